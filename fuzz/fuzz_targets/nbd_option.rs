//! Fuzzes the handshake parsers: option headers, INFO/GO and META_CONTEXT payloads, client flags.
//! Run: `tools/fuzz nbd_option` (libFuzzer on the stable toolchain, see `tools/fuzz`).
#![no_main]

use cryptnbd::nbd::option::{
    parse_client_flags, InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = OptionHeader::parse(data);
    let _ = OptionReplyHeader::parse(data);
    if let Ok(r) = InfoRequest::parse(data) {
        // Whatever parses must encode back to the same bytes.
        assert_eq!(r.encode(), data);
    }
    if let Ok(r) = MetaContextRequest::parse(data) {
        assert_eq!(r.encode(), data);
    }
    if data.len() >= 4 {
        let _ = parse_client_flags(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
    }
});
