//! Request handling against a mock guest: chains built in guest memory with virtio-queue's
//! `MockSplitQueue`, well-formed and malformed.

use super::*;
use crate::backend::testing::MemBackend;
use crate::crypto::XtsKey;
use crate::volume::VolumeHeader;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestMemoryMmap, Le32, Le64};

const MEM_SIZE: usize = 4 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x3f_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const SERIAL: [u8; 20] = *b"0123456789abcdef0123";

fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn volume(read_only: bool) -> Volume {
    let h = VolumeHeader::new(uuid::Uuid::new_v4(), 8 << 20, 4096);
    Volume::with_key(
        Box::new(MemBackend::new()),
        h,
        &XtsKey::generate(),
        read_only,
    )
    .unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemoryMmap<()>, kind: u32, sector: u64) {
    mem.write_obj(Le32::from(kind), GuestAddress(HDR)).unwrap();
    mem.write_obj(Le32::from(0), GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(Le64::from(sector), GuestAddress(HDR + 8))
        .unwrap();
}

/// Runs the chain `descs` (linked in order) and returns the answer.
fn run(
    mem: &GuestMemoryMmap<()>,
    vol: &Volume,
    descs: &[RawDescriptor],
) -> Result<Done, &'static str> {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    let t = Target {
        volume: vol,
        serial: &SERIAL,
    };
    process(mem, chain, &t, &mut Scratch::default())
}

fn status(mem: &GuestMemoryMmap<()>) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn ok(used_len: u32) -> Result<Done, &'static str> {
    Ok(Done {
        used_len,
        status: Some(VIRTIO_BLK_S_OK as u8),
    })
}

fn refused(s: u32) -> Result<Done, &'static str> {
    Ok(Done {
        used_len: 1,
        status: Some(s as u8),
    })
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

#[test]
fn a_write_reads_back_through_split_buffers() {
    let (m, vol) = (mem(), volume(false));
    let data = pattern(8192, 7);
    m.write_slice(&data, GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 8);
    let out = [desc(HDR, 16, 0), desc(DATA, 8192, 0), desc(STATUS, 1, W)];
    assert_eq!(run(&m, &vol, &out), ok(1));
    let mut back = vec![0u8; 8192];
    vol.read(8 * 512, &mut back).unwrap();
    assert_eq!(back, data);

    header(&m, VIRTIO_BLK_T_IN, 8);
    let dst = DATA + 0x10000;
    let inn = [
        desc(HDR, 16, 0),
        desc(dst, 512, W),
        desc(dst + 512, 7680, W),
        desc(STATUS, 1, W),
    ];
    assert_eq!(run(&m, &vol, &inn), ok(8193));
    let mut got = vec![0u8; 8192];
    m.read_slice(&mut got, GuestAddress(dst)).unwrap();
    assert_eq!(got, data);
}

#[test]
fn flush_get_id_and_unknown_types() {
    let (m, vol) = (mem(), volume(false));
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run(&m, &vol, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]),
        ok(1)
    );

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let id = [desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)];
    assert_eq!(run(&m, &vol, &id), ok(21));
    let mut got = [0u8; 20];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, SERIAL);

    header(&m, 0x7777, 0);
    assert_eq!(
        run(&m, &vol, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]),
        refused(VIRTIO_BLK_S_UNSUPP)
    );
}

#[test]
fn bad_ranges_and_lengths_are_io_errors() {
    let (m, vol) = (mem(), volume(false));
    let io = refused(VIRTIO_BLK_S_IOERR);
    // Past the end (8 MiB = 16384 sectors), an overflowing sector, a length not in sectors.
    for (sector, len) in [(16384 - 1, 1024), (u64::MAX / 256, 512), (0, 100)] {
        header(&m, VIRTIO_BLK_T_IN, sector);
        let d = [desc(HDR, 16, 0), desc(DATA, len, W), desc(STATUS, 1, W)];
        assert_eq!(run(&m, &vol, &d), io, "read at {sector} of {len}");
        header(&m, VIRTIO_BLK_T_OUT, sector);
        let d = [desc(HDR, 16, 0), desc(DATA, len, 0), desc(STATUS, 1, W)];
        assert_eq!(run(&m, &vol, &d), io, "write at {sector} of {len}");
    }
    // A header cut short.
    assert_eq!(run(&m, &vol, &[desc(HDR, 8, 0), desc(STATUS, 1, W)]), io);
}

#[test]
fn buffers_outside_guest_memory_are_io_errors_and_write_nothing() {
    let (m, vol) = (mem(), volume(false));
    let io = refused(VIRTIO_BLK_S_IOERR);
    m.write_slice(&pattern(4096, 1), GuestAddress(DATA))
        .unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let far = MEM_SIZE as u64 - 100; // straddles the end of guest memory
    let d = [
        desc(HDR, 16, 0),
        desc(DATA, 4096, 0),
        desc(far, 4096, 0),
        desc(STATUS, 1, W),
    ];
    assert_eq!(run(&m, &vol, &d), io);
    let mut back = vec![1u8; 8192];
    vol.read(0, &mut back).unwrap();
    assert!(
        back.iter().all(|b| *b == 0),
        "a refused write changed the volume"
    );

    header(&m, VIRTIO_BLK_T_IN, 0);
    let d = [
        desc(HDR, 16, 0),
        desc(u64::MAX - 10, 512, W),
        desc(STATUS, 1, W),
    ];
    assert_eq!(run(&m, &vol, &d), io);
}

#[test]
fn chains_that_cannot_be_answered_are_returned_unanswered() {
    let (m, vol) = (mem(), volume(false));
    header(&m, VIRTIO_BLK_T_IN, 0);
    // No writable status byte; a status of length 0; readable after writable; status outside memory.
    for d in [
        vec![desc(HDR, 16, 0), desc(DATA, 512, 0)],
        vec![desc(HDR, 16, 0), desc(STATUS, 0, W)],
        vec![
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(HDR, 16, 0),
            desc(STATUS, 1, W),
        ],
        vec![desc(HDR, 16, 0), desc(MEM_SIZE as u64 + 4096, 1, W)],
    ] {
        assert!(run(&m, &vol, &d).is_err(), "{d:?}");
    }
}

#[test]
fn a_looping_chain_ends_and_is_refused() {
    let (m, vol) = (mem(), volume(false));
    header(&m, VIRTIO_BLK_T_IN, 0);
    let q = MockSplitQueue::new(&m, 16);
    let next = (VRING_DESC_F_NEXT) as u16;
    let d = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, next | W, 0)),
    ];
    let chain = q.build_multiple_desc_chains(&d).unwrap();
    let t = Target {
        volume: &vol,
        serial: &SERIAL,
    };
    assert!(process(&m, chain, &t, &mut Scratch::default()).is_err());
    // A next index past the table.
    let d = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, next | W, 999)),
    ];
    let chain = q.build_multiple_desc_chains(&d).unwrap();
    assert!(process(&m, chain, &t, &mut Scratch::default()).is_err());
}

#[test]
fn indirect_descriptors_carry_a_request() {
    let (m, vol) = (mem(), volume(false));
    let data = pattern(4096, 3);
    m.write_slice(&data, GuestAddress(DATA)).unwrap();
    vol.write(4096, &mut data.clone(), false).unwrap();
    header(&m, VIRTIO_BLK_T_IN, 8);
    // The indirect table: header, data, status, linked by NEXT.
    let table = 0x30_0000u64;
    let next = VRING_DESC_F_NEXT as u16;
    let dst = DATA + 0x8000;
    let entries = [
        SplitDescriptor::new(HDR, 16, next, 1),
        SplitDescriptor::new(dst, 4096, next | W, 2),
        SplitDescriptor::new(STATUS, 1, W, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        m.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let ind = [desc(table, 48, VRING_DESC_F_INDIRECT as u16)];
    assert_eq!(run(&m, &vol, &ind), ok(4097));
    let mut got = vec![0u8; 4096];
    m.read_slice(&mut got, GuestAddress(dst)).unwrap();
    assert_eq!(got, data);
    // A table whose length is not whole descriptors cannot be followed.
    let bad = [desc(table, 40, VRING_DESC_F_INDIRECT as u16)];
    assert!(run(&m, &vol, &bad).is_err());
}

#[test]
fn read_only_exports_refuse_writes_and_serve_reads() {
    let (m, vol) = (mem(), volume(true));
    let io = refused(VIRTIO_BLK_S_IOERR);
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        run(
            &m,
            &vol,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]
        ),
        io
    );
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&m, kind, 0);
        let d = [desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)];
        assert_eq!(run(&m, &vol, &d), io);
    }
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(
            &m,
            &vol,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)]
        ),
        ok(513)
    );
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run(&m, &vol, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]),
        ok(1)
    );
}

fn segment(m: &GuestMemoryMmap<()>, at: u64, sector: u64, num: u32, flags: u32) {
    m.write_obj(Le64::from(sector), GuestAddress(at)).unwrap();
    m.write_obj(Le32::from(num), GuestAddress(at + 8)).unwrap();
    m.write_obj(Le32::from(flags), GuestAddress(at + 12))
        .unwrap();
}

#[test]
fn discard_and_write_zeroes_clear_ranges_and_check_their_segments() {
    let (m, vol) = (mem(), volume(false));
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    vol.write(0, &mut pattern(65536, 9), false).unwrap();
    let d = [desc(HDR, 16, 0), desc(DATA, 32, 0), desc(STATUS, 1, W)];
    // Two segments: sectors 0..8 and 64..72 (4 KiB each), zeroed with unmap allowed.
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&m, DATA, 0, 8, unmap);
    segment(&m, DATA + 16, 64, 8, 0);
    assert_eq!(run(&m, &vol, &d), ok(1));
    let mut back = vec![0u8; 65536];
    vol.read(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|b| *b == 0));
    assert!(back[32768..36864].iter().all(|b| *b == 0));
    assert_eq!(back[4096..32768], pattern(65536, 9)[4096..32768]);
    // DISCARD: fine without flags; "unmap" or unknown flags are unsupported; past the end or
    // too many segments is an I/O error.
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    segment(&m, DATA, 0, 8, 0);
    segment(&m, DATA + 16, 8, 8, 0);
    assert_eq!(run(&m, &vol, &d), ok(1));
    segment(&m, DATA + 16, 8, 8, unmap);
    assert_eq!(run(&m, &vol, &d), refused(VIRTIO_BLK_S_UNSUPP));
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&m, DATA + 16, 8, 8, 0x80);
    assert_eq!(run(&m, &vol, &d), refused(VIRTIO_BLK_S_UNSUPP));
    segment(&m, DATA + 16, 16384, 8, 0);
    assert_eq!(run(&m, &vol, &d), refused(VIRTIO_BLK_S_IOERR));
    let many = (MAX_DISCARD_SEGMENTS + 1) * 16;
    let d = [desc(HDR, 16, 0), desc(DATA, many, 0), desc(STATUS, 1, W)];
    assert_eq!(run(&m, &vol, &d), refused(VIRTIO_BLK_S_IOERR));
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
}
