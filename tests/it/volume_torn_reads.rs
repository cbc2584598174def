//! A read racing the first write of a sector never returns garbage (issue #10, defect 4): while a
//! 512-byte write turns a never-written 4096-byte sector into data, readers of the rest of that
//! sector must see zeroes, and readers of the written part each byte's old (zero) or new value.
//! The backend lands writes 16 bytes at a time, as a racing page-cache copy may show them; before
//! zero-ness was decided per 16-byte block, a reader saw a partly written sector, took it for data
//! and decrypted its zero blocks into garbage. Trims racing readers are covered the same way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use cryptnbd::backend::testing::{MemBackend, PiecewiseBackend};
use cryptnbd::crypto::XtsKey;
use cryptnbd::volume::{Volume, VolumeHeader};
use uuid::Uuid;

const SECTORS: u64 = 24;

fn volume() -> Arc<Volume> {
    let mut h = VolumeHeader::new(Uuid::new_v4(), SECTORS * 4096, 4096);
    h.key_id = Uuid::new_v4();
    h.key_version = 1;
    h.wrapped_dek = vec![7; 80];
    let b = PiecewiseBackend::new(MemBackend::new());
    Arc::new(Volume::create(b, &h, &XtsKey::generate()).unwrap())
}

/// Runs `readers` threads, each reading sector `current` over and over and checking it with
/// `check(bytes) -> Result<(), String>`, while `write(sector)` runs for every sector in turn.
fn race(
    v: &Arc<Volume>,
    write: impl Fn(&Volume, u64),
    check: impl Fn(&[u8]) -> Result<(), String> + Send + Sync + 'static,
) -> u64 {
    let current = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let check = Arc::new(check);
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (v, current, done, check) =
                (v.clone(), current.clone(), done.clone(), check.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut buf = vec![0u8; 4096];
                while !done.load(Ordering::SeqCst) {
                    let s = current.load(Ordering::SeqCst);
                    // One reader reads the whole sector, the other a sub-sector range.
                    if t == 0 {
                        v.read(s * 4096, &mut buf).unwrap();
                        check(&buf).map_err(|e| format!("sector {s}: {e}")).unwrap();
                    } else {
                        let mut part = vec![0u8; 1024];
                        v.read(s * 4096 + 2048, &mut part).unwrap();
                        buf.fill(0);
                        buf[2048..3072].copy_from_slice(&part);
                        check(&buf).map_err(|e| format!("sector {s}: {e}")).unwrap();
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for s in 0..SECTORS {
        current.store(s, Ordering::SeqCst);
        write(v, s);
    }
    done.store(true, Ordering::SeqCst);
    readers.into_iter().map(|r| r.join().unwrap()).sum()
}

/// Bytes 0..512 are each 0 or 0xAB (old or new), the rest of the sector zero.
fn first_write_check(b: &[u8]) -> Result<(), String> {
    if let Some(i) = b[..512].iter().position(|&x| x != 0 && x != 0xAB) {
        return Err(format!("byte {i} is {:#x}: neither old nor new", b[i]));
    }
    if let Some(i) = b[512..].iter().position(|&x| x != 0) {
        return Err(format!(
            "byte {} is {:#x}, but nobody wrote it (garbage)",
            512 + i,
            b[512 + i]
        ));
    }
    Ok(())
}

#[test]
fn readers_racing_a_first_sub_sector_write_see_old_or_new_bytes() {
    let v = volume();
    let reads = race(
        &v,
        |v, s| v.write(s * 4096, &mut [0xAB; 512], false).unwrap(),
        first_write_check,
    );
    assert!(reads > 0);
    let mut b = vec![0u8; 4096];
    for s in 0..SECTORS {
        v.read(s * 4096, &mut b).unwrap();
        assert_eq!(&b[..512], &[0xAB; 512][..]);
        assert!(b[512..].iter().all(|&x| x == 0));
    }
}

#[test]
fn readers_racing_a_rewrite_and_zeroing_see_old_or_new_bytes() {
    let v = volume();
    for s in 0..SECTORS {
        v.write(s * 4096, &mut [0x11; 4096], false).unwrap();
    }
    // Rewriting part of a written sector: each byte old (0x11) or new (0x22).
    race(
        &v,
        |v, s| v.write(s * 4096 + 1024, &mut [0x22; 2048], false).unwrap(),
        |b| match b.iter().position(|&x| x != 0x11 && x != 0x22 && x != 0) {
            Some(i) => Err(format!("byte {i} is {:#x}", b[i])),
            None => Ok(()),
        },
    );
    // Zeroing whole sectors with encrypted zeroes (no hole): each byte old or zero.
    race(
        &v,
        |v, s| v.write_zeroes(s * 4096, 4096, false, false).unwrap(),
        |b| match b.iter().position(|&x| x != 0x11 && x != 0x22 && x != 0) {
            Some(i) => Err(format!("byte {i} is {:#x}", b[i])),
            None => Ok(()),
        },
    );
}
