//! The virtio-blk device one VM sees over its vhost-user socket: what it is (the volume, the
//! serial GET_ID answers), the virtio and vhost-user features it offers and its configuration
//! space. The protocol (`handler`) and the queue workers (`queue`) read these; the device itself
//! holds no per-connection state, so one is built per socket and reused across reconnects.

use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use super::request::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use crate::volume::Volume;

/// Queues offered (QEMU's `num-queues` may ask for up to this many).
pub(crate) const MAX_QUEUES: usize = 8;
/// Largest queue a driver may set up (QEMU's `queue-size`; 128 by default).
pub(crate) const MAX_QUEUE_SIZE: usize = 1024;

/// One VM's block device over one volume.
pub(crate) struct BlkDevice {
    pub(crate) volume: Arc<Volume>,
    /// The socket path, for logs.
    pub(crate) socket: String,
    pub(crate) serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: Vec<u8>,
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
        }
    }

    /// The virtio features offered.
    pub(crate) fn features(&self) -> u64 {
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

    /// The vhost-user protocol features offered: the configuration space, several queues,
    /// inflight tracking (requests in flight at a crash are redone) and acknowledged requests.
    pub(crate) fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    /// `size` bytes of the configuration space from `offset`; past our fields, zeroes.
    pub(crate) fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(self.config.len());
        let end = start.saturating_add(size as usize).min(self.config.len());
        let mut v = self.config[start..end].to_vec();
        v.resize(size as usize, 0);
        v
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
