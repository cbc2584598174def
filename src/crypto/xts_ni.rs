//! The AES-NI fast path of the XTS engine (x86_64 only): the AES-256 key schedules and the
//! sector kernel. It owns every `unsafe` block of the XTS engine; [`super::xts`] only calls in
//! after [`available`] said yes.
//!
//! Why it is shaped like this:
//! - AES-NI `aesenc` has a latency of several cycles but a throughput of one or two per cycle, so
//!   one block at a time leaves the unit idle. We keep 8 independent blocks in flight.
//! - The XTS whitening `x ^ T` is folded into the round keys: the first round key becomes
//!   `rk0 ^ T` and the last `rk14 ^ T`, so `aesenclast(x, rk14 ^ T)` yields the ciphertext with
//!   the final xor done for free and off the dependency chain of the rounds.
//! - The tweak doubling (multiplication by α in GF(2^128)) is done in SSE registers: a 64-bit
//!   lane shift plus a masked carry (the classic `psrad / pshufd / pand / paddq / pxor`).
//! - No `target-cpu=native`, no AVX: only `aes` and `sse2` are enabled, because AVX-512 code
//!   competing with AES made the kernel slower on the machines we measured (see DESIGN.md).

use core::arch::x86_64::*;

use zeroize::Zeroize;

/// AES-256 has 14 rounds, hence 15 round keys.
const ROUNDS: usize = 14;
/// Blocks kept in flight by the kernel; sectors are multiples of 8 blocks (128 bytes).
const LANES: usize = 8;
const BLOCK: usize = 16;

/// True when this CPU has the instructions the kernel needs.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("aes") && is_x86_feature_detected!("sse2")
}

/// 15 round keys, 16-byte aligned so they can be loaded with aligned loads.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct RoundKeys([[u8; BLOCK]; ROUNDS + 1]);

impl RoundKeys {
    const ZERO: Self = Self([[0; BLOCK]; ROUNDS + 1]);
}

/// The expanded keys of one XTS key: K1 for encryption and for decryption (the equivalent
/// inverse cipher's schedule), K2 for the tweak. Zeroized on drop: these are key material.
pub(crate) struct NiKeys {
    enc1: RoundKeys,
    dec1: RoundKeys,
    enc2: RoundKeys,
}

impl Drop for NiKeys {
    fn drop(&mut self) {
        self.enc1.0.zeroize();
        self.dec1.0.zeroize();
        self.enc2.0.zeroize();
    }
}

impl NiKeys {
    /// Expands K1 and K2. Returns `None` when the CPU lacks AES-NI.
    pub(crate) fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Option<Box<Self>> {
        if !available() {
            return None;
        }
        // Boxed before filling so the schedules are written once, in place, and never copied
        // around the stack by moves of the owner.
        let mut keys = Box::new(Self {
            enc1: RoundKeys::ZERO,
            dec1: RoundKeys::ZERO,
            enc2: RoundKeys::ZERO,
        });
        // SAFETY: `available()` confirmed the `aes` and `sse2` features these functions enable.
        unsafe {
            let NiKeys { enc1, dec1, enc2 } = &mut *keys;
            expand_key(k1, enc1);
            invert_key(enc1, dec1);
            expand_key(k2, enc2);
        }
        Some(keys)
    }

    /// Encrypts (`ENC`) or decrypts whole sectors from `src` into `dst`.
    ///
    /// The caller guarantees: `src` and `dst` are valid for `len` bytes and either identical or
    /// non-overlapping, `len` is a multiple of `sector_size`, and `sector_size` is a multiple of
    /// 128 bytes and of 512 (the tweak unit).
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
        // SAFETY: `self` exists only if `available()` returned true at construction; the pointer
        // contract is forwarded from our caller.
        unsafe { crypt_sectors::<ENC>(self, src, dst, len, sector_size, first_unit) }
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

/// Multiplies a tweak by α in GF(2^128) with the IEEE 1619 (little-endian) convention: shift the
/// 128-bit value left by one, and fold the bit shifted out of the top back in as 0x87.
#[inline]
#[target_feature(enable = "aes,sse2")]
fn mul_alpha(t: __m128i) -> __m128i {
    // Per 32-bit lane: all ones if its top bit is set. Lane 3's top bit is bit 127 (becomes
    // 0x87 in lane 0); lane 1's top bit is bit 63 (carries into bit 64, lane 2). The 64-bit
    // adds shift each half left by one; the carries across halves come from the mask.
    let signs = _mm_srai_epi32::<31>(t);
    let carries = _mm_and_si128(
        _mm_shuffle_epi32::<0x13>(signs),
        _mm_set_epi32(0, 1, 0, 0x87),
    );
    _mm_xor_si128(_mm_add_epi64(t, t), carries)
}

/// Encrypts the 16-byte tweak block of each of the first `n <= LANES` units under K2.
#[inline]
#[target_feature(enable = "aes,sse2")]
fn encrypt_tweaks(k2: &RoundKeys, units: &[u64; LANES], n: usize) -> [__m128i; LANES] {
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

#[target_feature(enable = "aes,sse2")]
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
        for (s, &first_tweak) in tweaks.iter().enumerate().take(n) {
            let base = (done + s) * sector_size;
            let mut t = first_tweak;
            for g in 0..groups_per_sector {
                let off = base + g * LANES * BLOCK;
                // SAFETY: `off + 128 <= len` because `off` starts a 128-byte group inside a whole
                // sector of the buffer; the caller guarantees both pointers are valid for `len`
                // bytes and are equal or disjoint, and all 8 loads happen before any store.
                unsafe {
                    t = crypt_group::<ENC>(rks, src.add(off), dst.add(off), t);
                }
            }
        }
        done += n;
    }
}

/// Runs 8 consecutive blocks through XTS starting with tweak `t`; returns the tweak of the block
/// after them.
///
/// # Safety
/// 128 bytes must be readable at `src` and writable at `dst`, the two equal or disjoint.
#[inline]
#[target_feature(enable = "aes,sse2")]
unsafe fn crypt_group<const ENC: bool>(
    rks: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    t: __m128i,
) -> __m128i {
    let mut tw = [t; LANES];
    for i in 1..LANES {
        tw[i] = mul_alpha(tw[i - 1]);
    }
    let next = mul_alpha(tw[LANES - 1]);
    let first = load_rk(rks, 0);
    let mut x = [_mm_setzero_si128(); LANES];
    for (i, (xi, ti)) in x.iter_mut().zip(&tw).enumerate() {
        // SAFETY: `i * 16 + 16 <= 128` bytes readable at `src` (caller contract).
        let block = unsafe { _mm_loadu_si128(src.add(i * BLOCK).cast()) };
        *xi = _mm_xor_si128(block, _mm_xor_si128(*ti, first));
    }
    for r in 1..ROUNDS {
        let rk = load_rk(rks, r);
        for xi in x.iter_mut() {
            *xi = if ENC {
                _mm_aesenc_si128(*xi, rk)
            } else {
                _mm_aesdec_si128(*xi, rk)
            };
        }
    }
    let last = load_rk(rks, ROUNDS);
    // Every load above precedes every store below, so `src == dst` (in place) is sound.
    for (i, (xi, ti)) in x.iter().zip(&tw).enumerate() {
        let k = _mm_xor_si128(last, *ti);
        let y = if ENC {
            _mm_aesenclast_si128(*xi, k)
        } else {
            _mm_aesdeclast_si128(*xi, k)
        };
        // SAFETY: `i * 16 + 16 <= 128` bytes writable at `dst` (caller contract).
        unsafe { _mm_storeu_si128(dst.add(i * BLOCK).cast(), y) };
    }
    next
}
