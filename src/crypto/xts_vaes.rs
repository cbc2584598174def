//! The wide variant of the AES-NI XTS kernel (x86_64 with AVX2 and VAES): the same algorithm as
//! the 8-block SSE kernel in `xts_ni`, but each `vaesenc` works on two blocks in a 256-bit
//! register, so 16 blocks are in flight. On CPUs whose AES units accept 256-bit operands at full
//! rate (AMD Zen 3 and later, Intel Ice Lake and later) that doubles the AES work per instruction.
//! Only 256-bit (`ymm`) registers are used, no AVX-512 (DESIGN.md reports the AVX-512 code that
//! `target-cpu=native` produced as slower here; `xts_vaes512` is the deliberate 512-bit variant,
//! preferred where the CPU has it). Key schedules and tweak helpers come from the leaf
//! `xts_common`.
//! Measured: ≈2× the SSE kernel, ≈2× OpenSSL 3.0 (see `Kernel` in `xts`).

use core::arch::x86_64::*;

use super::xts_common::{
    aes_available, clear_ymm, encrypt_tweaks, mul_alpha, wipe, RoundKeys, BLOCK, LANES,
};

/// Blocks per group: 8 registers of 2 blocks.
const GROUP: usize = 16;

/// True when this CPU has the instructions the wide kernel needs.
pub(crate) fn available() -> bool {
    aes_available()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

/// Multiplies both tweaks of a register by α^K (`R` = 64 − K), as `xts_ni::mul_alpha_k` does
/// for one.
#[inline]
#[target_feature(enable = "aes,avx2,vaes,vpclmulqdq")]
fn mul_alpha_k<const K: i32, const R: i32>(t: __m256i) -> __m256i {
    let shifted = _mm256_or_si256(
        _mm256_slli_epi64::<K>(t),
        _mm256_srli_epi64::<R>(_mm256_slli_si256::<8>(t)),
    );
    let top = _mm256_srli_epi64::<R>(_mm256_srli_si256::<8>(t));
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    _mm256_xor_si256(shifted, _mm256_clmulepi64_epi128::<0x00>(top, poly))
}

/// The 16 tweaks of the group being processed and those of the next group (written while this
/// one runs), parked in memory, 32-byte aligned for `vmovdqa`. The halves swap per group.
#[repr(C, align(32))]
struct TweakScratch([u8; 2 * GROUP * BLOCK]);

impl TweakScratch {
    /// Fills in (first half) T·α^0 … T·α^15 for a sector's first group, in three levels (α², α⁴
    /// and α⁸ on pairs) instead of a chain of fifteen doublings.
    #[inline]
    #[target_feature(enable = "aes,avx2,vaes,vpclmulqdq")]
    fn start(&mut self, t0: __m128i) {
        let p0 = _mm256_set_m128i(mul_alpha(t0), t0);
        let p1 = mul_alpha_k::<2, 62>(p0);
        let (p2, p3) = (mul_alpha_k::<4, 60>(p0), mul_alpha_k::<4, 60>(p1));
        let p = [
            p0,
            p1,
            p2,
            p3,
            mul_alpha_k::<8, 56>(p0),
            mul_alpha_k::<8, 56>(p1),
            mul_alpha_k::<8, 56>(p2),
            mul_alpha_k::<8, 56>(p3),
        ];
        for (slot, v) in self.0.chunks_exact_mut(2 * BLOCK).zip(p) {
            // SAFETY: `slot` is 32 writable bytes; unaligned store.
            unsafe { _mm256_storeu_si256(slot.as_mut_ptr().cast(), v) };
        }
    }
}

// Register roles as in the SSE kernel: x0..x7 data (two blocks each), k the round key broadcast
// to both lanes, t a pair of tweaks, tmp scratch, poly the reduction constant in both lanes.
// As there, each tweak slot advances by its own α¹⁶ per group, into the other scratch half,
// instead of one long chain.

/// Blocks at byte offset `off` (two): load, whiten with their tweaks and round key 0.
#[rustfmt::skip]
macro_rules! whiten2 {
    ($x:literal, $off:literal) => {
        concat!(
            "vmovdqu {", $x, "}, ymmword ptr [{src} + ", $off, "]\n",
            "vpxor {", $x, "}, {", $x, "}, ymmword ptr [{tw} + ", $off, "]\n",
            "vpxor {", $x, "}, {", $x, "}, {k}\n",
        )
    };
}

/// Writes the tweak pair at byte offset `off`, advanced by α¹⁶, to the other scratch half
/// (`twn`) for the next group: `(T << 16) ^ clmul(T >> 112, 0x87)` per lane. Interleaved with the
/// first rounds, as in the SSE kernel.
#[rustfmt::skip]
macro_rules! advance2 {
    ($off:literal) => {
        concat!(
            "vmovdqa {t}, ymmword ptr [{tw} + ", $off, "]\n",
            "vpsrldq {tmp}, {t}, 14\n",
            "vpslldq {t}, {t}, 2\n",
            "vpclmulqdq {tmp}, {tmp}, {poly}, 0x00\n",
            "vpxor {t}, {t}, {tmp}\n",
            "vmovdqa ymmword ptr [{twn} + ", $off, "], {t}\n",
        )
    };
}

/// One middle round with the round key at byte offset `off`, on all 16 blocks.
#[rustfmt::skip]
macro_rules! round2 {
    ($op:literal, $off:literal) => {
        concat!(
            "vbroadcasti128 {k}, xmmword ptr [{rk} + ", $off, "]\n",
            $op, " {x0}, {x0}, {k}\n", $op, " {x1}, {x1}, {k}\n",
            $op, " {x2}, {x2}, {k}\n", $op, " {x3}, {x3}, {k}\n",
            $op, " {x4}, {x4}, {k}\n", $op, " {x5}, {x5}, {k}\n",
            $op, " {x6}, {x6}, {k}\n", $op, " {x7}, {x7}, {k}\n",
        )
    };
}

/// Last round with the key `rk14 ^ tweak` (`k` holds rk14 in both lanes), then the store.
#[rustfmt::skip]
macro_rules! finish2 {
    ($op:literal, $x:literal, $off:literal) => {
        concat!(
            "vpxor {tmp}, {k}, ymmword ptr [{tw} + ", $off, "]\n",
            $op, " {", $x, "}, {", $x, "}, {tmp}\n",
            "vmovdqu ymmword ptr [{dst} + ", $off, "], {", $x, "}\n",
        )
    };
}

/// As [`whiten2`], and first the zero test of the loaded pair (decryption with zero flags): a
/// bit per qword that is zero, from the very register that is then decrypted, shifted into
/// `zm` (four bits per register, so a block's two qword bits stay side by side; see
/// [`block_zero_bits`]). `tmp` is free until the rounds begin.
#[rustfmt::skip]
macro_rules! whiten2z {
    ($x:literal, $off:literal) => {
        concat!(
            "vmovdqu {", $x, "}, ymmword ptr [{src} + ", $off, "]\n",
            "vpcmpeqq {tmp}, {", $x, "}, {zero}\n",
            "vmovmskpd {r:e}, {tmp}\n",
            "shl {zm:e}, 4\n",
            "or {zm:e}, {r:e}\n",
            "vpxor {", $x, "}, {", $x, "}, ymmword ptr [{tw} + ", $off, "]\n",
            "vpxor {", $x, "}, {", $x, "}, {k}\n",
        )
    };
}

/// Rounds 1..=13 with the next group's tweaks advanced between the first eight, round 14 and
/// the stores.
#[rustfmt::skip]
macro_rules! rounds2 {
    ($round:literal, $last:literal) => {
        concat!(
            round2!($round, 16), advance2!(0), round2!($round, 32), advance2!(32),
            round2!($round, 48), advance2!(64), round2!($round, 64), advance2!(96),
            round2!($round, 80), advance2!(128), round2!($round, 96), advance2!(160),
            round2!($round, 112), advance2!(192), round2!($round, 128), advance2!(224),
            round2!($round, 144), round2!($round, 160), round2!($round, 176),
            round2!($round, 192), round2!($round, 208),
            "vbroadcasti128 {k}, xmmword ptr [{rk} + 224]\n",
            finish2!($last, "x0", 0), finish2!($last, "x1", 32), finish2!($last, "x2", 64),
            finish2!($last, "x3", 96), finish2!($last, "x4", 128), finish2!($last, "x5", 160),
            finish2!($last, "x6", 192), finish2!($last, "x7", 224),
        )
    };
}

#[rustfmt::skip]
macro_rules! group2_asm {
    ($round:literal, $last:literal, $rk:expr, $src:expr, $dst:expr, $tw:expr, $twn:expr, $poly:expr) => {
        core::arch::asm!(
            "vbroadcasti128 {k}, xmmword ptr [{rk}]",
            whiten2!("x0", 0), whiten2!("x1", 32), whiten2!("x2", 64), whiten2!("x3", 96),
            whiten2!("x4", 128), whiten2!("x5", 160), whiten2!("x6", 192), whiten2!("x7", 224),
            rounds2!($round, $last),
            rk = in(reg) $rk,
            src = in(reg) $src,
            dst = in(reg) $dst,
            tw = in(reg) $tw,
            twn = in(reg) $twn,
            poly = in(ymm_reg) $poly,
            k = out(ymm_reg) _,
            t = out(ymm_reg) _,
            tmp = out(ymm_reg) _,
            x0 = out(ymm_reg) _, x1 = out(ymm_reg) _, x2 = out(ymm_reg) _, x3 = out(ymm_reg) _,
            x4 = out(ymm_reg) _, x5 = out(ymm_reg) _, x6 = out(ymm_reg) _, x7 = out(ymm_reg) _,
            options(nostack, preserves_flags),
        )
    };
    // Decryption that also returns the group's qword-zero mask in `$zm`.
    (z, $rk:expr, $src:expr, $dst:expr, $tw:expr, $twn:expr, $poly:expr, $zero:expr, $pf:expr, $zm:ident) => {
        core::arch::asm!(
            "vbroadcasti128 {k}, xmmword ptr [{rk}]",
            whiten2z!("x0", 0), whiten2z!("x1", 32), whiten2z!("x2", 64), whiten2z!("x3", 96),
            whiten2z!("x4", 128), whiten2z!("x5", 160), whiten2z!("x6", 192), whiten2z!("x7", 224),
            // The group one page ahead from a mapping, else itself: see `prefetch_at`.
            "prefetcht0 byte ptr [{pf}]", "prefetcht0 byte ptr [{pf} + 64]",
            "prefetcht0 byte ptr [{pf} + 128]", "prefetcht0 byte ptr [{pf} + 192]",
            rounds2!("vaesdec", "vaesdeclast"),
            rk = in(reg) $rk,
            src = in(reg) $src,
            dst = in(reg) $dst,
            tw = in(reg) $tw,
            twn = in(reg) $twn,
            poly = in(ymm_reg) $poly,
            zero = in(ymm_reg) $zero,
            pf = in(reg) $pf,
            zm = inout(reg) 0u64 => $zm,
            r = out(reg) _,
            k = out(ymm_reg) _,
            t = out(ymm_reg) _,
            tmp = out(ymm_reg) _,
            x0 = out(ymm_reg) _, x1 = out(ymm_reg) _, x2 = out(ymm_reg) _, x3 = out(ymm_reg) _,
            x4 = out(ymm_reg) _, x5 = out(ymm_reg) _, x6 = out(ymm_reg) _, x7 = out(ymm_reg) _,
            options(nostack),
        )
    };
}

/// Which blocks of a group were all zero, from its qword-zero mask (`whiten2z`): bit 2i for
/// block i when both its qwords (bits 2i and 2i + 1) were zero.
#[inline(always)]
fn block_zero_bits(zm: u64) -> u64 {
    zm & (zm >> 1) & 0x5555_5555
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

/// Encrypts (`ENC`, with K1's encryption schedule in `rks`) or decrypts (with the decryption
/// schedule) whole sectors from `src` into `dst`; `k2` is the tweak key's schedule.
///
/// # Safety
/// The CPU must have AES, AVX2, VAES and VPCLMULQDQ ([`available`]). `src` and `dst` must be
/// valid for `len` bytes and equal or disjoint; `len` a multiple of `sector_size`, itself 512 or
/// 4096.
#[target_feature(enable = "aes,avx2,vaes,vpclmulqdq")]
pub(crate) unsafe fn crypt_sectors<const ENC: bool>(
    rks: &RoundKeys,
    k2: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_unit: u64,
) {
    // SAFETY: our own contract, passed on; no flags asked for.
    unsafe { crypt::<ENC, false>(rks, k2, src, dst, len, sector_size, first_unit, &mut []) }
}

/// Decrypts as [`crypt_sectors`] (with K1's decryption schedule in `rks`) and sets bit `i % 64`
/// of `zero[i / 64]` for each sector `i` that had an all-zero 16-byte block, as loaded for
/// its decryption (bits of other sectors are left alone).
///
/// # Safety
/// As [`crypt_sectors`]; `zero` has at least `(len / sector_size).div_ceil(64)` words (else it
/// panics, safely).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "aes,avx2,vaes,vpclmulqdq")]
pub(crate) unsafe fn decrypt_sectors_flagging(
    rks: &RoundKeys,
    k2: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_unit: u64,
    zero: &mut [u64],
) {
    // SAFETY: our own contract, passed on.
    unsafe { crypt::<false, true>(rks, k2, src, dst, len, sector_size, first_unit, zero) }
}

/// Both entry points: `FLAG` (decryption only) adds the zero test to the loads.
///
/// # Safety
/// As [`crypt_sectors`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "aes,avx2,vaes,vpclmulqdq")]
unsafe fn crypt<const ENC: bool, const FLAG: bool>(
    rks: &RoundKeys,
    k2: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_unit: u64,
    zero: &mut [u64],
) {
    let units_per_sector = (sector_size / 512) as u64;
    let groups_per_sector = sector_size / (GROUP * BLOCK);
    let sectors = len / sector_size;
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    let zero_reg = _mm256_setzero_si256();
    let rk = rks.0.as_ptr();
    let mut scratch = TweakScratch([0; 2 * GROUP * BLOCK]);
    let mut done = 0usize;
    while done < sectors {
        let n = (sectors - done).min(LANES);
        let mut units = [0u64; LANES];
        for (i, u) in units.iter_mut().enumerate().take(n) {
            // plain64: the unit number wraps modulo 2^64, as dm-crypt's does.
            *u = first_unit.wrapping_add((done + i) as u64 * units_per_sector);
        }
        let tweaks = encrypt_tweaks(k2, &units, n);
        for (s, &t0) in tweaks.iter().enumerate().take(n) {
            scratch.start(t0);
            let (mut tw, mut twn) = scratch.0.split_at_mut(GROUP * BLOCK);
            let base = (done + s) * sector_size;
            let mut zbits = 0u64;
            for g in 0..groups_per_sector {
                let off = base + g * GROUP * BLOCK;
                // SAFETY: `off + 256 <= len` (a 256-byte group inside a whole sector of the
                // buffer), so the asm's 256-byte reads at `src + off` and writes at `dst + off`
                // are in bounds and, per our contract, equal or disjoint; every load precedes
                // every store. It reads 240 bytes of round keys at `rk` (a whole `RoundKeys`),
                // reads the 256-byte half `tw` and writes the half `twn` of the 32-byte aligned
                // scratch, uses no stack (the `z` form changes the flags, and says so). The CPU
                // features are our caller's contract.
                // The flagging forms also prefetch at `prefetch_at(s, d)`: a hint that never faults
                // and changes no memory.
                unsafe {
                    let (s, d) = (src.add(off), dst.add(off));
                    let (t, tn) = (tw.as_ptr(), twn.as_mut_ptr());
                    if ENC {
                        group2_asm!("vaesenc", "vaesenclast", rk, s, d, t, tn, poly);
                    } else if FLAG {
                        let zm: u64;
                        group2_asm!(z, rk, s, d, t, tn, poly, zero_reg, prefetch_at(s, d), zm);
                        zbits |= block_zero_bits(zm);
                    } else {
                        group2_asm!("vaesdec", "vaesdeclast", rk, s, d, t, tn, poly);
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
    // tweaks and plaintext in the registers: zero idioms on `ymm0`–`ymm15` (a VEX write of an
    // `xmm` register zeroes its upper half), all this kernel uses (no AVX-512 here), then
    // `vzeroupper`, which leaves the upper halves clean for legacy-SSE code.
    wipe(&mut scratch.0);
    clear_ymm();
}
