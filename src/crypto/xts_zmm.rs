//! The 512-bit kernel's helpers that are not the data path (x86_64, AVX-512 F/BW with VAES and
//! VPCLMULQDQ): whether this CPU model should run `zmm` code at all, and the tweak work on
//! `zmm` registers (encrypting the tweaks of 8 sectors four per instruction, spreading a
//! sector's tweak over its first 32 blocks). A leaf like `xts_common`: the kernel `xts_vaes512`
//! and the kernel choice in `xts` import it, it imports neither.

use core::arch::x86_64::*;

use super::xts_common::{clear_ymm, RoundKeys, BLOCK, ROUNDS};

/// Sectors whose tweaks are encrypted together: two registers of four.
pub(crate) const BATCH: usize = 8;

/// Whether `Xts::new` should prefer the 512-bit kernel to the 256-bit one on this CPU (both
/// run wherever the 512-bit one does). Yes, except on the Intel models where 512-bit
/// instructions lower the core's clock for a while (Skylake-SP, Ice Lake, Tiger Lake, Rocket
/// Lake: the first AVX-512 generations, with their frequency licences), which would slow every
/// other thread of the server for a gain of a few per cent in AES (Linux keeps its `zmm` XTS
/// off these models for the same reason). Elsewhere the 512-bit kernel is at least as fast:
/// AMD Zen 5 runs two 512-bit AES operations per cycle (measured: ≈1.9× the 256-bit kernel,
/// see `Kernel` in `xts`); Zen 4 and Intel Sapphire Rapids split or single-issue them but save
/// instructions (published: ≈+13 % and ≈+4 % over 256-bit code).
pub(crate) fn zmm_preferred() -> bool {
    let (vendor, family, model) = cpu_signature();
    !zmm_lowers_the_clock(&vendor, family, model)
}

/// The CPU's vendor string and display family and model (CPUID leaves 0 and 1, with the
/// extended family and model folded in as the vendors document).
fn cpu_signature() -> ([u8; 12], u32, u32) {
    let id = __cpuid(0);
    let mut vendor = [0u8; 12];
    for (chunk, reg) in vendor.chunks_exact_mut(4).zip([id.ebx, id.edx, id.ecx]) {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    let eax = __cpuid(1).eax;
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let mut model = (eax >> 4) & 0xf;
    if base_family == 0x6 || base_family == 0xf {
        model |= ((eax >> 16) & 0xf) << 4;
    }
    (vendor, family, model)
}

/// The Intel family-6 models whose AVX-512 units downclock the core (see [`zmm_preferred`]).
fn zmm_lowers_the_clock(vendor: &[u8; 12], family: u32, model: u32) -> bool {
    const MODELS: [u32; 9] = [
        0x55, // Skylake-SP / Cascade Lake (no VAES: listed for completeness)
        0x6a, // Ice Lake-SP
        0x6c, // Ice Lake-D
        0x7d, // Ice Lake (client)
        0x7e, // Ice Lake-L
        0x9d, // Ice Lake-NNPI
        0x8c, // Tiger Lake-L
        0x8d, // Tiger Lake
        0xa7, // Rocket Lake
    ];
    vendor == b"GenuineIntel" && family == 6 && MODELS.contains(&model)
}

/// Zeroes all 32 `zmm` registers: the 512-bit kernel leaves round keys, tweaks and plaintext
/// in them (in `zmm16`–`zmm31` too, which `vzeroall` does not touch), and a core dump or a
/// context switch copies every thread's registers. Zero idioms (a VEX or EVEX write of an
/// `xmm` register zeroes the rest of its `zmm`), which the CPU resolves at register renaming,
/// then `vzeroupper` (the upper halves clean for legacy-SSE code). Measured: no visible cost on
/// 4 KiB calls (`examples/xts_small_calls`).
#[inline]
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
pub(crate) fn clear_zmm() {
    // SAFETY: only zeroes vector registers, all of which the C ABI lets a call clobber (and
    // `clobber_abi` tells the compiler so); no memory, no stack, no flags. The CPU has
    // AVX-512 F (this function's features).
    unsafe {
        core::arch::asm!(
            "vpxord xmm16, xmm16, xmm16",
            "vpxord xmm17, xmm17, xmm17",
            "vpxord xmm18, xmm18, xmm18",
            "vpxord xmm19, xmm19, xmm19",
            "vpxord xmm20, xmm20, xmm20",
            "vpxord xmm21, xmm21, xmm21",
            "vpxord xmm22, xmm22, xmm22",
            "vpxord xmm23, xmm23, xmm23",
            "vpxord xmm24, xmm24, xmm24",
            "vpxord xmm25, xmm25, xmm25",
            "vpxord xmm26, xmm26, xmm26",
            "vpxord xmm27, xmm27, xmm27",
            "vpxord xmm28, xmm28, xmm28",
            "vpxord xmm29, xmm29, xmm29",
            "vpxord xmm30, xmm30, xmm30",
            "vpxord xmm31, xmm31, xmm31",
            clobber_abi("C"),
            options(nomem, nostack, preserves_flags),
        )
    }
    // xmm0–xmm15 (and with them zmm0–zmm15), then `vzeroupper`.
    clear_ymm();
}

/// Round key `i` of `rk` in all four lanes.
#[inline]
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
fn broadcast_rk(rk: &RoundKeys, i: usize) -> __m512i {
    let k: &[u8; BLOCK] = &rk.0[i];
    // SAFETY: `k` is a reference to 16 readable bytes; unaligned load.
    _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(k.as_ptr().cast()) })
}

/// Encrypts the tweak blocks (the unit numbers, zero-extended) of the first `n <= BATCH` sectors
/// under K2: sector `i` ends up in lane `i % 4` of register `i / 4`. A second register is only
/// run when `n > 4`, so a one-sector call pays for one.
#[inline]
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
fn encrypt_tweaks(k2: &RoundKeys, units: &[u64; BATCH], n: usize) -> [__m512i; 2] {
    let u = |i: usize| units[i] as i64;
    let mut t = [
        _mm512_set_epi64(0, u(3), 0, u(2), 0, u(1), 0, u(0)),
        _mm512_set_epi64(0, u(7), 0, u(6), 0, u(5), 0, u(4)),
    ];
    let m = n.div_ceil(4);
    let rk0 = broadcast_rk(k2, 0);
    for x in t.iter_mut().take(m) {
        *x = _mm512_xor_si512(*x, rk0);
    }
    for r in 1..ROUNDS {
        let rk = broadcast_rk(k2, r);
        for x in t.iter_mut().take(m) {
            *x = _mm512_aesenc_epi128(*x, rk);
        }
    }
    let rk = broadcast_rk(k2, ROUNDS);
    for x in t.iter_mut().take(m) {
        *x = _mm512_aesenclast_epi128(*x, rk);
    }
    t
}

/// The encrypted tweaks of the up to [`BATCH`] sectors from sector `start` on (of `sectors`),
/// and how many they are.
#[inline]
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
pub(crate) fn batch_tweaks(
    k2: &RoundKeys,
    first_unit: u64,
    units_per_sector: u64,
    start: usize,
    sectors: usize,
) -> ([__m512i; 2], usize) {
    let n = (sectors - start).min(BATCH);
    let mut units = [0u64; BATCH];
    for (i, u) in units.iter_mut().enumerate().take(n) {
        // plain64: the unit number wraps modulo 2^64, as dm-crypt's does.
        *u = first_unit.wrapping_add((start + i) as u64 * units_per_sector);
    }
    (encrypt_tweaks(k2, &units, n), n)
}

/// Lane `lane` (0..4) of `v` in all four lanes.
#[inline]
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
pub(crate) fn broadcast_lane(v: __m512i, lane: usize) -> __m512i {
    match lane {
        0 => _mm512_shuffle_i64x2::<0x00>(v, v),
        1 => _mm512_shuffle_i64x2::<0x55>(v, v),
        2 => _mm512_shuffle_i64x2::<0xaa>(v, v),
        _ => _mm512_shuffle_i64x2::<0xff>(v, v),
    }
}

/// The tweaks of a sector's first group: register `j`, lane `l` holds T·α^(4j + l), from `t`
/// holding the encrypted tweak T in all four lanes. Each is `T << k` as a 128-bit value, with
/// the k bits shifted out of the top reduced by one carry-less multiply by 0x87 (k ≤ 31, so the
/// product stays inside the low 64 bits); variable shifts give every lane its own k, and the
/// eight registers are independent of each other.
#[inline]
#[target_feature(enable = "aes,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
pub(crate) fn first_tweaks(t: __m512i) -> [__m512i; 8] {
    let lo_up = _mm512_bslli_epi128::<8>(t); // low qword moved to the high one
    let hi_down = _mm512_bsrli_epi128::<8>(t); // high qword moved to the low one
    let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    let lane_k = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    let sixty_four = _mm512_set1_epi64(64);
    let mut out = [_mm512_setzero_si512(); 8];
    for (j, o) in out.iter_mut().enumerate() {
        let k = _mm512_add_epi64(lane_k, _mm512_set1_epi64(4 * j as i64));
        let r = _mm512_sub_epi64(sixty_four, k);
        // A shift by 64 (k = 0) gives 0, which is what the carries of T·α⁰ are.
        let top = _mm512_srlv_epi64(hi_down, r);
        let red = _mm512_clmulepi64_epi128::<0x00>(top, poly);
        // The three parts: the shifted qwords, the carry from low to high, the reduction.
        *o = _mm512_ternarylogic_epi64::<0x96>(
            _mm512_sllv_epi64(t, k),
            _mm512_srlv_epi64(lo_up, r),
            red,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn preferred_except_on_intel_models_that_downclock() {
        use super::zmm_lowers_the_clock as slow;
        assert!(slow(b"GenuineIntel", 6, 0x6a), "Ice Lake-SP");
        assert!(slow(b"GenuineIntel", 6, 0x8c), "Tiger Lake-L");
        assert!(!slow(b"GenuineIntel", 6, 0x8f), "Sapphire Rapids");
        assert!(!slow(b"GenuineIntel", 6, 0xad), "Granite Rapids");
        assert!(!slow(b"AuthenticAMD", 0x19, 0x11), "Zen 4");
        assert!(!slow(b"AuthenticAMD", 0x1a, 0x02), "Zen 5");
        assert!(
            !slow(b"AuthenticAMD", 6, 0x6a),
            "only Intel's model numbers mean that"
        );
        let (vendor, family, _) = super::cpu_signature();
        if vendor == *b"AuthenticAMD" {
            assert!(
                family >= 0x17,
                "an AMD CPU with AVX-512 is Zen 4 or later: {family:#x}"
            );
            assert!(super::zmm_preferred());
        }
    }
}
