//! The storage seam as the server sees it: it serves [`Volume`]s directly (one shared
//! `Arc<Volume>` per export, so a FLUSH on one connection covers all), found by name through an
//! [`ExportProvider`]. Which volumes exist and how they are attached (data directory, key
//! provider) is decided above the server (see `crate::exports`); the server only turns a volume
//! error into the errno of an NBD reply, here, in [`errno_for`].

use std::sync::Arc;

use crate::nbd::{self, validate::out_of_range_errno};
use crate::volume::{Op, Volume, VolumeError};

/// Why an export could not be attached. The source stays typed (e.g. the data directory's error,
/// which in turn holds the key provider's refusal); the message a client sees is built once from
/// the whole chain, by the handshake.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    #[error("no export named {0:?}")]
    NotFound(String),
    /// The export exists but cannot be served (disabled key, corrupt header...).
    #[error("export {name:?} cannot be attached")]
    Refused {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Refused again within the provider's log interval: the same message for the client, but
    /// the provider has already logged this refusal (logged at debug level only).
    #[error("export {name:?} cannot be attached")]
    RefusedQuietly {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A name and a description for humans, as NBD_OPT_LIST shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// Lists and attaches exports. `attach` is called by every connection that selects an export;
/// a provider hands out one shared `Arc` per export so FLUSH covers all connections.
pub trait ExportProvider: Send + Sync {
    fn list(&self) -> Vec<ExportInfo>;
    /// The export used when a client asks for the empty name.
    fn default_export(&self) -> Option<String> {
        self.list().into_iter().next().map(|e| e.name)
    }
    /// Whether `name` is an export (without attaching it).
    fn exists(&self, name: &str) -> bool {
        self.list().iter().any(|e| e.name == name)
    }
    fn attach(&self, name: &str) -> Result<Arc<Volume>, AttachError>;
    /// What a client is told about a refused attach: what it needs to act (the key is disabled,
    /// the volume is in use), never a server path, a KMS URL or a key id; the server log has the
    /// whole chain. The default says only that the export cannot be attached.
    fn refusal_message(&self, e: &AttachError) -> String {
        e.to_string()
    }
    /// What NBD_INFO_DESCRIPTION says about the attached export `name`.
    fn description(&self, _name: &str, volume: &Volume) -> String {
        volume.header().describe()
    }
}

/// The errno an NBD reply carries for a volume error: the one mapping from volume errors to the
/// wire. Requests are validated first ([`nbd::validate::check`]), so range and read-only errors
/// only come from a volume that changed under the server; they still get the protocol's errno.
pub fn errno_for(e: &VolumeError) -> u32 {
    match e {
        VolumeError::OutOfRange { op, .. } => out_of_range_errno(match op {
            Op::Write => nbd::CMD_WRITE,
            Op::WriteZeroes => nbd::CMD_WRITE_ZEROES,
            _ => nbd::CMD_READ,
        }),
        VolumeError::ReadOnly { .. } => nbd::EPERM,
        VolumeError::Io { cause, .. } => match cause.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => nbd::ENOSPC,
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => nbd::EPERM,
            Some(libc::ENOMEM) => nbd::ENOMEM,
            Some(libc::EINVAL) => nbd::EINVAL,
            Some(libc::EOPNOTSUPP) => nbd::ENOTSUP,
            _ if cause.kind() == std::io::ErrorKind::Unsupported => nbd::ENOTSUP,
            _ => nbd::EIO,
        },
        VolumeError::Invalid(_) => nbd::EINVAL,
        _ => nbd::EIO,
    }
}

/// An error and its sources on one line, leaving out a source whose text the line already holds:
/// the message a client (or a log line) gets.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn io(errno: i32) -> VolumeError {
        VolumeError::Io {
            what: "writing".into(),
            target: "memory".into(),
            cause: io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn volume_errors_map_to_protocol_errnos() {
        let range = |op| VolumeError::OutOfRange {
            op,
            offset: 10,
            len: 10,
            size: 12,
        };
        assert_eq!(errno_for(&range(Op::Read)), nbd::EINVAL);
        assert_eq!(errno_for(&range(Op::Write)), nbd::ENOSPC);
        assert_eq!(errno_for(&range(Op::WriteZeroes)), nbd::ENOSPC);
        assert_eq!(errno_for(&range(Op::Trim)), nbd::EINVAL);
        assert_eq!(
            errno_for(&VolumeError::ReadOnly { op: Op::Trim }),
            nbd::EPERM
        );
        assert_eq!(errno_for(&io(libc::ENOSPC)), nbd::ENOSPC);
        assert_eq!(errno_for(&io(libc::EDQUOT)), nbd::ENOSPC);
        assert_eq!(errno_for(&io(libc::EROFS)), nbd::EPERM);
        assert_eq!(errno_for(&io(libc::EOPNOTSUPP)), nbd::ENOTSUP);
        assert_eq!(errno_for(&io(libc::EBADF)), nbd::EIO);
        assert_eq!(errno_for(&VolumeError::Invalid("x".into())), nbd::EINVAL);
    }

    #[test]
    fn chains_print_each_cause_once() {
        let e = AttachError::Refused {
            name: "v".into(),
            source: Box::new(io(libc::EIO)),
        };
        let line = error_chain(&e);
        assert!(line.starts_with("export \"v\" cannot be attached: writing of memory"));
        assert_eq!(line.matches("writing").count(), 1);
    }
}
