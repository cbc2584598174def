//! Fuzzes the transmission parsers: request headers and reply headers.
//! Run: `tools/fuzz nbd_request` (libFuzzer on the stable toolchain, see `tools/fuzz`).
#![no_main]

use cryptnbd::nbd::reply::ReplyHeader;
use cryptnbd::nbd::request::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        assert_eq!(&r.encode()[..], data);
        let _ = r.flags_valid(true);
        let _ = r.flags_valid(false);
    }
    let _ = ReplyHeader::parse(data);
});
