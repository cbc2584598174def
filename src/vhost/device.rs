//! The virtio-blk device one VM sees over its vhost-user socket: the features and configuration
//! space it offers, and the queue loop run by `vhost-user-backend`'s worker threads (one per
//! queue). Requests of one queue run one at a time, in order, on that queue's thread, and a
//! request is put on the used ring only once it is done. That order is what makes a restart safe:
//! when the backend vanishes, QEMU rewinds each queue to its used index, so exactly the requests
//! not yet answered are sent again to the next backend, and no answered write is lost (see
//! `mod.rs`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::request::{self, Scratch, Target, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use crate::volume::Volume;

/// Guest memory as `vhost-user-backend` maps it.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Queues offered (QEMU's `num-queues` may ask for up to this many).
pub(crate) const MAX_QUEUES: usize = 8;
/// Largest queue a driver may set up (QEMU's `queue-size`; 128 by default).
const MAX_QUEUE_SIZE: usize = 1024;

/// One VM's block device over one volume.
pub(crate) struct BlkDevice {
    volume: Arc<Volume>,
    /// The socket path, for logs.
    socket: String,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: Vec<u8>,
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
    /// The VM set the device's features (it is starting the device) ...
    started: AtomicBool,
    /// ... and its memory table was mapped. Started but never mapped: the VM's RAM is not
    /// shared (QEMU then sends no memory table and gives up on the device).
    mapped: AtomicBool,
    /// Held (shared) while a queue is being worked on; `quiesce` takes it exclusively to wait
    /// for requests in flight and stop new ones.
    running: RwLock<bool>,
    scratch: Vec<Mutex<Scratch>>,
}

impl BlkDevice {
    pub(crate) fn new(volume: Arc<Volume>, socket: String) -> Self {
        let serial = serial_of(&volume);
        let config = config_space(&volume);
        BlkDevice {
            volume,
            socket,
            serial,
            config,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            started: AtomicBool::new(false),
            mapped: AtomicBool::new(false),
            running: RwLock::new(true),
            scratch: (0..MAX_QUEUES)
                .map(|_| Mutex::new(Scratch::default()))
                .collect(),
        }
    }

    /// Whether the VM tried to start the device without its memory ever being mapped.
    pub(crate) fn started_without_memory(&self) -> bool {
        self.started.load(Ordering::Acquire) && !self.mapped.load(Ordering::Acquire)
    }

    /// Waits for the requests being worked on and refuses to start more.
    pub(crate) fn quiesce(&self) {
        *self.running.write().unwrap_or_else(|p| p.into_inner()) = false;
    }

    /// Drains one queue; with EVENT_IDX, re-arms the notification and drains again if the
    /// driver added requests meanwhile (else a kick could be lost).
    fn process_queue(&self, vring: &VringRwLock<Mem>, thread: usize) {
        let Some(atomic) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let mem = atomic.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut scratch = self.scratch[thread % MAX_QUEUES]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            self.drain(vring, &mem, &mut scratch);
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    fn drain(&self, vring: &VringRwLock<Mem>, mem: &GuestMemoryMmap<()>, scratch: &mut Scratch) {
        let target = Target {
            volume: &self.volume,
            serial: &self.serial,
        };
        loop {
            let Some(chain) = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let used_len = match request::process(mem, chain, &target, scratch) {
                Ok(done) => done.used_len,
                Err(why) => {
                    warn!(socket = %self.socket, head, "malformed request from the VM, returned unanswered: {why}");
                    0
                }
            };
            if let Err(e) = vring.add_used(head, used_len) {
                warn!(socket = %self.socket, "cannot return a request to the VM: {e}");
                break;
            }
            if vring.needs_notification().unwrap_or(true) {
                let _ = vring.signal_used_queue();
            }
        }
    }
}

/// GET_ID's answer: the volume id's first 20 hex digits (what `/sys/block/vdX/serial` shows).
fn serial_of(volume: &Volume) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let hex = volume.header().volume_id.simple().to_string();
    let mut s = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let n = s.len().min(hex.len());
    s[..n].copy_from_slice(&hex.as_bytes()[..n]);
    s
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (60 bytes, little endian).
fn config_space(volume: &Volume) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let put = |c: &mut Vec<u8>, at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
    put(&mut c, 0, &(volume.size() / 512).to_le_bytes()); // capacity, 512-byte sectors
    put(&mut c, 12, &(MAX_QUEUE_SIZE as u32 - 2).to_le_bytes()); // seg_max
    put(&mut c, 20, &volume.sector_size().to_le_bytes()); // blk_size
    put(&mut c, 34, &(MAX_QUEUES as u16).to_le_bytes()); // num_queues (QEMU sets its own)
    put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut c, 40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
    put(&mut c, 44, &(volume.sector_size() / 512).to_le_bytes()); // discard_sector_alignment
    put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(&mut c, 52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        MAX_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.volume.is_read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn acked_features(&self, _features: u64) {
        self.started.store(true, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(self.config.len());
        let end = start.saturating_add(size as usize).min(self.config.len());
        let mut v = self.config[start..end].to_vec();
        // A read past our fields answers zeroes (fields we do not offer).
        v.resize(size as usize, 0);
        v
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        self.mapped.store(true, Ordering::Release);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..MAX_QUEUES).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<Mem>],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let running = self.running.read().unwrap_or_else(|p| p.into_inner());
        if !*running {
            return Ok(());
        }
        // An error here would end the worker thread: guest mistakes are answered per request.
        if let Some(vring) = vrings.get(device_event as usize) {
            self.process_queue(vring, thread_id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::testing::MemBackend;
    use crate::crypto::XtsKey;
    use crate::volume::VolumeHeader;

    fn device(sector: u32, read_only: bool) -> BlkDevice {
        let h = VolumeHeader::new(uuid::Uuid::new_v4(), 64 << 20, sector);
        let v = Volume::with_key(
            Box::new(MemBackend::new()),
            h,
            &XtsKey::generate(),
            read_only,
        );
        BlkDevice::new(Arc::new(v.unwrap()), "test.sock".into())
    }

    fn u32_at(c: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(c[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn the_config_space_describes_the_volume() {
        let d = device(4096, false);
        let c = d.get_config(0, 60);
        assert_eq!(
            u64::from_le_bytes(c[..8].try_into().unwrap()),
            (64 << 20) / 512
        );
        assert_eq!(u32_at(&c, 20), 4096, "blk_size = the encryption sector");
        assert_eq!(u32_at(&c, 12), MAX_QUEUE_SIZE as u32 - 2, "seg_max");
        assert_eq!(u32_at(&c, 44), 8, "discard alignment in 512-byte sectors");
        // A field read on its own, and reads past what we fill, answer zeroes.
        assert_eq!(d.get_config(20, 4), 4096u32.to_le_bytes());
        assert_eq!(d.get_config(56, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.get_config(1000, 4), [0; 4]);
        assert_eq!(u32_at(&device(512, false).get_config(0, 60), 20), 512);
    }

    #[test]
    fn read_only_volumes_offer_ro_and_no_discard() {
        let bit = |f: u64, b: u32| f & (1 << b) != 0;
        let rw = device(4096, false).features();
        let ro = device(4096, true).features();
        for b in [
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ] {
            assert!(bit(rw, b) && bit(ro, b), "feature bit {b}");
        }
        assert!(!bit(rw, VIRTIO_BLK_F_RO) && bit(ro, VIRTIO_BLK_F_RO));
        assert!(bit(rw, VIRTIO_BLK_F_DISCARD) && !bit(ro, VIRTIO_BLK_F_DISCARD));
        assert!(bit(rw, VIRTIO_BLK_F_WRITE_ZEROES) && !bit(ro, VIRTIO_BLK_F_WRITE_ZEROES));
    }

    #[test]
    fn the_serial_is_the_volume_id() {
        let d = device(4096, false);
        let id = d.volume.header().volume_id.simple().to_string();
        assert_eq!(&d.serial[..], &id.as_bytes()[..20]);
    }
}
