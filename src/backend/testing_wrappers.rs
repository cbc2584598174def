//! The test backends that wrap a [`MemBackend`] and change one thing about it: [`FaultyBackend`]
//! (a disk that fills up, a sync that fails once), [`SlowBackend`] (one slow spot, counts syncs),
//! [`PiecewiseBackend`] (writes land 16 bytes at a time) and [`AsyncBackend`] (writes complete
//! on other threads). Apart from `testing`, which holds the backends that keep their own bytes
//! (`MemBackend`, `CrashBackend`), because these hold none: each forwards to its inner
//! `MemBackend` and only adds a delay, a fault or a race.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::MemBackend;
use crate::backend::{Backend, IoDone};

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
    fn submit_write(&self, buf: Vec<u8>, offset: u64, done: IoDone) {
        let (inner, delay) = (self.inner.clone(), self.delay);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let r = inner.write_at(&buf, offset);
            done(buf, r);
        });
    }
    fn submit_read(&self, mut buf: Vec<u8>, offset: u64, done: IoDone) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
