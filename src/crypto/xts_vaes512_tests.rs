//! Tests of the 512-bit kernel (`xts_vaes512`) against the portable one: random keys, data,
//! sector sizes and units, every sector count across the tweak batches, odd alignments.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::crypto::xts::{Kernel, Xts, SECTOR_SIZES};
use crate::crypto::XtsKey;

/// The 512-bit engine and the portable one for `key`, or `None` (with a note) on a CPU
/// without AVX-512 + VAES, where there is nothing of this kernel to test.
fn pair(key: &XtsKey) -> Option<(Xts, Xts)> {
    let Some(wide) = Xts::with_kernel(key, Kernel::AesNiVaes512) else {
        eprintln!("NOTE: this CPU cannot run the 512-bit VAES kernel; nothing to compare");
        return None;
    };
    assert_eq!(wide.kernel(), Kernel::AesNiVaes512);
    Some((wide, Xts::new_portable(key)))
}

/// Unit numbers worth trying: small, random, and just below the 2^64 wrap (the tweaks of
/// one call then cross it).
fn some_unit(rng: &mut StdRng) -> u64 {
    match rng.gen_range(0..3) {
        0 => rng.gen_range(0..1 << 20),
        1 => rng.gen(),
        _ => u64::MAX - rng.gen_range(0..64),
    }
}

#[test]
fn matches_portable_on_random_keys_data_sector_sizes_and_units() {
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..48 {
        let key = XtsKey::generate();
        let Some((wide, portable)) = pair(&key) else {
            return;
        };
        let ss = SECTOR_SIZES[round % 2];
        // Up to 19 sectors of 512 B: partial, full and several batches of 8 tweaks.
        let sectors = rng.gen_range(1..=if ss == 512 { 19 } else { 10 });
        let unit = some_unit(&mut rng);
        let mut plain = vec![0u8; ss * sectors];
        rng.fill_bytes(&mut plain);
        let what = format!("seed {seed} round {round}: {sectors} × {ss} B at unit {unit}");

        let mut expect = plain.clone();
        portable.encrypt_sectors(&mut expect, ss, unit);
        let mut got = plain.clone();
        wide.encrypt_sectors(&mut got, ss, unit);
        assert!(got == expect, "encrypt in place, {what}");
        let mut to = vec![0xa5u8; plain.len()];
        wide.encrypt_sectors_to(&plain, &mut to, ss, unit);
        assert!(to == expect, "encrypt out of place, {what}");

        // Decrypt random bytes (not only our own ciphertext) and compare too.
        let mut junk = vec![0u8; plain.len()];
        rng.fill_bytes(&mut junk);
        let mut expect = junk.clone();
        portable.decrypt_sectors(&mut expect, ss, unit);
        let mut back = vec![0x5au8; junk.len()];
        wide.decrypt_sectors_to(&junk, &mut back, ss, unit);
        assert!(back == expect, "decrypt out of place, {what}");
        wide.decrypt_sectors(&mut junk, ss, unit);
        assert!(junk == expect, "decrypt in place, {what}");
        wide.decrypt_sectors(&mut got, ss, unit);
        assert!(got == plain, "round trip, {what}");
    }
}

#[test]
fn every_sector_count_across_tweak_batches() {
    // 1..=33 sectors of 512 B: the tweaks are encrypted 8 sectors at a time in two registers
    // of 4, so every partial batch and register occupancy shows up.
    let key = XtsKey::generate();
    let Some((wide, portable)) = pair(&key) else {
        return;
    };
    let plain: Vec<u8> = (0..33 * 512).map(|i| (i * 31 + 7) as u8).collect();
    for n in 1..=33 {
        for unit in [0, 1 << 33, u64::MAX - 3] {
            let mut expect = plain[..n * 512].to_vec();
            portable.encrypt_sectors(&mut expect, 512, unit);
            let mut got = plain[..n * 512].to_vec();
            wide.encrypt_sectors(&mut got, 512, unit);
            assert!(got == expect, "{n} sectors at unit {unit}");
            wide.decrypt_sectors(&mut got, 512, unit);
            assert!(
                got == plain[..n * 512],
                "{n} sectors at unit {unit}: round trip"
            );
        }
    }
}

#[test]
fn unaligned_and_differently_aligned_buffers() {
    // Source and destination each at their own offset from a 64-byte boundary (the
    // kernel's loads and stores are 64 bytes wide), including in place at odd offsets.
    let mut rng = StdRng::seed_from_u64(1619);
    let key = XtsKey::generate();
    let Some((wide, portable)) = pair(&key) else {
        return;
    };
    for &ss in &SECTOR_SIZES {
        let len = 2 * 4096;
        let mut plain = vec![0u8; len];
        rng.fill_bytes(&mut plain);
        let mut expect = plain.clone();
        portable.encrypt_sectors(&mut expect, ss, 4242);
        for (s_off, d_off) in [(0, 1), (1, 0), (3, 17), (16, 48), (33, 33), (63, 62)] {
            let mut src = vec![0u8; len + 64];
            src[s_off..s_off + len].copy_from_slice(&plain);
            let mut dst = vec![0u8; len + 64];
            wide.encrypt_sectors_to(
                &src[s_off..s_off + len],
                &mut dst[d_off..d_off + len],
                ss,
                4242,
            );
            assert!(
                dst[d_off..d_off + len] == expect,
                "ss {ss} offsets {s_off}/{d_off}"
            );
            assert!(dst[..d_off]
                .iter()
                .chain(&dst[d_off + len..])
                .all(|&b| b == 0));
            wide.encrypt_sectors(&mut src[s_off..s_off + len], ss, 4242);
            assert!(
                src[s_off..s_off + len] == expect,
                "ss {ss} in place at {s_off}"
            );
            wide.decrypt_sectors_to(&expect, &mut dst[d_off..d_off + len], ss, 4242);
            assert!(
                dst[d_off..d_off + len] == plain,
                "ss {ss} decrypt to {d_off}"
            );
        }
    }
}
