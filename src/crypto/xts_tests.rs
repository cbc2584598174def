//! Tests of the XTS engine (`xts`): every kernel against the `xts-mode` crate, the kernel
//! choice, unaligned buffers, sharing between threads, and the panics on programmer error.

use super::*;

/// The portable path's round keys live on locked, non-dumpable pages (issue #10).
#[test]
fn portable_round_keys_are_on_non_dumpable_pages() {
    let x = Xts::new_portable(&XtsKey::generate());
    let Engine::Portable(p) = &x.engine else {
        panic!("not portable");
    };
    let addr = &**p as *const Portable as usize;
    let flags = crate::crypto::locked::vm_flags_of(addr).expect("mapping");
    assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    if p.is_locked() {
        assert!(flags.split_whitespace().any(|f| f == "lo"), "{flags}");
    }
}
use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

fn engines(key: &XtsKey) -> Vec<Xts> {
    Kernel::available()
        .into_iter()
        .map(|k| Xts::with_kernel(key, k).unwrap())
        .collect()
}

fn oracle(key: &XtsKey, data: &mut [u8], ss: usize, first_unit: u64, enc: bool) {
    let o = Xts128::new(
        Aes256::new(key.dangerous_k1().into()),
        Aes256::new(key.dangerous_k2().into()),
    );
    for (i, s) in data.chunks_exact_mut(ss).enumerate() {
        let unit = first_unit.wrapping_add((i * ss / 512) as u64);
        if enc {
            o.encrypt_sector(s, get_tweak_default(unit as u128));
        } else {
            o.decrypt_sector(s, get_tweak_default(unit as u128));
        }
    }
}

#[test]
fn matches_xts_mode_crate_on_both_backends() {
    let key = XtsKey::generate();
    for xts in engines(&key) {
        for &ss in &SECTOR_SIZES {
            for first_unit in [0, (1u64 << 33) + 5, u64::MAX - 3] {
                let orig: Vec<u8> = (0..ss * 3).map(|i| (i * 7 + 3) as u8).collect();
                let mut expect = orig.clone();
                oracle(&key, &mut expect, ss, first_unit, true);
                let mut data = orig.clone();
                xts.encrypt_sectors(&mut data, ss, first_unit);
                assert_eq!(
                    data,
                    expect,
                    "{} ss={ss} unit={first_unit}",
                    xts.kernel().name()
                );
                let mut out = vec![0u8; data.len()];
                xts.decrypt_sectors_to(&data, &mut out, ss, first_unit);
                assert_eq!(out, orig);
                xts.decrypt_sectors(&mut data, ss, first_unit);
                assert_eq!(data, orig);
            }
        }
    }
}

#[test]
fn new_picks_the_fastest_available_kernel() {
    let key = XtsKey::generate();
    let best = Kernel::available()[0];
    assert_eq!(Xts::new(&key).kernel(), best);
    let expected = if best == Kernel::Portable {
        "portable"
    } else {
        "aes-ni"
    };
    assert_eq!(Xts::new(&key).backend_name(), expected);
    assert_eq!(Xts::new_portable(&key).backend_name(), "portable");
    assert_eq!(*Kernel::available().last().unwrap(), Kernel::Portable);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("aes") {
        assert_eq!(expected, "aes-ni");
        assert!(Kernel::AesNi.is_available());
        assert_eq!(
            Xts::with_kernel(&key, Kernel::AesNi).unwrap().kernel(),
            Kernel::AesNi
        );
    }
    for k in Kernel::ALL {
        assert_eq!(
            Xts::with_kernel(&key, k).is_some(),
            k.is_available(),
            "{k:?}"
        );
    }
}

#[test]
fn the_512_bit_kernel_is_the_default_where_it_runs_and_is_preferred() {
    let kernels = Kernel::available();
    let key = XtsKey::generate();
    if !Kernel::AesNiVaes512.is_available() {
        assert!(!kernels.contains(&Kernel::AesNiVaes512));
        return;
    }
    // Wherever the 512-bit kernel runs, so does the 256-bit one; they lead the list in the
    // order the CPU model prefers, and `new` takes the first.
    #[cfg(target_arch = "x86_64")]
    {
        let first = if super::super::xts_zmm::zmm_preferred() {
            [Kernel::AesNiVaes512, Kernel::AesNiVaes]
        } else {
            [Kernel::AesNiVaes, Kernel::AesNiVaes512]
        };
        assert_eq!(kernels[..2], first);
        assert_eq!(Xts::new(&key).kernel(), first[0]);
        assert_eq!(Xts::new_aesni(&key).unwrap().kernel(), first[0]);
    }
}

/// Encryption into shared memory (mapped writes) gives the oracle's bytes on every kernel,
/// whatever the destination held, and leaves the source as it was.
#[test]
fn encryption_into_shared_memory_matches_the_oracle_on_every_kernel() {
    use std::sync::atomic::{AtomicU8, Ordering};
    let key = XtsKey::generate();
    let plain: Vec<u8> = (0..3 * 4096).map(|i| (i * 29 + 5) as u8).collect();
    for xts in engines(&key) {
        for &ss in &SECTOR_SIZES {
            let mut expect = plain.clone();
            oracle(&key, &mut expect, ss, 1234, true);
            let shared: Vec<AtomicU8> = (0..plain.len()).map(|i| AtomicU8::new(i as u8)).collect();
            xts.encrypt_sectors_to_shared(&plain, &shared, ss, 1234);
            let got: Vec<u8> = shared.iter().map(|b| b.load(Ordering::Relaxed)).collect();
            assert_eq!(got, expect, "{} ss {ss}", xts.kernel().name());
            assert_eq!(plain[..4], [5, 34, 63, 92], "source untouched");
        }
    }
}

#[test]
fn unaligned_buffers_give_the_same_bytes() {
    // Buffers from the volume layer need not be 16-byte aligned: offset them by 1..15 bytes.
    let key = XtsKey::generate();
    let plain: Vec<u8> = (0..2 * 4096).map(|i| (i * 13 + 1) as u8).collect();
    for xts in engines(&key) {
        for &ss in &SECTOR_SIZES {
            let mut expect = plain.clone();
            oracle(&key, &mut expect, ss, 77, true);
            for shift in [1usize, 8, 15] {
                let mut a = vec![0u8; plain.len() + shift];
                let mut b = vec![0u8; plain.len() + 16 - shift];
                a[shift..].copy_from_slice(&plain);
                xts.encrypt_sectors_to(&a[shift..], &mut b[16 - shift..], ss, 77);
                assert_eq!(&b[16 - shift..], &expect[..], "{}", xts.kernel().name());
                xts.encrypt_sectors(&mut a[shift..], ss, 77);
                assert_eq!(&a[shift..], &expect[..], "{}", xts.kernel().name());
                xts.decrypt_sectors(&mut a[shift..], ss, 77);
                assert_eq!(&a[shift..], &plain[..]);
            }
        }
    }
}

#[test]
fn one_engine_shared_by_threads_gives_the_same_bytes() {
    let key = XtsKey::generate();
    let xts = Xts::new(&key);
    let plain: Vec<u8> = (0..8 * 4096).map(|i| (i % 251) as u8).collect();
    let mut expect = plain.clone();
    xts.encrypt_sectors(&mut expect, 4096, 99);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..20 {
                    let mut buf = plain.clone();
                    xts.encrypt_sectors(&mut buf, 4096, 99);
                    assert_eq!(buf, expect);
                }
            });
        }
    });
}

#[test]
fn empty_input_is_a_no_op() {
    let key = XtsKey::generate();
    for xts in engines(&key) {
        xts.encrypt_sectors(&mut [], 4096, 7);
        xts.decrypt_sectors_to(&[], &mut [], 512, 7);
    }
}

#[test]
#[should_panic(expected = "sector size must be 512 or 4096")]
fn bad_sector_size_panics() {
    Xts::new(&XtsKey::generate()).encrypt_sectors(&mut [0u8; 1024], 1024, 0);
}

#[test]
#[should_panic(expected = "whole sectors")]
fn partial_sector_panics() {
    Xts::new(&XtsKey::generate()).decrypt_sectors(&mut [0u8; 600], 512, 0);
}

#[test]
#[should_panic(expected = "lengths differ")]
fn mismatched_out_of_place_lengths_panic() {
    Xts::new(&XtsKey::generate()).encrypt_sectors_to(&[0u8; 512], &mut [0u8; 1024], 512, 0);
}

#[test]
fn debug_prints_no_key() {
    let xts = Xts::new_portable(&XtsKey::generate());
    assert_eq!(format!("{xts:?}"), "Xts(portable, <key redacted>)");
    let xts = Xts::new(&XtsKey::generate());
    assert!(format!("{xts:?}").ends_with(", <key redacted>)"));
}
