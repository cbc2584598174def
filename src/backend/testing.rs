//! Backends for tests (unit and integration): [`MemBackend`] (a `Vec<u8>`) and [`CrashBackend`]
//! (loses every write not yet synced when it "crashes", optionally tearing them), the two that
//! keep their own bytes; and, wrapping a `MemBackend` (in `testing_wrappers.rs`, re-exported
//! here), [`SlowBackend`] (one slow spot, counts syncs), [`FaultyBackend`] (a full disk after a
//! byte budget, a sync that fails once), [`PiecewiseBackend`] (lands writes 16 bytes at a time,
//! for read/write races) and [`AsyncBackend`] (completes writes on other threads, as RBD's aio
//! does). Each is a cheap handle: clones share the same storage, so a test can keep one while a
//! volume owns another. A `Volume` over these is the test double of the server (there is no
//! second implementation of disk semantics to drift from the real one).
//!
//! Compiled only for tests: in this crate's unit tests, and with the `test-utils` feature, which
//! the integration tests enable through a dev-dependency on the crate itself.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::Backend;

// The backends that wrap a `MemBackend` to add delays, faults or races: their own file, declared
// here so the paths `backend::testing::*` stay as they were.
#[path = "testing_wrappers.rs"]
mod wrappers;
pub use wrappers::{AsyncBackend, FaultyBackend, PiecewiseBackend, SlowBackend};

/// Granularity at which [`MemBackend`] reports holes: an all-zero block counts as a hole, like a
/// file system that never allocated it.
const MEM_BLOCK: u64 = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_from(data: &[u8], buf: &mut [u8], offset: u64) {
    buf.fill(0);
    if offset < data.len() as u64 {
        let start = offset as usize;
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
    }
}

fn write_into(data: &mut Vec<u8>, buf: &[u8], offset: u64) -> io::Result<()> {
    let end = offset
        .checked_add(buf.len() as u64)
        .and_then(|e| usize::try_from(e).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(buf);
    Ok(())
}

fn punch_in(data: &mut [u8], offset: u64, len: u64) {
    let start = (offset.min(data.len() as u64)) as usize;
    let end = (offset.saturating_add(len).min(data.len() as u64)) as usize;
    data[start..end].fill(0);
}

fn block_is_zero(data: &[u8], block: u64) -> bool {
    let s = (block * MEM_BLOCK) as usize;
    let e = (s + MEM_BLOCK as usize).min(data.len());
    data[s..e].iter().all(|&b| b == 0)
}

fn seek_data_in(data: &[u8], offset: u64) -> Option<u64> {
    let len = data.len() as u64;
    let mut block = offset / MEM_BLOCK;
    while block * MEM_BLOCK < len {
        if !block_is_zero(data, block) {
            return Some((block * MEM_BLOCK).max(offset));
        }
        block += 1;
    }
    None
}

fn seek_hole_in(data: &[u8], offset: u64) -> u64 {
    let len = data.len() as u64;
    let mut block = offset / MEM_BLOCK;
    while block * MEM_BLOCK < len {
        if block_is_zero(data, block) {
            return (block * MEM_BLOCK).max(offset);
        }
        block += 1;
    }
    len.max(offset)
}

fn set_len_in(data: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    data.resize(len, 0);
    Ok(())
}

/// A volume on a `Vec<u8>`. All-zero 4 KiB blocks are reported as holes.
#[derive(Clone, Default)]
pub struct MemBackend {
    data: Arc<RwLock<Vec<u8>>>,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: Arc::new(RwLock::new(bytes)),
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Overwrites bytes directly (to corrupt a header in a test).
    pub fn poke(&self, offset: usize, bytes: &[u8]) {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        write_into(&mut d, bytes, offset as u64).expect("poke within memory");
    }
}

impl Backend for MemBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_from(
            &self.data.read().unwrap_or_else(|p| p.into_inner()),
            buf,
            offset,
        );
        Ok(())
    }
    /// Memory never waits for a device: every read is "cached".
    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_into(
            &mut self.data.write().unwrap_or_else(|p| p.into_inner()),
            buf,
            offset,
        )
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        punch_in(
            &mut self.data.write().unwrap_or_else(|p| p.into_inner()),
            offset,
            len,
        );
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        set_len_in(
            &mut self.data.write().unwrap_or_else(|p| p.into_inner()),
            len,
        )
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(seek_data_in(
            &self.data.read().unwrap_or_else(|p| p.into_inner()),
            offset,
        ))
    }
    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        Ok(seek_hole_in(
            &self.data.read().unwrap_or_else(|p| p.into_inner()),
            offset,
        ))
    }
    fn describe(&self) -> String {
        "memory".to_string()
    }
}

/// How un-synced writes fare in a [`CrashBackend`] crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every write since the last sync is lost.
    DropUnsynced,
    /// Every write since the last sync is torn: only its first half reached the disk.
    TearUnsynced,
}

#[derive(Default)]
struct CrashState {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// Writes since the last sync, in order (for tearing).
    pending: Vec<(u64, Vec<u8>)>,
    pending_len: Option<u64>,
    /// Mutating operations (write, sync, set_len, punch) left before the power fails.
    ops_left: Option<u64>,
    crashed: bool,
}

/// Memory storage that models a volatile write cache: writes are visible at once but survive a
/// crash only after [`Backend::sync`]. [`CrashBackend::fail_after`] makes the power fail after
/// N more mutating operations (every later call fails); [`CrashBackend::after_crash`] returns the
/// disk as it is found after reboot.
#[derive(Clone, Default)]
pub struct CrashBackend {
    state: Arc<Mutex<CrashState>>,
}

impl CrashBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from `bytes`, all of them durable.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let s = CrashState {
            current: bytes.clone(),
            durable: bytes,
            ..Default::default()
        };
        Self {
            state: Arc::new(Mutex::new(s)),
        }
    }

    /// The power fails after `ops` more mutating operations.
    pub fn fail_after(&self, ops: u64) {
        lock(&self.state).ops_left = Some(ops);
    }

    /// Whether the simulated power failure has happened.
    pub fn crashed(&self) -> bool {
        lock(&self.state).crashed
    }

    /// The disk content after a crash now, as a fresh [`MemBackend`].
    pub fn after_crash(&self, mode: CrashMode) -> MemBackend {
        let s = lock(&self.state);
        let mut disk = s.durable.clone();
        if mode == CrashMode::TearUnsynced {
            if let Some(l) = s.pending_len {
                let _ = set_len_in(&mut disk, l);
            }
            for (off, data) in &s.pending {
                let _ = write_into(&mut disk, &data[..data.len() / 2], *off);
            }
        }
        MemBackend::from_bytes(disk)
    }

    fn mutate(&self) -> io::Result<MutexGuard<'_, CrashState>> {
        let mut s = lock(&self.state);
        if s.crashed {
            return Err(io::Error::other("simulated power failure"));
        }
        if let Some(n) = s.ops_left {
            if n == 0 {
                s.crashed = true;
                return Err(io::Error::other("simulated power failure"));
            }
            s.ops_left = Some(n - 1);
        }
        Ok(s)
    }
}

impl Backend for CrashBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.state).current.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = lock(&self.state);
        if s.crashed {
            return Err(io::Error::other("simulated power failure"));
        }
        read_from(&s.current, buf, offset);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.mutate()?;
        write_into(&mut s.current, buf, offset)?;
        s.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut s = self.mutate()?;
        s.durable = s.current.clone();
        s.pending.clear();
        s.pending_len = None;
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = self.mutate()?;
        punch_in(&mut s.current, offset, len);
        let n = len.min((s.current.len() as u64).saturating_sub(offset)) as usize;
        s.pending.push((offset, vec![0; n]));
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.mutate()?;
        set_len_in(&mut s.current, len)?;
        s.pending_len = Some(len);
        Ok(())
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(seek_data_in(&lock(&self.state).current, offset))
    }
    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        Ok(seek_hole_in(&lock(&self.state).current, offset))
    }
    fn describe(&self) -> String {
        "crashing memory".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_backend_keeps_only_synced_writes() {
        let b = CrashBackend::new();
        b.write_at(&[1; 8], 0).unwrap();
        b.sync().unwrap();
        b.write_at(&[2; 8], 0).unwrap();
        assert_eq!(
            b.after_crash(CrashMode::DropUnsynced).snapshot(),
            vec![1; 8]
        );
        assert_eq!(
            b.after_crash(CrashMode::TearUnsynced).snapshot(),
            [2, 2, 2, 2, 1, 1, 1, 1]
        );
        b.fail_after(1);
        b.sync().unwrap();
        assert!(b.write_at(&[3; 8], 0).is_err());
        assert!(b.crashed());
        assert_eq!(
            b.after_crash(CrashMode::DropUnsynced).snapshot(),
            vec![2; 8]
        );
    }

    #[test]
    fn mem_backend_reports_zero_blocks_as_holes() {
        let b = MemBackend::new();
        b.set_len(5 * MEM_BLOCK).unwrap();
        b.write_at(&[9], 2 * MEM_BLOCK + 5).unwrap();
        assert_eq!(b.seek_data(0).unwrap(), Some(2 * MEM_BLOCK));
        assert_eq!(b.seek_hole(2 * MEM_BLOCK).unwrap(), 3 * MEM_BLOCK);
        assert_eq!(b.seek_data(3 * MEM_BLOCK).unwrap(), None);
        assert_eq!(b.seek_hole(5 * MEM_BLOCK).unwrap(), 5 * MEM_BLOCK);
    }
}
