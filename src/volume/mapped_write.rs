//! Writes that encrypt straight from the caller's plaintext into the backend's lent destination
//! (a writable mapping of the volume file, see `backend::mapped`): one pass over the data, in
//! place of encrypting the buffer in place and then `pwrite`-ing it (a copy into the page cache
//! with a page-cache lookup per page). When the backend does not lend the range, or lends it but
//! reports a fault (out of space on the fault that fills a hole, an I/O error, a file truncated
//! under us), the caller writes as before: encrypt in place, `write_at`. That fallback always
//! has the plaintext, because the mapped write encrypts out of place and leaves the buffer
//! untouched; and it is the fallback that returns the real error (ENOSPC, EIO) to the client.
//!
//! Only whole sectors come here (sub-sector edges stay read-modify-write under their stripe
//! lock); the backend decides what it lends: `FileBackend` lends writes of at least
//! `backend::MAPPED_WRITE_MIN` bytes, on memory file systems by default (see
//! `FileBackend::with_write_mapping` for why not on disk ones).
//!
//! Durability does not change. A store through a `MAP_SHARED` mapping dirties the page-cache
//! page itself (Linux has one page cache: the first store after a page is clean goes through the
//! file system's `page_mkwrite`, which marks the folio dirty and, on ext4/xfs, reserves its
//! blocks — so running out of space shows up at that fault, as SIGBUS, not later at write-back,
//! just as `pwrite` reserves at `write_begin`). `Volume::flush`'s `fdatasync` writes dirty folios
//! back whoever dirtied them, and a failed write-back is recorded on the file's address space and
//! reported once to the next `fdatasync`, exactly as for `pwrite`-n pages; so the sticky rule of
//! `Volume::flush` (the first failure fails every later flush and write) holds unchanged, and no
//! `msync` is needed. A FUA write flushes after the data is in the page cache, whichever way it
//! got there. (tmpfs has no write-back at all.) Trim and write-zeroes punch holes as before: the
//! kernel unmaps punched pages from every mapping, and the next store to one faults it in afresh.
//!
//! Concurrent readers see each byte's old or new ciphertext as with `pwrite` (which is not
//! atomic either), and the zero-block rule of `Volume::decrypt_read` covers a sector caught
//! half-written.

use super::{Volume, VolumeError};
use crate::backend::Backend;

impl Volume {
    /// Encrypts whole sectors of plaintext `data` for volume offset `sector_off` straight into
    /// the backend's lent destination. `Ok(true)`: written (as by `write_at`). `Ok(false)`: not
    /// lent, or a fault spoiled it: `data` is untouched, write it the usual way.
    pub(super) fn write_mapped(
        &self,
        backend: &dyn Backend,
        data: &[u8],
        sector_off: u64,
    ) -> Result<bool, VolumeError> {
        let (ss, unit) = (self.ss(), self.unit(sector_off));
        backend
            .with_mapped_write(self.file_offset(sector_off), data.len(), &mut |dst| {
                self.xts.encrypt_sectors_to_shared(data, dst, ss, unit)
            })
            .map_err(|e| self.io_err("writing", data.len() as u64, sector_off, e))
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::testing::MemBackend;
    use crate::backend::FileBackend;
    use crate::crypto::XtsKey;
    use crate::volume::{Volume, VolumeHeader};

    fn file_volume(dir: &std::path::Path, name: &str, key: &XtsKey, min: usize) -> Volume {
        let path = dir.join(name);
        let f = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let h = VolumeHeader::new(uuid::Uuid::nil(), 4 << 20, 4096);
        let b = FileBackend::new(f, &path).with_mapped_write_min(min);
        Volume::create(b, &h, key).unwrap()
    }

    /// On tmpfs (every write lends), a whole-sector write lands through the mapping, leaves the
    /// caller's plaintext as it was, and the file holds the same ciphertext as a `pwrite` volume
    /// with the same key; a backend that does not lend (memory) is written the usual way.
    #[test]
    fn mapped_write_leaves_plaintext_and_matches_pwrite() {
        let Some(shm) = std::path::Path::new("/dev/shm")
            .is_dir()
            .then(|| tempfile::tempdir_in("/dev/shm").unwrap())
        else {
            return;
        };
        let key = XtsKey::generate();
        let mapped = file_volume(shm.path(), "m", &key, 0);
        let plain = file_volume(shm.path(), "p", &key, usize::MAX);
        let data: Vec<u8> = (0..(64 << 10)).map(|i: u32| (i * 31) as u8).collect();
        assert!(
            mapped
                .write_mapped(&*mapped.backend(), &data, 8192)
                .unwrap(),
            "tmpfs lends"
        );
        assert!(
            !plain.write_mapped(&*plain.backend(), &data, 8192).unwrap(),
            "below the threshold"
        );
        assert_eq!(data[..4], [0, 31, 62, 93], "the plaintext is untouched");
        plain.write(8192, &mut data.clone(), false).unwrap();
        let read = |v: &Volume| {
            let mut b = vec![0u8; 128 << 10];
            v.backend().read_at(&mut b, v.file_offset(0)).unwrap();
            b
        };
        assert!(read(&mapped) == read(&plain), "same ciphertext both ways");
        let mut back = vec![0u8; data.len()];
        mapped.read(8192, &mut back).unwrap();
        assert_eq!(back, data);

        let h = VolumeHeader::new(uuid::Uuid::nil(), 1 << 20, 4096);
        let mem = Volume::create(MemBackend::new(), &h, &key).unwrap();
        assert!(!mem.write_mapped(&*mem.backend(), &data, 0).unwrap());
    }
}
