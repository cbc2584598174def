//! An open encrypted volume: a [`Backend`] holding a 1 MiB header region then the data area, an
//! AES-256-XTS engine keyed with the volume's DEK, and the geometry. Owns sector math,
//! read-modify-write of unaligned edges (under striped per-sector locks), read-only mode,
//! flush/FUA, trim and write-zeroes (hole punching), and block status. This file holds the read
//! and write paths; `allocation` holds trim, write-zeroes, block status and cache.
//!
//! A volume may be a child layer over a read-only parent (a snapshot or a clone's origin): its
//! never-written sectors are read from the parent chain (see `layer`). An online snapshot puts a
//! new top layer over an open volume while it is in use (see `stack`): every write, trim and
//! write-zeroes passes a gate the snapshot closes for the milliseconds it takes.
//!
//! It knows nothing of NBD or CMKs: the header carries the key metadata opaquely, and whoever
//! attaches the volume turns it into an [`XtsKey`] (see `crate::datadir`).
//!
//! Concurrency: non-overlapping writes never lose each other, even inside one encryption sector,
//! because partial-sector writes are read-modify-write under a striped lock. Whole-sector writes
//! take no lock; a whole-sector write racing a partial write of the same sector is an
//! overlapping write, whose outcome NBD leaves unspecified (as a disk does).
//!
//! An all-zero ciphertext sector means "never written or discarded" and reads as plaintext zeroes
//! (encrypting real data gives an all-zero sector with probability 2^-4096 or less). Zero-ness is
//! decided per 16-byte XTS block, so a read racing the first write of a sector (or a trim) sees
//! each byte's old or new value, never garbage (see `decrypt_read`).

mod allocation;
mod error;
mod geometry;
pub mod header;
mod layer;
mod mapped;
mod mapped_write;
mod stack;
mod submit;

use std::cell::RefCell;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use crossbeam_utils::sync::ShardedLock;

pub use allocation::Extent;
pub use error::{Op, VolumeError};
pub use header::{ParentRef, VolumeHeader};
pub use layer::merge_into_child;
pub use stack::{BackendRef, Quiesced};
pub use submit::{ReadDone, SubmitDone};

use crate::backend::Backend;
use crate::crypto::{Xts, XtsKey};
use geometry::{flagged, is_zero, rezero_blocks, span, starts_with_zero_block, zero_blocks};

/// Number of RMW lock stripes (a power of two); unrelated sectors rarely share one.
const LOCK_STRIPES: usize = 256;
/// Most sectors per flagging decryption of a `pread` buffer (a multiple of 64: whole flag
/// words on the stack); 1 MiB of 4096-byte sectors is one call.
const FLAG_RUN: usize = 256;

/// What a read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOutcome {
    /// Every sector read was a hole or an all-zero (discarded) sector.
    pub all_zero: bool,
}

/// An open volume; `Send + Sync`, shared as `Arc<Volume>` by every connection.
pub struct Volume {
    /// This layer's storage and the layer below it, replaced together by an online snapshot
    /// (see `stack`); everything else is fixed for the volume's life.
    top: ArcSwap<stack::Top>,
    /// Shared with the snapshot layers an online snapshot puts below (one DEK per volume).
    xts: Arc<Xts>,
    header: VolumeHeader,
    read_only: bool,
    target: String,
    locks: Vec<Mutex<()>>,
    /// The first failed sync, sticky: see [`Volume::flush`].
    writeback_error: OnceLock<String>,
    /// Held shared by every write, trim and write-zeroes while it runs, exclusively by an
    /// online snapshot: draining those in flight and holding new ones (see `stack`). Sharded:
    /// a writer touches its own shard's cache line, not one all connections share.
    gate: ShardedLock<()>,
}

// The server shares one `Arc<Volume>` between connections and threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Volume>();
};

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: only what identifies the volume.
        f.debug_struct("Volume")
            .field("target", &self.target)
            .field("volume_id", &self.header.volume_id)
            .field("size", &self.header.size)
            .field("sector_size", &self.header.sector_size)
            .field("read_only", &self.read_only)
            .field(
                "parent",
                &self.top().parent.as_ref().map(|p| p.target.clone()),
            )
            .finish_non_exhaustive()
    }
}

thread_local! {
    static ZERO_MASK: RefCell<Vec<bool>> = const { RefCell::new(Vec::new()) };
}

impl Volume {
    /// Creates a volume on an empty `backend`: writes both header copies and sizes the (sparse)
    /// data area. `header` carries the key metadata the caller obtained for `key`.
    pub fn create(
        backend: impl Backend + 'static,
        header: &VolumeHeader,
        key: &XtsKey,
    ) -> Result<Volume, VolumeError> {
        header.validate()?;
        let target = backend.describe();
        let total = header.data_offset() + header.size;
        backend.set_len(total).map_err(|e| {
            VolumeError::io(
                format!("sizing the volume file to {total} bytes"),
                &target,
                e,
            )
        })?;
        header.write_new(&backend)?;
        Self::with_key(Box::new(backend), header.clone(), key, false)
    }

    /// Opens (attaches) a volume: reads its header, then `unwrap` turns the header's key metadata
    /// into the DEK (typically by asking the key store). Errors of either step come back as `E`.
    pub fn open<E: From<VolumeError>>(
        backend: impl Backend + 'static,
        read_only: bool,
        unwrap: impl FnOnce(&VolumeHeader) -> Result<XtsKey, E>,
    ) -> Result<Volume, E> {
        let header = VolumeHeader::read_from(&backend)?;
        let key = unwrap(&header)?;
        Ok(Self::with_key(Box::new(backend), header, &key, read_only)?)
    }

    /// Builds a volume from an already read header and its DEK.
    pub fn with_key(
        backend: Box<dyn Backend>,
        header: VolumeHeader,
        key: &XtsKey,
        read_only: bool,
    ) -> Result<Volume, VolumeError> {
        header.validate()?;
        Ok(Self::from_parts(
            Arc::from(backend),
            None,
            Arc::new(Xts::new(key)),
            header,
            read_only,
        ))
    }

    pub fn size(&self) -> u64 {
        self.header.size
    }

    pub fn sector_size(&self) -> u32 {
        self.header.sector_size
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn header(&self) -> &VolumeHeader {
        &self.header
    }

    /// This (top) layer's storage, as it is now (an online snapshot replaces it).
    pub fn backend(&self) -> BackendRef {
        BackendRef(self.top())
    }

    fn ss(&self) -> usize {
        self.header.sector_size as usize
    }

    fn unit(&self, volume_offset: u64) -> u64 {
        volume_offset / 512
    }

    fn file_offset(&self, volume_offset: u64) -> u64 {
        self.header.data_offset() + volume_offset
    }

    fn check(&self, op: Op, offset: u64, len: u64) -> Result<(), VolumeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                op,
                offset,
                len,
                size: self.header.size,
            }),
        }
    }

    fn check_writable(&self, op: Op) -> Result<(), VolumeError> {
        if self.read_only {
            return Err(VolumeError::ReadOnly { op });
        }
        self.check_writeback()
    }

    /// Fails once a sync has failed (see [`Volume::flush`]).
    fn check_writeback(&self) -> Result<(), VolumeError> {
        match self.writeback_error.get() {
            Some(first) => Err(VolumeError::WriteBackFailed {
                target: self.target.clone(),
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Whether a sync of this volume has failed (writes and flushes fail until re-attach).
    pub fn writeback_failed(&self) -> bool {
        self.writeback_error.get().is_some()
    }

    fn io_err(&self, verb: &str, len: u64, offset: u64, e: io::Error) -> VolumeError {
        VolumeError::io(
            format!("{verb} {len} bytes at volume offset {offset}"),
            &self.target,
            e,
        )
    }

    /// Reads whole sectors at `sector_off` into `buf` and decrypts them: straight from the
    /// backend's lent bytes when it lends them (see `mapped`), else read into `buf` and decrypted
    /// in place; all-zero ciphertext sectors stay zero. Returns whether every sector was such a
    /// zero sector.
    fn read_sectors(&self, buf: &mut [u8], sector_off: u64) -> Result<bool, VolumeError> {
        let top = self.top();
        if let Some(parent) = &top.parent {
            return self.read_layered(&*top.backend, parent, buf, sector_off);
        }
        if let Some(all_zero) = self.read_mapped(&*top.backend, buf, sector_off, false)? {
            return Ok(all_zero);
        }
        top.backend
            .read_at(buf, self.file_offset(sector_off))
            .map_err(|e| self.io_err("reading", buf.len() as u64, sector_off, e))?;
        Ok(self.decrypt_read(buf, sector_off))
    }

    /// Decrypts whole sectors of ciphertext just read at `sector_off`, in place; all-zero
    /// sectors are holes and stay zero. Returns whether every sector was a hole.
    ///
    /// Zero-ness is decided per 16-byte XTS block, not per sector: a write turning a hole into
    /// data (or a trim turning data into a hole) is not atomic against a concurrent read, which
    /// can see some blocks of a sector still zero and others already new ciphertext. XTS
    /// encrypts each block independently, so decrypting the new blocks and keeping the zero ones
    /// zero gives, for every byte, its old or its new value — never garbage. (An encrypted block
    /// is all zero with probability 2^-128.)
    ///
    /// One pass: runs of sectors are decrypted by the flagging kernel, which tests each block
    /// for zero on the value it decrypts, instead of a scan before decrypting. A flagged sector
    /// (rare: a write or trim racing this read's `pread`) gets its ciphertext back by
    /// re-encryption (XTS is a permutation of each sector) and is then decided on it. Where a
    /// run would start with a sector whose first block is zero (most likely a hole), that
    /// sector is decided on its ciphertext without being decrypted first.
    fn decrypt_read(&self, buf: &mut [u8], sector_off: u64) -> bool {
        let ss = self.ss();
        let mut all_zero = true;
        let n = buf.len() / ss;
        let mut i = 0;
        while i < n {
            if starts_with_zero_block(&buf[i * ss..]) {
                let sector = &mut buf[i * ss..(i + 1) * ss];
                if !is_zero(sector) {
                    all_zero = false;
                    self.decrypt_mixed(sector, sector_off + (i * ss) as u64);
                }
                i += 1;
                continue;
            }
            // The run's first sector is not all zero: the read is not.
            all_zero = false;
            // Only a run's first sector is looked at (see `mapped`): a hole inside the run is
            // flagged like any zero block.
            let start = i;
            i = n.min(start + FLAG_RUN);
            let first = sector_off + (start * ss) as u64;
            let run = &mut buf[start * ss..i * ss];
            let mut zero = [0u64; FLAG_RUN / 64];
            if self
                .xts
                .decrypt_sectors_flagging(run, ss, self.unit(first), &mut zero)
            {
                for j in flagged(&zero, i - start) {
                    let sector = &mut run[j * ss..(j + 1) * ss];
                    let off = first + (j * ss) as u64;
                    self.xts.encrypt_sectors(sector, ss, self.unit(off));
                    // A hole stays zero; a sector with some zero blocks keeps those zero.
                    if !is_zero(sector) {
                        self.decrypt_mixed(sector, off);
                    }
                }
            }
        }
        all_zero
    }

    /// Decrypts one sector some of whose 16-byte blocks are all zero (see `decrypt_read`).
    fn decrypt_mixed(&self, sector: &mut [u8], sector_off: u64) {
        ZERO_MASK.with(|m| {
            let mut mask = m.borrow_mut();
            zero_blocks(sector, &mut mask);
            self.xts
                .decrypt_sectors(sector, sector.len(), self.unit(sector_off));
            rezero_blocks(&mask, sector);
        });
    }

    /// Whether writes wait for the storage (network block storage) rather than a cache.
    pub fn writes_wait(&self) -> bool {
        self.top().backend.writes_wait()
    }

    /// Like [`Volume::read`], but only if the ciphertext can be read without waiting for the
    /// device (it is cached): `Ok(None)` means "would wait: call `read`". Only whole-sector reads
    /// are tried; others return `Ok(None)`.
    pub fn try_read_cached(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<ReadOutcome>, VolumeError> {
        self.check(Op::Read, offset, buf.len() as u64)?;
        let ss = self.ss() as u64;
        let top = self.top();
        if buf.is_empty()
            || !offset.is_multiple_of(ss)
            || !(buf.len() as u64).is_multiple_of(ss)
            || top.parent.is_some()
        {
            return Ok(None);
        }
        if let Some(all_zero) = self.read_mapped(&*top.backend, buf, offset, true)? {
            return Ok(Some(ReadOutcome { all_zero }));
        }
        let done = top
            .backend
            .try_read_at_nowait(buf, self.file_offset(offset))
            .map_err(|e| self.io_err("reading", buf.len() as u64, offset, e))?;
        Ok(done.then(|| ReadOutcome {
            all_zero: self.decrypt_read(buf, offset),
        }))
    }

    /// Reads `buf.len()` bytes at `offset` (any alignment).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadOutcome, VolumeError> {
        self.check(Op::Read, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(ReadOutcome { all_zero: true });
        }
        let ss = self.ss();
        let sp = span(offset, buf.len() as u64, ss as u64);
        let mut all_zero = true;
        let mut pos = 0usize;
        let mut scratch = [0u8; 4096];
        if let Some((s, in_off, n)) = sp.head {
            all_zero &= self.read_edge(&mut scratch[..ss], s)?;
            buf[..n].copy_from_slice(&scratch[in_off..in_off + n]);
            pos = n;
        }
        let mid_len = sp.mid.1 as usize;
        if mid_len > 0 {
            all_zero &= self.read_sectors(&mut buf[pos..pos + mid_len], sp.mid.0)?;
            pos += mid_len;
        }
        if let Some((s, _, n)) = sp.tail {
            all_zero &= self.read_edge(&mut scratch[..ss], s)?;
            buf[pos..pos + n].copy_from_slice(&scratch[..n]);
        }
        Ok(ReadOutcome { all_zero })
    }

    /// The stripe lock that serializes read-modify-writes of `sector` (a byte offset).
    fn stripe(&self, sector: u64) -> std::sync::MutexGuard<'_, ()> {
        let stripe = (sector / self.ss() as u64) as usize % LOCK_STRIPES;
        self.locks[stripe].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads one sector for a partial (sub-sector) read, under its stripe lock: a file read racing
    /// a read-modify-write's `pwrite` may see part of the new ciphertext, and a torn 16-byte XTS
    /// block would decrypt to garbage even in bytes the writer did not touch. The lock costs one
    /// uncontended mutex per edge sector; sub-sector reads are already the slow path.
    fn read_edge(&self, scratch: &mut [u8], sector: u64) -> Result<bool, VolumeError> {
        let _guard = self.stripe(sector);
        self.read_sectors(scratch, sector)
    }

    /// Read-modify-write of part of one sector under its stripe lock. `data = None` writes zeroes.
    fn rmw(
        &self,
        sector: u64,
        in_off: usize,
        len: usize,
        data: Option<&[u8]>,
    ) -> Result<(), VolumeError> {
        let ss = self.ss();
        let _guard = self.stripe(sector);
        let mut scratch = [0u8; 4096];
        let s = &mut scratch[..ss];
        self.read_sectors(s, sector)?;
        match data {
            Some(d) => s[in_off..in_off + len].copy_from_slice(d),
            None => s[in_off..in_off + len].fill(0),
        }
        self.xts.encrypt_sectors(s, ss, self.unit(sector));
        self.top()
            .backend
            .write_at(s, self.file_offset(sector))
            .map_err(|e| self.io_err("writing", ss as u64, sector, e))
    }

    /// Writes `data` at `offset` (any alignment). `data` is scratch: its sector-aligned part may
    /// hold ciphertext afterwards. With `fua`, the write is durable when this returns.
    pub fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), VolumeError> {
        self.check_writable(Op::Write)?;
        let _gate = self.enter();
        self.check(Op::Write, offset, data.len() as u64)?;
        if data.is_empty() {
            return if fua { self.flush() } else { Ok(()) };
        }
        let ss = self.ss();
        let sp = span(offset, data.len() as u64, ss as u64);
        let mut pos = 0usize;
        if let Some((s, in_off, n)) = sp.head {
            self.rmw(s, in_off, n, Some(&data[..n]))?;
            pos = n;
        }
        let mid_len = sp.mid.1 as usize;
        if mid_len > 0 {
            let mid = &mut data[pos..pos + mid_len];
            // Straight into the backend's lent destination when it lends one (`mapped_write`).
            let top = self.top();
            if !self.write_mapped(&*top.backend, mid, sp.mid.0)? {
                self.xts.encrypt_sectors(mid, ss, self.unit(sp.mid.0));
                top.backend
                    .write_at(mid, self.file_offset(sp.mid.0))
                    .map_err(|e| self.io_err("writing", mid_len as u64, sp.mid.0, e))?;
            }
            pos += mid_len;
        }
        if let Some((s, _, n)) = sp.tail {
            self.rmw(s, 0, n, Some(&data[pos..pos + n]))?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable.
    ///
    /// The first failure is sticky. Every connection shares this volume's one open file, and
    /// Linux reports a failed write-back to the first `fdatasync` after it only: a later sync by
    /// another connection would succeed for data that never reached the disk. So once a sync has
    /// failed, every later flush, FUA write and write fails too (EIO), until the volume is
    /// detached and attached again; the failure is logged once, at error level.
    pub fn flush(&self) -> Result<(), VolumeError> {
        self.check_writeback()?;
        if let Err(e) = self.top().backend.sync() {
            let first = format!("fdatasync failed: {e}");
            if self.writeback_error.set(first).is_ok() {
                tracing::error!(volume = %self.target, error = %e,
                    "WRITE-BACK FAILED: data acknowledged to clients may not be on disk; every further write and flush of this volume fails with EIO until it is detached and attached again");
            }
            return Err(VolumeError::io(
                "flushing (fdatasync) the volume",
                &self.target,
                e,
            ));
        }
        // A sync that raced with another's failure must not report success either.
        self.check_writeback()
    }
}
