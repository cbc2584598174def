//! The in-memory fixture shared by the protocol tests: a read-write 4096-sector export `disk0`, a
//! read-only 512-sector export `ro`, and `locked`, whose attach is refused with a reason.

use std::sync::Arc;

use super::raw::RawClient;
use super::TestServer;
use cryptnbd::server::mem::{MemExport, MemProvider};

pub const SIZE: u64 = 16 << 20;

pub fn provider() -> (Arc<MemExport>, Arc<MemExport>, Arc<MemProvider>) {
    let rw = Arc::new(MemExport::new("disk0", SIZE, 4096).with_description("test disk zero"));
    let ro = Arc::new(MemExport::new("ro", SIZE, 512).read_only(true));
    let p = MemProvider::new()
        .with_export(rw.clone())
        .with_export(ro.clone())
        .with_refused("locked", "CMK alias/locked is disabled (state 3)");
    (rw, ro, Arc::new(p))
}

pub fn server() -> (TestServer, Arc<MemExport>, Arc<MemExport>) {
    let (rw, ro, p) = provider();
    (TestServer::start(p), rw, ro)
}

pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A client that keeps working after a malformed request, proving only that request failed.
pub fn assert_still_works(c: &mut RawClient) {
    let data = pattern(4096, 9);
    assert_eq!(c.write(900, 0, &data, 0).error(), 0);
    assert_eq!(c.read(901, 0, 4096).unwrap(), data);
}
