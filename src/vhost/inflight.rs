//! vhost-user inflight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for split virtqueues:
//! a shared memory region, created here on GET_INFLIGHT_FD and kept by QEMU across backend
//! restarts (it hands the same fd back with SET_INFLIGHT_FD), in which each queue marks the
//! descriptor chains it has taken but not yet answered. A backend that starts on a region left
//! by a crashed one redoes the marked chains, oldest first, before taking new ones.
//!
//! The layout is QEMU's (docs/interop/vhost-user.rst, "Inflight I/O tracking"), per queue:
//! `QueueRegionSplit { u64 features; u16 version; u16 desc_num; u16 last_batch_head;
//! u16 used_idx; DescStateSplit desc[desc_num] }` with `DescStateSplit { u8 inflight;
//! u8 padding[5]; u16 next; u64 counter }`, little endian, each queue's part rounded up to 64
//! bytes as libvhost-user does. The region is mapped through `vm-memory` (a one-region
//! `GuestMemoryMmap` at address 0), so every access is bounds-checked and needs no `unsafe`.
//!
//! Protocol per chain (as libvhost-user): taken — `desc[head] = {inflight: 1, counter: n++}`;
//! before the used ring is updated — `last_batch_head = head`; after — `desc[head].inflight = 0`,
//! `used_idx = the queue's used index`. A crash between the used-ring update and the clear leaves
//! `used_idx` behind the ring's: recovery then clears `last_batch_head` instead of redoing it.

use std::fs::File;
use std::sync::atomic::Ordering;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Version written into a region this backend starts using.
const VERSION: u16 = 1;
/// Bytes before a queue's descriptor states, and per descriptor state.
const HEADER: u64 = 16;
const DESC: u64 = 16;
/// Each queue's part starts on this boundary.
const ALIGN: u64 = 64;
/// Field offsets in a queue's header and in a descriptor state.
const OFF_VERSION: u64 = 8;
const OFF_DESC_NUM: u64 = 10;
const OFF_LAST_BATCH_HEAD: u64 = 12;
const OFF_USED_IDX: u64 = 14;
const OFF_COUNTER: u64 = 8;

/// Bytes one queue of `queue_size` descriptors takes in the region.
pub(crate) fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER + DESC * u64::from(queue_size)).next_multiple_of(ALIGN)
}

/// A fresh, zeroed region for GET_INFLIGHT_FD: a memfd of `num_queues` queue parts.
pub(crate) fn create(num_queues: u16, queue_size: u16) -> std::io::Result<(File, u64)> {
    let size = queue_region_size(queue_size) * u64::from(num_queues);
    let fd = memfd_create(c"cryptnbd-vhost-inflight", MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let file = File::from(fd);
    file.set_len(size)?;
    Ok((file, size))
}

/// A mapped region (SET_INFLIGHT_FD), shared by the queues' workers.
pub(crate) struct Region {
    mem: GuestMemoryMmap,
    queue_size: u16,
    num_queues: u16,
}

impl Region {
    /// Maps `size` bytes of `file` from `offset`; refuses a region too small for its queues.
    pub(crate) fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, String> {
        let need = queue_region_size(queue_size) * u64::from(num_queues);
        if queue_size == 0 || num_queues == 0 || size < need {
            return Err(format!(
                "inflight region of {size} bytes for {num_queues} queues of {queue_size}"
            ));
        }
        let len = usize::try_from(size).map_err(|e| e.to_string())?;
        let region = MmapRegion::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| format!("mapping the inflight region: {e}"))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or("the inflight region does not fit the address space")?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| e.to_string())?;
        Ok(Region {
            mem,
            queue_size,
            num_queues,
        })
    }

    /// Queue `index`'s view, if the region has one for it and the queue fits its slots.
    pub(crate) fn queue(&self, index: u16, size: u16) -> Option<QueueInflight<'_>> {
        (index < self.num_queues && size <= self.queue_size).then(|| QueueInflight {
            mem: &self.mem,
            base: queue_region_size(self.queue_size) * u64::from(index),
            slots: self.queue_size,
        })
    }
}

/// One queue's part of the region.
pub(crate) struct QueueInflight<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
    slots: u16,
}

impl QueueInflight<'_> {
    fn at(&self, off: u64) -> GuestAddress {
        GuestAddress(self.base + off)
    }

    fn desc(&self, head: u16, off: u64) -> Option<GuestAddress> {
        (head < self.slots).then(|| self.at(HEADER + DESC * u64::from(head) + off))
    }

    fn store_u16(&self, off: u64, v: u16) {
        // In range by construction (`Region::map` checked the size).
        let _ = self.mem.store(v.to_le(), self.at(off), Ordering::Release);
    }

    fn load_u16(&self, off: u64) -> u16 {
        u16::from_le(self.mem.load(self.at(off), Ordering::Acquire).unwrap_or(0))
    }

    /// What a backend starting on this queue must do: the heads to redo, oldest first, and the
    /// counter to continue from. `used_idx` is the used ring's index as the guest sees it.
    /// A region never used (version 0) is claimed and has nothing to redo.
    pub(crate) fn recover(&self, used_idx: u16) -> (Vec<u16>, u64) {
        if self.load_u16(OFF_VERSION) == 0 {
            self.store_u16(OFF_DESC_NUM, self.slots);
            self.store_u16(OFF_USED_IDX, used_idx);
            self.store_u16(OFF_VERSION, VERSION);
            return (Vec::new(), 0);
        }
        if self.load_u16(OFF_USED_IDX) != used_idx {
            // The last chain reached the used ring but was not cleared: it is answered.
            let last = self.load_u16(OFF_LAST_BATCH_HEAD);
            if let Some(a) = self.desc(last, 0) {
                let _ = self.mem.store(0u8, a, Ordering::Release);
            }
            self.store_u16(OFF_USED_IDX, used_idx);
        }
        let mut redo: Vec<(u64, u16)> = (0..self.slots)
            .filter_map(|h| {
                let flag: u8 = self.mem.load(self.desc(h, 0)?, Ordering::Acquire).ok()?;
                let counter: u64 = self.mem.read_obj(self.desc(h, OFF_COUNTER)?).ok()?;
                (flag == 1).then_some((u64::from_le(counter), h))
            })
            .collect();
        redo.sort_unstable();
        let next = redo.last().map_or(0, |(c, _)| c.wrapping_add(1));
        (redo.into_iter().map(|(_, h)| h).collect(), next)
    }

    /// Marks `head` taken, with `counter` (its age).
    pub(crate) fn start(&self, head: u16, counter: u64) {
        if let (Some(c), Some(f)) = (self.desc(head, OFF_COUNTER), self.desc(head, 0)) {
            let _ = self.mem.write_obj(counter.to_le(), c);
            let _ = self.mem.store(1u8, f, Ordering::Release);
        }
    }

    /// Before `head` is put on the used ring.
    pub(crate) fn before_used(&self, head: u16) {
        self.store_u16(OFF_LAST_BATCH_HEAD, head);
    }

    /// After `head` was put on the used ring, which now has index `used_idx`.
    pub(crate) fn after_used(&self, head: u16, used_idx: u16) {
        if let Some(f) = self.desc(head, 0) {
            let _ = self.mem.store(0u8, f, Ordering::Release);
        }
        self.store_u16(OFF_USED_IDX, used_idx);
    }

    /// Whether `head` is marked in flight (for tests and logs).
    #[cfg(test)]
    pub(crate) fn is_inflight(&self, head: u16) -> bool {
        self.desc(head, 0)
            .and_then(|a| self.mem.load::<u8>(a, Ordering::Acquire).ok())
            == Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (File, Region) {
        let (f, len) = create(queues, size).unwrap();
        let r = Region::map(f.try_clone().unwrap(), 0, len, queues, size).unwrap();
        (f, r)
    }

    #[test]
    fn the_layout_is_qemus() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1), 64);
        let (f, len) = create(2, 128).unwrap();
        assert_eq!(f.metadata().unwrap().len(), len);
        assert_eq!(len, 2 * 2112);
    }

    #[test]
    fn a_fresh_region_is_claimed_and_has_nothing_to_redo() {
        let (_f, r) = region(2, 8);
        let q = r.queue(1, 8).unwrap();
        assert_eq!(q.recover(5), (vec![], 0));
        assert_eq!(q.load_u16(OFF_VERSION), VERSION);
        assert_eq!(q.load_u16(OFF_DESC_NUM), 8);
        assert!(r.queue(2, 8).is_none() && r.queue(0, 9).is_none());
    }

    #[test]
    fn chains_left_in_flight_are_redone_oldest_first() {
        let (f, r) = region(1, 8);
        let q = r.queue(0, 8).unwrap();
        q.recover(0);
        q.start(3, 10);
        q.start(1, 11);
        q.start(6, 12);
        // 3 was answered completely; 6 reached the used ring (index 2) but was not cleared.
        q.before_used(3);
        q.after_used(3, 1);
        q.before_used(6);
        // The next backend maps the same file.
        let r2 = Region::map(f, 0, queue_region_size(8), 1, 8).unwrap();
        let q2 = r2.queue(0, 8).unwrap();
        assert_eq!(q2.recover(2), (vec![1], 12));
        assert!(!q2.is_inflight(6) && !q2.is_inflight(3) && q2.is_inflight(1));
    }

    #[test]
    fn a_region_too_small_is_refused() {
        let (f, _) = create(1, 8).unwrap();
        assert!(Region::map(f, 0, 64, 2, 8).is_err());
    }
}
