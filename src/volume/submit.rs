//! Requests that complete later: [`Volume::submit_write`] encrypts a caller-owned buffer in
//! place and hands it to a backend that submits asynchronously (RBD's aio), so the caller can go
//! on with other work while the write travels; a completion gets the buffer back with the
//! result. [`Volume::submit_read`] does the same for reads, decrypting in the completion.
//! Nothing here knows who asked: the server wraps it into NBD replies (`server::inflight`).
//!
//! The rules are those of [`Volume::write`]: whole sectors only (no read-modify-write, which
//! would read first), no FUA (a FUA write waits for the flush anyway), refused on a read-only
//! volume and after a failed write-back (the sticky error). The completion runs only once the
//! data is in the backend, as `write` returns, so a later flush covers it.

use std::sync::Arc;

use super::error::Op;
use super::{ReadOutcome, Volume, VolumeError};

/// What [`Volume::submit_write`] calls once: the buffer back (holding ciphertext, or empty if
/// the backend could not give it back), and the write's result.
pub type SubmitDone = Box<dyn FnOnce(Vec<u8>, Result<(), VolumeError>) + Send>;
/// What [`Volume::submit_read`] calls once: the buffer (plaintext, on success) and the result.
pub type ReadDone = Box<dyn FnOnce(Vec<u8>, Result<ReadOutcome, VolumeError>) + Send>;

impl Volume {
    /// Whether [`Volume::submit_write`] would submit a `len`-byte write at `offset` without
    /// waiting for it: the backend submits asynchronously and the range is whole sectors.
    pub fn can_submit_write(&self, offset: u64, len: u64) -> bool {
        let ss = u64::from(self.header.sector_size);
        self.top().backend.submits_async()
            && !self.read_only
            && len > 0
            && offset.is_multiple_of(ss)
            && len.is_multiple_of(ss)
    }

    /// Encrypts `data` (plaintext for `[offset, offset + data.len())`, whole sectors) in place and
    /// submits it; `done` runs once the write has completed — possibly on another thread, or
    /// on this one before returning when the request is refused or the backend is synchronous.
    /// The caller must keep its own reference to the volume until `done` has run.
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
        self.top().backend.submit_write(
            data,
            self.file_offset(offset),
            Box::new(move |data, r| {
                let r = r.map_err(|e| vol.io_err("writing", len, offset, e));
                // Never the last reference on the storage's thread: closing an RBD image from
                // its own completion callback would wait for itself. The caller still holds one
                // until `done` has run.
                drop(vol);
                done(data, r)
            }),
        );
    }

    /// Whether [`Volume::submit_read`] would submit a `len`-byte read at `offset` without waiting.
    pub fn can_submit_read(&self, offset: u64, len: u64) -> bool {
        let ss = u64::from(self.header.sector_size);
        let top = self.top();
        top.backend.submits_async()
            && top.parent.is_none()
            && len > 0
            && offset.is_multiple_of(ss)
            && len.is_multiple_of(ss)
    }

    /// Reads `[offset, offset + data.len())` into `data` and decrypts it, like [`Volume::read`],
    /// calling `done` once it has completed (on the backend's completion thread, which then also
    /// decrypts; or on this one). Partial sectors take the blocking path.
    pub fn submit_read(self: &Arc<Self>, offset: u64, mut data: Vec<u8>, done: ReadDone) {
        let len = data.len() as u64;
        let ss = self.ss() as u64;
        if let Err(e) = self.check(Op::Read, offset, len) {
            return done(data, Err(e));
        }
        // A child layer's holes fall through to its parent: the blocking path reads them.
        let top = self.top();
        let blocking = top.parent.is_some();
        if data.is_empty() || !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) || blocking {
            let r = self.read(offset, &mut data);
            return done(data, r);
        }
        let vol = Arc::clone(self);
        top.backend.submit_read(
            data,
            self.file_offset(offset),
            Box::new(move |mut data, r| {
                let r = match r {
                    Ok(()) => Ok(ReadOutcome {
                        all_zero: vol.decrypt_read(&mut data, offset),
                    }),
                    Err(e) => Err(vol.io_err("reading", len, offset, e)),
                };
                drop(vol); // see `submit_write`
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
    fn submitted_reads_decrypt_and_report_holes() {
        let v = Arc::new(test_volume_on(
            Box::new(AsyncBackend::new(MemBackend::new())),
            false,
        ));
        let plain: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
        submit(&v, 8192, plain.clone()).1.unwrap();
        let read = |offset: u64, len: usize| {
            let (tx, rx) = mpsc::channel();
            v.submit_read(
                offset,
                vec![0xff; len],
                Box::new(move |d, r| {
                    let _ = tx.send((d, r));
                }),
            );
            rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap()
        };
        let (d, r) = read(8192, 8192);
        assert!(!r.unwrap().all_zero);
        assert_eq!(d, plain);
        let (d, r) = read(65536, 4096);
        assert!(r.unwrap().all_zero, "never written: a hole");
        assert!(d.iter().all(|&b| b == 0));
        let (d, r) = read(8192 + 100, 50);
        r.unwrap();
        assert_eq!(d, &plain[100..150], "unaligned takes the blocking path");
        let (_, r) = read(v.size() - 4096, 8192);
        assert!(matches!(r, Err(VolumeError::OutOfRange { .. })), "{r:?}");
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
