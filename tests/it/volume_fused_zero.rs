//! Zero blocks decided by the fused decrypt (issue #13, "passes over the data"): the XTS kernel
//! flags sectors with an all-zero ciphertext block as it decrypts them, instead of a scan before
//! (and, on mapped reads, after). Here the volume file is given every kind of zero block —
//! the first, last or a middle block of a sector, several, a whole sector (a hole), none — and
//! reads through the mapping, through `pread` and from an in-memory backend must all give what
//! the rule says (zero blocks read as zero, the rest decrypts, all-zero sectors are holes),
//! byte for byte, with the same all-zero outcome, for both sector sizes.

use std::os::unix::fs::FileExt;
use std::path::Path;

use cryptnbd::backend::testing::MemBackend;
use cryptnbd::backend::{Backend, FileBackend};
use cryptnbd::crypto::{Xts, XtsKey};
use cryptnbd::volume::{Volume, VolumeHeader};
use rand::{Rng, RngCore, SeedableRng};
use uuid::Uuid;

/// What reading the data area `cipher` must give: holes zero, zero blocks zero, the rest
/// decrypted; and per sector, whether it is a hole.
fn model(xts: &Xts, cipher: &[u8], ss: usize) -> (Vec<u8>, Vec<bool>) {
    let mut plain = cipher.to_vec();
    let mut holes = Vec::new();
    for (i, s) in plain.chunks_exact_mut(ss).enumerate() {
        let hole = s.iter().all(|&b| b == 0);
        holes.push(hole);
        if hole {
            continue;
        }
        let zero: Vec<bool> = s
            .chunks_exact(16)
            .map(|b| b.iter().all(|&x| x == 0))
            .collect();
        xts.decrypt_sectors(s, ss, (i * ss / 512) as u64);
        for (b, z) in s.chunks_exact_mut(16).zip(zero) {
            if z {
                b.fill(0);
            }
        }
    }
    (plain, holes)
}

fn check_dir(dir: &Path, ss: usize, rng: &mut rand::rngs::StdRng) {
    let sectors = if ss == 512 { 600 } else { 80 };
    let size = (sectors * ss) as u64;
    let path = dir.join(format!("fused{ss}.vol"));
    let mut h = VolumeHeader::new(Uuid::new_v4(), size, ss as u32);
    h.key_id = Uuid::new_v4();
    h.key_version = 1;
    h.wrapped_dek = vec![7; 80];
    let mut kb = [0u8; 64];
    rng.fill_bytes(&mut kb);
    let key = XtsKey::from_slice(&kb).unwrap();
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mapped =
        Volume::create(FileBackend::new(file, &path).with_mapped_min(0), &h, &key).unwrap();
    let plain = FileBackend::open(&path, false).unwrap().with_mapping(false);
    let plain = Volume::with_key(Box::new(plain), h.clone(), &key, false).unwrap();

    // Data everywhere, then zero blocks of every kind written into the file itself.
    let mut data = vec![0u8; size as usize];
    rng.fill_bytes(&mut data);
    mapped.write(0, &mut data, false).unwrap();
    let raw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let base = h.data_offset();
    let blocks = ss / 16;
    for s in 0..sectors {
        let zero_blocks: Vec<usize> = match s % 8 {
            0 => vec![],
            1 => vec![0],
            2 => vec![blocks - 1],
            3 => vec![rng.gen_range(1..blocks - 1)],
            4 => (0..rng.gen_range(2..5))
                .map(|_| rng.gen_range(0..blocks))
                .collect(),
            5 => (0..blocks).collect(),
            6 if rng.gen_bool(0.5) => (1..blocks).collect(), // all but the first
            _ => vec![],
        };
        for b in zero_blocks {
            raw.write_all_at(&[0u8; 16], base + (s * ss + b * 16) as u64)
                .unwrap();
        }
    }
    // A trimmed range too (a real hole in the file where the file system has them).
    let t0 = (sectors / 2 * ss) as u64;
    plain.trim(t0, 3 * ss as u64, false).unwrap();

    let mut cipher = vec![0u8; size as usize];
    FileBackend::open(&path, true)
        .unwrap()
        .read_at(&mut cipher, base)
        .unwrap();
    let (expect, holes) = model(&Xts::new_portable(&key), &cipher, ss);
    let mut image = vec![0u8; base as usize];
    image.extend_from_slice(&cipher);
    let mem = Volume::with_key(Box::new(MemBackend::from_bytes(image)), h, &key, false).unwrap();

    let mut lent = 0;
    for i in 0..300 {
        let (off, len) = match i {
            0 => (0, size as usize),
            _ if i % 3 == 0 => {
                let s = rng.gen_range(0..sectors);
                (s * ss, rng.gen_range(1..=(sectors - s).min(300)) * ss)
            }
            _ => {
                let off = rng.gen_range(0..size as usize - 1);
                (off, rng.gen_range(1..=(size as usize - off).min(200 << 10)))
            }
        };
        let want = &expect[off..off + len];
        let want_zero = holes[off / ss..(off + len).div_ceil(ss)].iter().all(|&h| h);
        for (name, v) in [("mapped", &mapped), ("pread", &plain), ("memory", &mem)] {
            let mut got = vec![0xa5u8; len];
            let r = v.read(off as u64, &mut got).unwrap();
            assert!(got == want, "{dir:?} ss {ss} {name}: {len} bytes at {off}");
            assert_eq!(r.all_zero, want_zero, "{dir:?} ss {ss} {name}: {off}+{len}");
            if let Some(r) = v.try_read_cached(off as u64, &mut got).unwrap() {
                assert!(got == want, "{dir:?} ss {ss} {name}, cached: {off}+{len}");
                assert_eq!(r.all_zero, want_zero);
            }
        }
        let lends = mapped
            .backend()
            .with_mapped(base + off as u64, len, false, &mut |_| {})
            .unwrap();
        lent += usize::from(lends);
    }
    assert!(lent > 0, "{dir:?}: no read was served from the mapping");
}

#[test]
fn every_kind_of_zero_block_reads_the_same_through_mapping_pread_and_memory() {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm")
        .is_dir()
        .then(|| tempfile::tempdir_in("/dev/shm").unwrap());
    let mut dirs = vec![tmp.path()];
    dirs.extend(shm.as_ref().map(|d| d.path()));
    for dir in dirs {
        for ss in [4096, 512] {
            check_dir(dir, ss, &mut rng);
        }
    }
}
