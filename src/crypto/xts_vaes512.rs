//! The 512-bit variant of the AES-NI XTS kernel (x86_64 with AVX-512 F/BW, VAES and
//! VPCLMULQDQ): the algorithm of `xts_vaes`, but each `vaesenc` works on four blocks in a `zmm`
//! register, so 32 blocks (one 512-byte group) are in flight. On CPUs whose AES units take
//! 512-bit operands at full rate (AMD Zen 5: two 512-bit AES operations per cycle) that doubles
//! the AES work per cycle over the 256-bit kernel; on those that split them in two (Zen 4) or
//! run them on one port (Intel Ice Lake, Sapphire Rapids) it saves instructions but not AES
//! cycles. Key schedules come from the leaf `xts_common`, the tweak work on `zmm` and the CPU
//! model preference from `xts_zmm`; `xts` chooses.
//!
//! What differs from the 256-bit kernel, and why:
//! - As there, each of the 8 tweak registers of a group advances by its own α³² per group (a
//!   byte shift and one carry-less multiply) into the other half of a small scratch while this
//!   group's rounds run; a sector's last group skips that work (with 512-byte sectors, every
//!   group is a last group).
//! - The whitening `x ^ T ^ rk0` is one `vpternlogq`.
//! - A sector's first 32 tweaks T·α⁰ … T·α³¹ are computed side by side, each register with
//!   per-lane variable shifts (`vpsllvq`), not as a chain of doublings.
//! - The tweaks of up to 8 sectors are encrypted together on `zmm` (4 per instruction) rather
//!   than one `xmm` block per instruction: with 512-byte sectors that work is 1/32 of the data.
//! - Decryption with zero flags (`decrypt_sectors_flagging`, the read path's form) tests each
//!   loaded register with `vptestnmq` into a mask register, packs the eight masks of a group
//!   into one 64-bit mask (`kunpck*`, `kmovq`) and prefetches the group one page ahead; the
//!   encrypting and plain decrypting forms are the code they were.
//! - At the end of every call all 32 `zmm` registers are zeroed (`xts_zmm::clear_zmm`): they
//!   held round keys, tweaks and plaintext.

use core::arch::x86_64::*;

use super::xts_common::{aes_available, wipe, RoundKeys, BLOCK};
use super::xts_zmm::{batch_tweaks, broadcast_lane, clear_zmm, first_tweaks, BATCH};

/// Bytes per group: 8 registers of 4 blocks.
const GROUP: usize = 8 * 4 * BLOCK;

/// True when this CPU has the instructions the 512-bit kernel needs.
pub(crate) fn available() -> bool {
    aes_available()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

/// The 32 tweaks of the group being processed and those of the next group (written while this
/// one runs), parked in memory, 64-byte aligned. The halves swap per group.
///
/// (Registers would do, AVX-512 has 32 of them, but an asm block with more than 16 `zmm_reg`
/// operands, e.g. eight tweak registers in and eight out, is refused by the compiler's register
/// allocator here: "inline assembly requires more registers than available".)
#[repr(C, align(64))]
struct TweakScratch([u8; 2 * GROUP]);

impl TweakScratch {
    /// Fills in half `half` (0 or 1) with the tweaks of a sector's first group, see
    /// `xts_zmm::first_tweaks`.
    #[inline]
    #[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
    fn start(&mut self, half: usize, t: __m512i) {
        let slots = self.0[half * GROUP..(half + 1) * GROUP].chunks_exact_mut(4 * BLOCK);
        for (slot, v) in slots.zip(first_tweaks(t)) {
            // SAFETY: `slot` is 64 writable bytes; unaligned store.
            unsafe { _mm512_storeu_si512(slot.as_mut_ptr().cast(), v) };
        }
    }
}

// Register roles: x0..x7 data (four blocks each), k the round key in all four lanes, t a tweak
// register being advanced, tmp scratch, poly 0x87 in every lane.

/// Blocks at byte offset `off` (four): load, then `x ^ T ^ rk0` in one instruction.
#[rustfmt::skip]
macro_rules! whiten4 {
    ($x:literal, $off:literal) => {
        concat!(
            "vmovdqu64 {", $x, "}, zmmword ptr [{src} + ", $off, "]\n",
            "vpternlogq {", $x, "}, {k}, zmmword ptr [{tw} + ", $off, "], 0x96\n",
        )
    };
}

/// Writes the tweak register at byte offset `off`, advanced by α³², to the other scratch half
/// (`twn`) for the next group: `(T << 32) ^ clmul(T >> 96, 0x87)` per lane. Interleaved with the
/// first rounds, where these non-AES instructions fill gaps.
#[rustfmt::skip]
macro_rules! advance4 {
    ($off:literal) => {
        concat!(
            "vmovdqa64 {t}, zmmword ptr [{tw} + ", $off, "]\n",
            "vpsrldq {tmp}, {t}, 12\n",
            "vpslldq {t}, {t}, 4\n",
            "vpclmulqdq {tmp}, {tmp}, {poly}, 0x00\n",
            "vpxorq {t}, {t}, {tmp}\n",
            "vmovdqa64 zmmword ptr [{twn} + ", $off, "], {t}\n",
        )
    };
}

/// One middle round with the round key at byte offset `off`, on all 32 blocks.
#[rustfmt::skip]
macro_rules! round4 {
    ($op:literal, $off:literal) => {
        concat!(
            "vbroadcasti32x4 {k}, xmmword ptr [{rk} + ", $off, "]\n",
            $op, " {x0}, {x0}, {k}\n", $op, " {x1}, {x1}, {k}\n",
            $op, " {x2}, {x2}, {k}\n", $op, " {x3}, {x3}, {k}\n",
            $op, " {x4}, {x4}, {k}\n", $op, " {x5}, {x5}, {k}\n",
            $op, " {x6}, {x6}, {k}\n", $op, " {x7}, {x7}, {k}\n",
        )
    };
}

/// Last round with the key `rk14 ^ tweak` (`k` holds rk14), then the store.
#[rustfmt::skip]
macro_rules! finish4 {
    ($op:literal, $x:literal, $off:literal) => {
        concat!(
            "vpxorq {tmp}, {k}, zmmword ptr [{tw} + ", $off, "]\n",
            $op, " {", $x, "}, {", $x, "}, {tmp}\n",
            "vmovdqu64 zmmword ptr [{dst} + ", $off, "], {", $x, "}\n",
        )
    };
}

/// As [`whiten4`], and first the zero test of the loaded blocks (decryption with zero flags):
/// mask register `m` gets a bit per qword of `x` that is zero, from the very register that is
/// then decrypted. A block is zero when both its qwords are (see [`block_zero_bits`]).
#[rustfmt::skip]
macro_rules! whiten4z {
    ($x:literal, $m:literal, $off:literal) => {
        concat!(
            "vmovdqu64 {", $x, "}, zmmword ptr [{src} + ", $off, "]\n",
            "vptestnmq {", $m, "}, {", $x, "}, {", $x, "}\n",
            "vpternlogq {", $x, "}, {k}, zmmword ptr [{tw} + ", $off, "], 0x96\n",
        )
    };
}

/// The loads of a group with their zero tests: the eight 8-bit qword masks are packed into one
/// 64-bit mask (each register's byte stays whole, so a block's two qword bits stay side by side)
/// and moved to `zm`. Five mask registers, reused as the packing frees them; mask instructions
/// and one `kmovq`, none of them on the AES ports' critical path.
#[rustfmt::skip]
macro_rules! loads4z {
    () => {
        concat!(
            whiten4z!("x0", "m0", 0), whiten4z!("x1", "m1", 64),
            whiten4z!("x2", "m2", 128), whiten4z!("x3", "m3", 192),
            "kunpckbw {m0}, {m1}, {m0}\n", "kunpckbw {m2}, {m3}, {m2}\n",
            "kunpckwd {m0}, {m2}, {m0}\n",
            whiten4z!("x4", "m1", 256), whiten4z!("x5", "m2", 320),
            whiten4z!("x6", "m3", 384), whiten4z!("x7", "m4", 448),
            "kunpckbw {m1}, {m2}, {m1}\n", "kunpckbw {m3}, {m4}, {m3}\n",
            "kunpckwd {m1}, {m3}, {m1}\n", "kunpckdq {m0}, {m1}, {m0}\n",
            "kmovq {zm}, {m0}\n",
        )
    };
}

/// Software prefetch of the eight cache lines at `pf`: in the flagging decryption from another
/// buffer (a mapping of the page cache, `volume::mapped`), the group one 4 KiB page ahead
/// ([`prefetch_at`]): the data there is usually in no cache, and the hardware's stream
/// prefetchers stop at page boundaries. A prefetch never faults, so an address past the
/// buffer's end is harmless.
#[rustfmt::skip]
macro_rules! prefetch4 {
    () => {
        concat!(
            "prefetcht0 byte ptr [{pf}]\n", "prefetcht0 byte ptr [{pf} + 64]\n",
            "prefetcht0 byte ptr [{pf} + 128]\n", "prefetcht0 byte ptr [{pf} + 192]\n",
            "prefetcht0 byte ptr [{pf} + 256]\n", "prefetcht0 byte ptr [{pf} + 320]\n",
            "prefetcht0 byte ptr [{pf} + 384]\n", "prefetcht0 byte ptr [{pf} + 448]\n",
        )
    };
}

/// The loads of a group, whitened (no zero test).
#[rustfmt::skip]
macro_rules! loads4 {
    () => {
        concat!(
            whiten4!("x0", 0), whiten4!("x1", 64), whiten4!("x2", 128), whiten4!("x3", 192),
            whiten4!("x4", 256), whiten4!("x5", 320), whiten4!("x6", 384), whiten4!("x7", 448),
        )
    };
}

/// Rounds 1..=13 with the next group's tweaks advanced between the first eight (`next`).
#[rustfmt::skip]
macro_rules! rounds4_next {
    ($round:literal) => {
        concat!(
            round4!($round, 16), advance4!(0), round4!($round, 32), advance4!(64),
            round4!($round, 48), advance4!(128), round4!($round, 64), advance4!(192),
            round4!($round, 80), advance4!(256), round4!($round, 96), advance4!(320),
            round4!($round, 112), advance4!(384), round4!($round, 128), advance4!(448),
            round4!($round, 144), round4!($round, 160), round4!($round, 176),
            round4!($round, 192), round4!($round, 208),
        )
    };
}

/// Rounds 1..=13 alone (a sector's last group).
#[rustfmt::skip]
macro_rules! rounds4_last {
    ($round:literal) => {
        concat!(
            round4!($round, 16), round4!($round, 32), round4!($round, 48), round4!($round, 64),
            round4!($round, 80), round4!($round, 96), round4!($round, 112), round4!($round, 128),
            round4!($round, 144), round4!($round, 160), round4!($round, 176),
            round4!($round, 192), round4!($round, 208),
        )
    };
}

/// Round 14 and the stores of all eight registers.
#[rustfmt::skip]
macro_rules! finish4_all {
    ($last:literal) => {
        concat!(
            "vbroadcasti32x4 {k}, xmmword ptr [{rk} + 224]\n",
            finish4!($last, "x0", 0), finish4!($last, "x1", 64), finish4!($last, "x2", 128),
            finish4!($last, "x3", 192), finish4!($last, "x4", 256), finish4!($last, "x5", 320),
            finish4!($last, "x6", 384), finish4!($last, "x7", 448),
        )
    };
}

/// One 512-byte group from `src` to `dst` with the tweaks at `tw`. The `next` form also writes
/// the next group's tweaks (those at `tw` advanced by α³²) to `twn`; the `last` form, for a
/// sector's last group, does not.
#[rustfmt::skip]
macro_rules! group4_asm {
    (next, $round:literal, $last:literal, $rk:expr, $src:expr, $dst:expr, $tw:expr, $twn:expr, $poly:expr) => {
        core::arch::asm!(
            "vbroadcasti32x4 {k}, xmmword ptr [{rk}]",
            loads4!(), rounds4_next!($round), finish4_all!($last),
            rk = in(reg) $rk,
            src = in(reg) $src,
            dst = in(reg) $dst,
            tw = in(reg) $tw,
            twn = in(reg) $twn,
            poly = in(zmm_reg) $poly,
            k = out(zmm_reg) _,
            t = out(zmm_reg) _,
            tmp = out(zmm_reg) _,
            x0 = out(zmm_reg) _, x1 = out(zmm_reg) _, x2 = out(zmm_reg) _, x3 = out(zmm_reg) _,
            x4 = out(zmm_reg) _, x5 = out(zmm_reg) _, x6 = out(zmm_reg) _, x7 = out(zmm_reg) _,
            options(nostack, preserves_flags),
        )
    };
    (last, $round:literal, $last:literal, $rk:expr, $src:expr, $dst:expr, $tw:expr) => {
        core::arch::asm!(
            "vbroadcasti32x4 {k}, xmmword ptr [{rk}]",
            loads4!(), rounds4_last!($round), finish4_all!($last),
            rk = in(reg) $rk,
            src = in(reg) $src,
            dst = in(reg) $dst,
            tw = in(reg) $tw,
            k = out(zmm_reg) _,
            tmp = out(zmm_reg) _,
            x0 = out(zmm_reg) _, x1 = out(zmm_reg) _, x2 = out(zmm_reg) _, x3 = out(zmm_reg) _,
            x4 = out(zmm_reg) _, x5 = out(zmm_reg) _, x6 = out(zmm_reg) _, x7 = out(zmm_reg) _,
            options(nostack, preserves_flags),
        )
    };
    // The decrypting forms that also return the group's qword-zero mask in `$zm`.
    (next_z, $rk:expr, $src:expr, $dst:expr, $tw:expr, $twn:expr, $poly:expr, $pf:expr, $zm:ident) => {
        core::arch::asm!(
            "vbroadcasti32x4 {k}, xmmword ptr [{rk}]",
            loads4z!(), prefetch4!(), rounds4_next!("vaesdec"), finish4_all!("vaesdeclast"),
            rk = in(reg) $rk,
            src = in(reg) $src,
            dst = in(reg) $dst,
            tw = in(reg) $tw,
            twn = in(reg) $twn,
            poly = in(zmm_reg) $poly,
            pf = in(reg) $pf,
            zm = out(reg) $zm,
            k = out(zmm_reg) _,
            t = out(zmm_reg) _,
            tmp = out(zmm_reg) _,
            x0 = out(zmm_reg) _, x1 = out(zmm_reg) _, x2 = out(zmm_reg) _, x3 = out(zmm_reg) _,
            x4 = out(zmm_reg) _, x5 = out(zmm_reg) _, x6 = out(zmm_reg) _, x7 = out(zmm_reg) _,
            m0 = out(kreg) _, m1 = out(kreg) _, m2 = out(kreg) _, m3 = out(kreg) _,
            m4 = out(kreg) _,
            options(nostack, preserves_flags),
        )
    };
    (last_z, $rk:expr, $src:expr, $dst:expr, $tw:expr, $pf:expr, $zm:ident) => {
        core::arch::asm!(
            "vbroadcasti32x4 {k}, xmmword ptr [{rk}]",
            loads4z!(), prefetch4!(), rounds4_last!("vaesdec"), finish4_all!("vaesdeclast"),
            rk = in(reg) $rk,
            src = in(reg) $src,
            dst = in(reg) $dst,
            tw = in(reg) $tw,
            pf = in(reg) $pf,
            zm = out(reg) $zm,
            k = out(zmm_reg) _,
            tmp = out(zmm_reg) _,
            x0 = out(zmm_reg) _, x1 = out(zmm_reg) _, x2 = out(zmm_reg) _, x3 = out(zmm_reg) _,
            x4 = out(zmm_reg) _, x5 = out(zmm_reg) _, x6 = out(zmm_reg) _, x7 = out(zmm_reg) _,
            m0 = out(kreg) _, m1 = out(kreg) _, m2 = out(kreg) _, m3 = out(kreg) _,
            m4 = out(kreg) _,
            options(nostack, preserves_flags),
        )
    };
}

/// Which blocks of a group were all zero, from its qword-zero mask (`loads4z`): bit 2i of the
/// result for block i when both its qwords (bits 2i and 2i + 1) were zero.
#[inline(always)]
fn block_zero_bits(zm: u64) -> u64 {
    zm & (zm >> 1) & 0x5555_5555_5555_5555
}

/// Encrypts (`ENC`, with K1's encryption schedule in `rks`) or decrypts (with the decryption
/// schedule) whole sectors from `src` into `dst`; `k2` is the tweak key's schedule.
///
/// # Safety
/// The CPU must have what [`available`] checks. `src` and `dst` must be valid for `len` bytes
/// and equal or disjoint; `len` a multiple of `sector_size`, itself 512 or 4096 (a multiple of
/// the 512-byte group and of the 512-byte tweak unit).
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
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
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
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
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
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
    let mut scratch = TweakScratch([0; 2 * GROUP]);
    let (rk, sectors) = (rks.0.as_ptr(), len / sector_size);
    let (s, d, ss, fu) = (src, dst, sector_size, first_unit);
    // SAFETY: our own contract, passed on; the sector size picks the loop.
    unsafe {
        if sector_size == GROUP {
            one_group_sectors::<ENC, FLAG>(rk, k2, s, d, sectors, fu, &mut scratch, zero);
        } else {
            many_group_sectors::<ENC, FLAG>(rk, k2, s, d, sectors, ss, fu, &mut scratch, zero);
        }
    }
    // The tweaks are derived from K2; don't leave them on the stack, nor the round keys,
    // tweaks and plaintext in the vector registers (this also leaves the upper halves clean
    // for any legacy-SSE code that runs next, which Intel charges a transition penalty for).
    wipe(&mut scratch.0);
    clear_zmm();
}

/// Where the flagging decryption of the group at `s` prefetches: one page ahead when it reads
/// from another buffer (a mapping), the group itself (already loaded: nothing to fetch) in
/// place, where the data was just read into the buffer and is in the cache. The address is
/// only prefetched, never dereferenced, hence `wrapping_add`.
#[inline(always)]
fn prefetch_at(s: *const u8, d: *mut u8) -> *const u8 {
    if s == d.cast_const() {
        s
    } else {
        s.wrapping_add(4096)
    }
}

/// Records sector `i`'s flag from the OR of its groups' `block_zero_bits`.
#[inline(always)]
fn set_flag(zero: &mut [u64], i: usize, bits: u64) {
    zero[i / 64] |= u64::from(bits != 0) << (i % 64);
}

/// 512-byte sectors: one group each, so no tweak advances; instead the next sector's 32 tweaks
/// are computed into the other scratch half before this sector's rounds are issued, which takes
/// that short dependency chain (lane broadcast, shifts, multiply, stores, loads) off the path
/// between two sectors.
///
/// # Safety
/// As [`crypt_sectors`], with `sectors` sectors of 512 bytes; `rk` points at a whole
/// `RoundKeys`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn one_group_sectors<const ENC: bool, const FLAG: bool>(
    rk: *const [u8; BLOCK],
    k2: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    sectors: usize,
    first_unit: u64,
    scratch: &mut TweakScratch,
    zero: &mut [u64],
) {
    if sectors == 0 {
        return;
    }
    // The batch of encrypted tweaks holding sector `i + 1`'s, and the batch after it.
    let mut batch = batch_tweaks(k2, first_unit, 1, 0, sectors).0;
    let mut ahead = (sectors > BATCH).then(|| batch_tweaks(k2, first_unit, 1, BATCH, sectors).0);
    scratch.start(0, broadcast_lane(batch[0], 0));
    for i in 0..sectors {
        let half = i % 2;
        let j = i + 1;
        if j < sectors {
            if j % BATCH == 0 {
                // Sector j opens a new batch, encrypted one batch ago; start the one after.
                batch = ahead.unwrap_or(batch);
                ahead = (j + BATCH < sectors)
                    .then(|| batch_tweaks(k2, first_unit, 1, j + BATCH, sectors).0);
            }
            let lane = j % BATCH;
            scratch.start(1 - half, broadcast_lane(batch[lane / 4], lane % 4));
        }
        let off = i * GROUP;
        // SAFETY: `off + 512 <= sectors * 512`, the buffer's length: the asm's 512-byte reads at
        // `src + off` and writes at `dst + off` are in bounds and, per our contract, equal or
        // disjoint; every load of the group precedes its first store. It reads 240 bytes of
        // round keys at `rk` (a whole `RoundKeys`) and the 512-byte half `half` of the scratch,
        // uses no stack and leaves the flags alone. The CPU features are our caller's contract.
        // The flagging forms also prefetch at `prefetch_at(s, d)`: a hint that never faults
        // and changes no memory.
        unsafe {
            let (s, d) = (src.add(off), dst.add(off));
            let t = scratch.0.as_ptr().add(half * GROUP);
            if ENC {
                group4_asm!(last, "vaesenc", "vaesenclast", rk, s, d, t)
            } else if FLAG {
                let zm: u64;
                group4_asm!(last_z, rk, s, d, t, prefetch_at(s, d), zm);
                set_flag(zero, i, block_zero_bits(zm));
            } else {
                group4_asm!(last, "vaesdec", "vaesdeclast", rk, s, d, t)
            }
        }
    }
}

/// 4096-byte sectors: eight groups each, each group's tweaks advanced by α³² for the next one
/// while its rounds run.
///
/// # Safety
/// As [`crypt_sectors`], with `sectors` sectors of `sector_size` bytes; `rk` points at a whole
/// `RoundKeys`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn many_group_sectors<const ENC: bool, const FLAG: bool>(
    rk: *const [u8; BLOCK],
    k2: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    sectors: usize,
    sector_size: usize,
    first_unit: u64,
    scratch: &mut TweakScratch,
    zero: &mut [u64],
) {
    let units_per_sector = (sector_size / 512) as u64;
    let groups_per_sector = sector_size / GROUP;
    let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    let mut next = batch_tweaks(k2, first_unit, units_per_sector, 0, sectors);
    let mut done = 0usize;
    while done < sectors {
        let (enc, n) = next;
        // Encrypt the next batch's tweaks now, before this batch's data: a chain of 14 dependent
        // rounds that the CPU then runs beside this batch's groups, instead of the next batch's
        // first group waiting for it.
        if done + n < sectors {
            next = batch_tweaks(k2, first_unit, units_per_sector, done + n, sectors);
        }
        for s in 0..n {
            scratch.start(0, broadcast_lane(enc[s / 4], s % 4));
            let (mut tw, mut twn) = scratch.0.split_at_mut(GROUP);
            let base = (done + s) * sector_size;
            let mut zbits = 0u64;
            for g in 0..groups_per_sector {
                let off = base + g * GROUP;
                // SAFETY: `off + 512 <= sectors * sector_size` (a 512-byte group inside a whole
                // sector of the buffer), so the asm's 512-byte reads at `src + off` and writes at
                // `dst + off` are in bounds and, per our contract, equal or disjoint; every load
                // of the group precedes its first store. It reads 240 bytes of round keys at `rk`
                // (a whole `RoundKeys`), reads the 512-byte half `tw` and (the `next` form)
                // writes the half `twn` of the scratch, uses no stack and leaves the flags
                // alone. The CPU features are our caller's contract.
                // The flagging forms also prefetch at `prefetch_at(s, d)`: a hint that never faults
                // and changes no memory.
                unsafe {
                    let (s, d) = (src.add(off), dst.add(off));
                    let (t, tn) = (tw.as_ptr(), twn.as_mut_ptr());
                    match (ENC, FLAG, g + 1 < groups_per_sector) {
                        (true, _, true) => {
                            group4_asm!(next, "vaesenc", "vaesenclast", rk, s, d, t, tn, poly)
                        }
                        (false, false, true) => {
                            group4_asm!(next, "vaesdec", "vaesdeclast", rk, s, d, t, tn, poly)
                        }
                        (false, true, true) => {
                            let zm: u64;
                            group4_asm!(next_z, rk, s, d, t, tn, poly, prefetch_at(s, d), zm);
                            zbits |= block_zero_bits(zm);
                        }
                        (true, _, false) => {
                            group4_asm!(last, "vaesenc", "vaesenclast", rk, s, d, t)
                        }
                        (false, false, false) => {
                            group4_asm!(last, "vaesdec", "vaesdeclast", rk, s, d, t)
                        }
                        (false, true, false) => {
                            let zm: u64;
                            group4_asm!(last_z, rk, s, d, t, prefetch_at(s, d), zm);
                            zbits |= block_zero_bits(zm);
                        }
                    }
                }
                core::mem::swap(&mut tw, &mut twn);
            }
            if FLAG {
                set_flag(zero, done + s, zbits);
            }
        }
        done += n;
    }
}

#[cfg(test)]
#[path = "xts_vaes512_tests.rs"]
mod tests;
