//! Fuzzes the key store file decoder (`kms::store::parse`): the JSON document that holds every CMK,
//! read at every start and after every change by another process.
//! Run: `tools/fuzz keystore` (libFuzzer on the stable toolchain, see `tools/fuzz`).
#![no_main]

use std::path::Path;

use cryptnbd::kms::store;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz/keystore.json");
    if let Ok(file) = store::parse(data, path) {
        // What parses must serialize and parse again to the same document.
        let bytes = serde_json::to_vec(&file).expect("a parsed store serializes");
        let again = store::parse(&bytes, path).expect("a store we wrote must parse");
        assert_eq!(
            serde_json::to_value(&again).expect("serialize"),
            serde_json::to_value(&file).expect("serialize")
        );
    }
});
