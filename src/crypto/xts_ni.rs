//! The 8-block SSE AES-NI kernel of the XTS engine (x86_64 only). It and `xts_vaes` hold every
//! `unsafe` block of the XTS engine; the key schedules and tweak helpers they share are in the
//! leaf `xts_common`, and `xts` (the kernel choice) only calls in after [`available`] said yes.
//!
//! Why it is shaped like this:
//! - `aesenc` has a latency of about 4 cycles but a throughput of 2 per cycle, so one block at a
//!   time leaves the AES units idle. We keep 8 independent blocks in flight, each round issued
//!   for all 8 before the next round key (in assembly: see `group_asm` for why).
//! - The XTS whitening `x ^ T` is folded into the last round key: `aesenclast(x, rk14 ^ T)`
//!   yields the ciphertext with the final xor done for free and off the rounds' dependency chain
//!   (the first xor, `x ^ T ^ rk0`, is likewise one step before round 1).
//! - The tweaks stay in registers and a small aligned scratch; each of the 8 tweak slots advances
//!   by α⁸ per group with a byte shift and one carry-less multiply (PCLMULQDQ), instead of a chain
//!   of doublings that would serialize the groups.
//! - Only `aes`, `sse2` and `pclmulqdq` are enabled here, no `target-cpu=native` (its AVX-512
//!   code competing with AES made things slower, see DESIGN.md).

use core::arch::x86_64::*;

use super::xts_common::{
    aes_available, clear_xmm, encrypt_tweaks, mul_alpha, wipe, AesKeys, BLOCK, LANES,
};

/// True when this CPU has the instructions the kernel needs.
pub(crate) fn available() -> bool {
    aes_available()
}

// The kernel is written in assembly because LLVM's scheduler, short of registers, reordered the
// intrinsics version to run one or two blocks through all 14 rounds before starting the next,
// which starved the AES units (measured: ≈0.7× OpenSSL). Here every round is issued for all 8
// blocks before the next round key is loaded (≈1.0× OpenSSL at 4096 B, ≈1.1× at 512 B).
//
// The tweaks are not one running chain of doublings (T, Tα, Tα², …): such a chain (≈4 cycles a
// step) sat between the groups and cost about as much as the AES rounds themselves. Instead each
// of the 8 tweak slots advances by α⁸ per group (a byte shift and one carry-less multiply), 8
// independent short computations, done during the first rounds of a group into the scratch's
// other half so the next group never waits for this one's rounds.
//
// Register roles: x0..x7 data blocks, k the current round key, t a tweak, tmp scratch, poly the
// reduction constant 0x87.

/// Block `x` at byte offset `off`: load, whiten with its tweak and round key 0 (already in `k`).
#[rustfmt::skip]
macro_rules! whiten {
    ($x:literal, $off:literal) => {
        concat!(
            "movdqu {", $x, "}, xmmword ptr [{src} + ", $off, "]\n",
            "pxor {", $x, "}, xmmword ptr [{tw} + ", $off, "]\n",
            "pxor {", $x, "}, {k}\n",
        )
    };
}

/// Writes the tweak slot at byte offset `off`, advanced by α⁸, to the other scratch half (`twn`)
/// for the next group: `(T << 8) ^ clmul(T >> 120, 0x87)`. Issued between the first rounds (one
/// slot after each), where these non-AES instructions fill the gaps the rounds leave (measured
/// ≈6% faster than issuing them all before round 1), and long before the next group needs them.
#[rustfmt::skip]
macro_rules! advance {
    ($off:literal) => {
        concat!(
            "movdqa {t}, xmmword ptr [{tw} + ", $off, "]\n",
            "movdqa {tmp}, {t}\n",
            "psrldq {tmp}, 15\n",
            "pslldq {t}, 1\n",
            "pclmulqdq {tmp}, {poly}, 0x00\n",
            "pxor {t}, {tmp}\n",
            "movdqa xmmword ptr [{twn} + ", $off, "], {t}\n",
        )
    };
}

/// One middle round (`aesenc` or `aesdec`) with the round key at byte offset `off`, 8 blocks.
#[rustfmt::skip]
macro_rules! round {
    ($op:literal, $off:literal) => {
        concat!(
            "movdqa {k}, xmmword ptr [{rk} + ", $off, "]\n",
            $op, " {x0}, {k}\n", $op, " {x1}, {k}\n", $op, " {x2}, {k}\n", $op, " {x3}, {k}\n",
            $op, " {x4}, {k}\n", $op, " {x5}, {k}\n", $op, " {x6}, {k}\n", $op, " {x7}, {k}\n",
        )
    };
}

/// Last round of block `x` with the key `rk14 ^ tweak` (`k` holds rk14): the tweak's final xor
/// comes for free. Then the store.
#[rustfmt::skip]
macro_rules! finish {
    ($op:literal, $x:literal, $off:literal) => {
        concat!(
            "movdqa {tmp}, xmmword ptr [{tw} + ", $off, "]\n",
            "pxor {tmp}, {k}\n",
            $op, " {", $x, "}, {tmp}\n",
            "movdqu xmmword ptr [{dst} + ", $off, "], {", $x, "}\n",
        )
    };
}

/// As [`whiten`], and first the zero test of the loaded block (decryption with zero flags),
/// on the very register that is then decrypted: the byte mask of its zero bytes is 0xffff for
/// an all-zero block, so the mask plus one has bit 16 set exactly then; OR-ed into `zm`.
/// `tmp` is free until the rounds begin.
#[rustfmt::skip]
macro_rules! whitenz {
    ($x:literal, $off:literal) => {
        concat!(
            "movdqu {", $x, "}, xmmword ptr [{src} + ", $off, "]\n",
            "pxor {tmp}, {tmp}\n",
            "pcmpeqb {tmp}, {", $x, "}\n",
            "pmovmskb {r:e}, {tmp}\n",
            "inc {r:e}\n",
            "or {zm:e}, {r:e}\n",
            "pxor {", $x, "}, xmmword ptr [{tw} + ", $off, "]\n",
            "pxor {", $x, "}, {k}\n",
        )
    };
}

/// Rounds 1..=13 with the next group's tweaks advanced between the first eight, round 14 and
/// the stores.
#[rustfmt::skip]
macro_rules! rounds {
    ($round:literal, $last:literal) => {
        concat!(
            round!($round, 16), advance!(0), round!($round, 32), advance!(16),
            round!($round, 48), advance!(32), round!($round, 64), advance!(48),
            round!($round, 80), advance!(64), round!($round, 96), advance!(80),
            round!($round, 112), advance!(96), round!($round, 128), advance!(112),
            round!($round, 144), round!($round, 160), round!($round, 176), round!($round, 192),
            round!($round, 208),
            "movdqa {k}, xmmword ptr [{rk} + 224]\n",
            finish!($last, "x0", 0), finish!($last, "x1", 16), finish!($last, "x2", 32),
            finish!($last, "x3", 48), finish!($last, "x4", 64), finish!($last, "x5", 80),
            finish!($last, "x6", 96), finish!($last, "x7", 112),
        )
    };
}

#[rustfmt::skip]
macro_rules! group_asm {
    ($round:literal, $last:literal, $rk:expr, $src:expr, $dst:expr, $tw:expr, $twn:expr, $poly:expr) => {
        core::arch::asm!(
            "movdqa {k}, xmmword ptr [{rk}]",
            whiten!("x0", 0), whiten!("x1", 16), whiten!("x2", 32), whiten!("x3", 48),
            whiten!("x4", 64), whiten!("x5", 80), whiten!("x6", 96), whiten!("x7", 112),
            rounds!($round, $last),
            rk = in(reg) $rk,
            src = in(reg) $src,
            dst = in(reg) $dst,
            tw = in(reg) $tw,
            twn = in(reg) $twn,
            poly = in(xmm_reg) $poly,
            k = out(xmm_reg) _,
            t = out(xmm_reg) _,
            tmp = out(xmm_reg) _,
            x0 = out(xmm_reg) _, x1 = out(xmm_reg) _, x2 = out(xmm_reg) _, x3 = out(xmm_reg) _,
            x4 = out(xmm_reg) _, x5 = out(xmm_reg) _, x6 = out(xmm_reg) _, x7 = out(xmm_reg) _,
            options(nostack, preserves_flags),
        )
    };
    // Decryption that also returns the group's zero indicator in `$zm` (bit 16: see `whitenz`).
    (z, $rk:expr, $src:expr, $dst:expr, $tw:expr, $twn:expr, $poly:expr, $pf:expr, $zm:ident) => {
        core::arch::asm!(
            "movdqa {k}, xmmword ptr [{rk}]",
            whitenz!("x0", 0), whitenz!("x1", 16), whitenz!("x2", 32), whitenz!("x3", 48),
            whitenz!("x4", 64), whitenz!("x5", 80), whitenz!("x6", 96), whitenz!("x7", 112),
            // The group one page ahead from a mapping, else itself: see `prefetch_at`.
            "prefetcht0 byte ptr [{pf}]", "prefetcht0 byte ptr [{pf} + 64]",
            rounds!("aesdec", "aesdeclast"),
            rk = in(reg) $rk,
            src = in(reg) $src,
            dst = in(reg) $dst,
            tw = in(reg) $tw,
            twn = in(reg) $twn,
            poly = in(xmm_reg) $poly,
            pf = in(reg) $pf,
            zm = inout(reg) 0u64 => $zm,
            r = out(reg) _,
            k = out(xmm_reg) _,
            t = out(xmm_reg) _,
            tmp = out(xmm_reg) _,
            x0 = out(xmm_reg) _, x1 = out(xmm_reg) _, x2 = out(xmm_reg) _, x3 = out(xmm_reg) _,
            x4 = out(xmm_reg) _, x5 = out(xmm_reg) _, x6 = out(xmm_reg) _, x7 = out(xmm_reg) _,
            options(nostack),
        )
    };
}

/// Bit 16 of a group's `zm` (`whitenz`): one of its blocks was all zero.
const ZERO_SEEN: u64 = 1 << 16;

/// Multiplies a tweak by α^K in GF(2^128) for 1 <= K <= 63 (`R` must be
/// `64 - K`: stable Rust cannot compute it from `K`). The 128-bit shift is assembled from 64-bit
/// shifts; the K bits shifted out of the top are reduced with one carry-less multiply by 0x87.
#[inline]
#[target_feature(enable = "aes,sse2,pclmulqdq")]
fn mul_alpha_k<const K: i32, const R: i32>(t: __m128i) -> __m128i {
    let shifted = _mm_or_si128(
        _mm_slli_epi64::<K>(t),
        _mm_srli_epi64::<R>(_mm_slli_si128::<8>(t)),
    );
    let top = _mm_srli_epi64::<R>(_mm_srli_si128::<8>(t));
    let poly = _mm_set_epi64x(0, 0x87);
    _mm_xor_si128(shifted, _mm_clmulepi64_si128::<0x00>(top, poly))
}

/// Tweaks parked in memory (8 data blocks, the round key, two temporaries and the reduction
/// constant already use 12 of the 16 XMM registers), in two halves: the tweaks of the group being
/// processed and those of the next group, written while this one runs. Halves swap per group.
#[repr(C, align(16))]
struct TweakScratch([u8; 2 * LANES * BLOCK]);

impl TweakScratch {
    /// Fills in (first half) the tweaks T·α^0 … T·α^7 of a sector's first group in three levels
    /// (α, α², α⁴) rather than a chain of seven doublings, so the first group does not wait on a
    /// long chain.
    #[inline]
    #[target_feature(enable = "aes,sse2,pclmulqdq")]
    fn start(&mut self, t0: __m128i) {
        let t1 = mul_alpha(t0);
        let (t2, t3) = (mul_alpha_k::<2, 62>(t0), mul_alpha_k::<2, 62>(t1));
        let t = [
            t0,
            t1,
            t2,
            t3,
            mul_alpha_k::<4, 60>(t0),
            mul_alpha_k::<4, 60>(t1),
            mul_alpha_k::<4, 60>(t2),
            mul_alpha_k::<4, 60>(t3),
        ];
        for (slot, v) in self.0.chunks_exact_mut(BLOCK).zip(t) {
            // SAFETY: `slot` is 16 writable bytes; unaligned store.
            unsafe { _mm_storeu_si128(slot.as_mut_ptr().cast(), v) };
        }
    }
}

/// Where the flagging decryption of the group at `s` prefetches: one page ahead when it reads
/// from another buffer (a mapping of the page cache, usually in no cache), the group itself
/// (already loaded) in place. Only prefetched, never dereferenced, hence `wrapping_add`.
#[inline(always)]
fn prefetch_at(s: *const u8, d: *mut u8) -> *const u8 {
    if s == d.cast_const() {
        s
    } else {
        s.wrapping_add(4096)
    }
}

/// Encrypts (`ENC`) or decrypts whole sectors from `src` into `dst`.
///
/// # Safety
/// The CPU must have what [`available`] checks. `src` and `dst` must be valid for `len` bytes and
/// equal or disjoint; `len` a multiple of `sector_size`, itself 512 or 4096 (a multiple of the
/// 128-byte group and of the 512-byte tweak unit).
#[target_feature(enable = "aes,sse2,pclmulqdq")]
pub(crate) unsafe fn crypt_sectors<const ENC: bool>(
    keys: &AesKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_unit: u64,
) {
    // SAFETY: our own contract, passed on; no flags asked for.
    unsafe { crypt::<ENC, false>(keys, src, dst, len, sector_size, first_unit, &mut []) }
}

/// Decrypts as [`crypt_sectors`] and sets bit `i % 64` of `zero[i / 64]` for each sector `i`
/// that had an all-zero 16-byte block, as loaded for its decryption (bits of other sectors are
/// left alone).
///
/// # Safety
/// As [`crypt_sectors`]; `zero` has at least `(len / sector_size).div_ceil(64)` words (else it
/// panics, safely).
#[target_feature(enable = "aes,sse2,pclmulqdq")]
pub(crate) unsafe fn decrypt_sectors_flagging(
    keys: &AesKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_unit: u64,
    zero: &mut [u64],
) {
    // SAFETY: our own contract, passed on.
    unsafe { crypt::<false, true>(keys, src, dst, len, sector_size, first_unit, zero) }
}

/// Both entry points: `FLAG` (decryption only) adds the zero test to the loads.
///
/// # Safety
/// As [`crypt_sectors`].
#[target_feature(enable = "aes,sse2,pclmulqdq")]
unsafe fn crypt<const ENC: bool, const FLAG: bool>(
    keys: &AesKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_unit: u64,
    zero: &mut [u64],
) {
    let rks = keys.data::<ENC>();
    let units_per_sector = (sector_size / 512) as u64;
    let groups_per_sector = sector_size / (LANES * BLOCK);
    let sectors = len / sector_size;
    let poly = _mm_set_epi64x(0, 0x87);
    let rk = rks.0.as_ptr();
    let mut scratch = TweakScratch([0; 2 * LANES * BLOCK]);
    let mut done = 0usize;
    while done < sectors {
        // The tweak encryptions of up to 8 sectors run together, 8 blocks in flight like the data.
        let n = (sectors - done).min(LANES);
        let mut units = [0u64; LANES];
        for (i, u) in units.iter_mut().enumerate().take(n) {
            // plain64: the unit number wraps modulo 2^64, as dm-crypt's does.
            *u = first_unit.wrapping_add((done + i) as u64 * units_per_sector);
        }
        let tweaks = encrypt_tweaks(&keys.enc2, &units, n);
        for (s, &t0) in tweaks.iter().enumerate().take(n) {
            scratch.start(t0);
            let (mut tw, mut twn) = scratch.0.split_at_mut(LANES * BLOCK);
            let base = (done + s) * sector_size;
            let mut zbits = 0u64;
            for g in 0..groups_per_sector {
                let off = base + g * LANES * BLOCK;
                // SAFETY: `off + 128 <= len` (a 128-byte group inside a whole sector of the
                // buffer), so the asm's 128-byte reads at `src + off` and writes at `dst + off`
                // are in bounds and, per our contract, equal or disjoint; every load precedes
                // every store. It reads 240 bytes of round keys at `rk` (a whole, aligned
                // `RoundKeys`), reads the 128-byte half `tw` and writes the half `twn` of the
                // 16-byte aligned scratch, uses no stack (the `z` form changes the flags, and
                // says so). AES-NI and PCLMULQDQ were checked at construction.
                // The flagging forms also prefetch at `prefetch_at(s, d)`: a hint that never faults
                // and changes no memory.
                unsafe {
                    let (s, d) = (src.add(off), dst.add(off));
                    let (t, tn) = (tw.as_ptr(), twn.as_mut_ptr());
                    if ENC {
                        group_asm!("aesenc", "aesenclast", rk, s, d, t, tn, poly);
                    } else if FLAG {
                        let zm: u64;
                        group_asm!(z, rk, s, d, t, tn, poly, prefetch_at(s, d), zm);
                        zbits |= zm & ZERO_SEEN;
                    } else {
                        group_asm!("aesdec", "aesdeclast", rk, s, d, t, tn, poly);
                    }
                }
                core::mem::swap(&mut tw, &mut twn);
            }
            if FLAG {
                let i = done + s;
                zero[i / 64] |= u64::from(zbits != 0) << (i % 64);
            }
        }
        done += n;
    }
    // The tweaks are derived from K2; don't leave them on the stack, nor the round keys,
    // tweaks and plaintext in the registers.
    wipe(&mut scratch.0);
    clear_xmm();
}
