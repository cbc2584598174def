//! Who gets which export: the one rule every listener applies, and the reloadable set of settings
//! it reads (`--allow` rules and TLS files), swapped as a whole on reload.
//!
//! The rule (README "Who may attach"): with neither TLS nor `--allow` configured, every peer that
//! can connect gets every export (the listener's reach decides: an owner-only socket, or
//! `--insecure-no-tls`). Once either is configured, a peer gets only what it was given:
//! - a TLS client with a verified certificate: what the rules give its certificate names, or
//!   everything when there are no rules (the client CA vouched for it);
//! - a TLS client without a certificate (`--tls-no-client-auth`): everything without rules, else
//!   only rules that name its Unix uid/gid;
//! - a plaintext Unix peer: what `uid:`/`gid:` rules give it, and nothing else;
//! - a plaintext TCP peer: nothing (TLS listeners never get this far without TLS);
//! - the server's own user on a Unix socket: everything, as it can read the data directory and
//!   the server's credentials anyway.
//!
//! On reload every serving connection is checked against the new settings (its certificate
//! against the new CA and CRLs, its principals against the new rules); one that fails is shut for
//! reading, so requests in flight finish and reply, and the log names the connection and why.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use super::access::{AllowList, ExportAccess, Principal};
use super::tls::TlsConfig;
use crate::config::ConfigError;

/// One consistent set of access settings.
#[derive(Debug, Default)]
pub struct Rules {
    allow: AllowList,
    tls: Option<Arc<TlsConfig>>,
}

/// What a connection has proved about its client.
#[derive(Debug, Clone, Default)]
pub(crate) struct Peer {
    /// Unix uid and groups, then the certificate's names once TLS is up.
    pub principals: Vec<Principal>,
    /// A Unix peer running as the server's own user.
    pub own_user: bool,
    /// TLS is up on the connection.
    pub tls: bool,
    /// The client's certificate chain (leaf first), empty without one.
    pub cert_chain: Vec<CertificateDer<'static>>,
}

impl Peer {
    /// The names it proved, for log lines and messages ("cn:host-a, dns:a.example" or "uid:1000").
    pub(crate) fn label(&self) -> String {
        if self.principals.is_empty() {
            return "no identity".into();
        }
        let v: Vec<String> = self.principals.iter().map(|p| p.to_string()).collect();
        v.join(", ")
    }
}

impl Rules {
    /// Checks that the rules can be met: a rule naming a certificate needs client certificates.
    pub fn new(allow: AllowList, tls: Option<Arc<TlsConfig>>) -> Result<Self, ConfigError> {
        if allow.names_certificates() && !tls.as_ref().is_some_and(|t| t.requires_client_cert()) {
            let rule = allow
                .entries()
                .iter()
                .find(|e| e.client.is_certificate_name())
                .map(|e| e.to_string())
                .unwrap_or_default();
            return Err(ConfigError(format!(
                "--allow {rule} names a certificate, which needs TLS with client certificates \
                 (--tls-client-ca)"
            )));
        }
        Ok(Self { allow, tls })
    }

    pub fn tls(&self) -> Option<&Arc<TlsConfig>> {
        self.tls.as_ref()
    }

    pub fn allow(&self) -> &AllowList {
        &self.allow
    }

    /// Whether access is restricted at all (TLS or rules configured).
    pub fn restricted(&self) -> bool {
        self.tls.is_some() || !self.allow.is_empty()
    }

    /// The exports `p` may list and open under these settings.
    pub(crate) fn exports_for(&self, p: &Peer) -> ExportAccess {
        if p.own_user || !self.restricted() {
            return ExportAccess::All;
        }
        if self.allow.is_empty() && p.tls {
            return ExportAccess::All;
        }
        self.allow.access_for(&p.principals)
    }

    /// Why `p`, serving `export`, may no longer do so under these settings.
    pub(crate) fn recheck(&self, p: &Peer, export: &str) -> Result<(), String> {
        if p.tls {
            if let Some(t) = &self.tls {
                t.verify_client(&p.cert_chain)?;
            }
        }
        if self.exports_for(p).permits(export) {
            Ok(())
        } else {
            Err(format!(
                "no --allow rule gives {export:?} to {} any more",
                p.label()
            ))
        }
    }
}

/// The settings in force, replaced as a whole by [`Policy::replace`]; the server watches it and
/// re-checks serving connections on every change.
#[derive(Debug)]
pub struct Policy {
    tx: tokio::sync::watch::Sender<Arc<Rules>>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new(Rules::default())
    }
}

impl Policy {
    pub fn new(rules: Rules) -> Self {
        Self {
            tx: tokio::sync::watch::Sender::new(Arc::new(rules)),
        }
    }

    pub fn current(&self) -> Arc<Rules> {
        self.tx.borrow().clone()
    }

    /// Puts `rules` in force for new connections and has serving ones checked again. TLS cannot
    /// be switched on or off here (the listeners' modes were fixed at start).
    pub fn replace(&self, rules: Rules) -> Result<(), ConfigError> {
        if self.current().tls.is_some() != rules.tls.is_some() {
            return Err(ConfigError(
                "TLS cannot be turned on or off by a reload: restart the server".into(),
            ));
        }
        self.tx.send_replace(Arc::new(rules));
        Ok(())
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Rules>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(principals: &[&str], tls: bool) -> Peer {
        Peer {
            principals: principals
                .iter()
                .map(|s| match s.split_once(':') {
                    Some(("uid", u)) => Principal::Uid(u.parse().unwrap()),
                    Some(("gid", g)) => Principal::Gid(g.parse().unwrap()),
                    _ => Principal::Cn(s.to_string()),
                })
                .collect(),
            tls,
            ..Default::default()
        }
    }

    #[test]
    fn unrestricted_serves_everyone_and_rules_serve_only_the_named() {
        let open = Rules::default();
        assert_eq!(open.exports_for(&peer(&[], false)), ExportAccess::All);
        let unix = Rules::new(AllowList::new(vec!["uid:1000=d0".parse().unwrap()]), None).unwrap();
        assert!(unix.exports_for(&peer(&["uid:1000"], false)).permits("d0"));
        assert!(!unix.exports_for(&peer(&["uid:1000"], false)).permits("d1"));
        assert!(!unix.exports_for(&peer(&["uid:7"], false)).permits("d0"));
        assert!(
            !unix.exports_for(&peer(&[], false)).permits("d0"),
            "plain TCP"
        );
        let own = Peer {
            own_user: true,
            ..peer(&["uid:0"], false)
        };
        assert_eq!(unix.exports_for(&own), ExportAccess::All);
        assert!(unix.recheck(&peer(&["uid:1000"], false), "d0").is_ok());
        let e = unix.recheck(&peer(&["uid:7"], false), "d0").unwrap_err();
        assert!(e.contains("uid:7") && e.contains("d0"), "{e}");
    }

    #[test]
    fn certificate_rules_need_client_certificates() {
        let e = Rules::new(AllowList::new(vec!["host-a=d0".parse().unwrap()]), None).unwrap_err();
        assert!(e.0.contains("--tls-client-ca"), "{e}");
    }

    #[test]
    fn a_reload_cannot_switch_tls() {
        let p = Policy::default();
        p.replace(Rules::default()).unwrap();
        assert!(!p.current().restricted());
    }
}
