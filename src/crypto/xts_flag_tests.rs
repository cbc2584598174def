//! Tests of the flagging decryption (`Xts::decrypt_sectors_flagging` and `_to_flagging`) on every
//! kernel this CPU runs: the flags against a scalar scan of the ciphertext, with zero blocks
//! planted at the first or last block of a sector, in every sector, in none, at random; the
//! plaintext against the plain decryption; in place and out of place; at odd buffer offsets.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::xts::{Kernel, Xts, SECTOR_SIZES};
use super::XtsKey;

/// The flags a scalar scan gives: bit i for sector i when one of its 16-byte blocks is zero.
fn reference_flags(cipher: &[u8], ss: usize) -> Vec<u64> {
    let n = cipher.len() / ss;
    let mut out = vec![0u64; n.div_ceil(64)];
    for (i, s) in cipher.chunks_exact(ss).enumerate() {
        if s.chunks_exact(16).any(|b| b.iter().all(|&x| x == 0)) {
            out[i / 64] |= 1 << (i % 64);
        }
    }
    out
}

/// Where zero blocks go.
#[derive(Clone, Copy, Debug)]
enum Plant {
    None,
    FirstBlockEverySector,
    LastBlockEverySector,
    RandomBlockEverySector,
    Random,
    WholeSectors,
    /// A zero qword (half a block) in every sector, and no zero block: not a hole.
    HalfBlocks,
}

const PLANTS: [Plant; 7] = [
    Plant::None,
    Plant::FirstBlockEverySector,
    Plant::LastBlockEverySector,
    Plant::RandomBlockEverySector,
    Plant::Random,
    Plant::WholeSectors,
    Plant::HalfBlocks,
];

fn plant(rng: &mut StdRng, buf: &mut [u8], ss: usize, how: Plant) {
    let blocks = ss / 16;
    for s in buf.chunks_exact_mut(ss) {
        let zero_block = |s: &mut [u8], b: usize| s[b * 16..(b + 1) * 16].fill(0);
        match how {
            Plant::None => {}
            Plant::FirstBlockEverySector => zero_block(s, 0),
            Plant::LastBlockEverySector => zero_block(s, blocks - 1),
            Plant::RandomBlockEverySector => zero_block(s, rng.gen_range(0..blocks)),
            Plant::Random => {
                if rng.gen_bool(0.3) {
                    for _ in 0..rng.gen_range(1..4) {
                        zero_block(s, rng.gen_range(0..blocks));
                    }
                }
            }
            Plant::WholeSectors => {
                if rng.gen_bool(0.5) {
                    s.fill(0);
                }
            }
            Plant::HalfBlocks => {
                let b = rng.gen_range(0..blocks);
                let half = rng.gen_range(0..2) * 8;
                s[b * 16 + half..b * 16 + half + 8].fill(0);
            }
        }
    }
}

fn engines(key: &XtsKey) -> Vec<Xts> {
    Kernel::available()
        .into_iter()
        .map(|k| Xts::with_kernel(key, k).expect("available kernel"))
        .collect()
}

#[test]
fn flags_match_a_scalar_scan_on_every_kernel() {
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let key = XtsKey::generate();
    let reference = Xts::new_portable(&key);
    for xts in engines(&key) {
        let name = xts.kernel().name();
        for &ss in &SECTOR_SIZES {
            // One sector, a partial tweak batch, several flag words (130 sectors of 512 B).
            for sectors in [1usize, 7, 9, 33, if ss == 512 { 130 } else { 17 }] {
                for how in PLANTS {
                    let len = sectors * ss;
                    let mut cipher = vec![0u8; len];
                    rng.fill_bytes(&mut cipher);
                    plant(&mut rng, &mut cipher, ss, how);
                    let unit = match rng.gen_range(0..3) {
                        0 => rng.gen_range(0..1 << 20),
                        1 => rng.gen(),
                        _ => u64::MAX - rng.gen_range(0..64),
                    };
                    let what = format!("seed {seed}: {name}, {sectors} × {ss} B, {how:?}");
                    let expect_flags = reference_flags(&cipher, ss);
                    let mut expect_plain = cipher.clone();
                    reference.decrypt_sectors(&mut expect_plain, ss, unit);
                    let words = sectors.div_ceil(64);
                    let flagged = |f: &[u64], i: usize| f[i / 64] >> (i % 64) & 1 == 1;

                    // Out of place, at offsets of their own; a spare word stays untouched.
                    let (so, d_o) = (rng.gen_range(0..64), rng.gen_range(0..64));
                    let mut src = vec![0u8; len + 64];
                    src[so..so + len].copy_from_slice(&cipher);
                    let mut dst = vec![0u8; len + 64];
                    let mut zero = vec![u64::MAX; words + 1];
                    let any = xts.decrypt_sectors_to_flagging(
                        &src[so..so + len],
                        &mut dst[d_o..d_o + len],
                        ss,
                        unit,
                        &mut zero,
                    );
                    assert_eq!(zero[..words], expect_flags[..], "to: {what}");
                    assert_eq!(zero[words], u64::MAX, "to, spare word: {what}");
                    assert_eq!(any, expect_flags.iter().any(|&w| w != 0), "{what}");
                    for i in (0..sectors).filter(|&i| !flagged(&zero, i)) {
                        let r = d_o + i * ss..d_o + (i + 1) * ss;
                        assert!(
                            dst[r] == expect_plain[i * ss..(i + 1) * ss],
                            "to, sector {i}: {what}"
                        );
                    }

                    // In place: every sector decrypted, so a flagged one re-encrypts to its
                    // ciphertext.
                    let off = rng.gen_range(0..64);
                    let mut buf = vec![0u8; len + 64];
                    buf[off..off + len].copy_from_slice(&cipher);
                    let mut zero = vec![0x5555u64; words];
                    let data = &mut buf[off..off + len];
                    let any = xts.decrypt_sectors_flagging(data, ss, unit, &mut zero);
                    assert_eq!(zero, expect_flags, "in place: {what}");
                    assert_eq!(any, expect_flags.iter().any(|&w| w != 0), "{what}");
                    assert!(data[..] == expect_plain[..], "in place: {what}");
                    xts.encrypt_sectors(data, ss, unit);
                    assert!(data[..] == cipher[..], "in place, round trip: {what}");
                }
            }
        }
    }
}

#[test]
fn flagging_and_plain_decryption_agree_across_kernels() {
    // Random keys and data, no planted zeroes: nothing is flagged and every kernel gives the
    // plain decryption's bytes.
    let mut rng = StdRng::seed_from_u64(1619);
    for round in 0..16 {
        let key = XtsKey::generate();
        let ss = SECTOR_SIZES[round % 2];
        let sectors = rng.gen_range(1..=40);
        let mut cipher = vec![0u8; sectors * ss];
        rng.fill_bytes(&mut cipher);
        let mut expect = cipher.clone();
        Xts::new_portable(&key).decrypt_sectors(&mut expect, ss, round as u64);
        for xts in engines(&key) {
            let mut out = vec![0u8; cipher.len()];
            let mut zero = [7u64; 1];
            assert!(!xts.decrypt_sectors_to_flagging(
                &cipher,
                &mut out,
                ss,
                round as u64,
                &mut zero
            ));
            assert_eq!(zero, [0]);
            assert!(out == expect, "{} round {round}", xts.kernel().name());
        }
    }
}

#[test]
fn empty_input_flags_nothing() {
    for xts in engines(&XtsKey::generate()) {
        assert!(!xts.decrypt_sectors_flagging(&mut [], 4096, 3, &mut []));
        assert!(!xts.decrypt_sectors_to_flagging(&[], &mut [], 512, 3, &mut []));
    }
}

#[test]
#[should_panic(expected = "zero flags")]
fn too_few_flag_words_panics() {
    Xts::new(&XtsKey::generate()).decrypt_sectors_flagging(&mut [1u8; 65 * 512], 512, 0, &mut [0]);
}
