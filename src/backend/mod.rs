//! The storage under a volume: a narrow positional trait ([`Backend`]) and its file implementation
//! ([`FileBackend`]: pread/pwrite, `fallocate(PUNCH_HOLE)`, `lseek(SEEK_DATA/SEEK_HOLE)`,
//! `fdatasync`). Backends move opaque bytes: they never see plaintext, tweaks or keys.
//!
//! Reads of a file can also be lent straight from a read-only mapping of it
//! ([`Backend::with_mapped`]; `mapped` owns the mapping and its SIGBUS guard, `lend` when to map),
//! so a reader can decrypt from the page cache into its reply buffer without a copy first; and
//! writes can be lent a writable mapping ([`Backend::with_mapped_write`]), so a writer encrypts
//! its plaintext straight into the page cache instead of encrypting in place and `pwrite`-ing.
//!
//! [`rbd`] puts volumes on Ceph RBD images (feature `rbd`). `testing` (feature `test-utils`, and
//! this crate's unit tests) holds the memory, slow, faulty, crashing, piecewise and async
//! backends the tests use. This trait is the one place a new store plugs in.

mod file;
mod lend;
// mmap/munmap/mincore and the SIGBUS handler.
#[allow(unsafe_code)]
pub mod mapped;
pub mod rbd;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

use std::io;
use std::sync::atomic::AtomicU8;

pub use file::{FileBackend, MAPPED_MIN, MAPPED_WRITE_MIN};

/// What [`Backend::submit_write`] and [`Backend::submit_read`] call once: the buffer back, and
/// the result.
pub type IoDone = Box<dyn FnOnce(Vec<u8>, io::Result<()>) + Send>;

/// Positional byte storage. All methods take `&self`: a backend is shared by concurrent requests,
/// so implementations must be safe to call from many threads at once.
// `len` is a fallible storage query, not a collection length: `is_empty` would mean nothing here.
#[allow(clippy::len_without_is_empty)]
pub trait Backend: Send + Sync {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Fills `buf` from `offset`. Bytes past the end read as zeroes (sparse/short files).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Fills `buf` from `offset` only if that needs no wait for the device (the data is cached):
    /// `Ok(true)` when done, `Ok(false)` when it would have to wait (then `buf` holds nothing
    /// useful and the caller uses [`Backend::read_at`]). Lets a server run cached reads inline
    /// and hand slow ones to another thread. The default never tries.
    fn try_read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Lends `[offset, offset+len)` to `f`, read-only and without copying, when the storage can
    /// (a mapped file whose pages are all in memory). `Ok(true)`: `f` ran on the stored bytes.
    /// `Ok(false)`: nothing lent, or `f` ran but a fault meanwhile (a file truncated under us,
    /// an I/O error) made what it saw untrustworthy: discard its result and use
    /// [`Backend::read_at`], which reports the real error. With `nowait`, lends only if touching
    /// the bytes can never wait for a device (memory file systems). The bytes may change while
    /// lent (concurrent writes): `f` must not assume two loads of a byte agree. The default
    /// never lends.
    fn with_mapped(
        &self,
        _offset: u64,
        _len: usize,
        _nowait: bool,
        _f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<bool> {
        Ok(false)
    }

    /// Lends `[offset, offset+len)` (inside the current length) to `f` for storing, without a
    /// copy, when the storage can do so cheaply and safely (a file mapped writable, on a memory
    /// file system or where the pages are in memory, so a store never reads the device first).
    /// `f` must store every byte of what it is given; the bytes are shared memory (other
    /// writers, the storage itself), hence `&[AtomicU8]`. `Ok(true)`: the bytes are in the
    /// storage as after [`Backend::write_at`] (a later [`Backend::sync`] covers them).
    /// `Ok(false)`: not lent, or `f` ran but a fault meanwhile (out of space, an I/O error, a
    /// file truncated under us) may have sent its stores elsewhere: the range holds anything,
    /// write it with [`Backend::write_at`], which reports the real error. The default never
    /// lends.
    fn with_mapped_write(
        &self,
        _offset: u64,
        _len: usize,
        _f: &mut dyn FnMut(&[AtomicU8]),
    ) -> io::Result<bool> {
        Ok(false)
    }

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;

    /// Deallocates `[offset, offset+len)` without changing the length; the range then reads as
    /// zeroes. `ErrorKind::Unsupported` when the storage cannot punch holes.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Truncates or extends (sparsely) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// The first offset `>= offset` that holds data, or `None` if only holes follow (SEEK_DATA).
    /// A backend without hole tracking may report everything as data.
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>>;

    /// The first offset `>= offset` that starts a hole; the end of the storage counts as one
    /// (SEEK_HOLE).
    fn seek_hole(&self, offset: u64) -> io::Result<u64>;

    /// Whether a write waits for a device or the network before it completes (RBD), instead of
    /// landing in a cache (files). Servers then never run writes on the thread that reads the
    /// next request.
    fn writes_wait(&self) -> bool {
        false
    }

    /// Whether [`Backend::submit_write`] and [`Backend::submit_read`] return before the request
    /// completes (RBD's aio), so a server can go on reading requests while they are in flight.
    fn submits_async(&self) -> bool {
        false
    }

    /// Writes all of `buf` at `offset` (inside the current length) and calls `done` with the
    /// buffer and the result once the write has completed, as [`Backend::write_at`] would have
    /// returned it. The backend owns `buf` until then. With [`Backend::submits_async`], `done`
    /// may run on another (the storage's completion) thread; by default the write runs here.
    fn submit_write(&self, buf: Vec<u8>, offset: u64, done: IoDone) {
        let r = self.write_at(&buf, offset);
        done(buf, r);
    }

    /// Fills all of `buf` from `offset` (as [`Backend::read_at`]) and calls `done` with it once
    /// the read has completed; like [`Backend::submit_write`], possibly on another thread.
    fn submit_read(&self, mut buf: Vec<u8>, offset: u64, done: IoDone) {
        let r = self.read_at(&mut buf, offset);
        done(buf, r);
    }

    /// Whether [`Backend::punch_hole`] is expected to work (used to answer "is zeroing fast").
    fn can_punch(&self) -> bool {
        true
    }

    /// Hints that `[offset, offset+len)` will be read soon (posix_fadvise WILLNEED).
    fn will_need(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// What the storage is, for error messages (a path, or "memory").
    fn describe(&self) -> String;
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        (**self).try_read_at_nowait(buf, offset)
    }
    fn with_mapped(
        &self,
        offset: u64,
        len: usize,
        nowait: bool,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<bool> {
        (**self).with_mapped(offset, len, nowait, f)
    }
    fn with_mapped_write(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[AtomicU8]),
    ) -> io::Result<bool> {
        (**self).with_mapped_write(offset, len, f)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        (**self).seek_data(offset)
    }
    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        (**self).seek_hole(offset)
    }
    fn can_punch(&self) -> bool {
        (**self).can_punch()
    }
    fn writes_wait(&self) -> bool {
        (**self).writes_wait()
    }
    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).will_need(offset, len)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}
