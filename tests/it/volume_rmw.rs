//! Byte-granular read-modify-write, which is what the advertised minimum block size of 1 promises:
//! tiny writes at and around sector edges against a `Vec<u8>` model (both sector sizes), each
//! touching the ciphertext of its own sectors only; and concurrency on a real file: threads
//! writing interleaved sub-sector pieces of the same sectors never lose each other's bytes,
//! readers of untouched bytes in those sectors always see them intact, and writers of the same
//! bytes leave one writer's bytes (never a torn mixture decrypted to garbage).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use cryptnbd::backend::testing::MemBackend;
use cryptnbd::backend::FileBackend;
use cryptnbd::crypto::XtsKey;
use cryptnbd::volume::{Volume, VolumeHeader};
use proptest::prelude::*;
use uuid::Uuid;

const HEADER: usize = 1 << 20;

fn mem_volume(size: u64, ss: u32) -> (MemBackend, Volume) {
    let b = MemBackend::new();
    let h = VolumeHeader::new(Uuid::new_v4(), size, ss);
    let v = Volume::create(b.clone(), &h, &XtsKey::generate()).unwrap();
    (b, v)
}

fn file_volume(dir: &tempfile::TempDir, size: u64, ss: u32) -> Volume {
    let path = dir.path().join("v.vol");
    let f = std::fs::File::options()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let h = VolumeHeader::new(Uuid::new_v4(), size, ss);
    Volume::create(FileBackend::new(f, &path), &h, &XtsKey::generate()).unwrap()
}

/// An offset within `delta` bytes of a sector edge (or anywhere), and a short length.
fn near_edge(sectors: u64, ss: u64) -> impl Strategy<Value = (u64, usize)> {
    let size = sectors * ss;
    prop_oneof![
        (0..=sectors, -40i64..40, 1usize..=40).prop_map(move |(s, d, n)| {
            let off = ((s * ss) as i64 + d).clamp(0, size as i64 - 1) as u64;
            (off, n.min((size - off) as usize))
        }),
        (0..size, 1usize..=600).prop_map(move |(o, n)| (o, n.min((size - o) as usize))),
    ]
}

fn byte_writes(ss: u32, ops: &[((u64, usize), u8, bool)]) -> Result<(), TestCaseError> {
    const SECTORS: u64 = 6;
    let ssz = u64::from(ss);
    let size = SECTORS * ssz;
    let (b, v) = mem_volume(size, ss);
    let mut model = vec![0u8; size as usize];
    for &((off, len), seed, is_write) in ops {
        let o = off as usize;
        if is_write {
            let data: Vec<u8> = (0..len).map(|i| seed ^ (i as u8) | 1).collect();
            let before = b.snapshot();
            v.write(off, &mut data.clone(), false).unwrap();
            model[o..o + len].copy_from_slice(&data);
            // Only the sectors the write touches change on disk.
            let after = b.snapshot();
            let (first, last) = (off / ssz, (off + len as u64 - 1) / ssz);
            for s in 0..SECTORS {
                let r = HEADER + (s * ssz) as usize..HEADER + ((s + 1) * ssz) as usize;
                if s < first || s > last {
                    prop_assert!(before[r.clone()] == after[r], "sector {} changed", s);
                }
            }
        }
        let mut buf = vec![0xA5u8; len];
        v.read(off, &mut buf).unwrap();
        prop_assert_eq!(&buf[..], &model[o..o + len], "read {}+{}", off, len);
    }
    let mut all = vec![0u8; size as usize];
    v.read(0, &mut all).unwrap();
    prop_assert!(all == model, "final contents differ from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn byte_granular_rmw_matches_model_512(
        ops in prop::collection::vec((near_edge(6, 512), any::<u8>(), any::<bool>()), 1..60)
    ) {
        byte_writes(512, &ops)?;
    }

    #[test]
    fn byte_granular_rmw_matches_model_4096(
        ops in prop::collection::vec((near_edge(6, 4096), any::<u8>(), any::<bool>()), 1..60)
    ) {
        byte_writes(4096, &ops)?;
    }
}

/// The byte every thread writes at `i`: nonzero, different per position and thread.
fn byte_for(t: usize, i: usize) -> u8 {
    ((i * 7 + t * 13) % 251 + 1) as u8
}

/// `threads` writers own interleaved `granule`-byte pieces of the first `sectors` sectors (piece
/// k belongs to thread k % threads) and write them in a scrambled order, all at once; then every
/// byte must be its owner's.
fn interleaved_writers(ss: u32, sectors: u64, granule: usize, threads: usize) {
    let dir = tempfile::tempdir().unwrap();
    let size = sectors * u64::from(ss);
    let v = Arc::new(file_volume(&dir, size, ss));
    let pieces = (size as usize).div_ceil(granule);
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let v = Arc::clone(&v);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let mut mine: Vec<usize> = (t..pieces).step_by(threads).collect();
                // A fixed scramble per thread so threads collide on different sectors.
                let n = mine.len();
                for i in 0..n {
                    mine.swap(i, (i * 7919 + t * 104_729) % n);
                }
                start.wait();
                for k in mine {
                    let off = k * granule;
                    let end = (off + granule).min(size as usize);
                    let mut data: Vec<u8> = (off..end).map(|i| byte_for(t, i)).collect();
                    v.write(off as u64, &mut data, false).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut all = vec![0u8; size as usize];
    v.read(0, &mut all).unwrap();
    for (i, &got) in all.iter().enumerate() {
        let owner = (i / granule) % threads;
        assert_eq!(
            got,
            byte_for(owner, i),
            "byte {i} (granule {granule}, {threads} threads, {ss}-byte sectors) lost its write"
        );
    }
}

#[test]
fn concurrent_single_byte_writes_to_shared_sectors_all_land() {
    interleaved_writers(4096, 2, 1, 4);
    interleaved_writers(512, 8, 1, 4);
}

#[test]
fn concurrent_odd_sized_writes_to_shared_sectors_all_land() {
    interleaved_writers(4096, 8, 7, 6);
    interleaved_writers(4096, 16, 512, 8);
    interleaved_writers(4096, 16, 1000, 3);
    interleaved_writers(512, 32, 100, 5);
}

/// Readers of bytes nobody writes, in sectors that writers are changing byte by byte, always
/// see those bytes: a partial read of a sector never catches a half-written RMW.
#[test]
fn sub_sector_reads_beside_concurrent_rmw_see_stable_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let ss = 4096u64;
    let sectors = 4u64;
    let v = Arc::new(file_volume(&dir, sectors * ss, 4096));
    // Bytes [0, 2048) of each sector are stable; writers change [2048, 4096).
    let stable: Vec<u8> = (0..2048).map(|i| (i % 253) as u8 + 1).collect();
    for s in 0..sectors {
        v.write(s * ss, &mut stable.clone(), false).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|t| {
            let (v, stop) = (Arc::clone(&v), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let s = n % sectors;
                    let off = s * ss + 2048 + (n * 37 + t * 501) % 2000;
                    v.write(off, &mut [n as u8, t as u8, 0xEE], false).unwrap();
                    n += 1;
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    let mut reads = 0u64;
    while std::time::Instant::now() < deadline {
        let s = reads % sectors;
        // Sub-sector reads of the stable half: at the start, inside, and up to its end.
        for (a, n) in [(0usize, 16usize), (1000, 48), (2032, 16), (1, 2047)] {
            let mut buf = vec![0u8; n];
            v.read(s * ss + a as u64, &mut buf).unwrap();
            assert!(
                buf == stable[a..a + n],
                "read of stable bytes {a}+{n} of sector {s} saw a torn sector"
            );
        }
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(reads > 0);
}

/// Several threads writing the same bytes: each byte ends up as one writer's (all writers of a
/// round write one value over overlapping ranges), never garbage from a torn RMW.
#[test]
fn overlapping_sub_sector_writes_leave_one_writers_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let v = Arc::new(file_volume(&dir, 4 * 4096, 4096));
    let threads = 4usize;
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (v, start) = (Arc::clone(&v), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                for r in 0..400u64 {
                    let off = (r * 389 + t as u64 * 97) % (4 * 4096 - 700);
                    let len = 1 + ((r * 31 + t as u64) % 700) as usize;
                    v.write(off, &mut vec![t as u8 + 1; len], false).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut all = vec![0u8; 4 * 4096];
    v.read(0, &mut all).unwrap();
    for (i, &b) in all.iter().enumerate() {
        assert!(
            usize::from(b) <= threads,
            "byte {i} is {b:#x}: not any writer's value (a torn read-modify-write)"
        );
    }
}
