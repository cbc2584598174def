//! The AES-NI fast path of the XTS engine (x86_64 only): the AES-256 key schedules (shared with
//! the wide VAES kernel in [`super::xts_vaes`]) and the 8-block SSE kernel. Together with
//! `xts_vaes` it holds every `unsafe` block of the XTS engine; [`super::xts`] only calls in after
//! the kernel's `available()` said yes.
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

use zeroize::Zeroize;

use super::locked::{LockedBox, Zeroable};

/// AES-256 has 14 rounds, hence 15 round keys.
const ROUNDS: usize = 14;
/// Blocks kept in flight by the kernel; sectors are multiples of 8 blocks (128 bytes).
pub(super) const LANES: usize = 8;
pub(super) const BLOCK: usize = 16;

/// True when this CPU has the instructions the kernel needs.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("sse2")
        && is_x86_feature_detected!("pclmulqdq")
}

/// Which AES-NI kernel runs the data blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NiKernel {
    /// SSE, 8 blocks in flight (this file).
    Sse8,
    /// AVX2 + VAES, 16 blocks in flight (`xts_vaes`).
    Vaes16,
}

impl NiKernel {
    pub(crate) fn available(self) -> bool {
        match self {
            NiKernel::Sse8 => available(),
            NiKernel::Vaes16 => super::xts_vaes::available(),
        }
    }
}

/// 15 round keys, 16-byte aligned so they can be loaded with aligned loads. Deliberately not
/// `Copy`/`Clone`: key material should exist once, in its zeroize-on-drop owner.
#[repr(C, align(16))]
pub(crate) struct RoundKeys(pub(crate) [[u8; BLOCK]; ROUNDS + 1]);

/// The three schedules of one XTS key: K1 for encryption and for decryption (the equivalent
/// inverse cipher's schedule), K2 for the tweak.
#[repr(C)]
pub(crate) struct Schedules {
    pub(crate) enc1: RoundKeys,
    pub(crate) dec1: RoundKeys,
    pub(crate) enc2: RoundKeys,
}

// SAFETY: three arrays of bytes: all zeroes is a valid value and nothing is owned.
unsafe impl Zeroable for Schedules {}

impl Zeroize for Schedules {
    fn zeroize(&mut self) {
        self.enc1.0.zeroize();
        self.dec1.0.zeroize();
        self.enc2.0.zeroize();
    }
}

/// The expanded keys of one XTS key, on locked, non-dumpable pages that are zeroized when the
/// engine is dropped (these are key material), plus the kernel that uses them.
pub(crate) struct NiKeys {
    schedules: LockedBox<Schedules>,
    kernel: NiKernel,
}

impl std::ops::Deref for NiKeys {
    type Target = Schedules;
    fn deref(&self) -> &Schedules {
        &self.schedules
    }
}

impl NiKeys {
    /// Expands K1 and K2 for `kernel`. Returns `None` when the CPU lacks what it needs.
    pub(crate) fn new(k1: &[u8; 32], k2: &[u8; 32], kernel: NiKernel) -> Option<Box<Self>> {
        if !available() || !kernel.available() {
            return None;
        }
        // The schedules are written once, in place, in their locked pages: never copied around
        // the stack by moves of the owner.
        let schedules = LockedBox::<Schedules>::new_with(|s| {
            // SAFETY: `available()` confirmed the `aes` and `sse2` features these functions enable.
            unsafe {
                expand_key(k1, &mut s.enc1);
                invert_key(&s.enc1, &mut s.dec1);
                expand_key(k2, &mut s.enc2);
            }
        });
        Some(Box::new(Self { schedules, kernel }))
    }

    /// Encrypts (`ENC`) or decrypts whole sectors from `src` into `dst`.
    ///
    /// The caller guarantees: `src` and `dst` are valid for `len` bytes and either identical or
    /// non-overlapping, `len` is a multiple of `sector_size`, and `sector_size` is 512 or 4096
    /// (a multiple of both kernels' groups, 128 and 256 bytes, and of the 512-byte tweak unit).
    ///
    /// # Safety
    /// The pointer contract above must hold.
    pub(crate) unsafe fn crypt<const ENC: bool>(
        &self,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        sector_size: usize,
        first_unit: u64,
    ) {
        let rks = if ENC { &self.enc1 } else { &self.dec1 };
        // SAFETY: `self` exists only if its kernel's `available()` returned true at construction;
        // the pointer contract is forwarded from our caller.
        unsafe {
            match self.kernel {
                NiKernel::Sse8 => {
                    crypt_sectors::<ENC>(self, src, dst, len, sector_size, first_unit)
                }
                NiKernel::Vaes16 => super::xts_vaes::crypt_sectors::<ENC>(
                    rks,
                    &self.enc2,
                    src,
                    dst,
                    len,
                    sector_size,
                    first_unit,
                ),
            }
        }
    }

    pub(crate) fn kernel(&self) -> NiKernel {
        self.kernel
    }
}

/// Round key `i` (panics on `i > 14`, which the constant loop bounds rule out at compile time).
#[inline]
#[target_feature(enable = "aes,sse2")]
fn load_rk(rk: &RoundKeys, i: usize) -> __m128i {
    let k: &[u8; BLOCK] = &rk.0[i];
    // SAFETY: `k` is a reference to 16 readable bytes, 16-byte aligned because `RoundKeys` is
    // `align(16)` and its elements are 16 bytes apart.
    unsafe { _mm_load_si128(k.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "aes,sse2")]
fn store_rk(rk: &mut RoundKeys, i: usize, v: __m128i) {
    let k: &mut [u8; BLOCK] = &mut rk.0[i];
    // SAFETY: as in `load_rk`, 16 writable, aligned bytes.
    unsafe { _mm_store_si128(k.as_mut_ptr().cast(), v) }
}

/// One step of the AES-256 key expansion for an even round key: `a` is the key two positions
/// back, `assist` the `aeskeygenassist` of the previous key (its RotWord/SubWord/Rcon word).
#[inline]
#[target_feature(enable = "aes,sse2")]
fn expand_even(a: __m128i, assist: __m128i) -> __m128i {
    let assist = _mm_shuffle_epi32::<0xff>(assist);
    let mut a = a;
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    _mm_xor_si128(a, assist)
}

/// One step of the AES-256 key expansion for an odd round key (SubWord without RotWord/Rcon).
#[inline]
#[target_feature(enable = "aes,sse2")]
fn expand_odd(prev_even: __m128i, b: __m128i) -> __m128i {
    let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(prev_even));
    let mut b = b;
    b = _mm_xor_si128(b, _mm_slli_si128::<4>(b));
    b = _mm_xor_si128(b, _mm_slli_si128::<4>(b));
    b = _mm_xor_si128(b, _mm_slli_si128::<4>(b));
    _mm_xor_si128(b, t)
}

/// The AES-256 encryption key schedule (FIPS-197 §5.2) with `aeskeygenassist`.
#[target_feature(enable = "aes,sse2")]
fn expand_key(key: &[u8; 32], out: &mut RoundKeys) {
    let (lo, hi) = key.split_at(16);
    // SAFETY: `lo` and `hi` are 16 readable bytes each; unaligned loads.
    let (mut a, mut b) = unsafe {
        (
            _mm_loadu_si128(lo.as_ptr().cast()),
            _mm_loadu_si128(hi.as_ptr().cast()),
        )
    };
    store_rk(out, 0, a);
    store_rk(out, 1, b);
    macro_rules! step {
        ($rcon:literal, $i:literal) => {
            a = expand_even(a, _mm_aeskeygenassist_si128::<$rcon>(b));
            store_rk(out, $i, a);
            if $i < ROUNDS {
                b = expand_odd(a, b);
                store_rk(out, $i + 1, b);
            }
        };
    }
    step!(0x01, 2);
    step!(0x02, 4);
    step!(0x04, 6);
    step!(0x08, 8);
    step!(0x10, 10);
    step!(0x20, 12);
    step!(0x40, 14);
    // Best effort: clear the register copies of the key so no spill slot keeps them.
    a = _mm_setzero_si128();
    b = _mm_setzero_si128();
    core::hint::black_box((a, b));
}

/// The decryption schedule of the equivalent inverse cipher: reversed, with InvMixColumns
/// (`aesimc`) applied to the inner round keys.
#[target_feature(enable = "aes,sse2")]
fn invert_key(enc: &RoundKeys, dec: &mut RoundKeys) {
    store_rk(dec, 0, load_rk(enc, ROUNDS));
    for i in 1..ROUNDS {
        store_rk(dec, i, _mm_aesimc_si128(load_rk(enc, ROUNDS - i)));
    }
    store_rk(dec, ROUNDS, load_rk(enc, 0));
}

/// Multiplies a tweak by α in GF(2^128) (IEEE 1619 little-endian convention); the same trick as
/// the kernel's `whiten` below.
#[inline]
#[target_feature(enable = "aes,sse2")]
pub(super) fn mul_alpha(t: __m128i) -> __m128i {
    let carries = _mm_and_si128(
        _mm_srai_epi32::<31>(_mm_shuffle_epi32::<0x13>(t)),
        _mm_set_epi32(0, 1, 0, 0x87),
    );
    _mm_xor_si128(_mm_add_epi64(t, t), carries)
}

/// Encrypts the 16-byte tweak block of each of the first `n <= LANES` units under K2.
#[inline]
#[target_feature(enable = "aes,sse2")]
pub(super) fn encrypt_tweaks(k2: &RoundKeys, units: &[u64; LANES], n: usize) -> [__m128i; LANES] {
    let mut t = [_mm_setzero_si128(); LANES];
    let rk0 = load_rk(k2, 0);
    for (x, &u) in t.iter_mut().zip(units).take(n) {
        *x = _mm_xor_si128(_mm_set_epi64x(0, u as i64), rk0);
    }
    for r in 1..ROUNDS {
        let rk = load_rk(k2, r);
        for x in t.iter_mut().take(n) {
            *x = _mm_aesenc_si128(*x, rk);
        }
    }
    let rk = load_rk(k2, ROUNDS);
    for x in t.iter_mut().take(n) {
        *x = _mm_aesenclast_si128(*x, rk);
    }
    t
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

#[rustfmt::skip]
macro_rules! group_asm {
    ($round:literal, $last:literal, $rk:expr, $src:expr, $dst:expr, $tw:expr, $twn:expr, $poly:expr) => {
        core::arch::asm!(
            "movdqa {k}, xmmword ptr [{rk}]",
            whiten!("x0", 0), whiten!("x1", 16), whiten!("x2", 32), whiten!("x3", 48),
            whiten!("x4", 64), whiten!("x5", 80), whiten!("x6", 96), whiten!("x7", 112),
            round!($round, 16), advance!(0), round!($round, 32), advance!(16),
            round!($round, 48), advance!(32), round!($round, 64), advance!(48),
            round!($round, 80), advance!(64), round!($round, 96), advance!(80),
            round!($round, 112), advance!(96), round!($round, 128), advance!(112),
            round!($round, 144), round!($round, 160), round!($round, 176), round!($round, 192),
            round!($round, 208),
            "movdqa {k}, xmmword ptr [{rk} + 224]",
            finish!($last, "x0", 0), finish!($last, "x1", 16), finish!($last, "x2", 32),
            finish!($last, "x3", 48), finish!($last, "x4", 64), finish!($last, "x5", 80),
            finish!($last, "x6", 96), finish!($last, "x7", 112),
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
}

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

#[target_feature(enable = "aes,sse2,pclmulqdq")]
unsafe fn crypt_sectors<const ENC: bool>(
    keys: &NiKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    sector_size: usize,
    first_unit: u64,
) {
    let rks = if ENC { &keys.enc1 } else { &keys.dec1 };
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
            for g in 0..groups_per_sector {
                let off = base + g * LANES * BLOCK;
                // SAFETY: `off + 128 <= len` (a 128-byte group inside a whole sector of the
                // buffer), so the asm's 128-byte reads at `src + off` and writes at `dst + off`
                // are in bounds and, per our contract, equal or disjoint; every load precedes
                // every store. It reads 240 bytes of round keys at `rk` (a whole, aligned
                // `RoundKeys`), reads the 128-byte half `tw` and writes the half `twn` of the
                // 16-byte aligned scratch, uses no stack and leaves the flags alone. AES-NI and
                // PCLMULQDQ were checked at construction.
                unsafe {
                    let (s, d) = (src.add(off), dst.add(off));
                    let (t, tn) = (tw.as_ptr(), twn.as_mut_ptr());
                    if ENC {
                        group_asm!("aesenc", "aesenclast", rk, s, d, t, tn, poly);
                    } else {
                        group_asm!("aesdec", "aesdeclast", rk, s, d, t, tn, poly);
                    }
                }
                core::mem::swap(&mut tw, &mut twn);
            }
        }
        done += n;
    }
    // The tweaks are derived from K2; don't leave them on the stack.
    super::xts::wipe(&mut scratch.0);
}
