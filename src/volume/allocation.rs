//! The operations on a volume's allocation rather than on its bytes: trim and write-zeroes
//! (hole punching, or encrypted zeroes where discard is off or the storage cannot punch), block
//! status (holes versus data, from SEEK_DATA/SEEK_HOLE), and cache (read-ahead). They share no
//! state with the read and write paths of `mod.rs` beyond the volume itself and its partial-sector
//! read-modify-write (`Volume::rmw`), which zeroes the edges of a write-zeroes; hence their own
//! file.

use std::cell::RefCell;
use std::io;

use super::geometry::span;
use super::{Op, Volume, VolumeError};

/// Largest chunk of encrypted zeroes written at once by write-zeroes without hole punching.
const ZERO_CHUNK: usize = 256 << 10;
/// Most extents one block-status call returns.
const MAX_EXTENTS: usize = 1024;

thread_local! {
    static ZEROES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A run of the volume with one allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub hole: bool,
    pub zero: bool,
}

impl Volume {
    /// Punches whole sectors; `Ok(false)` when the storage cannot.
    fn punch(&self, start: u64, len: u64) -> Result<bool, VolumeError> {
        match self.top().backend.punch_hole(self.file_offset(start), len) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(false),
            Err(e) => Err(self.io_err("punching a hole of", len, start, e)),
        }
    }

    /// Discards the whole sectors inside `[offset, offset+len)` (partial edge sectors are left
    /// as they are: a trim is advisory). A no-op when discard is disabled for this volume.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check_writable(Op::Trim)?;
        self.check(Op::Trim, offset, len)?;
        let _gate = self.enter();
        if !self.header.discard || len == 0 {
            return Ok(());
        }
        let sp = span(offset, len, self.ss() as u64);
        if sp.mid.1 > 0 {
            // In a child, only where every layer below is a hole (see `layer`): elsewhere a
            // punched sector would show the parent's data again, so it is left as it is.
            for (start, n, below_hole) in self.below(sp.mid.0, sp.mid.1)? {
                if below_hole {
                    self.punch(start, n)?;
                }
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes: whole sectors by punching a hole when
    /// `may_punch` and discard is enabled (else encrypted zeroes are written), edges by RMW.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_writable(Op::WriteZeroes)?;
        self.check(Op::WriteZeroes, offset, len)?;
        let _gate = self.enter();
        if len == 0 {
            return Ok(());
        }
        let sp = span(offset, len, self.ss() as u64);
        if let Some((s, in_off, n)) = sp.head {
            self.rmw(s, in_off, n, None)?;
        }
        let (start, mid_len) = sp.mid;
        if mid_len > 0 {
            // In a child, zeroes over the parent's data are written encrypted (see `layer`).
            for (start, n, below_hole) in self.below(start, mid_len)? {
                let punched =
                    below_hole && may_punch && self.header.discard && self.punch(start, n)?;
                if !punched {
                    self.write_encrypted_zeroes(start, n)?;
                }
            }
        }
        if let Some((s, _, n)) = sp.tail {
            self.rmw(s, 0, n, None)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_encrypted_zeroes(&self, start: u64, len: u64) -> Result<(), VolumeError> {
        let ss = self.ss();
        ZEROES.with(|z| {
            let mut z = z.borrow_mut();
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(ZERO_CHUNK as u64) as usize;
                z.clear();
                z.resize(n, 0);
                let off = start + done;
                self.xts.encrypt_sectors(&mut z[..n], ss, self.unit(off));
                self.top()
                    .backend
                    .write_at(&z[..n], self.file_offset(off))
                    .map_err(|e| self.io_err("writing zeroes:", n as u64, off, e))?;
                done += n as u64;
            }
            Ok(())
        })
    }

    /// Whether write-zeroes will be fast (a hole punch, no data written): for NBD FAST_ZERO.
    pub fn zeroing_is_fast(&self, may_punch: bool) -> bool {
        let top = self.top();
        may_punch && self.header.discard && top.backend.can_punch() && top.parent.is_none()
    }

    /// Asks the OS to read `[offset, offset+len)` ahead.
    pub fn cache(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check(Op::Cache, offset, len)?;
        self.top()
            .backend
            .will_need(self.file_offset(offset), len)
            .map_err(|e| self.io_err("prefetching", len, offset, e))
    }

    /// Extents from `offset` covering up to `len` bytes (at least one, possibly fewer bytes than
    /// asked): holes (which read as zeroes) versus data, from SEEK_DATA/SEEK_HOLE.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        self.check(Op::BlockStatus, offset, len)?;
        if len == 0 {
            return Err(VolumeError::OutOfRange {
                op: Op::BlockStatus,
                offset,
                len,
                size: self.header.size,
            });
        }
        let base = self.header.data_offset();
        let end = offset + len;
        let err = |e, pos: u64| self.io_err("querying the allocation of", end - pos, pos, e);
        let mut out = Vec::new();
        let mut pos = offset;
        let top = self.top();
        while pos < end && out.len() < MAX_EXTENTS {
            let data = top
                .backend
                .seek_data(base + pos)
                .map_err(|e| err(e, pos))?
                .map(|d| d.saturating_sub(base));
            let (next, hole) = match data {
                Some(d) if d <= pos => {
                    let h = top.backend.seek_hole(base + pos).map_err(|e| err(e, pos))?;
                    (h.saturating_sub(base), false)
                }
                Some(d) => (d, true),
                None => (end, true),
            };
            // Guard against a backend answer that does not move forward.
            let next = next.clamp(pos + 1, end);
            out.push(Extent {
                length: next - pos,
                hole,
                zero: hole,
            });
            pos = next;
        }
        match &top.parent {
            Some(parent) => self.layered_extents(parent, offset, out, MAX_EXTENTS),
            None => Ok(out),
        }
    }
}
