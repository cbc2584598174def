//! The vhost-user socket against a small frontend of our own (`vhost`'s `Frontend`, speaking the
//! protocol as QEMU does, with guest memory in a memfd): who may connect, a request served end to
//! end, and requests left in a crashed backend's inflight region redone in their order.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::backend::testing::MemBackend;
use crate::crypto::XtsKey;
use crate::server::{AllowEntry, AllowList, Rules};
use crate::volume::VolumeHeader;

const MEM_SIZE: usize = 1 << 20;
/// Where the frontend pretends the guest's RAM is in its own address space.
const VMM_BASE: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 8;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: u64 = 0x10000;
const SECTOR: usize = 4096;

fn volume() -> Arc<Volume> {
    let h = VolumeHeader::new(uuid::Uuid::new_v4(), 16 << 20, SECTOR as u32);
    let v = Volume::with_key(Box::new(MemBackend::new()), h, &XtsKey::generate(), false);
    Arc::new(v.unwrap())
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn access(allow_uids: Vec<u32>, rules: Vec<AllowEntry>, own_uid: u32) -> VhostAccess {
    VhostAccess {
        peers: UnixPeerPolicy {
            allow_uids,
            allow_gids: vec![],
        },
        policy: Arc::new(Policy::new(
            Rules::new(AllowList::new(rules), None).unwrap(),
        )),
        own_uid,
    }
}

/// Fields drop in order: the server before its directory.
struct Served {
    server: Option<VhostBlkServer>,
    sock: PathBuf,
    volume: Arc<Volume>,
    _dir: tempfile::TempDir,
}

fn serve(access: VhostAccess) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let volume = volume();
    let server = start(VhostBlkExport {
        socket: sock.clone(),
        name: "vm".into(),
        volume: volume.clone(),
        access,
    })
    .unwrap();
    Served {
        _dir: dir,
        sock,
        server: Some(server),
        volume,
    }
}

fn memfd(size: u64) -> File {
    let f = File::from(memfd_create(c"vhost-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap());
    f.set_len(size).unwrap();
    f
}

fn map(file: &File, size: usize) -> GuestMemoryMmap {
    let r = MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), size).unwrap();
    GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(r, GuestAddress(0)).unwrap()]).unwrap()
}

/// A frontend with the features negotiated and the guest's memory sent.
struct Vm {
    fe: Frontend,
    mem: GuestMemoryMmap,
    _ram: File,
    kick: EventFd,
    call: EventFd,
}

fn connect(sock: &Path) -> Frontend {
    Frontend::connect(sock, MAX_QUEUES_FOR_TEST).unwrap()
}

const MAX_QUEUES_FOR_TEST: u64 = 8;

fn negotiate(mut fe: Frontend) -> vhost::Result<Vm> {
    fe.set_owner()?;
    let features = fe.get_features()?;
    fe.set_features(features)?;
    let proto = fe.get_protocol_features()?;
    assert!(proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    fe.set_protocol_features(proto)?;
    let ram = memfd(MEM_SIZE as u64);
    let mem = map(&ram, MEM_SIZE);
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: VMM_BASE,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
    }])?;
    Ok(Vm {
        fe,
        mem,
        _ram: ram,
        kick: EventFd::new(0).unwrap(),
        call: EventFd::new(0).unwrap(),
    })
}

impl Vm {
    /// Writes a chain at descriptors `first..first+3`: header, `data` at `buf`, status byte;
    /// `sector` counts volume sectors.
    fn post_write(&self, first: u16, sector: u64, buf: u64, data: &[u8]) {
        let sector = sector * (SECTOR as u64 / 512);
        let hdr = buf + 0x8000;
        let status = hdr + 0x100;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_slice(data, GuestAddress(buf)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let descs = [
            (hdr, 16u32, 1u16),
            (buf, data.len() as u32, 1),
            (status, 1, 2), // VIRTQ_DESC_F_WRITE, no next
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let at = DESC + 16 * u64::from(first + i as u16);
            let next = if flags & 1 != 0 {
                first + i as u16 + 1
            } else {
                0
            };
            self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
            self.mem
                .write_obj(len.to_le(), GuestAddress(at + 8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), GuestAddress(at + 12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), GuestAddress(at + 14))
                .unwrap();
        }
    }

    fn status(&self, buf: u64) -> u8 {
        self.mem.read_obj(GuestAddress(buf + 0x8100)).unwrap()
    }

    /// Makes `heads` available, in that order.
    fn publish(&self, heads: &[u16]) {
        for (i, h) in heads.iter().enumerate() {
            let at = GuestAddress(AVAIL + 4 + 2 * i as u64);
            self.mem.write_obj(h.to_le(), at).unwrap();
        }
        let idx = heads.len() as u16;
        self.mem
            .store(idx.to_le(), GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
    }

    fn start_queue(&mut self) -> vhost::Result<()> {
        self.fe.set_vring_num(0, QSIZE)?;
        self.fe.set_vring_base(0, 0)?;
        self.fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: VMM_BASE + DESC,
                used_ring_addr: VMM_BASE + USED,
                avail_ring_addr: VMM_BASE + AVAIL,
                log_addr: None,
            },
        )?;
        self.fe.set_vring_kick(0, &self.kick)?;
        self.fe.set_vring_call(0, &self.call)?;
        self.fe.set_vring_enable(0, true)
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(USED + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// Waits (bounded) until the used ring holds `n` entries; returns their heads.
    fn wait_used(&self, n: u16) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.used_idx() < n {
            assert!(Instant::now() < deadline, "the backend did not answer");
            std::thread::sleep(Duration::from_millis(5));
        }
        (0..n)
            .map(|i| {
                let at = GuestAddress(USED + 4 + 8 * u64::from(i));
                u32::from_le(self.mem.read_obj(at).unwrap())
            })
            .collect()
    }
}

fn sector_of(volume: &Volume, sector: u64) -> Vec<u8> {
    let mut b = vec![0u8; SECTOR];
    volume.read(sector * SECTOR as u64, &mut b).unwrap();
    b
}

#[test]
fn a_write_is_served_end_to_end_and_signalled() {
    let s = serve(access(vec![], vec![], euid()));
    let mut vm = negotiate(connect(&s.sock)).unwrap();
    vm.start_queue().unwrap();
    let data = vec![0x5au8; SECTOR];
    vm.post_write(0, 3, DATA, &data);
    vm.publish(&[0]);
    vm.kick.write(1).unwrap();
    assert_eq!(vm.wait_used(1), vec![0]);
    assert_eq!(vm.status(DATA), VIRTIO_BLK_S_OK as u8);
    assert_eq!(vm.call.read().unwrap(), 1, "the guest was notified");
    assert!(sector_of(&s.volume, 3) == data, "the write did not land");
    // Stopping the ring reports where it stopped.
    assert_eq!(vm.fe.get_vring_base(0).unwrap(), 1);
}

#[test]
fn peers_the_rules_refuse_are_cut_off_before_any_message() {
    let me = euid();
    let stranger = me.wrapping_add(1);
    // --allow-uid names someone else, and we are not the server's user.
    let s = serve(access(vec![me.wrapping_add(2)], vec![], stranger));
    let fe = connect(&s.sock);
    assert!(negotiate(fe).is_err(), "a refused peer got an answer");
    // The socket still serves the next, allowed, VM.
    drop(s);
    let s = serve(access(vec![me], vec![], stranger));
    negotiate(connect(&s.sock)).unwrap();
    drop(s);

    // --allow rules: uid:me gets another export, not this one ...
    let rule = |export: &str| AllowEntry {
        client: Principal::Uid(me),
        exports: vec![export.into()],
    };
    let s = serve(access(vec![], vec![rule("other")], stranger));
    assert!(negotiate(connect(&s.sock)).is_err());
    drop(s);
    // ... or this one.
    let s = serve(access(vec![], vec![rule("vm")], stranger));
    negotiate(connect(&s.sock)).unwrap();
    drop(s);
    // The server's own user keeps everything.
    let s = serve(access(vec![me.wrapping_add(2)], vec![rule("other")], me));
    negotiate(connect(&s.sock)).unwrap();
}

#[test]
fn requests_left_in_flight_by_a_crash_are_redone_in_their_order() {
    let s = serve(access(vec![], vec![], euid()));
    let mut vm = negotiate(connect(&s.sock)).unwrap();
    // As QEMU: a region from the backend, kept and handed back after a backend restart.
    let req = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QSIZE,
    };
    let (info, region) = vm.fe.get_inflight_fd(&req).unwrap();
    assert_eq!(info.mmap_size, inflight::queue_region_size(QSIZE));
    // The crashed backend had taken two writes to sector 0 — "A" (head 3) before "B" (head 0),
    // counters 5 and 6 — and answered neither; the avail ring lists them the other way round,
    // so only the inflight order leaves B on the disk.
    let a = vec![b'A'; SECTOR];
    let b = vec![b'B'; SECTOR];
    vm.post_write(0, 0, DATA, &b);
    vm.post_write(3, 0, DATA + 0x20000, &a);
    vm.publish(&[0, 3]);
    let r = map(&region, info.mmap_size as usize);
    r.write_obj(1u16.to_le(), GuestAddress(8)).unwrap(); // version
    r.write_obj(QSIZE.to_le(), GuestAddress(10)).unwrap(); // desc_num
    for (head, counter) in [(3u64, 5u64), (0, 6)] {
        let d = 16 + 16 * head;
        r.write_obj(1u8, GuestAddress(d)).unwrap();
        r.write_obj(counter.to_le(), GuestAddress(d + 8)).unwrap();
    }
    vm.fe.set_inflight_fd(&info, region.as_raw_fd()).unwrap();
    // QEMU rewinds the ring to its used index (0) and starts it; no kick is needed.
    vm.start_queue().unwrap();
    assert_eq!(vm.wait_used(2), vec![3, 0], "redone oldest first");
    assert_eq!(vm.status(DATA), VIRTIO_BLK_S_OK as u8);
    assert_eq!(vm.status(DATA + 0x20000), VIRTIO_BLK_S_OK as u8);
    assert!(
        sector_of(&s.volume, 0)[..] == b[..],
        "the later write must win"
    );
    for head in [0u64, 3] {
        let flag: u8 = r.read_obj(GuestAddress(16 + 16 * head)).unwrap();
        assert_eq!(flag, 0, "head {head} still marked in flight");
    }
    let used: u16 = r.read_obj(GuestAddress(14)).unwrap();
    assert_eq!(u16::from_le(used), 2);
    // The ring goes on after the redone requests, not from the base QEMU sent.
    assert_eq!(vm.fe.get_vring_base(0).unwrap(), 2);
}

#[test]
fn shutdown_cuts_the_vm_off_and_removes_the_socket() {
    let mut s = serve(access(vec![], vec![], euid()));
    let mut vm = negotiate(connect(&s.sock)).unwrap();
    vm.start_queue().unwrap();
    s.server.take().unwrap().shutdown();
    assert!(vm.fe.get_features().is_err());
    assert!(!s.sock.exists());
}
