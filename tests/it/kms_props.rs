//! Property tests: the decoders of untrusted input (wrapped data keys, store files) never panic,
//! and every wrapped key round-trips under its own context only.

use std::path::Path;

use cryptnbd::kms::{blob, store, EncryptionContext, InitRoot, KeyStore, KmsError};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn blob_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = blob::parse(&bytes);
    }

    #[test]
    fn store_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = store::parse(&bytes, Path::new("fuzz.json"));
    }

    #[test]
    fn store_parse_of_mutated_json_never_panics(pos in 0usize..2000, byte in any::<u8>()) {
        let mut s = GOLDEN.as_bytes().to_vec();
        let i = pos % s.len();
        s[i] = byte;
        let _ = store::parse(&s, Path::new("fuzz.json"));
    }
}

const GOLDEN: &str = include_str!("../data/keystore-v1/keystore.json");

#[test]
fn random_ciphertexts_only_ever_fail_to_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
    let k = ks.create_key("p", "").unwrap();
    let ctx = EncryptionContext::new();
    let good = ks
        .create_data_key("p", &ctx, 512)
        .unwrap()
        .wrapped
        .cipher_text;
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(128));
    runner
        .run(
            &(
                proptest::collection::vec(any::<u8>(), 0..140),
                any::<bool>(),
            ),
            |(mut bytes, keep_header)| {
                if keep_header && bytes.len() >= 25 {
                    // A valid header naming the real key, with a random body: gets past parsing.
                    bytes[..25].copy_from_slice(&good[..25]);
                }
                let r = ks.decrypt_data_key(&k.key_id.to_string(), &bytes, &ctx);
                prop_assert!(matches!(r, Err(KmsError::CannotDecrypt { .. })), "{:?}", r);
                Ok(())
            },
        )
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn wrapped_keys_open_only_under_their_own_context(
        a in proptest::collection::btree_map("[a-z]{0,4}", "[a-z0-9=]{0,6}", 0..4),
        b in proptest::collection::btree_map("[a-z]{0,4}", "[a-z0-9=]{0,6}", 0..4),
    ) {
        let a: EncryptionContext = a.into_iter().filter(|(k, _)| !k.is_empty()).collect();
        let b: EncryptionContext = b.into_iter().filter(|(k, _)| !k.is_empty()).collect();
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        ks.create_key("p", "").unwrap();
        let dk = ks.create_data_key("p", &a, 256).unwrap();
        let r = ks.decrypt_data_key("p", &dk.wrapped.cipher_text, &b);
        if a == b {
            prop_assert_eq!(r.unwrap().plain_text, dk.plain_text);
        } else {
            let refused = matches!(r, Err(KmsError::CannotDecrypt { .. }));
            prop_assert!(refused, "another context must not decrypt");
        }
    }
}
