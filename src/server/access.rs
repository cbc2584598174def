//! `--allow` rules: who (a typed principal) may list and open which exports, and the principals
//! a connection proves: the names its client certificate vouches for after TLS, and for a Unix
//! peer its uid and groups (SO_PEERCRED, SO_PEERGROUPS).
//!
//! Types keep one kind of name from standing in for another: `cn:host-a` matches only a subject
//! common name, `dns:` a DNS SAN (case-insensitively), `ip:` an IP SAN, `uri:` a URI SAN (SPIFFE
//! IDs are URIs), `email:` an e-mail SAN, `uid:`/`gid:` a local Unix peer (name or number). An
//! untyped name keeps its old meaning: any certificate name (CN or SAN) equal to it.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A name a rule gives exports to, or one a connection has proved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// Untyped (rules only): any certificate CN or SAN with this text.
    Any(String),
    Cn(String),
    Dns(String),
    Ip(IpAddr),
    Uri(String),
    Email(String),
    Uid(u32),
    Gid(u32),
}

/// Why a rule could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    #[error("--allow {0:?}: expected CLIENT=EXPORT[,EXPORT...] (CLIENT: NAME, cn:, dns:, ip:, uri:, email:, uid: or gid:)")]
    Syntax(String),
    #[error("--allow {rule:?}: {why}")]
    Name { rule: String, why: String },
}

impl Principal {
    /// Whether a rule naming `self` covers the proved principal `p`.
    pub fn covers(&self, p: &Principal) -> bool {
        use Principal::*;
        match (self, p) {
            (Any(a), Cn(b) | Dns(b) | Uri(b) | Email(b)) => a == b,
            (Any(a), Ip(b)) => a.parse::<IpAddr>().is_ok_and(|a| a == *b),
            (Cn(a), Cn(b)) | (Uri(a), Uri(b)) | (Email(a), Email(b)) => a == b,
            (Dns(a), Dns(b)) => a.eq_ignore_ascii_case(b),
            (Ip(a), Ip(b)) => a == b,
            (Uid(a), Uid(b)) | (Gid(a), Gid(b)) => a == b,
            _ => false,
        }
    }

    /// Whether only a client certificate can prove this principal.
    pub fn is_certificate_name(&self) -> bool {
        !matches!(self, Principal::Uid(_) | Principal::Gid(_))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Any(s) => write!(f, "{s}"),
            Principal::Cn(s) => write!(f, "cn:{s}"),
            Principal::Dns(s) => write!(f, "dns:{s}"),
            Principal::Ip(a) => write!(f, "ip:{a}"),
            Principal::Uri(s) => write!(f, "uri:{s}"),
            Principal::Email(s) => write!(f, "email:{s}"),
            Principal::Uid(u) => write!(f, "uid:{u}"),
            Principal::Gid(g) => write!(f, "gid:{g}"),
        }
    }
}

/// A user by name or number.
fn resolve_user(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("no user named {name:?}")),
        Err(e) => Err(format!("cannot look up user {name:?}: {e}")),
    }
}

impl FromStr for Principal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty name".into());
        }
        let typed = |t: &str| s.strip_prefix(t).map(str::trim);
        let nonempty = |v: &str, what: &str| {
            if v.is_empty() {
                Err(format!("{what} is empty"))
            } else {
                Ok(v.to_string())
            }
        };
        Ok(if let Some(v) = typed("cn:") {
            Principal::Cn(nonempty(v, "the common name")?)
        } else if let Some(v) = typed("dns:") {
            Principal::Dns(nonempty(v, "the DNS name")?)
        } else if let Some(v) = typed("ip:") {
            Principal::Ip(
                v.parse()
                    .map_err(|_| format!("{v:?} is not an IP address"))?,
            )
        } else if let Some(v) = typed("uri:") {
            Principal::Uri(nonempty(v, "the URI")?)
        } else if let Some(v) = typed("email:") {
            Principal::Email(nonempty(v, "the e-mail address")?)
        } else if let Some(v) = typed("uid:") {
            Principal::Uid(resolve_user(v)?)
        } else if let Some(v) = typed("gid:") {
            Principal::Gid(super::peer::resolve_group(v).map_err(|e| e.to_string())?)
        } else {
            Principal::Any(s.to_string())
        })
    }
}

/// One `CLIENT=EXPORT[,EXPORT]`; the export `*` stands for every export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub client: Principal,
    pub exports: Vec<String>,
}

impl FromStr for AllowEntry {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, RuleError> {
        let bad = || RuleError::Syntax(s.to_string());
        // Split at the last '=': a URI (SPIFFE ID) may hold '=' in its query, export names not.
        let (client, exports) = s.rsplit_once('=').ok_or_else(bad)?;
        let exports: Vec<String> = exports
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect();
        if client.trim().is_empty() || exports.is_empty() {
            return Err(bad());
        }
        let client = client.parse().map_err(|why| RuleError::Name {
            rule: s.to_string(),
            why,
        })?;
        Ok(Self { client, exports })
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.client, self.exports.join(","))
    }
}

/// Which exports one connection may list and open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportAccess {
    All,
    Only(BTreeSet<String>),
}

impl ExportAccess {
    pub fn permits(&self, export: &str) -> bool {
        match self {
            ExportAccess::All => true,
            ExportAccess::Only(s) => s.contains(export),
        }
    }
}

/// The `--allow` rules. Empty means no rule: who gets what is then decided by the listener
/// (see `policy`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowEntry>,
}

impl AllowList {
    pub fn new(entries: Vec<AllowEntry>) -> Self {
        Self { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[AllowEntry] {
        &self.entries
    }

    /// Whether some rule can only be met by a client certificate.
    pub fn names_certificates(&self) -> bool {
        self.entries.iter().any(|e| e.client.is_certificate_name())
    }

    /// What a client that proved `proved` may use: the union of the rules that cover one of its
    /// principals (nothing when none does).
    pub fn access_for(&self, proved: &[Principal]) -> ExportAccess {
        let mut set = BTreeSet::new();
        for e in self
            .entries
            .iter()
            .filter(|e| proved.iter().any(|p| e.client.covers(p)))
        {
            if e.exports.iter().any(|x| x == "*") {
                return ExportAccess::All;
            }
            set.extend(e.exports.iter().cloned());
        }
        ExportAccess::Only(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Principal {
        s.parse().unwrap()
    }

    #[test]
    fn entries_parse_typed_names_and_refuse_nonsense() {
        let e: AllowEntry = "host1=disk0, disk1".parse().unwrap();
        assert_eq!(e.client, Principal::Any("host1".into()));
        assert_eq!(e.exports, ["disk0", "disk1"]);
        assert_eq!(p("cn:a b"), Principal::Cn("a b".into()));
        assert_eq!(p("ip:10.0.0.1"), Principal::Ip("10.0.0.1".parse().unwrap()));
        assert_eq!(p("uid:0"), Principal::Uid(0));
        assert_eq!(p("uid:root"), Principal::Uid(0));
        assert_eq!(p("gid:root"), Principal::Gid(0));
        let spiffe: AllowEntry = "uri:spiffe://example.org/ns/a/sa/b=disk0".parse().unwrap();
        assert_eq!(
            spiffe.client,
            Principal::Uri("spiffe://example.org/ns/a/sa/b".into())
        );
        assert_eq!(
            spiffe.to_string(),
            "uri:spiffe://example.org/ns/a/sa/b=disk0"
        );
        for bad in ["host1", "=disk0", "host1=", "host1=,", "ip:nope=d", "cn:=d"] {
            assert!(bad.parse::<AllowEntry>().is_err(), "{bad}");
        }
        let e = "uid:no-such-user-xyz=d".parse::<AllowEntry>().unwrap_err();
        assert!(e.to_string().contains("no-such-user-xyz"), "{e}");
    }

    #[test]
    fn one_kind_of_name_never_stands_in_for_another() {
        assert!(p("cn:a").covers(&Principal::Cn("a".into())));
        assert!(!p("cn:a").covers(&Principal::Dns("a".into())));
        assert!(!p("dns:a").covers(&Principal::Cn("a".into())));
        assert!(p("dns:Host.Example").covers(&Principal::Dns("host.example".into())));
        assert!(!p("uri:a").covers(&Principal::Email("a".into())));
        assert!(!p("uid:5").covers(&Principal::Gid(5)));
        // Untyped: any certificate name, never a Unix peer.
        assert!(p("a").covers(&Principal::Dns("a".into())));
        assert!(p("10.0.0.1").covers(&Principal::Ip("10.0.0.1".parse().unwrap())));
        assert!(!p("5").covers(&Principal::Uid(5)));
    }

    #[test]
    fn access_is_the_union_of_matching_entries() {
        let l = AllowList::new(vec![
            "a=d0".parse().unwrap(),
            "dns:b.example=d1,d2".parse().unwrap(),
            "cn:root=*".parse().unwrap(),
            "gid:0=d3".parse().unwrap(),
        ]);
        let acc = l.access_for(&[
            Principal::Cn("x".into()),
            Principal::Cn("a".into()),
            Principal::Dns("b.example".into()),
        ]);
        assert!(acc.permits("d0") && acc.permits("d2") && !acc.permits("d3"));
        assert!(!l
            .access_for(&[Principal::Cn("nobody".into())])
            .permits("d0"));
        assert_eq!(
            l.access_for(&[Principal::Cn("root".into())]),
            ExportAccess::All
        );
        assert!(l
            .access_for(&[Principal::Uid(7), Principal::Gid(0)])
            .permits("d3"));
        assert!(!l.access_for(&[]).permits("d0"));
        assert!(l.names_certificates());
        let unix_only = AllowList::new(vec!["uid:0=*".parse().unwrap()]);
        assert!(!unix_only.names_certificates());
    }
}
