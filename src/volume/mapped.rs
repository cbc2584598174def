//! Reads that decrypt straight from the backend's lent bytes (a mapping of the volume file) into
//! the caller's buffer: one pass over the data instead of `pread` into the buffer and decrypting
//! it in place (DESIGN.md, "Performance"). When the backend does not lend the range, the caller
//! reads with `read_at` as before.
//!
//! The lent ciphertext is not a snapshot: a concurrent write or trim of the same sectors can
//! change it while it is read, and the zero-block rule of `Volume::decrypt_read` must still give
//! every byte its old or its new value. So the zero test is fused into the decryption: the XTS
//! kernel loads each 16-byte block once, decrypts that value and flags its sector if that very
//! value was all zero (`Xts::decrypt_sectors_to_flagging`). A sector not flagged was decrypted
//! from non-zero blocks only, each some old or new ciphertext; a flagged sector is copied into
//! the buffer (a snapshot) and decided there exactly as a `pread` read is. There is no scan of
//! the ciphertext before or after decrypting, and no window between a test and a load.
//!
//! A sector whose first block is zero is most likely a hole: where a run would start with one,
//! it goes to the snapshot path without being decrypted first (a 16-byte look, which only
//! routes: the decision is made on the snapshot), so long runs of holes are not decrypted.

use super::geometry::{flagged, starts_with_zero_block};
use super::{Volume, VolumeError};
use crate::backend::Backend;

/// Bytes decrypted per call: the flagged sectors' ciphertext, copied right after, is then
/// still in the core's cache, and the flags fit in [`RUN_WORDS`] words on the stack.
const RUN_BYTES: usize = 64 << 10;
/// Flag words for one run of 512-byte sectors.
const RUN_WORDS: usize = (RUN_BYTES / 512).div_ceil(64);

impl Volume {
    /// Reads and decrypts whole sectors at `sector_off` into `buf` from lent ciphertext.
    /// `Ok(None)`: not lent (or a fault spoiled it): read with `read_at`. `Ok(Some(all_zero))`
    /// as `read_sectors`. With `nowait`, only if that cannot wait for the device.
    pub(super) fn read_mapped(
        &self,
        backend: &dyn Backend,
        buf: &mut [u8],
        sector_off: u64,
        nowait: bool,
    ) -> Result<Option<bool>, VolumeError> {
        let len = buf.len();
        let mut all_zero = true;
        let lent = backend
            .with_mapped(self.file_offset(sector_off), len, nowait, &mut |src| {
                all_zero = self.decrypt_from(src, buf, sector_off)
            })
            .map_err(|e| self.io_err("reading", len as u64, sector_off, e))?;
        Ok(lent.then_some(all_zero))
    }

    /// Decrypts whole sectors of `src` (lent ciphertext at `sector_off`) into `dst`, one
    /// flagging call per run; see the module doc. Returns whether every sector was a hole.
    fn decrypt_from(&self, src: &[u8], dst: &mut [u8], sector_off: u64) -> bool {
        let ss = self.ss();
        let n = src.len() / ss;
        let run_max = (RUN_BYTES / ss).max(1);
        let mut all_zero = true;
        // Sector `j` from a snapshot of its ciphertext, decided as a `pread` read is.
        let snapshot = |dst: &mut [u8], j: usize| {
            let r = j * ss..(j + 1) * ss;
            dst[r.clone()].copy_from_slice(&src[r.clone()]);
            self.decrypt_read(&mut dst[r], sector_off + (j * ss) as u64)
        };
        let mut i = 0;
        while i < n {
            if starts_with_zero_block(&src[i * ss..]) {
                all_zero &= snapshot(dst, i);
                i += 1;
                continue;
            }
            // Only a run's first sector is looked at: looking at every one would be a pass of
            // cache misses ahead of the kernel's own loads (measured: ≈ a quarter of the
            // decryption's time). A hole inside the run is flagged like any zero block.
            let start = i;
            i = n.min(start + run_max);
            let (a, b) = (start * ss, i * ss);
            let unit = self.unit(sector_off + a as u64);
            let mut zero = [0u64; RUN_WORDS];
            let any = self.xts.decrypt_sectors_to_flagging(
                &src[a..b],
                &mut dst[a..b],
                ss,
                unit,
                &mut zero,
            );
            let mut redone = 0;
            if any {
                for j in flagged(&zero, i - start) {
                    all_zero &= snapshot(dst, start + j);
                    redone += 1;
                }
            }
            // A sector decrypted from non-zero blocks is data.
            if redone < i - start {
                all_zero = false;
            }
        }
        all_zero
    }
}
