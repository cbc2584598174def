//! IEEE Std 1619-2007 Annex B known-answer tests for AES-256-XTS (vectors 10–14: 512-byte data
//! units, data unit sequence numbers 0xff … 0xffffffffff), run through every backend of
//! `cryptnbd::crypto::Xts`. The vectors live in `tests/data/xts/ieee1619_aes256.txt`.
//!
//! A 512-byte data unit numbered `dusn` is, in our convention, a 512-byte sector at unit `dusn`.
//!
//! Also the golden file `tests/data/xts/plain64_golden.txt`, made with an independent XTS
//! (Python `cryptography`, i.e. OpenSSL): it pins our on-disk convention — 4096-byte sectors as
//! one data unit with tweak 8n (LUKS2/dm-crypt style), unit numbers past 2^32 and wrapping at 2^64.

use std::collections::HashMap;

use cryptnbd::crypto::{Kernel, Xts, XtsKey};

struct Vector {
    name: String,
    key: Vec<u8>,
    dusn: u64,
    pt: Vec<u8>,
    ct: Vec<u8>,
}

/// The blank-line separated `name = value` records of a file in `tests/data/xts/`.
fn records(file: &str) -> Vec<HashMap<String, String>> {
    let path = format!("{}/tests/data/xts/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.split("\n\n")
        .map(|record| {
            record
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(|line| {
                    let (k, v) = line.split_once(" = ").expect("`name = value` line");
                    (k.trim().to_string(), v.trim().to_string())
                })
                .collect::<HashMap<_, _>>()
        })
        .filter(|r| !r.is_empty())
        .collect()
}

fn vectors() -> Vec<Vector> {
    records("ieee1619_aes256.txt")
        .into_iter()
        .map(|f| Vector {
            name: format!("IEEE 1619 vector {}", f["vector"]),
            key: hex::decode(&f["key"]).unwrap(),
            dusn: f["dusn"].parse().unwrap(),
            pt: hex::decode(&f["pt"]).unwrap(),
            ct: hex::decode(&f["ct"]).unwrap(),
        })
        .collect()
}

/// Every kernel this machine can run; on an AES-NI CPU that must include the AES-NI kernels.
fn engines(key: &XtsKey) -> Vec<Xts> {
    let kernels = Kernel::available();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("aes") {
        assert!(
            kernels.contains(&Kernel::AesNi),
            "AES-NI CPU without the AES-NI kernel"
        );
    }
    if kernels == [Kernel::Portable] {
        eprintln!("NOTE: no AES-NI on this CPU/target: only the portable path is tested");
    }
    kernels
        .into_iter()
        .map(|k| Xts::with_kernel(key, k).expect("an available kernel"))
        .collect()
}

#[test]
fn vector_file_holds_vectors_10_to_14() {
    let v = vectors();
    let names: Vec<_> = v.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        (10..=14)
            .map(|n| format!("IEEE 1619 vector {n}"))
            .collect::<Vec<_>>()
    );
    let dusns: Vec<u64> = v.iter().map(|v| v.dusn).collect();
    assert_eq!(
        dusns,
        [0xff, 0xffff, 0xff_ffff, 0xffff_ffff, 0xff_ffff_ffff]
    );
    for v in &v {
        assert_eq!(
            (v.key.len(), v.pt.len(), v.ct.len()),
            (64, 512, 512),
            "{}",
            v.name
        );
    }
}

#[test]
fn ieee1619_vectors_encrypt_and_decrypt_in_place() {
    for v in vectors() {
        let key = XtsKey::from_slice(&v.key).unwrap();
        for xts in engines(&key) {
            let mut buf = v.pt.clone();
            xts.encrypt_sectors(&mut buf, 512, v.dusn);
            assert_eq!(
                hex::encode(&buf),
                hex::encode(&v.ct),
                "{} on {}",
                v.name,
                xts.kernel().name()
            );
            xts.decrypt_sectors(&mut buf, 512, v.dusn);
            assert_eq!(buf, v.pt, "{} decrypt on {}", v.name, xts.kernel().name());
        }
    }
}

#[test]
fn ieee1619_vectors_encrypt_and_decrypt_out_of_place() {
    for v in vectors() {
        let key = XtsKey::from_slice(&v.key).unwrap();
        for xts in engines(&key) {
            let mut out = vec![0u8; 512];
            xts.encrypt_sectors_to(&v.pt, &mut out, 512, v.dusn);
            assert_eq!(out, v.ct, "{} on {}", v.name, xts.kernel().name());
            let mut back = vec![0u8; 512];
            xts.decrypt_sectors_to(&v.ct, &mut back, 512, v.dusn);
            assert_eq!(back, v.pt, "{} decrypt on {}", v.name, xts.kernel().name());
        }
    }
}

#[test]
fn ieee1619_vector_inside_a_multi_sector_buffer() {
    // The vector placed at every position of a 12-sector buffer (more than the kernel's batch of
    // 8 sectors) whose first unit is chosen so that the vector's sector gets its `dusn`.
    for v in vectors() {
        let key = XtsKey::from_slice(&v.key).unwrap();
        for xts in engines(&key) {
            for pos in [0usize, 3, 7, 8, 11] {
                let mut buf = vec![0xa5u8; 12 * 512];
                buf[pos * 512..(pos + 1) * 512].copy_from_slice(&v.pt);
                let first = v.dusn - pos as u64;
                xts.encrypt_sectors(&mut buf, 512, first);
                assert_eq!(
                    &buf[pos * 512..(pos + 1) * 512],
                    &v.ct[..],
                    "{} at sector {pos} on {}",
                    v.name,
                    xts.kernel().name()
                );
            }
        }
    }
}

#[test]
fn corrupted_key_or_tweak_does_not_reproduce_the_vector() {
    // Negative control: the test above would catch a wrong key half or an off-by-one tweak.
    let v = &vectors()[0];
    let mut bad = v.key.clone();
    bad[40] ^= 1; // inside K2, the tweak key
    let key = XtsKey::from_slice(&bad).unwrap();
    let good = XtsKey::from_slice(&v.key).unwrap();
    for (xts, unit) in [(Xts::new(&key), v.dusn), (Xts::new(&good), v.dusn + 1)] {
        let mut buf = v.pt.clone();
        xts.encrypt_sectors(&mut buf, 512, unit);
        assert_ne!(buf, v.ct);
    }
}

#[test]
fn plain64_golden_file_matches_every_kernel() {
    let cases = records("plain64_golden.txt");
    assert_eq!(cases.len(), 3);
    for c in cases {
        let key = XtsKey::from_slice(&hex::decode(&c["key"]).unwrap()).unwrap();
        let ss: usize = c["sector_size"].parse().unwrap();
        let first: u64 = c["first_unit"].parse().unwrap();
        let n: usize = c["sectors"].parse().unwrap();
        let ct = hex::decode(&c["ct"]).unwrap();
        let pt: Vec<u8> = (0..n * ss).map(|i| (i * 31 + 7) as u8).collect();
        assert_eq!(ct.len(), pt.len(), "{}", c["case"]);
        for xts in engines(&key) {
            let name = format!("{} on {}", c["case"], xts.kernel().name());
            let mut buf = pt.clone();
            xts.encrypt_sectors(&mut buf, ss, first);
            assert!(buf == ct, "{name}: ciphertext differs from the golden file");
            xts.decrypt_sectors(&mut buf, ss, first);
            assert!(buf == pt, "{name}: decryption");
        }
    }
}
