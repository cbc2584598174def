//! Layered volumes: a child layer over a read-only parent (a snapshot), for snapshots and
//! clones. It owns the read fall-through, the rules that keep a parent's data from showing
//! through again, block status across layers, copying the parent's data up (flatten) and
//! merging a parent into its child (deleting a snapshot).
//!
//! The record of what a child owns is its own ciphertext: a sector whose ciphertext is all zero
//! (never written, punched) falls through to the parent; any other sector is the child's. So
//! every sector a child writes — data, or zeroes from WRITE_ZEROES — is stored encrypted (an
//! encrypted sector is never all zero), and a hole is punched only where every layer below is a
//! hole too; TRIM elsewhere leaves the sector as it is (TRIM is advisory). A parent's data can
//! therefore never show through again, and no separate bitmap has to be kept crash-safe: the
//! ownership record is written by the very `pwrite` that writes the data. The price: a child
//! cannot free space where its parent has data.
//!
//! A sector caught half-written (a crash during an unflushed write, or a read racing the first
//! write of a sector) decrypts its written 16-byte blocks and keeps the others zero, as in a
//! single-layer volume; in a child those blocks read as zeroes rather than the parent's bytes.

use std::sync::Arc;

use super::allocation::Extent;
use super::geometry::is_zero;
use super::{Volume, VolumeError};
use crate::backend::Backend;

/// Bytes merged per step by [`merge_into_child`] and copied by [`Volume::copy_up`] callers.
pub const LAYER_CHUNK: usize = 1 << 20;

impl Volume {
    /// Makes this (child) layer read its never-written sectors from `parent`, after checking
    /// that `parent` is the layer its header names (volume id, layer id, size, sector size).
    pub fn with_parent(mut self, parent: Arc<Volume>) -> Result<Volume, VolumeError> {
        let mismatch = |reason: String| VolumeError::ParentMismatch {
            target: self.target.clone(),
            parent: parent.target.clone(),
            reason,
        };
        let Some(want) = &self.header.parent else {
            return Err(mismatch("this layer's header names no parent".into()));
        };
        let got = &parent.header;
        if got.volume_id != want.volume_id || got.layer_id != Some(want.layer_id) {
            return Err(mismatch(format!(
                "expected volume {} layer {}, found volume {} layer {}",
                want.volume_id,
                want.layer_id,
                got.volume_id,
                got.layer_id.map(|l| l.to_string()).unwrap_or("none".into())
            )));
        }
        if got.size != want.size || got.size != self.header.size {
            return Err(mismatch(format!(
                "expected {} bytes, the parent has {} and this layer {}",
                want.size, got.size, self.header.size
            )));
        }
        if got.sector_size != self.header.sector_size {
            return Err(mismatch(format!(
                "sector size {} against this layer's {}",
                got.sector_size, self.header.sector_size
            )));
        }
        self.set_parent(parent);
        Ok(self)
    }

    /// Whole sectors of a child: reads its own ciphertext, decrypts the sectors it owns and
    /// reads runs of all-zero ones from the parent. Returns whether everything read as holes.
    pub(super) fn read_layered(
        &self,
        own: &dyn Backend,
        parent: &Volume,
        buf: &mut [u8],
        sector_off: u64,
    ) -> Result<bool, VolumeError> {
        own.read_at(buf, self.file_offset(sector_off))
            .map_err(|e| self.io_err("reading", buf.len() as u64, sector_off, e))?;
        let ss = self.ss();
        let n = buf.len() / ss;
        let mut all_zero = true;
        let mut i = 0;
        while i < n {
            let hole = is_zero(&buf[i * ss..(i + 1) * ss]);
            let mut j = i + 1;
            while j < n && is_zero(&buf[j * ss..(j + 1) * ss]) == hole {
                j += 1;
            }
            let run = &mut buf[i * ss..j * ss];
            let off = sector_off + (i * ss) as u64;
            all_zero &= if hole {
                parent.read(off, run)?.all_zero
            } else {
                self.decrypt_read(run, off)
            };
            i = j;
        }
        Ok(all_zero)
    }

    /// `(start, len, below_is_hole)` runs covering `[start, start + len)`: whether every layer
    /// below this one is a hole there (so punching a hole here cannot reveal anything).
    pub(super) fn below(&self, start: u64, len: u64) -> Result<Vec<(u64, u64, bool)>, VolumeError> {
        let Some(parent) = self.parent() else {
            return Ok(vec![(start, len, true)]);
        };
        let mut out = Vec::new();
        let (mut pos, end) = (start, start + len);
        while pos < end {
            for e in parent.block_status(pos, end - pos)? {
                out.push((pos, e.length, e.hole));
                pos += e.length;
            }
        }
        Ok(out)
    }

    /// Block status of a child: its own data is data; its holes are whatever the layers below
    /// say. `own` is this layer's own extents from `offset`.
    pub(super) fn layered_extents(
        &self,
        parent: &Volume,
        offset: u64,
        own: Vec<Extent>,
        max: usize,
    ) -> Result<Vec<Extent>, VolumeError> {
        let mut out = Vec::new();
        let mut pos = offset;
        for e in own {
            if !e.hole {
                out.push(e);
            } else {
                let end = pos + e.length;
                let mut p = pos;
                while p < end && out.len() < max {
                    for sub in parent.block_status(p, end - p)? {
                        p += sub.length;
                        out.push(sub);
                    }
                }
                if p < end {
                    break;
                }
            }
            pos += e.length;
            if out.len() >= max {
                break;
            }
        }
        out.truncate(max);
        Ok(out)
    }

    /// Copies into this layer the sectors of `[offset, offset + len)` (whole sectors) it has
    /// not written itself and whose data below is not all zero, encrypted under this layer's
    /// key: one step of a flatten. Idempotent, so an interrupted flatten simply runs again.
    /// Returns the bytes written.
    pub fn copy_up(&self, offset: u64, len: usize) -> Result<u64, VolumeError> {
        self.check_writable(super::Op::Write)?;
        self.check(super::Op::Write, offset, len as u64)?;
        let _gate = self.enter();
        let top = self.top();
        let Some(parent) = &top.parent else {
            return Ok(0);
        };
        let ss = self.ss();
        if !offset.is_multiple_of(ss as u64) || !len.is_multiple_of(ss) {
            return Err(VolumeError::Invalid(format!(
                "copy-up of {len} bytes at {offset} is not whole sectors"
            )));
        }
        if self.below(offset, len as u64)?.iter().all(|r| r.2) {
            return Ok(0);
        }
        let mut own = vec![0u8; len];
        top.backend
            .read_at(&mut own, self.file_offset(offset))
            .map_err(|e| self.io_err("reading", len as u64, offset, e))?;
        let mut written = 0;
        let mut i = 0;
        let n = len / ss;
        while i < n {
            if !is_zero(&own[i * ss..(i + 1) * ss]) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && is_zero(&own[j * ss..(j + 1) * ss]) {
                j += 1;
            }
            let off = offset + (i * ss) as u64;
            let run = &mut own[i * ss..j * ss];
            if !parent.read(off, run)?.all_zero && !is_zero(run) {
                self.xts.encrypt_sectors(run, ss, self.unit(off));
                top.backend
                    .write_at(run, self.file_offset(off))
                    .map_err(|e| self.io_err("writing", run.len() as u64, off, e))?;
                written += run.len() as u64;
            }
            i = j;
        }
        Ok(written)
    }
}

/// Merges a parent layer into its child, by ciphertext (both layers of one volume share its
/// DEK and tweaks, so no key is needed): every sector the child has not written takes the
/// parent's ciphertext. The child's contents do not change, so this is safe to interrupt and
/// run again; the caller then points the child at the parent's parent. Syncs the child.
/// `progress(done, total)` after each step.
pub fn merge_into_child(
    parent: &dyn Backend,
    child: &dyn Backend,
    header: &super::VolumeHeader,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), VolumeError> {
    let ss = header.sector_size as usize;
    let base = header.data_offset();
    let size = header.size;
    let (pt, ct) = (parent.describe(), child.describe());
    let mut pbuf = vec![0u8; LAYER_CHUNK];
    let mut cbuf = vec![0u8; LAYER_CHUNK];
    let mut pos = 0u64;
    while pos < size {
        // Skip the parent's holes: nothing to merge there.
        let data = parent
            .seek_data(base + pos)
            .map_err(|e| VolumeError::io("looking for data in", &pt, e))?;
        let Some(data) = data.map(|d| d - base).filter(|&d| d < size) else {
            break;
        };
        pos = pos.max(data / ss as u64 * ss as u64);
        let n = (size - pos).min(LAYER_CHUNK as u64) as usize;
        parent
            .read_at(&mut pbuf[..n], base + pos)
            .map_err(|e| VolumeError::io(format!("reading {n} bytes at {pos} of"), &pt, e))?;
        child
            .read_at(&mut cbuf[..n], base + pos)
            .map_err(|e| VolumeError::io(format!("reading {n} bytes at {pos} of"), &ct, e))?;
        // Runs of sectors to take from the parent, written one run at a time.
        let take = |k: usize| {
            let r = k * ss..(k + 1) * ss;
            is_zero(&cbuf[r.clone()]) && !is_zero(&pbuf[r])
        };
        let mut k = 0;
        while k < n / ss {
            if !take(k) {
                k += 1;
                continue;
            }
            let start = k;
            while k < n / ss && take(k) {
                k += 1;
            }
            child
                .write_at(&pbuf[start * ss..k * ss], base + pos + (start * ss) as u64)
                .map_err(|e| VolumeError::io("merging sectors into", &ct, e))?;
        }
        pos += n as u64;
        progress(pos, size);
    }
    child
        .sync()
        .map_err(|e| VolumeError::io("syncing the merged layer", &ct, e))?;
    progress(size, size);
    Ok(())
}
