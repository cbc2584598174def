//! What the server serves: the [`Export`] trait (one attached disk, all `&self`, shared by every
//! connection to it) and the [`ExportProvider`] that lists and attaches exports by name. The server
//! knows nothing else about storage, so it is tested against [`super::mem::MemExport`].

use std::sync::Arc;

// The server speaks the volume's own read/extent types: one definition, no conversions.
pub use crate::volume::{Extent, ReadOutcome};

/// An I/O error to report to the client: a POSIX errno (as NBD numbers them) and a message for a
/// human that names what was done to what (never data or keys).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    pub errno: u32,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

/// One attached disk. Offsets and lengths are already checked against [`Export::size`] by the
/// server; implementations may still refuse them. Unaligned I/O is the export's business (the
/// encrypted volume does read-modify-write).
pub trait Export: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> String;
    fn size(&self) -> u64;
    /// The smallest unit the export stores (512 or 4096): advertised as the minimum block size.
    fn sector_size(&self) -> u32;
    fn is_read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadOutcome, ExportError>;
    /// [`Export::read`] if it can be done without waiting for a device (cached data), else
    /// `None`: the session then lets another worker read the next request meanwhile.
    fn try_read_cached(
        &self,
        _offset: u64,
        _buf: &mut [u8],
    ) -> Option<Result<ReadOutcome, ExportError>> {
        None
    }
    /// Whether a write waits for storage round trips (network block storage): then even small
    /// writes run on a follower, so one connection's writes overlap.
    fn writes_wait(&self) -> bool {
        false
    }
    /// Writes `data` at `offset`. `data` is scratch: the export may transform it in place
    /// (encrypt) to avoid a copy.
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), ExportError>;
    /// Makes every completed write durable (on every connection: they share this export).
    fn flush(&self) -> Result<(), ExportError>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), ExportError>;
    /// Whether zeroing is faster than writing zeroes (NBD_CMD_FLAG_FAST_ZERO).
    fn zeroing_is_fast(&self, may_punch: bool) -> bool;
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// Allocation status from `offset`, covering at least one byte of `[offset, offset+len)`.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError>;
}

/// Why an export could not be attached; the message goes to the client and the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("no export named {0:?}")]
    NotFound(String),
    /// The export exists but cannot be served (disabled key, corrupt header...).
    #[error("export {name:?} cannot be attached: {reason}")]
    Refused { name: String, reason: String },
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
    fn attach(&self, name: &str) -> Result<Arc<dyn Export>, AttachError>;
}
