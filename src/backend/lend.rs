//! When and which mapping a [`super::FileBackend`] lends its bytes from (one [`Lender`] for
//! reads, with a read-only mapping, and one for writes, with a writable one): created lazily at
//! the first use, at the file's length then; retired on the first fault in it (or a resize) and
//! replaced by a fresh one at a later use, at most [`MAX_MAPPINGS`] times in a backend's life,
//! after which it reads with `pread` only. Retired mappings stay mapped (and registered with the
//! SIGBUS guard) until the backend is dropped, because a reader on another thread may still be
//! inside one: unmapping under it would turn the guard's zero page into a real crash, or worse,
//! hand the address range to an unrelated allocation. No lock on the hot path: one atomic load
//! finds the current mapping.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::mapped::{Mapping, Touch};

/// Mappings one backend may create in its life (the first plus re-creations after faults).
pub(super) const MAX_MAPPINGS: usize = 4;
/// `current` when no mapping exists yet or the last one was retired.
const NONE: usize = 0;
/// `current` once mapping is given up for good.
const NEVER: usize = usize::MAX;

#[derive(Debug)]
pub(super) struct Lender {
    slots: [OnceLock<Mapping>; MAX_MAPPINGS],
    /// `NONE`, `NEVER`, or 1 + the index in `slots` of the mapping in use.
    current: AtomicUsize,
    /// How many slots are filled; held while creating one.
    made: Mutex<usize>,
    /// Maps read-write (for [`Lender::lend_write`]) rather than read-only.
    writable: bool,
}

impl Lender {
    /// `enabled = false` never maps (file systems where mapping is unwise, 32-bit, tests);
    /// `writable` maps read-write, for writes.
    pub(super) fn new(enabled: bool, writable: bool) -> Lender {
        let on = enabled && cfg!(target_pointer_width = "64");
        Lender {
            slots: Default::default(),
            current: AtomicUsize::new(if on { NONE } else { NEVER }),
            made: Mutex::new(0),
            writable,
        }
    }

    pub(super) fn disable(&mut self) {
        *self.current.get_mut() = NEVER;
    }

    pub(super) fn enabled(&self) -> bool {
        self.current.load(Ordering::Acquire) != NEVER
    }

    /// The mapping in use, creating one if none is (`None`: read with `pread`).
    fn mapping(&self, file: &File) -> Option<(usize, &Mapping)> {
        match self.current.load(Ordering::Acquire) {
            NEVER => None,
            NONE => self.create(file),
            k => self.slots[k - 1].get().map(|m| (k, m)),
        }
    }

    fn create(&self, file: &File) -> Option<(usize, &Mapping)> {
        // Another thread creating one: read with pread this once rather than wait.
        let mut made = self.made.try_lock().ok()?;
        match self.current.load(Ordering::Acquire) {
            NONE => {}
            NEVER => return None,
            k => return self.slots[k - 1].get().map(|m| (k, m)),
        }
        if *made >= MAX_MAPPINGS {
            self.current.store(NEVER, Ordering::Release);
            return None;
        }
        let len = file.metadata().ok()?.len();
        let mapped = if self.writable {
            Mapping::new_writable(file, len)
        } else {
            Mapping::new(file, len)
        };
        let m = match mapped {
            Ok(m) => m,
            // An empty file (a volume being created): try again at a later read.
            Err(_) if len == 0 => return None,
            Err(e) => {
                tracing::debug!(error = %e, writable = self.writable,
                    "not mapping the volume file; reads use pread and writes pwrite");
                self.current.store(NEVER, Ordering::Release);
                return None;
            }
        };
        let i = *made;
        let slot = &self.slots[i];
        let _ = slot.set(m);
        *made += 1;
        self.current.store(i + 1, Ordering::Release);
        slot.get().map(|m| (i + 1, m))
    }

    /// Stops lending from mapping `k` (if it is still the current one).
    fn retire(&self, k: usize) {
        let _ = self
            .current
            .compare_exchange(k, NONE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Retires the current mapping so the next read maps the file at its new length.
    pub(super) fn resized(&self) {
        let k = self.current.load(Ordering::Acquire);
        if k != NONE && k != NEVER {
            self.retire(k);
        }
    }

    /// A hole was punched at `[offset, offset+len)`: its pages are no longer known resident.
    pub(super) fn punched(&self, offset: u64, len: u64) {
        for m in self.slots.iter().filter_map(OnceLock::get) {
            m.forget(offset, len);
        }
    }

    /// Lends `[offset, offset+len)` of `file` to `f` if it is mapped and resident; `Ok(false)`
    /// when not lent or when a fault made what `f` saw untrustworthy.
    pub(super) fn lend(
        &self,
        file: &File,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<bool> {
        let Some((k, m)) = self.mapping(file) else {
            return Ok(false);
        };
        if !m.resident(offset, len) {
            return Ok(false);
        }
        match m.read_with(offset, len, f) {
            Touch::Clean => Ok(true),
            Touch::OutOfRange => Ok(false),
            Touch::Faulted => {
                tracing::warn!(
                    faults = m.faults(),
                    "a fault in the mapped volume file (truncated or an I/O error under it); \
                     reading this range with pread and no longer trusting that mapping"
                );
                self.retire(k);
                Ok(false)
            }
        }
    }

    /// Lends `[offset, offset+len)` of `file` to `f` for storing, if it is mapped (and, with
    /// `resident`, only if its pages are in memory); `Ok(false)` when not lent or when a fault
    /// may have sent stores to a throw-away page: then the range must be written otherwise.
    pub(super) fn lend_write(
        &self,
        file: &File,
        offset: u64,
        len: usize,
        resident: bool,
        f: &mut dyn FnMut(&[AtomicU8]),
    ) -> io::Result<bool> {
        let Some((k, m)) = self.mapping(file) else {
            return Ok(false);
        };
        if resident && !m.resident(offset, len) {
            return Ok(false);
        }
        match m.write_with(offset, len, f) {
            Touch::Clean => Ok(true),
            Touch::OutOfRange => Ok(false),
            Touch::Faulted => {
                tracing::warn!(
                    faults = m.faults(),
                    "a fault in the writable mapping of the volume file (out of space, an I/O \
                     error or a truncated file); writing this range with pwrite, which reports \
                     the error, and no longer trusting that mapping"
                );
                self.retire(k);
                Ok(false)
            }
        }
    }
}
