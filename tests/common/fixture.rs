//! Fixtures shared by the server tests. The server serves real [`Volume`]s: here over an in-memory
//! [`SlowBackend`] (from `backend::testing`, feature `test-utils`) with a random key, so the tests
//! exercise the same disk semantics production does.
//!
//! The protocol fixture: a read-write 4096-sector export `disk0`, a read-only 512-sector export
//! `ro`, and `locked`, whose attach is refused with a reason.

use std::sync::Arc;
use std::time::Duration;

use super::raw::RawClient;
use super::TestServer;
use cryptnbd::backend::testing::{MemBackend, SlowBackend};
use cryptnbd::crypto::XtsKey;
use cryptnbd::server::{AttachError, ExportInfo, ExportProvider};
use cryptnbd::volume::{Volume, VolumeHeader};

pub const SIZE: u64 = 16 << 20;

/// An encrypted volume in memory, with handles to look at its storage.
pub struct TestVolume {
    pub volume: Arc<Volume>,
    pub backend: SlowBackend,
    pub description: String,
}

impl TestVolume {
    /// A fresh (all holes) volume of `size` bytes.
    pub fn new(size: u64, sector_size: u32) -> Self {
        Self::build(size, sector_size, false)
    }

    /// A fresh volume attached read-only.
    pub fn read_only(size: u64, sector_size: u32) -> Self {
        Self::build(size, sector_size, true)
    }

    fn build(size: u64, sector_size: u32, read_only: bool) -> Self {
        let backend = SlowBackend::new(MemBackend::new());
        let header = VolumeHeader::new(uuid::Uuid::new_v4(), size, sector_size);
        let key = XtsKey::generate();
        let created = Volume::create(backend.clone(), &header, &key).expect("create volume");
        let volume = if read_only {
            drop(created);
            Volume::with_key(Box::new(backend.clone()), header, &key, true).expect("attach")
        } else {
            created
        };
        Self {
            volume: Arc::new(volume),
            backend,
            description: "in-memory test volume".into(),
        }
    }

    pub fn with_description(mut self, d: &str) -> Self {
        self.description = d.into();
        self
    }

    /// `len` bytes at `offset`, read (and decrypted) through the volume.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.volume.read(offset, &mut buf).expect("read volume");
        buf
    }

    /// Writes `data` at `offset` through the volume.
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.volume
            .write(offset, &mut data.to_vec(), false)
            .expect("write volume");
    }

    /// How many times the storage was synced (FLUSH, FUA, shutdown).
    pub fn flush_count(&self) -> u64 {
        self.backend.sync_count()
    }

    /// Makes reads of the sector at volume offset `offset` take `delay` (and never count as
    /// cached, so the server hands them to another worker).
    pub fn set_slow_read(&self, offset: u64, delay: Duration) {
        let base = self.volume.header().data_offset();
        self.backend.set_slow_read(base + offset, delay);
    }
}

/// Why the fixture refuses an export (stands in for a key store's refusal).
#[derive(Debug)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

enum Entry {
    Ready(Arc<Volume>, String),
    Refused(String),
}

/// Serves a fixed list of volumes, plus names whose attach is refused with a reason.
#[derive(Default)]
pub struct TestProvider {
    entries: Vec<(String, Entry)>,
}

impl TestProvider {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, v: &TestVolume) -> Self {
        self.entries.push((
            name.into(),
            Entry::Ready(v.volume.clone(), v.description.clone()),
        ));
        self
    }

    pub fn with_refused(mut self, name: &str, reason: &str) -> Self {
        self.entries
            .push((name.into(), Entry::Refused(reason.into())));
        self
    }
}

impl ExportProvider for TestProvider {
    fn list(&self) -> Vec<ExportInfo> {
        self.entries
            .iter()
            .map(|(name, e)| ExportInfo {
                name: name.clone(),
                description: match e {
                    Entry::Ready(_, d) => d.clone(),
                    Entry::Refused(_) => format!("export {name} (cannot be attached)"),
                },
            })
            .collect()
    }

    fn attach(&self, name: &str) -> Result<Arc<Volume>, AttachError> {
        match self.entries.iter().find(|(n, _)| n == name) {
            Some((_, Entry::Ready(v, _))) => Ok(v.clone()),
            Some((_, Entry::Refused(reason))) => Err(AttachError::Refused {
                name: name.into(),
                source: Box::new(Refusal(reason.clone())),
            }),
            None => Err(AttachError::NotFound(name.into())),
        }
    }

    /// The fixture's refusal reasons are written for clients: they are shown whole.
    fn refusal_message(&self, e: &AttachError) -> String {
        cryptnbd::server::error_chain(e)
    }

    fn description(&self, name: &str, volume: &Volume) -> String {
        match self.entries.iter().find(|(n, _)| n == name) {
            Some((_, Entry::Ready(_, d))) => d.clone(),
            _ => volume.header().describe(),
        }
    }
}

pub fn provider() -> (TestVolume, TestVolume, Arc<TestProvider>) {
    let rw = TestVolume::new(SIZE, 4096).with_description("test disk zero");
    let ro = TestVolume::read_only(SIZE, 512);
    let p = TestProvider::new()
        .with("disk0", &rw)
        .with("ro", &ro)
        .with_refused("locked", "CMK alias/locked is disabled (state 3)");
    (rw, ro, Arc::new(p))
}

pub fn server() -> (TestServer, TestVolume, TestVolume) {
    let (rw, ro, p) = provider();
    (TestServer::start(p), rw, ro)
}

pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A client that keeps working after a malformed request, proving only that request failed.
pub fn assert_still_works(c: &mut RawClient) {
    let data = pattern(4096, 9);
    assert_eq!(c.write(900, 0, &data, 0).error(), 0);
    assert_eq!(c.read(901, 0, 4096).unwrap(), data);
}
