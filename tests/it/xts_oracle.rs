//! Property test: every kernel this CPU runs (AES-NI with VAES, AES-NI with SSE, portable) and an
//! independent implementation (the
//! `xts-mode` crate, a dev-dependency used only as an oracle) give the same bytes for random keys,
//! random data, random first units (including values past 2^32 and next to u64::MAX, where the
//! plain64 unit number wraps), both sector sizes, in place and out of place, over buffers of
//! 1 to 18 sectors (across the kernel's batches of 8 sectors).

use aes::cipher::KeyInit;
use aes::Aes256;
use cryptnbd::crypto::{Kernel, Xts, XtsKey};
use proptest::prelude::*;
use xts_mode::{get_tweak_default, Xts128};

fn oracle_encrypt(key: &XtsKey, data: &mut [u8], ss: usize, first_unit: u64) {
    let o = Xts128::new(
        Aes256::new(key.dangerous_k1().into()),
        Aes256::new(key.dangerous_k2().into()),
    );
    for (i, s) in data.chunks_exact_mut(ss).enumerate() {
        // plain64: the unit number is 64 bits and wraps, like dm-crypt's.
        let unit = first_unit.wrapping_add((i * ss / 512) as u64);
        o.encrypt_sector(s, get_tweak_default(u128::from(unit)));
    }
}

fn first_unit() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..1024,
        any::<u64>(),
        ((1u64 << 32) - 64)..((1u64 << 32) + 64),
        (u64::MAX - 64)..=u64::MAX,
    ]
}

fn case() -> impl Strategy<Value = (Vec<u8>, usize, usize, u64, Vec<u8>)> {
    (
        prop::collection::vec(any::<u8>(), 64),
        prop_oneof![Just(512usize), Just(4096usize)],
        1usize..=18,
        first_unit(),
    )
        .prop_flat_map(|(key, ss, n, unit)| {
            let sectors = if ss == 4096 { n.min(9) } else { n };
            (
                Just(key),
                Just(ss),
                Just(sectors),
                Just(unit),
                prop::collection::vec(any::<u8>(), sectors * ss),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn aesni_portable_and_oracle_agree((key, ss, _n, unit, data) in case()) {
        let key = match XtsKey::from_slice(&key) {
            Ok(k) => k,
            Err(_) => return Err(TestCaseError::reject("equal XTS key halves")),
        };
        let mut expect = data.clone();
        oracle_encrypt(&key, &mut expect, ss, unit);

        let kernels = Kernel::available();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("aes") {
            prop_assert!(
                kernels.contains(&Kernel::AesNi),
                "this CPU has AES-NI: the kernel must be tested"
            );
        }
        let engines: Vec<Xts> = kernels
            .iter()
            .map(|&k| Xts::with_kernel(&key, k).unwrap())
            .collect();
        for xts in &engines {
            let name = xts.kernel().name();
            let mut inplace = data.clone();
            xts.encrypt_sectors(&mut inplace, ss, unit);
            prop_assert!(inplace == expect, "{} in place, ss={} unit={}", name, ss, unit);

            let mut out = vec![0u8; data.len()];
            xts.encrypt_sectors_to(&data, &mut out, ss, unit);
            prop_assert!(out == expect, "{} out of place, ss={} unit={}", name, ss, unit);

            let mut back = vec![0u8; data.len()];
            xts.decrypt_sectors_to(&expect, &mut back, ss, unit);
            prop_assert!(back == data, "{} decrypt out of place", name);
            xts.decrypt_sectors(&mut inplace, ss, unit);
            prop_assert!(inplace == data, "{} decrypt in place", name);
        }
    }

    #[test]
    fn splitting_a_buffer_does_not_change_the_ciphertext(
        (key, ss, n, unit, data) in case(),
        cut in 0usize..=18,
    ) {
        // Encrypting sectors [0, cut) and [cut, n) separately, with the second call's first unit
        // advanced accordingly, equals one call over all n sectors.
        let key = match XtsKey::from_slice(&key) {
            Ok(k) => k,
            Err(_) => return Err(TestCaseError::reject("equal XTS key halves")),
        };
        let cut = cut.min(n);
        let xts = Xts::new(&key);
        let mut whole = data.clone();
        xts.encrypt_sectors(&mut whole, ss, unit);
        let mut parts = data.clone();
        let (a, b) = parts.split_at_mut(cut * ss);
        xts.encrypt_sectors(a, ss, unit);
        xts.encrypt_sectors(b, ss, unit.wrapping_add((cut * ss / 512) as u64));
        prop_assert!(parts == whole);
    }
}
