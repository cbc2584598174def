//! Layered volumes through the public API: a child over a read-only parent reads the parent's
//! data where it has not written, owns what it writes (also partial sectors), and TRIM or
//! WRITE_ZEROES never let the parent's data show through again; block status across layers;
//! copy-up (flatten) and merging a parent into its child; a mismatched parent is refused; and
//! the version-2 header is pinned by a golden file.

use std::sync::Arc;

use cryptnbd::backend::testing::MemBackend;
use cryptnbd::crypto::XtsKey;
use cryptnbd::volume::{merge_into_child, ParentRef, Volume, VolumeError, VolumeHeader};
use uuid::Uuid;

const SIZE: u64 = 4 << 20;
const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/volume-header-v2.bin"
);

fn base_header(ss: u32) -> VolumeHeader {
    let mut h = VolumeHeader::new(Uuid::new_v4(), SIZE, ss);
    h.key_id = Uuid::new_v4();
    h.key_version = 1;
    h.wrapped_dek = vec![7; 8];
    h.layer_id = Some(Uuid::new_v4());
    h
}

fn child_header(parent: &VolumeHeader) -> VolumeHeader {
    let mut h = parent.clone();
    h.volume_id = Uuid::new_v4();
    h.layer_id = Some(Uuid::new_v4());
    h.parent = Some(ParentRef {
        name: "base@s1".into(),
        volume_id: parent.volume_id,
        layer_id: parent.layer_id.unwrap(),
        size: parent.size,
    });
    h
}

fn copy_key(k: &XtsKey) -> XtsKey {
    XtsKey::from_slice(k.dangerous_as_bytes()).unwrap()
}

/// A parent with 0xAA over [0, 1 MiB) and 0xBB over [2 MiB, 3 MiB), frozen read-only, and a
/// child on its own key over it.
fn layers(ss: u32) -> (MemBackend, Arc<Volume>, MemBackend, Volume, XtsKey) {
    layers_keyed(ss, false)
}

/// [`layers`]; with `same_key` the child shares the parent's DEK (a snapshot chain of one
/// volume) instead of having its own (a clone under another key).
fn layers_keyed(ss: u32, same_key: bool) -> (MemBackend, Arc<Volume>, MemBackend, Volume, XtsKey) {
    let pb = MemBackend::new();
    let pk = XtsKey::generate();
    let ph = base_header(ss);
    let p = Volume::create(pb.clone(), &ph, &pk).unwrap();
    p.write(0, &mut vec![0xAA; 1 << 20], false).unwrap();
    p.write(2 << 20, &mut vec![0xBB; 1 << 20], true).unwrap();
    drop(p);
    let parent =
        Arc::new(Volume::with_key(Box::new(pb.clone()), ph.clone(), &copy_key(&pk), true).unwrap());
    let cb = MemBackend::new();
    let ck = if same_key {
        copy_key(&pk)
    } else {
        XtsKey::generate()
    };
    let child = Volume::create(cb.clone(), &child_header(&ph), &ck)
        .unwrap()
        .with_parent(parent.clone())
        .unwrap();
    (pb, parent, cb, child, ck)
}

fn read(v: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read(off, &mut b).unwrap();
    b
}

#[test]
fn child_reads_through_and_owns_its_writes() {
    for ss in [512, 4096] {
        let (_pb, parent, _cb, child, _) = layers(ss);
        assert_eq!(read(&child, 0, 1 << 20), vec![0xAA; 1 << 20]);
        assert!(read(&child, 1 << 20, 4096).iter().all(|&b| b == 0));
        // A partial-sector write copies the parent's sector up (read-modify-write).
        child.write(100, &mut [1, 2, 3], false).unwrap();
        let got = read(&child, 0, 8192);
        assert_eq!(&got[100..103], &[1, 2, 3]);
        assert!(got[..100].iter().chain(&got[103..]).all(|&b| b == 0xAA));
        child.write(8192, &mut vec![0xCC; 8192], false).unwrap();
        assert_eq!(read(&child, 8192, 8192), vec![0xCC; 8192]);
        // The parent is unchanged.
        assert_eq!(read(&parent, 0, 16384), vec![0xAA; 16384]);
    }
}

#[test]
fn trim_and_write_zeroes_never_reveal_the_parent() {
    for ss in [512, 4096] {
        let (_pb, _parent, _cb, child, _) = layers(ss);
        child.write(0, &mut vec![0x11; 65536], false).unwrap();
        child.trim(0, 65536, false).unwrap();
        // Trim over the parent's data keeps the child's own data (advisory), never 0xAA.
        assert!(read(&child, 0, 65536).iter().all(|&b| b == 0x11));
        child.write_zeroes(0, 65536, true, false).unwrap();
        assert!(read(&child, 0, 65536).iter().all(|&b| b == 0));
        child.write_zeroes(2 << 20, 4096, true, false).unwrap();
        assert!(read(&child, 2 << 20, 8192)[..4096].iter().all(|&b| b == 0));
        assert_eq!(read(&child, (2 << 20) + 4096, 4096), vec![0xBB; 4096]);
        // Where every layer below is a hole, trim punches and the data reads as zeroes.
        child.write(1 << 20, &mut vec![0x22; 65536], false).unwrap();
        child.trim(1 << 20, 65536, false).unwrap();
        assert!(read(&child, 1 << 20, 65536).iter().all(|&b| b == 0));
        assert!(!child.zeroing_is_fast(true));
    }
}

#[test]
fn block_status_merges_the_layers() {
    let (_pb, _parent, _cb, child, _) = layers(4096);
    let ext = child.block_status(0, SIZE).unwrap();
    let mut pos = 0;
    let mut data = Vec::new();
    for e in &ext {
        if !e.hole {
            data.push((pos, e.length));
        }
        pos += e.length;
    }
    assert_eq!(pos, SIZE);
    assert_eq!(data, [(0, 1 << 20), (2 << 20, 1 << 20)]);
}

#[test]
fn copy_up_flattens_and_merge_keeps_the_child_view() {
    let (pb, parent, cb, child, ck) = layers(4096);
    child.write(4096, &mut vec![0x33; 4096], false).unwrap();
    let before = read(&child, 0, SIZE as usize);
    let mut pos = 0;
    while pos < SIZE {
        child.copy_up(pos, 1 << 20).unwrap();
        pos += 1 << 20;
    }
    child.flush().unwrap();
    drop(child);
    drop(parent);
    // Without its parent, the child reads the same.
    let mut h = VolumeHeader::read_from(&cb).unwrap();
    h.parent = None;
    let alone = Volume::with_key(Box::new(cb.clone()), h, &ck, true).unwrap();
    assert_eq!(read(&alone, 0, SIZE as usize), before);

    // Merging a parent into a child of the same volume (same key), by ciphertext.
    let (pb2, parent2, cb2, child2, ck2) = layers_keyed(4096, true);
    drop(pb);
    child2.write(0, &mut vec![0x44; 4096], true).unwrap();
    child2.trim(1 << 20, 1 << 20, true).unwrap();
    let before = read(&child2, 0, SIZE as usize);
    drop(child2);
    drop(parent2);
    let mut ch = VolumeHeader::read_from(&cb2).unwrap();
    merge_into_child(&pb2, &cb2, &ch, |_, _| {}).unwrap();
    ch.parent = None;
    let alone = Volume::with_key(Box::new(cb2.clone()), ch, &ck2, true).unwrap();
    assert_eq!(read(&alone, 0, SIZE as usize), before);
    assert_eq!(before[..4096], vec![0x44; 4096][..]);
    assert_eq!(before[4096..8192], vec![0xAA; 4096][..]);
}

#[test]
fn a_mismatched_parent_is_refused() {
    let (_pb, parent, _cb, _child, _) = layers(4096);
    let mut h = base_header(4096);
    h.parent = Some(ParentRef {
        name: "x@y".into(),
        volume_id: parent.header().volume_id,
        layer_id: Uuid::new_v4(),
        size: SIZE,
    });
    let v = Volume::create(MemBackend::new(), &h, &XtsKey::generate()).unwrap();
    let e = v.with_parent(parent).unwrap_err();
    assert!(matches!(e, VolumeError::ParentMismatch { .. }), "{e}");
    assert!(e.to_string().contains("does not match"), "{e}");
}

fn golden_v2() -> VolumeHeader {
    let mut h = VolumeHeader::new(
        Uuid::parse_str("6f1d2c1e-9a43-4a5e-8d47-0c3b2f1e5a77").unwrap(),
        10 << 30,
        4096,
    );
    h.created = 1_790_000_000;
    h.generation = 3;
    h.key_id = Uuid::parse_str("0b9f4a52-1c3d-4e6f-8a9b-c0d1e2f30415").unwrap();
    h.key_version = 1;
    h.wrapped_dek = (0..108u8).collect();
    h.encryption_context
        .insert("volume_id".into(), h.volume_id.to_string());
    h.layer_id = Some(Uuid::parse_str("11111111-2222-4333-8444-555555555555").unwrap());
    h.parent = Some(ParentRef {
        name: "base@monday".into(),
        volume_id: Uuid::parse_str("a6a7a8a9-0000-4000-8000-000000000001").unwrap(),
        layer_id: Uuid::parse_str("a6a7a8a9-0000-4000-8000-000000000002").unwrap(),
        size: 10 << 30,
    });
    h
}

#[test]
fn golden_header_v2_is_pinned() {
    let enc = golden_v2().encode().unwrap();
    if std::env::var_os("CRYPTNBD_BLESS").is_some() {
        std::fs::write(GOLDEN, &enc).unwrap();
    }
    let golden = std::fs::read(GOLDEN).expect("tests/data/volume-header-v2.bin");
    assert_eq!(
        enc, golden,
        "the v2 header encoding changed: a format change"
    );
    assert_eq!(VolumeHeader::decode(&golden).unwrap(), golden_v2());
    assert_eq!(u32::from_le_bytes(golden[8..12].try_into().unwrap()), 2);
}
