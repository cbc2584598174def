//! Fuzzes the wrapped data key parser (`kms::blob::parse`): the `cipher_text` that applications and
//! volume headers hand back to the key store.
//! Run: `tools/fuzz wrapped_key` (libFuzzer on the stable toolchain, see `tools/fuzz`).
#![no_main]

use cryptnbd::kms::blob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = blob::parse(data) {
        // Whatever parses encodes back to the same bytes.
        assert_eq!(blob::encode(p.key_id, p.key_version, p.sealed), data);
        assert!(data.len() <= blob::MAX_BLOB);
    }
});
