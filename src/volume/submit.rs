//! Writes that complete later: [`Volume::submit_write`] encrypts a caller-owned buffer in place
//! and hands it to a backend that submits asynchronously (RBD's aio), so the caller can go on
//! with other work while the write travels; a completion gets the buffer back with the result.
//! Nothing here knows who asked: the server wraps it into NBD replies (`server::inflight`).
//!
//! The rules are those of [`Volume::write`]: whole sectors only (no read-modify-write, which
//! would read first), no FUA (a FUA write waits for the flush anyway), refused on a read-only
//! volume and after a failed write-back (the sticky error). The completion runs only once the
//! data is in the backend, as `write` returns, so a later flush covers it.

use std::sync::Arc;

use super::error::Op;
use super::{Volume, VolumeError};

/// What [`Volume::submit_write`] calls once: the buffer back (holding ciphertext, or empty if
/// the backend could not give it back), and the write's result.
pub type SubmitDone = Box<dyn FnOnce(Vec<u8>, Result<(), VolumeError>) + Send>;

impl Volume {
    /// Whether [`Volume::submit_write`] would submit a `len`-byte write at `offset` without
    /// waiting for it: the backend submits asynchronously and the range is whole sectors.
    pub fn can_submit_write(&self, offset: u64, len: u64) -> bool {
        let ss = u64::from(self.header.sector_size);
        self.backend.submits_async()
            && !self.read_only
            && len > 0
            && offset.is_multiple_of(ss)
            && len.is_multiple_of(ss)
    }

    /// Encrypts `data` (plaintext for `[offset, offset + data.len())`, whole sectors) in place and
    /// submits it; `done` runs once the write has completed — possibly on another thread, or
    /// on this one before returning when the request is refused or the backend is synchronous.
    pub fn submit_write(self: &Arc<Self>, offset: u64, mut data: Vec<u8>, done: SubmitDone) {
        let len = data.len() as u64;
        let ss = self.ss() as u64;
        let checked = self
            .check_writable(Op::Write)
            .and_then(|()| self.check(Op::Write, offset, len));
        if let Err(e) = checked {
            return done(data, Err(e));
        }
        if !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) {
            // Partial sectors need a read-modify-write: the blocking path does that.
            let r = self.write(offset, &mut data, false);
            return done(data, r);
        }
        if data.is_empty() {
            return done(data, Ok(()));
        }
        self.xts
            .encrypt_sectors(&mut data, ss as usize, self.unit(offset));
        let vol = Arc::clone(self);
        self.backend.submit_write(
            data,
            self.file_offset(offset),
            Box::new(move |data, r| {
                let r = r.map_err(|e| vol.io_err("writing", len, offset, e));
                done(data, r)
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::backend::testing::{AsyncBackend, MemBackend};
    use crate::backend::Backend;
    use crate::crypto::XtsKey;
    use crate::volume::VolumeHeader;

    fn test_volume_on(backend: Box<dyn Backend>, read_only: bool) -> Volume {
        let h = VolumeHeader::new(uuid::Uuid::new_v4(), 1 << 20, 4096);
        Volume::with_key(backend, h, &XtsKey::generate(), read_only).unwrap()
    }

    fn submit(v: &Arc<Volume>, offset: u64, data: Vec<u8>) -> (Vec<u8>, Result<(), VolumeError>) {
        let (tx, rx) = mpsc::channel();
        v.submit_write(
            offset,
            data,
            Box::new(move |d, r| {
                let _ = tx.send((d, r));
            }),
        );
        rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap()
    }

    #[test]
    fn submitted_writes_read_back_and_follow_the_write_rules() {
        let v = Arc::new(test_volume_on(
            Box::new(AsyncBackend::new(MemBackend::new())),
            false,
        ));
        assert!(v.can_submit_write(4096, 8192));
        assert!(!v.can_submit_write(4096, 100));
        let plain: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let (back, r) = submit(&v, 4096, plain.clone());
        r.unwrap();
        assert_eq!(back.len(), 8192, "the buffer comes back");
        assert_ne!(back, plain, "it holds ciphertext now");
        let mut got = vec![0u8; 8192];
        v.read(4096, &mut got).unwrap();
        assert_eq!(got, plain);
        // Unaligned: falls back to read-modify-write, still correct.
        let (_, r) = submit(&v, 4096 + 10, vec![0xee; 20]);
        r.unwrap();
        v.read(4096, &mut got).unwrap();
        assert_eq!(&got[10..30], &[0xee; 20]);
        assert_eq!(&got[30..], &plain[30..]);
        // Out of range is refused, and a read-only volume refuses writes.
        let (_, r) = submit(&v, v.size(), vec![0; 4096]);
        assert!(matches!(r, Err(VolumeError::OutOfRange { .. })), "{r:?}");
        let ro = Arc::new(test_volume_on(
            Box::new(AsyncBackend::new(MemBackend::new())),
            true,
        ));
        assert!(!ro.can_submit_write(0, 4096));
        let (_, r) = submit(&ro, 0, vec![0; 4096]);
        assert!(matches!(r, Err(VolumeError::ReadOnly { .. })), "{r:?}");
    }

    #[test]
    fn a_failed_write_back_refuses_later_submissions() {
        let mem = MemBackend::new();
        let v = Arc::new(test_volume_on(
            Box::new(AsyncBackend::failing_sync(mem)),
            false,
        ));
        assert!(v.flush().is_err());
        let (_, r) = submit(&v, 0, vec![1; 4096]);
        assert!(
            matches!(r, Err(VolumeError::WriteBackFailed { .. })),
            "{r:?}"
        );
        assert!(v.backend().submits_async());
    }
}
