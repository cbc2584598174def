//! Fuzzes the volume header decoder (`VolumeHeader::decode`), which reads the first bytes of every
//! volume file, so whatever is on disk (torn, truncated, hostile) reaches it.
//! Run: `tools/fuzz volume_header` (libFuzzer on the stable toolchain, see `tools/fuzz`).
#![no_main]

use cryptnbd::volume::VolumeHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = VolumeHeader::decode(data) {
        // A header that decodes must survive encode → decode unchanged (the encoder may still
        // refuse it when it breaks a rule only the encoder checks, such as the size limit).
        if let Ok(bytes) = h.encode() {
            let again = VolumeHeader::decode(&bytes).expect("a header we encoded must decode");
            assert_eq!(again, h);
        }
    }
});
