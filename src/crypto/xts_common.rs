//! The leaf of the XTS engine: helpers that the kernel choice (`xts`) and the kernels
//! (`xts_ni`, `xts_vaes`) share, importing none of them. On x86_64: the AES-256 key schedules
//! built with AES-NI ([`AesKeys`], zeroized, on locked pages), round-key loads, the tweak
//! encryption and multiplication by α in registers. On every target: [`wipe`].

/// Overwrites scratch memory that held tweaks or plaintext with zeroes, on every call of the hot
/// path. `zeroize` would write byte by byte (volatile), ≈1 cycle a byte — as much as the AES work
/// on a 512-byte sector. A plain `fill` compiles to wide stores, and `black_box` makes the
/// compiler treat the zeroes as read afterwards, so the stores are not dropped as dead.
#[inline]
pub(crate) fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use zeroize::Zeroize;

    use crate::crypto::locked::{LockedBox, Zeroable};

    /// AES-256 has 14 rounds, hence 15 round keys.
    pub(crate) const ROUNDS: usize = 14;
    /// Blocks kept in flight per group by the SSE kernel, and tweaks encrypted together.
    pub(crate) const LANES: usize = 8;
    pub(crate) const BLOCK: usize = 16;

    /// True when this CPU has what the key schedule and tweak code need (AES-NI, SSE2 and
    /// PCLMULQDQ, which both kernels use).
    pub(crate) fn aes_available() -> bool {
        is_x86_feature_detected!("aes")
            && is_x86_feature_detected!("sse2")
            && is_x86_feature_detected!("pclmulqdq")
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
    /// engine is dropped (these are key material). Both AES-NI kernels run on these.
    pub(crate) struct AesKeys {
        schedules: LockedBox<Schedules>,
    }

    impl std::ops::Deref for AesKeys {
        type Target = Schedules;
        fn deref(&self) -> &Schedules {
            &self.schedules
        }
    }

    impl AesKeys {
        /// Expands K1 and K2. Returns `None` when the CPU lacks AES-NI (see [`aes_available`]).
        pub(crate) fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Option<Box<Self>> {
            if !aes_available() {
                return None;
            }
            // The schedules are written once, in place, in their locked pages: never copied around
            // the stack by moves of the owner.
            let schedules = LockedBox::<Schedules>::new_with(|s| {
                // SAFETY: `aes_available()` confirmed the `aes` and `sse2` features these functions
                // enable.
                unsafe {
                    expand_key(k1, &mut s.enc1);
                    invert_key(&s.enc1, &mut s.dec1);
                    expand_key(k2, &mut s.enc2);
                }
            });
            Some(Box::new(Self { schedules }))
        }

        /// The data schedule for encryption (`ENC`) or decryption.
        #[inline]
        pub(crate) fn data<const ENC: bool>(&self) -> &RoundKeys {
            if ENC {
                &self.enc1
            } else {
                &self.dec1
            }
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

    /// Zeroes `xmm0`–`xmm15` (SSE2, which every x86_64 has): a kernel's registers hold round
    /// keys, tweaks and plaintext when it returns, and a core dump or a context switch copies
    /// every thread's registers. Sixteen zero idioms, which the CPU resolves when it renames
    /// them: a few cycles per call. (On CPUs with AVX the upper halves are left as they were;
    /// the SSE and portable kernels never write them.)
    #[inline]
    pub(crate) fn clear_xmm() {
        // SAFETY: only zeroes vector registers, all of which the C ABI lets a call clobber (and
        // `clobber_abi` tells the compiler so); no memory, no stack, no flags.
        unsafe {
            core::arch::asm!(
                "xorps xmm0, xmm0",
                "xorps xmm1, xmm1",
                "xorps xmm2, xmm2",
                "xorps xmm3, xmm3",
                "xorps xmm4, xmm4",
                "xorps xmm5, xmm5",
                "xorps xmm6, xmm6",
                "xorps xmm7, xmm7",
                "xorps xmm8, xmm8",
                "xorps xmm9, xmm9",
                "xorps xmm10, xmm10",
                "xorps xmm11, xmm11",
                "xorps xmm12, xmm12",
                "xorps xmm13, xmm13",
                "xorps xmm14, xmm14",
                "xorps xmm15, xmm15",
                clobber_abi("C"),
                options(nomem, nostack, preserves_flags),
            )
        }
    }

    /// Zeroes `ymm0`–`ymm15` for the AVX kernels: VEX zero idioms (a VEX write of an `xmm`
    /// register zeroes the rest of it, up to `zmm`), then `vzeroupper`, which leaves the upper
    /// halves clean for legacy-SSE code. Why at all: see [`clear_xmm`].
    #[inline]
    #[target_feature(enable = "avx")]
    pub(crate) fn clear_ymm() {
        // SAFETY: only zeroes vector registers, all of which the C ABI lets a call clobber (and
        // `clobber_abi` tells the compiler so); no memory, no stack, no flags. The CPU has AVX
        // (this function's feature).
        unsafe {
            core::arch::asm!(
                "vpxor xmm0, xmm0, xmm0",
                "vpxor xmm1, xmm1, xmm1",
                "vpxor xmm2, xmm2, xmm2",
                "vpxor xmm3, xmm3, xmm3",
                "vpxor xmm4, xmm4, xmm4",
                "vpxor xmm5, xmm5, xmm5",
                "vpxor xmm6, xmm6, xmm6",
                "vpxor xmm7, xmm7, xmm7",
                "vpxor xmm8, xmm8, xmm8",
                "vpxor xmm9, xmm9, xmm9",
                "vpxor xmm10, xmm10, xmm10",
                "vpxor xmm11, xmm11, xmm11",
                "vpxor xmm12, xmm12, xmm12",
                "vpxor xmm13, xmm13, xmm13",
                "vpxor xmm14, xmm14, xmm14",
                "vpxor xmm15, xmm15, xmm15",
                "vzeroupper",
                clobber_abi("C"),
                options(nomem, nostack, preserves_flags),
            )
        }
    }

    /// Multiplies a tweak by α in GF(2^128) (IEEE 1619 little-endian convention), in a register.
    #[inline]
    #[target_feature(enable = "aes,sse2")]
    pub(crate) fn mul_alpha(t: __m128i) -> __m128i {
        let carries = _mm_and_si128(
            _mm_srai_epi32::<31>(_mm_shuffle_epi32::<0x13>(t)),
            _mm_set_epi32(0, 1, 0, 0x87),
        );
        _mm_xor_si128(_mm_add_epi64(t, t), carries)
    }

    /// Encrypts the 16-byte tweak block of each of the first `n <= LANES` units under K2.
    #[inline]
    #[target_feature(enable = "aes,sse2")]
    pub(crate) fn encrypt_tweaks(
        k2: &RoundKeys,
        units: &[u64; LANES],
        n: usize,
    ) -> [__m128i; LANES] {
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
}
