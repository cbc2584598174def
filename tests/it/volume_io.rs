//! Volume data path through the public API: round trips at any alignment, zero/hole semantics,
//! errno mapping, read-only, concurrency of RMW writers in one sector, block status, and that the
//! data area is standard AES-XTS (plain64) checked with the independent `xts-mode` crate.

use std::sync::Arc;

use aes::cipher::KeyInit;
use aes::Aes256;
use cryptnbd::backend::testing::{FaultyBackend, MemBackend};
use cryptnbd::backend::{Backend, FileBackend};
use cryptnbd::crypto::XtsKey;
use cryptnbd::nbd as errno;
use cryptnbd::server::errno_for;
use cryptnbd::volume::{Extent, Volume, VolumeError, VolumeHeader};
use uuid::Uuid;

const MIB: u64 = 1 << 20;

fn header(size: u64, ss: u32) -> VolumeHeader {
    let mut h = VolumeHeader::new(Uuid::new_v4(), size, ss);
    h.key_id = Uuid::new_v4();
    h.key_version = 1;
    h.wrapped_dek = vec![1, 2, 3];
    h.encryption_context
        .insert("volume_id".into(), h.volume_id.to_string());
    h
}

fn mem_volume(size: u64, ss: u32) -> (MemBackend, Volume, XtsKey) {
    let b = MemBackend::new();
    let key = XtsKey::generate();
    let v = Volume::create(b.clone(), &header(size, ss), &key).unwrap();
    (b, v, key)
}

/// A new volume in a new file at `path`, on a fresh key.
fn file_volume(path: &std::path::Path, size: u64, ss: u32) -> Volume {
    let f = std::fs::File::options()
        .create_new(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Volume::create(
        FileBackend::new(f, path),
        &header(size, ss),
        &XtsKey::generate(),
    )
    .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn new_volume_reads_zeroes_and_is_sparse() {
    let (b, v, _) = mem_volume(8 * MIB, 4096);
    assert_eq!(b.len().unwrap(), MIB + 8 * MIB);
    let mut buf = vec![0xFFu8; 3 * 4096 + 100];
    let out = v.read(77, &mut buf).unwrap();
    assert!(out.all_zero);
    assert!(buf.iter().all(|&x| x == 0));
    assert_eq!(
        v.block_status(0, 8 * MIB).unwrap(),
        vec![Extent {
            length: 8 * MIB,
            hole: true,
            zero: true
        }]
    );
}

#[test]
fn round_trips_at_any_alignment_both_sector_sizes() {
    for ss in [512u32, 4096] {
        let (_, v, _) = mem_volume(MIB, ss);
        for (off, len) in [
            (0u64, 4096usize),
            (1, 1),
            (511, 2),
            (4095, 4098),
            (10_000, 70_000),
            (MIB - 5, 5),
        ] {
            let data = pattern(len, off as u8);
            let mut scratch = data.clone();
            v.write(off, &mut scratch, false).unwrap();
            let mut back = vec![0u8; len];
            let out = v.read(off, &mut back).unwrap();
            assert_eq!(back, data, "ss {ss} off {off} len {len}");
            assert!(!out.all_zero);
        }
    }
}

#[test]
fn ciphertext_is_standard_aes_xts_plain64() {
    use xts_mode::{get_tweak_default, Xts128};
    for ss in [512u32, 4096] {
        let (b, v, key) = mem_volume(MIB, ss);
        let data = pattern(64 << 10, 9);
        v.write(8192, &mut data.clone(), false).unwrap();
        let disk = b.snapshot();
        let oracle = Xts128::new(
            Aes256::new(key.dangerous_k1().into()),
            Aes256::new(key.dangerous_k2().into()),
        );
        let start = (MIB + 8192) as usize;
        let mut area = disk[start..start + data.len()].to_vec();
        assert_ne!(area, data);
        oracle.decrypt_area(
            &mut area,
            ss as usize,
            (8192 / 512) as u128 / (ss as u128 / 512),
            |s| get_tweak_default(s * (ss as u128 / 512)),
        );
        assert_eq!(area, data, "sector size {ss}");
    }
}

#[test]
fn out_of_range_maps_to_einval_for_reads_and_enospc_for_writes() {
    let (_, v, _) = mem_volume(MIB, 4096);
    let mut buf = [0u8; 10];
    let e = v.read(MIB - 5, &mut buf).unwrap_err();
    assert!(matches!(e, VolumeError::OutOfRange { .. }));
    assert_eq!(errno_for(&e), errno::EINVAL);
    assert_eq!(
        errno_for(&v.write(MIB, &mut buf, false).unwrap_err()),
        errno::ENOSPC
    );
    assert_eq!(
        errno_for(&v.write_zeroes(u64::MAX, 2, true, false).unwrap_err()),
        errno::ENOSPC
    );
    assert_eq!(
        errno_for(&v.trim(MIB, 1, false).unwrap_err()),
        errno::EINVAL
    );
    assert_eq!(errno_for(&v.cache(MIB, 1).unwrap_err()), errno::EINVAL);
    assert_eq!(
        errno_for(&v.block_status(0, MIB + 1).unwrap_err()),
        errno::EINVAL
    );
}

#[test]
fn read_only_volume_refuses_writes_with_eperm() {
    let (b, v, key) = mem_volume(MIB, 4096);
    drop(v);
    let ro = Volume::open(b, true, |_| {
        XtsKey::from_slice(key.dangerous_as_bytes()).map_err(|_| VolumeError::Invalid("key".into()))
    })
    .unwrap();
    assert!(ro.is_read_only());
    let mut d = [1u8; 512];
    for e in [
        ro.write(0, &mut d, false).unwrap_err(),
        ro.trim(0, 4096, false).unwrap_err(),
        ro.write_zeroes(0, 4096, true, false).unwrap_err(),
    ] {
        assert!(matches!(e, VolumeError::ReadOnly { .. }), "{e}");
        assert_eq!(errno_for(&e), errno::EPERM);
    }
    ro.read(0, &mut d).unwrap();
}

#[test]
fn trim_and_write_zeroes_punch_holes_and_read_as_zeroes() {
    let (_, v, _) = mem_volume(MIB, 4096);
    v.write(0, &mut pattern(64 << 10, 1), true).unwrap();
    v.trim(4096, 8192, false).unwrap();
    v.write_zeroes(20_000, 10_000, true, true).unwrap();
    let mut all = vec![0u8; 64 << 10];
    v.read(0, &mut all).unwrap();
    let mut expect = pattern(64 << 10, 1);
    expect[4096..12288].fill(0);
    expect[20_000..30_000].fill(0);
    assert_eq!(all, expect);
    let mut hole = vec![1u8; 8192];
    assert!(v.read(4096, &mut hole).unwrap().all_zero);
    assert!(v.zeroing_is_fast(true));
    assert!(!v.zeroing_is_fast(false));
    let st = v.block_status(0, 64 << 10).unwrap();
    assert_eq!(
        st[0],
        Extent {
            length: 4096,
            hole: false,
            zero: false
        }
    );
    assert_eq!(
        st[1],
        Extent {
            length: 8192,
            hole: true,
            zero: true
        }
    );
    assert_eq!(st.iter().map(|e| e.length).sum::<u64>(), 64 << 10);
}

#[test]
fn write_zeroes_without_punch_writes_encrypted_zeroes() {
    let b = FaultyBackend::new(MemBackend::new(), u64::MAX).without_punch();
    let v = Volume::create(b.clone(), &header(MIB, 4096), &XtsKey::generate()).unwrap();
    v.write(0, &mut pattern(16384, 3), false).unwrap();
    v.write_zeroes(0, 16384, true, false).unwrap();
    assert!(!v.zeroing_is_fast(true));
    let disk = b.inner().snapshot();
    assert!(disk[MIB as usize..MIB as usize + 16384]
        .iter()
        .any(|&x| x != 0));
    let mut back = vec![1u8; 16384];
    assert!(!v.read(0, &mut back).unwrap().all_zero);
    assert!(back.iter().all(|&x| x == 0));
}

#[test]
fn discard_disabled_trim_keeps_data_and_write_zeroes_encrypts() {
    let b = MemBackend::new();
    let mut h = header(MIB, 512);
    h.discard = false;
    let v = Volume::create(b.clone(), &h, &XtsKey::generate()).unwrap();
    v.write(0, &mut pattern(4096, 5), false).unwrap();
    v.trim(0, 4096, false).unwrap();
    let mut back = vec![0u8; 4096];
    v.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(4096, 5));
    v.write_zeroes(0, 4096, true, false).unwrap();
    assert!(!v.zeroing_is_fast(true));
    v.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0));
    assert!(b.snapshot()[MIB as usize..MIB as usize + 4096]
        .iter()
        .any(|&x| x != 0));
}

#[test]
fn full_disk_write_fails_with_enospc_and_leaves_other_sectors_intact() {
    let b = FaultyBackend::new(MemBackend::new(), u64::MAX);
    let v = Volume::create(b.clone(), &header(MIB, 4096), &XtsKey::generate()).unwrap();
    v.write(0, &mut pattern(16384, 7), true).unwrap();
    b.set_budget(4096);
    let e = v.write(8192, &mut pattern(32768, 8), false).unwrap_err();
    assert_eq!(errno_for(&e), errno::ENOSPC);
    let msg = e.to_string();
    assert!(
        msg.contains("writing 32768 bytes at volume offset 8192"),
        "{msg}"
    );
    assert_eq!(e.io_error().unwrap().raw_os_error(), Some(libc::ENOSPC));
    // An unaligned write into a fresh sector, and the earlier data, are untouched.
    let mut back = vec![0u8; 16384];
    v.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(16384, 7));
    b.set_budget(0);
    assert_eq!(
        errno_for(&v.write(100, &mut [1u8; 10], false).unwrap_err()),
        errno::ENOSPC
    );
    v.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(16384, 7));
}

#[test]
fn concurrent_small_writes_into_one_sector_are_never_lost() {
    let (_, v, _) = mem_volume(MIB, 4096);
    let v = Arc::new(v);
    for round in 0..200u8 {
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let v = v.clone();
                std::thread::spawn(move || {
                    let mut d = vec![round.wrapping_mul(8).wrapping_add(i as u8) | 0x80; 512];
                    v.write(i * 512, &mut d, false).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut back = vec![0u8; 4096];
        v.read(0, &mut back).unwrap();
        for i in 0..8usize {
            let want = round.wrapping_mul(8).wrapping_add(i as u8) | 0x80;
            assert!(
                back[i * 512..(i + 1) * 512].iter().all(|&x| x == want),
                "round {round} part {i}"
            );
        }
    }
}

#[test]
fn file_backend_volume_is_sparse_and_reports_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.vol");
    let v = file_volume(&path, 1 << 40, 4096);
    v.write(1 << 30, &mut pattern(1 << 20, 2), true).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 8 << 20,
        "allocated {}",
        meta.blocks() * 512
    );
    let st = v.block_status(0, 4 << 30).unwrap();
    assert_eq!(
        st[0],
        Extent {
            length: 1 << 30,
            hole: true,
            zero: true
        }
    );
    assert_eq!(
        st[1],
        Extent {
            length: 1 << 20,
            hole: false,
            zero: false
        }
    );
    v.cache(0, 1 << 20).unwrap();
    v.flush().unwrap();
    let mut back = vec![0u8; 1 << 20];
    v.read(1 << 30, &mut back).unwrap();
    assert_eq!(back, pattern(1 << 20, 2));
}

#[test]
fn crash_consistency_flushed_and_fua_writes_survive_unflushed_may_not() {
    use cryptnbd::backend::testing::{CrashBackend, CrashMode};
    let cb = CrashBackend::new();
    let key = XtsKey::generate();
    let v = Volume::create(cb.clone(), &header(MIB, 4096), &key).unwrap();
    v.write(0, &mut pattern(8192, 1), false).unwrap();
    v.flush().unwrap();
    v.write(8192, &mut pattern(4096, 2), true).unwrap();
    v.write(100, &mut pattern(10, 3), false).unwrap();
    v.write(65536, &mut pattern(4096, 4), false).unwrap();
    for mode in [CrashMode::DropUnsynced, CrashMode::TearUnsynced] {
        let disk = cb.after_crash(mode);
        let k = XtsKey::from_slice(key.dangerous_as_bytes()).unwrap();
        let v2 = Volume::open(disk, false, move |_| Ok::<_, VolumeError>(k)).unwrap();
        let mut b = vec![0u8; 8192];
        v2.read(4096, &mut b).unwrap();
        assert_eq!(&b[..4096], &pattern(8192, 1)[4096..], "{mode:?}");
        assert_eq!(&b[4096..], &pattern(4096, 2)[..], "{mode:?}");
        if mode == CrashMode::DropUnsynced {
            let mut first = vec![0u8; 4096];
            v2.read(0, &mut first).unwrap();
            assert_eq!(first, pattern(8192, 1)[..4096], "unsynced RMW lost whole");
            let mut lost = vec![1u8; 4096];
            assert!(v2.read(65536, &mut lost).unwrap().all_zero);
        }
    }
}

#[test]
fn empty_requests_are_no_ops() {
    let (b, v, _) = mem_volume(MIB, 4096);
    let before = b.snapshot();
    v.write(123, &mut [], true).unwrap();
    assert!(v.read(MIB, &mut []).unwrap().all_zero);
    v.trim(5, 0, false).unwrap();
    v.write_zeroes(5, 0, true, false).unwrap();
    assert_eq!(b.snapshot(), before);
}

/// `try_read_cached` is `read` when it answers: same bytes, same hole flag. On tmpfs (a memory
/// filesystem) it always answers aligned requests; unaligned ones, and backends that cannot tell
/// (the memory test backend), are left to `read`.
#[test]
fn try_read_cached_agrees_with_read() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs a tmpfs at /dev/shm");
    for ss in [512u32, 4096] {
        let dir = tempfile::tempdir_in(shm).unwrap();
        let v = file_volume(&dir.path().join("v.vol"), 4 << 20, ss);
        v.write(8192, &mut pattern(65536, 5), false).unwrap();
        for (off, len) in [
            (8192u64, 65536usize),
            (0, 4096),
            (1 << 20, 8192),
            (12288, 4096),
        ] {
            let mut a = vec![0u8; len];
            let mut b = vec![0xEE; len];
            let ra = v.read(off, &mut a).unwrap();
            let rb = v
                .try_read_cached(off, &mut b)
                .unwrap()
                .expect("tmpfs reads never wait");
            assert!(a == b, "bytes differ at {off}+{len}");
            assert_eq!(ra.all_zero, rb.all_zero, "hole flag at {off}+{len}");
        }
        let mut odd = vec![0u8; 100];
        assert!(v.try_read_cached(8193, &mut odd).unwrap().is_none());
        assert!(
            v.try_read_cached(4 << 20, &mut vec![0u8; 4096]).is_err(),
            "out of range"
        );
    }
    // A backend that cannot tell whether a read would wait never claims one is cached.
    let b = FaultyBackend::new(MemBackend::new(), u64::MAX);
    let v = Volume::create(b, &header(1 << 20, 4096), &XtsKey::generate()).unwrap();
    assert!(v
        .try_read_cached(0, &mut vec![0u8; 4096])
        .unwrap()
        .is_none());
}
