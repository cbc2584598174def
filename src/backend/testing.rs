//! Backends for tests (unit and integration): [`MemBackend`] (a `Vec<u8>`), [`SlowBackend`] (a
//! memory disk with one slow spot that also counts syncs), [`FaultyBackend`] (a full disk after a
//! byte budget, a sync that fails once), [`CrashBackend`] (loses every write not yet synced when
//! it "crashes", optionally tearing them) and [`PiecewiseBackend`] (lands writes 16 bytes at a
//! time, for read/write races). Each is a cheap handle: clones share the same storage, so a test can
//! keep one while a volume owns another. A `Volume` over these is the test double of the server
//! (there is no second implementation of disk semantics to drift from the real one).
//!
//! Compiled only for tests: in this crate's unit tests, and with the `test-utils` feature, which
//! the integration tests enable through a dev-dependency on the crate itself.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use super::Backend;

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

/// A [`MemBackend`] on a "disk" that fills up: writes succeed until `budget` bytes have been
/// written, then every write that does not fit fails with ENOSPC and changes nothing. Hole
/// punching (which frees space) can be disabled to force the encrypted-zeroes path.
#[derive(Clone)]
pub struct FaultyBackend {
    inner: MemBackend,
    budget: Arc<AtomicU64>,
    can_punch: bool,
    /// The next sync fails with EIO (a lost write-back), once.
    fail_sync: Arc<AtomicBool>,
}

impl FaultyBackend {
    pub fn new(inner: MemBackend, budget: u64) -> Self {
        Self {
            inner,
            budget: Arc::new(AtomicU64::new(budget)),
            can_punch: true,
            fail_sync: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Makes the next [`Backend::sync`] fail with EIO, as `fdatasync` does once after the kernel
    /// failed to write back dirty pages (later syncs succeed again, as on Linux).
    pub fn fail_next_sync(&self) {
        self.fail_sync.store(true, Ordering::SeqCst);
    }

    pub fn without_punch(mut self) -> Self {
        self.can_punch = false;
        self
    }

    /// Sets how many more bytes may be written.
    pub fn set_budget(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::SeqCst);
    }

    pub fn inner(&self) -> &MemBackend {
        &self.inner
    }
}

impl Backend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = buf.len() as u64;
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(n))
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))?;
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        if self.fail_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_punch {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "hole punching disabled",
            ));
        }
        self.inner.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.seek_data(offset)
    }
    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.seek_hole(offset)
    }
    fn can_punch(&self) -> bool {
        self.can_punch
    }
    fn describe(&self) -> String {
        "faulty memory".to_string()
    }
}

/// A [`MemBackend`] where reads touching one chosen byte take a while (and are never "cached",
/// so a server hands them to another thread), and which counts syncs. For tests of out-of-order
/// replies, of shutdown with requests in flight, and of FLUSH reaching the storage.
#[derive(Clone, Default)]
pub struct SlowBackend {
    inner: MemBackend,
    /// Storage offset of the slow byte (`u64::MAX`: none) and the delay in milliseconds.
    slow_offset: Arc<AtomicU64>,
    slow_ms: Arc<AtomicU64>,
    syncs: Arc<AtomicU64>,
}

impl SlowBackend {
    pub fn new(inner: MemBackend) -> Self {
        Self {
            inner,
            slow_offset: Arc::new(AtomicU64::new(u64::MAX)),
            ..Self::default()
        }
    }

    /// Makes every read whose range holds storage offset `offset` take `delay`.
    pub fn set_slow_read(&self, offset: u64, delay: Duration) {
        self.slow_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        self.slow_offset.store(offset, Ordering::SeqCst);
    }

    /// How many times [`Backend::sync`] ran.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    pub fn inner(&self) -> &MemBackend {
        &self.inner
    }

    fn is_slow(&self, buf: &[u8], offset: u64) -> bool {
        let slow = self.slow_offset.load(Ordering::SeqCst);
        offset <= slow && slow - offset < buf.len() as u64
    }
}

impl Backend for SlowBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.is_slow(buf, offset) {
            std::thread::sleep(Duration::from_millis(self.slow_ms.load(Ordering::SeqCst)));
        }
        self.inner.read_at(buf, offset)
    }
    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if self.is_slow(buf, offset) {
            return Ok(false);
        }
        self.inner.try_read_at_nowait(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.seek_data(offset)
    }
    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.seek_hole(offset)
    }
    fn describe(&self) -> String {
        "slow memory".to_string()
    }
}

/// A [`MemBackend`] whose writes land 16 bytes at a time, letting other threads run between the
/// pieces: what a read racing a `pwrite` may see of the page cache, made likely. Reads see each
/// piece as it lands.
#[derive(Clone, Default)]
pub struct PiecewiseBackend {
    inner: MemBackend,
}

impl PiecewiseBackend {
    pub fn new(inner: MemBackend) -> Self {
        Self { inner }
    }
}

impl Backend for PiecewiseBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (i, piece) in buf.chunks(16).enumerate() {
            self.inner.write_at(piece, offset + (i * 16) as u64)?;
            std::thread::yield_now();
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.seek_data(offset)
    }
    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.seek_hole(offset)
    }
    fn describe(&self) -> String {
        "piecewise memory".to_string()
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
    fn faulty_backend_fails_with_enospc_and_writes_nothing() {
        let b = FaultyBackend::new(MemBackend::new(), 10);
        b.write_at(&[1; 8], 0).unwrap();
        let e = b.write_at(&[2; 8], 8).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(b.inner().snapshot(), vec![1; 8]);
    }

    #[test]
    fn slow_backend_delays_one_spot_and_counts_syncs() {
        let b = SlowBackend::new(MemBackend::new());
        b.write_at(&[5; 64], 0).unwrap();
        b.set_slow_read(40, Duration::from_millis(1));
        let mut buf = [0u8; 16];
        assert!(b.try_read_at_nowait(&mut buf, 0).unwrap());
        assert!(!b.try_read_at_nowait(&mut buf, 32).unwrap());
        b.read_at(&mut buf, 32).unwrap();
        assert_eq!(buf, [5; 16]);
        assert_eq!(b.sync_count(), 0);
        b.sync().unwrap();
        assert_eq!(b.sync_count(), 1);
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

/// A [`MemBackend`] that submits writes asynchronously: each lands on its own thread after a
/// short delay and completes there, the way RBD's aio completes on a librbd thread. Optionally
/// its sync fails (a failed write-back).
#[derive(Clone)]
pub struct AsyncBackend {
    inner: MemBackend,
    fail_sync: bool,
    delay: Duration,
}

impl AsyncBackend {
    pub fn new(inner: MemBackend) -> Self {
        Self {
            inner,
            fail_sync: false,
            delay: Duration::from_millis(2),
        }
    }

    /// Every sync fails with EIO.
    pub fn failing_sync(inner: MemBackend) -> Self {
        Self {
            fail_sync: true,
            ..Self::new(inner)
        }
    }

    /// Completions come this much after submission.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

impl Backend for AsyncBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        if self.fail_sync {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.seek_data(offset)
    }
    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.seek_hole(offset)
    }
    fn writes_wait(&self) -> bool {
        true
    }
    fn submits_async(&self) -> bool {
        true
    }
    fn submit_write(&self, buf: Vec<u8>, offset: u64, done: super::IoDone) {
        let (inner, delay) = (self.inner.clone(), self.delay);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let r = inner.write_at(&buf, offset);
            done(buf, r);
        });
    }
    fn submit_read(&self, mut buf: Vec<u8>, offset: u64, done: super::IoDone) {
        let (inner, delay) = (self.inner.clone(), self.delay);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let r = inner.read_at(&mut buf, offset);
            done(buf, r);
        });
    }
    fn describe(&self) -> String {
        "async memory".into()
    }
}
