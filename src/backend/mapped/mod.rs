//! Shared mappings of a backing file — read-only ones lent out for zero-copy reads, writable ones
//! lent out for zero-copy writes — without ever turning storage trouble into a crash. This is the
//! one module that owns the mappings and their `unsafe`: `mmap`/`munmap`/`mincore`, and (in
//! [`sigbus`]) the SIGBUS guard.
//!
//! Why lend bytes at all: a file read is otherwise `pread` (page cache → buffer) then decrypt in
//! place, two passes over the data before the socket write; decrypting straight from the page
//! cache into the reply buffer makes decryption replace the copy.
//!
//! A mapping is never trusted after a fault: touching a page past the (truncated) end of the
//! file or one that cannot be read raises SIGBUS, which the guard absorbs by counting the fault
//! on the mapping and mapping a zero page over the faulting one. [`Mapping::read_with`] reports
//! the fault, the caller reads with `pread` instead (which returns the real error, or zeroes past
//! the end), and the owner retires the mapping.
//!
//! Soundness of lending `&[u8]`: the bytes under it can change while it is lent — our own
//! `pwrite`s and hole punches from other threads, other processes writing the file, the guard's
//! zero page. None of these is a Rust write: they happen outside the Rust abstract machine (in
//! the kernel, in another process, by replacing the page), like shared memory with another
//! process, so no Rust code holds a `&mut` that aliases the slice. What a borrower must not
//! assume is that two loads of one byte agree: it may read each byte more than once, but must
//! treat what it reads as a snapshot per load (the volume's reader checks zero blocks before and
//! after decrypting, see `volume::mapped`). The crypto kernels read their source through raw
//! pointers once per block; a `&[UnsafeCell<u8>]` would say this more precisely, but the XTS
//! engine takes `&[u8]`, and raw pointers here would only move the same contract one call down.
//!
//! Writes go the other way through a *second*, writable mapping of the same file
//! ([`Mapping::new_writable`], [`Mapping::write_with`]): the writer encrypts its plaintext
//! straight into the page cache, so encryption replaces `pwrite`'s copy and its per-page lookups.
//! Why a second mapping rather than one read-write mapping for both directions, and why it is
//! lent as `&[AtomicU8]`:
//! - Our own stores are Rust-side stores, unlike the kernel's `pwrite` or another process. Were
//!   they made through the mapping that lends `&[u8]` to readers, they would be writes, in the
//!   abstract machine, to memory another thread holds a shared reference to — exactly what
//!   `&[u8]` promises cannot happen. Through a separate mapping they are writes to a different
//!   allocation: the abstract machine cannot see that both mappings show the same page-cache
//!   pages, and the bytes reach the readers' mapping the way `pwrite`'s and other processes'
//!   bytes do, from outside it. The reader's contract above stays what it was. (Moving the
//!   readers to raw pointers or `&[UnsafeCell<u8>]` would also be needed had we chosen one
//!   mapping; with two it is not.) The read mapping also stays `PROT_READ`, so no bug can store
//!   through it.
//! - Writers among themselves: two NBD writes of one range may run at once (NBD leaves the result
//!   unspecified, but it must not be undefined). So the writable mapping is never a `&mut [u8]`
//!   nor a `&[u8]`: it is lent as `&[AtomicU8]`, shared memory whose every byte may be stored by
//!   several threads. The only writer, `Xts::encrypt_sectors_to_shared`, stores into it from
//!   inside the AES-NI kernels' inline assembly (byte-wise single-copy atomic on x86: any mix of
//!   the racing writers' bytes, never a torn byte) or, on the portable engine, by relaxed atomic
//!   byte stores.
//! - The cost of two mappings: a page touched by both is faulted into each (minor faults, the
//!   page is already cached) and the guard holds two slots per file.
//!
//! A store faults on storage trouble as a load does (and more often: on a file system out of
//! space, the fault that fills a hole fails). The guard maps a writable throw-away page over the
//! faulting one, so the store completes there; `write_with` reports `Faulted`, the caller writes
//! the range again with `pwrite` (from its plaintext, which it still holds) and so gets the real
//! error (ENOSPC, EIO) or, after a truncation, extends the file as `pwrite` always did.

mod sigbus;

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

pub use sigbus::faults_handled;

/// What happened to a lent range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// The closure saw the file's bytes.
    Clean,
    /// A fault happened in this mapping while (or before) the closure ran: what it saw may be
    /// zero pages instead of data. Discard its result, read otherwise, and retire the mapping.
    Faulted,
    /// The range is not inside the mapping (or the mapping is not writable, for a write).
    OutOfRange,
}

/// A `MAP_SHARED` mapping of the first `len` bytes of a file, read-only (lent for reads) or
/// read-write (lent for writes), registered with the SIGBUS guard for its whole life.
#[derive(Debug)]
pub struct Mapping {
    base: *const u8,
    len: usize,
    slot: usize,
    writable: bool,
    /// One bit per page: `mincore` found it resident and no hole was punched there since (see
    /// [`Mapping::resident`]). Empty for files too large to keep it for.
    known: Box<[AtomicU64]>,
}

/// Pages asked about at once when the memo misses (1 MiB of 4 KiB pages).
const WINDOW_PAGES: usize = 256;

/// Largest page memo kept (bytes): 8 MiB of bits covers a 256 GiB file of 4 KiB pages.
const MAX_MEMO: usize = 8 << 20;

// SAFETY: the mapping is memory owned by this value; it is read through `read_with` (a
// read-only mapping), written only as `&[AtomicU8]` through `write_with` (a writable one), and
// unmapped in `Drop`, which needs `&mut`. Both are fine from several threads at once.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` read-only, shared. Fails on a zero length, on a
    /// length that does not fit the address space, or when the guard cannot be installed or has
    /// no free slot — callers then read with `pread`.
    pub fn new(file: &File, len: u64) -> io::Result<Mapping> {
        Self::map(file, len, false)
    }

    /// Maps the first `len` bytes of `file` read-write, shared, for [`Mapping::write_with`]
    /// (the file must be open for writing). Fails as [`Mapping::new`] does.
    pub fn new_writable(file: &File, len: u64) -> io::Result<Mapping> {
        Self::map(file, len, true)
    }

    fn map(file: &File, len: u64, writable: bool) -> io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l > 0 && l <= isize::MAX as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "cannot map this length"))?;
        sigbus::install()?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no MAP_FIXED), of a file
        // descriptor we own; nothing else in the process is affected. No MAP_POPULATE: on tmpfs,
        // touching a hole through a mapping allocates it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let Some(slot) = sigbus::register(p as usize, len, writable) else {
            // SAFETY: unmapping what we just mapped; nothing has seen it.
            unsafe { libc::munmap(p, len) };
            return Err(io::Error::other(
                "too many mapped files (SIGBUS guard slots)",
            ));
        };
        let words = len.div_ceil(sigbus::page_size()).div_ceil(64);
        let words = if words * 8 <= MAX_MEMO { words } else { 0 };
        Ok(Mapping {
            base: p.cast_const().cast(),
            len,
            slot,
            writable,
            known: (0..words).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Faults absorbed in this mapping; any at all means it must not be used again.
    pub fn faults(&self) -> u64 {
        sigbus::faults_in(self.slot)
    }

    fn range(&self, offset: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        (off.checked_add(len)? <= self.len).then_some(off)
    }

    /// Whether every page of `[offset, offset+len)` is in memory (`mincore`), so touching it
    /// neither waits for the device nor, on tmpfs, allocates a hole. Only a hint: a page can be
    /// evicted (or punched, or truncated away) right after; the guard and the fault count cover
    /// what follows. Pages once found resident are remembered, so repeated reads of them make no
    /// system call; the owner calls [`Mapping::forget`] for the holes it punches. What the memo
    /// can miss — a page evicted by memory pressure, a hole punched by another process — costs
    /// a fault that waits for the device (in the slow path: lending with "no wait" happens only
    /// on memory file systems, which do not evict) or, on tmpfs, a zero page allocated in the
    /// hole: correct data either way.
    pub fn resident(&self, offset: u64, len: usize) -> bool {
        let Some(off) = self.range(offset, len) else {
            return false;
        };
        if len == 0 {
            return true;
        }
        let page = sigbus::page_size();
        let (p0, p1) = (off / page, (off + len - 1) / page);
        if self.memo(p0, p1, Memo::Check) {
            return true;
        }
        // The range itself first, stopping at the first miss: a read of a hole costs one small
        // `mincore`, as before the memo.
        if !self.query(p0, p1, false) {
            return false;
        }
        if !self.known.is_empty() {
            self.memo(p0, p1, Memo::Set);
            // Then learn the aligned window around it: random reads make one more `mincore` per
            // window, instead of one per read.
            let pages = self.len.div_ceil(page);
            let w0 = p0 / WINDOW_PAGES * WINDOW_PAGES;
            let w1 = ((p1 / WINDOW_PAGES + 1) * WINDOW_PAGES).min(pages) - 1;
            if (w0, w1) != (p0, p1) {
                self.query(w0, w1, true);
            }
        }
        true
    }

    /// `mincore` of pages `p0..=p1`: whether all are resident; with `note`, each resident one is
    /// set in the memo (and the whole range is asked about even after a miss).
    fn query(&self, p0: usize, p1: usize, note: bool) -> bool {
        let page = sigbus::page_size();
        let mut vec = [0u8; 512];
        let mut all = true;
        let mut p = p0;
        while p <= p1 {
            let n = (p1 - p + 1).min(vec.len());
            // SAFETY: pages `p..p+n` lie inside our mapping (`p1` is at most its last page; the
            // last page may extend past `len` inside the mapped page, which mincore accepts), and
            // `vec` has room for `n` entries.
            let rc = unsafe {
                libc::mincore(
                    self.base.add(p * page).cast_mut().cast::<c_void>(),
                    n * page,
                    vec.as_mut_ptr(),
                )
            };
            if rc != 0 {
                return false;
            }
            for (i, v) in vec[..n].iter().enumerate() {
                if v & 1 == 0 {
                    all = false;
                } else if note {
                    self.memo(p + i, p + i, Memo::Set);
                }
            }
            if !all && !note {
                return false;
            }
            p += n;
        }
        all
    }

    /// Forgets that the pages of `[offset, offset+len)` were resident (a hole was punched).
    pub fn forget(&self, offset: u64, len: u64) {
        let page = sigbus::page_size() as u64;
        if len == 0 || offset >= self.len as u64 {
            return;
        }
        let last = (offset.saturating_add(len - 1)).min(self.len as u64 - 1);
        self.memo(
            (offset / page) as usize,
            (last / page) as usize,
            Memo::Clear,
        );
    }

    /// Checks (all bits set?), sets or clears the memo bits of pages `p0..=p1`. Without a memo,
    /// a check is always false.
    fn memo(&self, p0: usize, p1: usize, op: Memo) -> bool {
        if self.known.is_empty() {
            return false;
        }
        let mut p = p0;
        while p <= p1 {
            let (w, bit) = (p / 64, p % 64);
            let n = (p1 - p + 1).min(64 - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let word = &self.known[w];
            match op {
                Memo::Check if word.load(Ordering::Relaxed) & mask != mask => return false,
                Memo::Check => {}
                Memo::Set => {
                    word.fetch_or(mask, Ordering::Relaxed);
                }
                Memo::Clear => {
                    word.fetch_and(!mask, Ordering::Relaxed);
                }
            }
            p += n;
        }
        true
    }

    /// Lends `[offset, offset+len)` to `f`. The result says whether `f` saw the file's bytes;
    /// after `Faulted` whatever `f` produced must be thrown away (see [`Touch`]).
    pub fn read_with(&self, offset: u64, len: usize, f: &mut dyn FnMut(&[u8])) -> Touch {
        let Some(off) = self.range(offset, len) else {
            return Touch::OutOfRange;
        };
        if self.faults() != 0 {
            return Touch::Faulted;
        }
        // SAFETY: `[off, off+len)` lies inside our live mapping (checked above), which stays
        // mapped while `&self` is borrowed. A fault on it is absorbed by the guard (the page
        // becomes zeroes and the fault is counted, checked below). For bytes changing under the
        // slice, see the module doc.
        let bytes = unsafe { std::slice::from_raw_parts(self.base.add(off), len) };
        f(bytes);
        // The handler runs on this thread, synchronously, before the faulting load completes;
        // another thread's fault poisons the mapping before its zero page exists, so a reader
        // that saw that page sees the count too.
        if self.faults() != 0 {
            Touch::Faulted
        } else {
            Touch::Clean
        }
    }

    /// Lends `[offset, offset+len)` of a writable mapping to `f` for storing (see the module doc
    /// for why as `&[AtomicU8]`). `Clean`: every store landed in the file's pages. `Faulted`: a
    /// fault happened in this mapping meanwhile (out of space, an I/O error, a truncated file),
    /// so some stores may have gone to a throw-away page: write the range otherwise (`pwrite`)
    /// and retire the mapping. `OutOfRange` also for a read-only mapping.
    pub fn write_with(&self, offset: u64, len: usize, f: &mut dyn FnMut(&[AtomicU8])) -> Touch {
        let Some(off) = self.range(offset, len).filter(|_| self.writable) else {
            return Touch::OutOfRange;
        };
        if self.faults() != 0 {
            return Touch::Faulted;
        }
        // SAFETY: `[off, off+len)` lies inside our live, writable mapping (checked above), which
        // stays mapped while `&self` is borrowed; `AtomicU8` has the size and alignment of `u8`,
        // and every Rust access to this mapping goes through such atomics (it is never lent as
        // `&[u8]` or `&mut [u8]`; readers use the other, read-only mapping: see the module doc).
        // A fault on a store is absorbed by the guard (a writable throw-away page takes it, and
        // the fault is counted, checked below).
        let bytes =
            unsafe { std::slice::from_raw_parts(self.base.add(off).cast::<AtomicU8>(), len) };
        f(bytes);
        // As in `read_with`: the count is raised before the throw-away page exists.
        if self.faults() != 0 {
            Touch::Faulted
        } else {
            Touch::Clean
        }
    }
}

#[derive(Clone, Copy)]
enum Memo {
    Check,
    Set,
    Clear,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        sigbus::unregister(self.slot);
        // SAFETY: our own mapping, no longer registered, and no borrow of it outlives `&self`.
        unsafe { libc::munmap(self.base.cast_mut().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file_with(dir: &std::path::Path, len: usize) -> File {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("f"))
            .unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all_at(&data, 0).unwrap();
        f
    }

    /// The guard: a file truncated under a live mapping raises SIGBUS on the next touch past the
    /// new end. The process survives, the fault is counted on that mapping (and only there), the
    /// faulting pages read as zeroes, and the mapping stays poisoned for every later reader.
    #[test]
    fn truncated_file_faults_are_absorbed_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_with(dir.path(), 64 << 10);
        let m = Mapping::new(&f, 64 << 10).unwrap();
        let other = Mapping::new(&f, 64 << 10).unwrap();
        let mut first = Vec::new();
        assert_eq!(
            m.read_with(0, 8192, &mut |b| first = b.to_vec()),
            Touch::Clean
        );
        assert_eq!(first[..4], [1, 2, 3, 4]);
        assert!(m.resident(0, 8192));

        let before = faults_handled();
        f.set_len(16 << 10).unwrap();
        let mut seen = Vec::new();
        let touch = m.read_with(16 << 10, 32 << 10, &mut |b| seen = b.to_vec());
        assert_eq!(touch, Touch::Faulted);
        assert!(m.faults() >= 1);
        assert!(faults_handled() > before);
        assert_eq!(other.faults(), 0, "only the faulting mapping is poisoned");
        assert!(
            seen.iter().all(|&x| x == 0),
            "pages past the end read as zeroes"
        );
        // Poisoned for good, even for a range that is still inside the file.
        assert_eq!(m.read_with(0, 4096, &mut |_| {}), Touch::Faulted);
        assert_eq!(m.read_with(60 << 10, 8192, &mut |_| {}), Touch::OutOfRange);
        drop(m);
        // A slot freed by a dropped mapping is reused clean.
        let again = Mapping::new(&f, 16 << 10).unwrap();
        assert_eq!(again.faults(), 0);
        assert_eq!(again.read_with(0, 4096, &mut |_| {}), Touch::Clean);
    }

    /// The page memo: ranges across word boundaries are known only once every page in them is,
    /// and forgetting part of a range (a punched hole) unknows just those pages; a `resident`
    /// query remembers every resident page of its window, so neighbours need no system call.
    #[test]
    fn page_memo_tracks_ranges_across_words() {
        let dir = tempfile::tempdir().unwrap();
        let page = sigbus::page_size();
        let f = file_with(dir.path(), 300 * page);
        let m = Mapping::new(&f, (300 * page) as u64).unwrap();
        assert!(!m.memo(60, 130, Memo::Check));
        m.memo(60, 130, Memo::Set);
        assert!(m.memo(60, 130, Memo::Check));
        assert!(m.memo(64, 127, Memo::Check));
        assert!(!m.memo(59, 61, Memo::Check));
        assert!(!m.memo(130, 131, Memo::Check));
        m.forget((100 * page) as u64 + 1, 1);
        assert!(!m.memo(60, 130, Memo::Check));
        assert!(m.memo(60, 99, Memo::Check) && m.memo(101, 130, Memo::Check));
        m.forget(0, u64::MAX);
        assert!(!m.memo(101, 101, Memo::Check));
        // Freshly written pages are resident; asking about one page learns its whole window.
        assert!(m.resident((3 * page) as u64, 10));
        assert!(m.memo(0, WINDOW_PAGES - 1, Memo::Check));
        assert!(!m.memo(WINDOW_PAGES, WINDOW_PAGES, Memo::Check));
        assert!(m.resident((299 * page) as u64, page));
        assert!(m.memo(WINDOW_PAGES, 299, Memo::Check));
    }

    /// The guard for stores: a file truncated under a live writable mapping makes the next store
    /// past the new end raise SIGBUS. The process survives, the store completes on a writable
    /// throw-away page (it does not fault again forever), the fault is counted on that mapping
    /// only, the file is neither extended nor changed by the lost stores, and the mapping stays
    /// poisoned. Stores before the fault landed in the file; a read-only mapping lends nothing
    /// for writing.
    #[test]
    fn write_faults_are_absorbed_on_a_writable_page() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_with(dir.path(), 64 << 10);
        let w = Mapping::new_writable(&f, 64 << 10).unwrap();
        let r = Mapping::new(&f, 64 << 10).unwrap();
        assert_eq!(r.write_with(0, 4096, &mut |_| {}), Touch::OutOfRange);
        let store = |w: &Mapping, off: u64, len: usize, v: u8| {
            w.write_with(off, len, &mut |d| {
                for b in d {
                    b.store(v, Ordering::Relaxed);
                }
            })
        };
        assert_eq!(store(&w, 4096, 8192, 0xab), Touch::Clean);
        let mut back = vec![0u8; 8192];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&x| x == 0xab), "stores land in the file");
        let mut seen = Vec::new();
        assert_eq!(
            r.read_with(4096, 8192, &mut |b| seen = b.to_vec()),
            Touch::Clean
        );
        assert_eq!(seen, back, "the read mapping shows the same pages");

        let before = faults_handled();
        f.set_len(16 << 10).unwrap();
        assert_eq!(store(&w, 12 << 10, 40 << 10, 0xcd), Touch::Faulted);
        assert!(w.faults() >= 1 && faults_handled() > before);
        assert_eq!(r.faults(), 0, "only the faulting mapping is poisoned");
        assert_eq!(f.metadata().unwrap().len(), 16 << 10, "not extended");
        let mut head = vec![0u8; 4096];
        f.read_exact_at(&mut head, 12 << 10).unwrap();
        assert!(
            head.iter().all(|&x| x == 0xcd),
            "stores before the end landed"
        );
        assert_eq!(store(&w, 0, 4096, 1), Touch::Faulted, "poisoned for good");
        let mut first = vec![0u8; 4096];
        f.read_exact_at(&mut first, 0).unwrap();
        assert_eq!(first[..3], [1, 2, 3], "a poisoned mapping stores nothing");
    }

    #[test]
    fn zero_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_with(dir.path(), 0);
        assert!(Mapping::new(&f, 0).is_err());
    }
}
