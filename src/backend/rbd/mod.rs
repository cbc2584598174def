//! Ceph RBD images as volume storage: where an image is ([`RbdLocation`], always compiled so a data
//! directory can name RBD volumes even in a build without Ceph) and, with the `rbd` feature, the
//! [`RbdBackend`] that reads and writes it through librbd's asynchronous API and enforces the
//! gateways' single-writer rule with RBD's exclusive lock.
//!
//! Who may open an image ([`Access`]):
//! - a writer (and by default a reader too) takes the exclusive lock and keeps it. While the holder
//!   is alive (its client still watches the image) every other gateway is refused, naming the
//!   holder. Once the holder is gone (killed, or cut off long enough for its watch to expire) the
//!   next gateway breaks the lock; librbd blocklists the old holder first, so a half-dead gateway
//!   can never write after the takeover.
//! - [`Access::ReadShared`] (only when the user asks for it) opens read-only without the lock, so
//!   several gateways can export one image read-only.

use std::fmt;
use std::path::PathBuf;

#[cfg(feature = "rbd")]
mod backend;
// The only place RBD code may use `unsafe`: the librbd/librados FFI, each block with a SAFETY note.
#[cfg(feature = "rbd")]
#[allow(unsafe_code)]
mod ffi;

// Whole RADOS objects for the key store; `unsafe` fenced the same way, SAFETY notes inside.
#[cfg(feature = "rbd")]
#[allow(unsafe_code)]
mod rados_obj;
#[cfg(feature = "rbd")]
mod snapshots;

#[cfg(not(feature = "rbd"))]
mod disabled;

#[cfg(feature = "rbd")]
pub use backend::{create_image, remove_image, RbdBackend};
#[cfg(not(feature = "rbd"))]
pub use disabled::{
    clone_image, create_image, create_snapshot_online, list_snapshots, remove_image,
    remove_snapshot, RbdBackend,
};
#[cfg(feature = "rbd")]
pub use rados_obj::{RadosPool, Watch};
#[cfg(feature = "rbd")]
pub use snapshots::{clone_image, create_snapshot_online, list_snapshots, remove_snapshot};

/// Whether this build can open RBD images (the `rbd` cargo feature).
pub const SUPPORTED: bool = cfg!(feature = "rbd");

/// Where an RBD image lives and how to reach its cluster. Unset fields mean what they mean to the
/// Ceph tools: the config from `$CEPH_CONF` or `/etc/ceph/ceph.conf`, the id `admin`, the keyring
/// named in the config; `$CEPH_ARGS` applies too.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RbdLocation {
    pub pool: String,
    pub image: String,
    /// Recorded beside the pool and image (flattened: the reference's format is unchanged).
    #[serde(flatten)]
    pub ceph: CephClient,
}

/// How a Ceph client reaches its cluster, recorded with every RBD volume reference and in a RADOS
/// key store's marker. Unset fields mean what they mean to the Ceph tools: the config from
/// `$CEPH_CONF` or `/etc/ceph/ceph.conf`, the id `admin`, the keyring named in the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CephClient {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_conf: Option<PathBuf>,
    /// The cephx user without the `client.` prefix, as `rbd --id` takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
}

impl fmt::Display for RbdLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}/{}", self.pool, self.image)
    }
}

/// Checks a pool or image name the way the `rbd` tool would accept it in `POOL/IMAGE`: no `/`,
/// `@` (snapshots) or control characters, 1 to 250 bytes.
pub fn check_rbd_name(what: &'static str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 250 {
        return Err(format!("the {what} name must have 1 to 250 characters"));
    }
    if s.chars().any(|c| c == '/' || c == '@' || c.is_control()) {
        return Err(format!(
            "the {what} name {s:?} must not contain '/', '@' or control characters"
        ));
    }
    Ok(())
}

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSnapshot {
    pub name: String,
    /// The image's size when the snapshot was taken.
    pub size: u64,
}

/// An image cloned from a snapshot (or a snapshot a clone was made from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdLink {
    pub pool: String,
    pub image: String,
    /// The snapshot of `image` (for a parent; empty for a child).
    pub snapshot: String,
    /// In RBD's trash: a removed child image, or a removed parent snapshot still kept for its
    /// clones.
    pub trash: bool,
}

/// How a gateway (or a command) opens an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-write, holding the exclusive lock.
    Write,
    /// Read-only, but still holding the exclusive lock: no other gateway writes meanwhile.
    ReadExclusive,
    /// Read-only without the lock: several gateways may do this at once (the user said so).
    ReadShared,
}

impl Access {
    pub fn read_only(self) -> bool {
        !matches!(self, Access::Write)
    }
}

/// Errors of the RBD backend, each naming the image (the cluster's error is the source).
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("this cryptnbd was built without Ceph RBD support (cargo feature `rbd`), so it cannot open {location}")]
    NotBuilt { location: String },

    #[error("cannot connect to the Ceph cluster for {location} (config {conf}, client.{id})")]
    Connect {
        location: String,
        conf: String,
        id: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot open pool {pool:?} for {location}")]
    Pool {
        location: String,
        pool: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot {action} {location}")]
    Image {
        location: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// Another live client holds the exclusive lock.
    #[error("{location} is in use: its exclusive lock is held by {owner} ({addr}), which is alive: another gateway serves it (it can take over once that one is gone)")]
    LockHeld {
        location: String,
        owner: String,
        addr: String,
    },
}

impl RbdError {
    /// Whether the image is busy (locked by a live gateway, or still open somewhere).
    pub fn is_busy(&self) -> bool {
        match self {
            RbdError::LockHeld { .. } => true,
            RbdError::Image { source, .. } => source.raw_os_error() == Some(libc::EBUSY),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_display() {
        assert!(check_rbd_name("pool", "rbd").is_ok());
        assert!(check_rbd_name("image", "vm-1.disk_0").is_ok());
        for bad in ["", "a/b", "img@snap", "x\n", &"y".repeat(251)] {
            assert!(check_rbd_name("image", bad).is_err(), "{bad:?}");
        }
        let l = RbdLocation {
            pool: "rbd".into(),
            image: "vm1".into(),
            ceph: CephClient::default(),
        };
        assert_eq!(l.to_string(), "rbd:rbd/vm1");
        let j = serde_json::to_string(&l).unwrap();
        assert_eq!(j, r#"{"pool":"rbd","image":"vm1"}"#);
        assert_eq!(serde_json::from_str::<RbdLocation>(&j).unwrap(), l);
    }
}
