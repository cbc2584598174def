//! Fuzzes the volume header decoder (`VolumeHeader::decode`), which reads the first bytes of every
//! volume file, so whatever is on disk (torn, truncated, hostile) reaches it.
//! Run: `tools/fuzz volume_header` (libFuzzer on the stable toolchain, see `tools/fuzz`).
#![no_main]

use cryptnbd::volume::VolumeHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    // Random bytes almost never carry a valid checksum, which would keep the fuzzer at the
    // door: also decode a copy whose checksum is made right, so the field parsing gets fuzzed.
    if data.len() >= 20 {
        let mut fixed = data.to_vec();
        let len = (u32::from_le_bytes([data[12], data[13], data[14], data[15]]) as usize)
            .clamp(20, data.len());
        let mut crc = crc32c::crc32c(&fixed[..16]);
        crc = crc32c::crc32c_append(crc, &[0; 4]);
        crc = crc32c::crc32c_append(crc, &fixed[20..len]);
        fixed[16..20].copy_from_slice(&crc.to_le_bytes());
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    if let Ok(h) = VolumeHeader::decode(data) {
        // A header that decodes must survive encode → decode unchanged (the encoder may still
        // refuse it when it breaks a rule only the encoder checks, such as the size limit).
        if let Ok(bytes) = h.encode() {
            let again = VolumeHeader::decode(&bytes).expect("a header we encoded must decode");
            assert_eq!(again, h);
        }
    }
}
