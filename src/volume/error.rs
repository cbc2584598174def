//! The volume layer's one error type. Which errno an NBD reply carries for each is the server's
//! business (`crate::server::errno_for`): this layer knows nothing of NBD.

use std::fmt;
use std::io;

/// The operation an error happened in (a caller may answer an out-of-range read and write
/// differently: NBD asks for EINVAL and ENOSPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
    Create,
    Open,
    UpdateHeader,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write-zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block status",
            Op::Create => "create",
            Op::Open => "open",
            Op::UpdateHeader => "header update",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// The request reaches past the end of the volume (or its offset+length overflows).
    #[error("{op} of {len} bytes at offset {offset} is outside the volume ({size} bytes)")]
    OutOfRange {
        op: Op,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("{op} refused: the volume is attached read-only")]
    ReadOnly { op: Op },

    /// An I/O error of the backing storage; `what` says what was done ("writing 4096 bytes at
    /// volume offset 0"). The OS error is its source.
    #[error("{what} of {target}")]
    Io {
        what: String,
        target: String,
        #[source]
        cause: io::Error,
    },

    #[error("{target} is not a cryptnbd volume (no volume header magic in either header copy)")]
    NotAVolume { target: String },

    #[error("the volume header of {target} is corrupt in both copies (primary: {primary}; backup: {backup}); refusing to guess")]
    CorruptHeader {
        target: String,
        primary: String,
        backup: String,
    },

    #[error("the volume header of {target} has format version {version}, which this cryptnbd does not know (it reads versions 1 to {supported}); use a newer cryptnbd")]
    UnsupportedVersion {
        target: String,
        version: u32,
        supported: u32,
    },

    #[error("the volume header of {target} names cipher {cipher:?} with tweak {tweak:?}; only aes-256-xts/plain64 is supported")]
    UnsupportedCipher {
        target: String,
        cipher: String,
        tweak: String,
    },

    #[error(
        "the volume header of {target} sets unknown feature flags {flags:#x}; use a newer cryptnbd"
    )]
    UnsupportedFlags { target: String, flags: u32 },

    #[error(
        "{target} is truncated: it is {len} bytes long but its header needs at least {needed}"
    )]
    Truncated {
        target: String,
        len: u64,
        needed: u64,
    },

    /// An earlier sync of this volume failed: data acknowledged before it may not be on disk,
    /// and Linux reports such an error to one `fdatasync` only, so it is remembered (sticky)
    /// until the volume is detached and attached again.
    #[error("{target}: an earlier write-back failed ({first}); acknowledged writes may be lost, so every flush and write fails until the volume is detached and attached again")]
    WriteBackFailed { target: String, first: String },

    /// A child layer's parent is not the layer its header names (another volume or layer, another
    /// size or sector size): reading through it would return another disk's data.
    #[error("{target}: its parent layer {parent:?} does not match: {reason}")]
    ParentMismatch {
        target: String,
        parent: String,
        reason: String,
    },

    /// Bad creation parameters or header fields (size, sector size, oversized metadata).
    #[error("invalid volume parameters: {0}")]
    Invalid(String),
}

impl VolumeError {
    pub(crate) fn io(what: impl Into<String>, target: &str, cause: io::Error) -> Self {
        VolumeError::Io {
            what: what.into(),
            target: target.to_string(),
            cause,
        }
    }

    /// The OS error behind an I/O failure, if that is what this is.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            VolumeError::Io { cause, .. } => Some(cause),
            _ => None,
        }
    }
}
