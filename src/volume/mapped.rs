//! Reads that decrypt straight from the backend's lent bytes (a mapping of the volume file) into
//! the caller's buffer: one pass over the data instead of `pread` into the buffer and decrypting
//! it in place (DESIGN.md, "Performance"). When the backend does not lend the range, the caller
//! reads with `read_at` as before.
//!
//! The lent ciphertext is not a snapshot: a concurrent write or trim of the same sectors can
//! change it while it is read, and the zero-block rule of `Volume::decrypt_read` must still give
//! every byte its old or its new value. So each run of sectors is checked for zero blocks
//! before it is decrypted and again after: a sector that had none both times was decrypted from
//! non-zero blocks (each block is loaded once by the XTS kernel, so it is some old or new
//! ciphertext); a sector that had a zero block at either check is copied into the buffer (a
//! snapshot) and decided there exactly as a `pread` read is. What escapes both checks is a block
//! that is non-zero, then zero, then non-zero again within the microseconds of one run — a trim
//! and a rewrite of that block landing during one read of it, three overlapping requests whose
//! outcome NBD leaves unspecified.

use super::geometry::has_zero_block;
use super::{Volume, VolumeError};

/// Bytes decrypted between the two zero checks: small enough that the second check reads from
/// the core's cache.
const RUN_BYTES: usize = 64 << 10;

impl Volume {
    /// Reads and decrypts whole sectors at `sector_off` into `buf` from lent ciphertext.
    /// `Ok(None)`: not lent (or a fault spoiled it): read with `read_at`. `Ok(Some(all_zero))`
    /// as `read_sectors`. With `nowait`, only if that cannot wait for the device.
    pub(super) fn read_mapped(
        &self,
        buf: &mut [u8],
        sector_off: u64,
        nowait: bool,
    ) -> Result<Option<bool>, VolumeError> {
        let len = buf.len();
        let mut all_zero = true;
        let lent = self
            .backend
            .with_mapped(self.file_offset(sector_off), len, nowait, &mut |src| {
                all_zero = self.decrypt_from(src, buf, sector_off)
            })
            .map_err(|e| self.io_err("reading", len as u64, sector_off, e))?;
        Ok(lent.then_some(all_zero))
    }

    /// Decrypts whole sectors of `src` (lent ciphertext at `sector_off`) into `dst`; see the
    /// module doc for why zero blocks are checked twice. Returns whether every sector was a hole.
    fn decrypt_from(&self, src: &[u8], dst: &mut [u8], sector_off: u64) -> bool {
        let ss = self.ss();
        let n = src.len() / ss;
        let run_max = (RUN_BYTES / ss).max(1);
        let mut all_zero = true;
        let mut i = 0;
        while i < n {
            let start = i;
            while i < n && i - start < run_max && !has_zero_block(&src[i * ss..(i + 1) * ss]) {
                i += 1;
            }
            if i > start {
                let (a, b) = (start * ss, i * ss);
                let unit = self.unit(sector_off + a as u64);
                self.xts
                    .decrypt_sectors_to(&src[a..b], &mut dst[a..b], ss, unit);
                for j in start..i {
                    let r = j * ss..(j + 1) * ss;
                    if has_zero_block(&src[r.clone()]) {
                        // Changed while we decrypted: decide on a snapshot instead.
                        dst[r.clone()].copy_from_slice(&src[r.clone()]);
                        all_zero &= self.decrypt_read(&mut dst[r], sector_off + (j * ss) as u64);
                    } else {
                        all_zero = false;
                    }
                }
                continue;
            }
            // Sector i has a zero block: a hole, or one being written or trimmed right now.
            let r = i * ss..(i + 1) * ss;
            dst[r.clone()].copy_from_slice(&src[r.clone()]);
            all_zero &= self.decrypt_read(&mut dst[r], sector_off + (i * ss) as u64);
            i += 1;
        }
        all_zero
    }
}
