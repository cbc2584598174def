//! Who may talk to the server, decided per listener and per connection: the TLS mode of a
//! listener, Unix peer credentials (SO_PEERCRED, SO_PEERGROUPS) against `--allow-uid`/`--allow-gid`,
//! socket file permissions for sockets outside the data directory, and what one connection has
//! proved (its `Peer`), from which `policy` derives the exports it may use.
//!
//! A refused Unix peer is not simply hung up on: it gets the NBD greeting and an
//! NBD_REP_ERR_POLICY reply naming the reason to every option, so `nbdinfo` and qemu print
//! something a human understands, and it never reaches an export.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use super::access::ExportAccess;
use super::policy::{Peer, Policy};

/// Whether a listener offers or requires TLS (STARTTLS during option haggling). The certificate
/// files come from the server's [`Policy`], so a reload changes them for every listener at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: STARTTLS is answered with NBD_REP_ERR_UNSUP.
    #[default]
    Off,
    /// STARTTLS is accepted, but clients may also go on without it.
    Optional,
    /// Every option but STARTTLS gets NBD_REP_ERR_TLS_REQD until TLS is up.
    Required,
}

impl TlsMode {
    pub fn is_required(&self) -> bool {
        matches!(self, TlsMode::Required)
    }
}

/// Which local users may connect to a Unix socket. Empty lists mean anyone who can open the
/// socket file (its permissions decide). The server's own user is always let in: it can read
/// the data directory anyway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixPeerPolicy {
    pub allow_uids: Vec<u32>,
    /// Matched against the peer's primary group (SO_PEERCRED) and its supplementary groups
    /// (SO_PEERGROUPS), as they were when it connected.
    pub allow_gids: Vec<u32>,
}

/// A Unix peer's credentials, as the kernel reported them at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (empty when the kernel could not report them).
    pub groups: Vec<u32>,
}

/// Most supplementary groups a peer can have (NGROUPS_MAX on Linux).
const MAX_GROUPS: usize = 65536;

/// The supplementary groups of the process that connected to Unix socket `sock`, as the kernel
/// recorded them at connect time (SO_PEERGROUPS, Linux 4.13+).
// getsockopt(2) through libc: neither std nor nix wraps SO_PEERGROUPS.
#[allow(unsafe_code)]
pub(crate) fn peer_groups(sock: &impl AsRawFd) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `groups`, which has that many, and
        // updates `len`; the descriptor is a socket we own for the duration of the call.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // ERANGE: `len` now says how much room the list needs.
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() || n > MAX_GROUPS {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

impl UnixPeerPolicy {
    pub fn is_open(&self) -> bool {
        self.allow_uids.is_empty() && self.allow_gids.is_empty()
    }

    /// `Err(reason)` when this peer must not get any export.
    pub(crate) fn check(&self, cred: Option<PeerCred>, own_uid: u32) -> Result<(), String> {
        if self.is_open() {
            return Ok(());
        }
        let Some(c) = cred else {
            return Err("the peer's credentials could not be read".into());
        };
        if c.uid == own_uid
            || self.allow_uids.contains(&c.uid)
            || self.allow_gids.contains(&c.gid)
            || c.groups.iter().any(|g| self.allow_gids.contains(g))
        {
            return Ok(());
        }
        Err(format!(
            "uid {} (gid {}) is not allowed on this socket (--allow-uid/--allow-gid)",
            c.uid, c.gid
        ))
    }
}

/// Why socket permissions could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("no group named {0:?}")]
    UnknownGroup(String),
    #[error("cannot look up group {name:?}")]
    GroupLookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot set {what} of socket {path}")]
    Apply {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A group given by name or number.
pub fn resolve_group(name: &str) -> Result<u32, PeerError> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(PeerError::UnknownGroup(name.to_string())),
        Err(source) => Err(PeerError::GroupLookup {
            name: name.to_string(),
            source,
        }),
    }
}

/// Applies `--socket-mode` and `--socket-group` to a bound socket file. A new socket file is
/// created with the umask (0755 usually: only its owner may connect), so widening happens here,
/// before any client is accepted.
pub fn set_socket_permissions(
    path: &Path,
    mode: Option<u32>,
    gid: Option<u32>,
) -> Result<(), PeerError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |what| {
        move |source| PeerError::Apply {
            what,
            path: path.display().to_string(),
            source,
        }
    };
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(err("the group"))?;
    }
    if let Some(m) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m & 0o777))
            .map_err(err("the mode"))?;
    }
    Ok(())
}

/// What one connection may do, fixed by its listener and peer and updated by STARTTLS.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    pub tls: TlsMode,
    /// The settings in force (rules and TLS files).
    pub policy: Arc<Policy>,
    /// Set when the peer was refused: every option gets this as an NBD_REP_ERR_POLICY message.
    pub refused: Option<String>,
    /// What the client proved.
    pub peer: Peer,
    /// Who the client is for the connection limits: its certificate names after TLS, else its
    /// Unix uid or TCP address. `authenticated` when it is a certificate or a uid (then it may
    /// replace its own oldest connection at a limit); an address is shared behind NAT.
    pub identity: Option<String>,
    pub authenticated: bool,
}

impl Access {
    pub(crate) fn new(tls: TlsMode, policy: Arc<Policy>, refused: Option<String>) -> Self {
        Self {
            tls,
            policy,
            refused,
            peer: Peer::default(),
            identity: None,
            authenticated: false,
        }
    }

    /// The exports this client may list and open under the settings in force now.
    pub(crate) fn exports(&self) -> ExportAccess {
        self.policy.current().exports_for(&self.peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_policy_lets_listed_users_and_the_owner_in() {
        let p = UnixPeerPolicy {
            allow_uids: vec![1000],
            allow_gids: vec![50],
        };
        let c = |uid, gid| {
            Some(PeerCred {
                uid,
                gid,
                pid: Some(1),
                groups: vec![],
            })
        };
        assert!(p.check(c(1000, 1), 0).is_ok());
        assert!(p.check(c(7, 50), 0).is_ok());
        let supplementary = Some(PeerCred {
            groups: vec![3, 50],
            ..c(7, 7).unwrap()
        });
        assert!(p.check(supplementary, 0).is_ok(), "a supplementary group");
        assert!(p.check(c(0, 0), 0).is_ok(), "the server's own uid");
        let e = p.check(c(65534, 65534), 0).unwrap_err();
        assert!(e.contains("uid 65534"), "{e}");
        assert!(p.check(None, 0).is_err());
        assert!(UnixPeerPolicy::default().check(None, 0).is_ok());
    }

    #[test]
    fn peer_groups_are_this_process_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut got = peer_groups(&a).unwrap();
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        want.dedup();
        got.dedup();
        assert_eq!(got, want);
    }

    #[test]
    fn groups_resolve_by_number_and_name() {
        assert_eq!(resolve_group("42").unwrap(), 42);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(matches!(
            resolve_group("no-such-group-xyz"),
            Err(PeerError::UnknownGroup(_))
        ));
    }
}
