//! libnbd's Python bindings (what `nbdsh` runs) against the in-process server: structured reads,
//! holes, block status, trim, zero, flush, FUA, many concurrent requests on one connection, and
//! several connections to one export (multi-conn).

use crate::common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::fixture::{TestProvider, TestVolume};
use common::{require_python_nbd, run_bounded, TestServer};

/// Runs a Python script with `uri` as argv[1]; the script asserts and prints "OK".
fn run_python(script: &str, uri: &str) {
    let (ok, out, err) = run_bounded(
        Command::new("/usr/bin/python3").args(["-c", script, uri]),
        Duration::from_secs(60),
    );
    assert!(
        ok && out.contains("OK"),
        "python failed\nstdout: {out}\nstderr: {err}"
    );
}

fn server() -> (TestServer, TestVolume) {
    let disk = TestVolume::new(32 << 20, 4096);
    let srv = TestServer::start(Arc::new(TestProvider::new().with("disk0", &disk)));
    (srv, disk)
}

const STRUCTURED: &str = r#"
import sys, nbd
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
# Let unaligned and out-of-range requests reach the server (libnbd checks them by default).
h.set_strict_mode(h.get_strict_mode() & ~(nbd.STRICT_ALIGN | nbd.STRICT_BOUNDS))
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim()
assert h.can_zero() and h.can_fast_zero() and h.can_cache() and h.can_df()
size = h.get_size()
assert size == 32 << 20

# A never-written range is a hole: the read arrives as an OFFSET_HOLE chunk.
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(65536, 0, chunk)
assert buf == bytearray(65536), "hole reads as zeroes"
assert chunks == [(0, 65536, nbd.READ_HOLE)], chunks

# Unaligned write with FUA, read back as data.
data = bytes((i * 7 + 3) % 251 for i in range(10000))
h.pwrite(data, 5000, nbd.CMD_FLAG_FUA)
assert h.pread(10000, 5000) == data
chunks.clear()
h.pread_structured(4096, 8192, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(8192, 4096, nbd.READ_DATA)], chunks

def extents(off, ln):
    got = []
    def cb(meta, offset, entries, err):
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(ln, off, cb)
    return got

e = extents(0, 65536)
assert e[0] == (4096, nbd.STATE_HOLE | nbd.STATE_ZERO), e
assert e[1] == (12288, 0), e
assert sum(l for l, _ in e) == 65536, e

# Trim punches a hole; zero (may punch) as well; zero with NO_HOLE keeps data allocated.
h.trim(4096, 12288)
e = extents(0, 65536)
assert e[1:3] == [(8192, 0), (4096 + 49152, nbd.STATE_HOLE | nbd.STATE_ZERO)], e
h.pwrite(b"\xff" * 8192, 1 << 20)
h.zero(4096, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 1 << 20) == bytearray(4096) + b"\xff" * 4096
h.zero(4096, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
try:
    h.zero(4096, 1 << 20, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    raise SystemExit("fast zero with NO_HOLE must fail with ENOTSUP")
except nbd.Error as ex:
    assert ex.errno == "ENOTSUP", ex.errno
h.flush()
h.cache(65536, 0)

# Errors come back as structured error chunks with a message.
try:
    h.pread(4096, size)
    raise SystemExit("read past the end must fail")
except nbd.Error as ex:
    assert ex.errno == "EINVAL", ex.errno
try:
    h.pwrite(b"x" * 4096, size - 10)
    raise SystemExit("write past the end must fail")
except nbd.Error as ex:
    assert ex.errno == "ENOSPC", ex.errno
h.shutdown()
print("OK")
"#;

const CONCURRENT: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
N = 128
bufs = []
for i in range(N):
    b = nbd.Buffer.from_bytearray(bytearray([i % 256]) * 16384)
    bufs.append(b)
    h.aio_pwrite(b, i * 16384)
while h.aio_in_flight() > 0:
    h.poll(-1)
order = []
rbufs = {}
for i in range(N):
    rb = nbd.Buffer(16384)
    rbufs[i] = rb
    cookie = h.aio_pread(rb, i * 16384, completion=lambda err, i=i: (order.append(i), 1)[1])
while h.aio_in_flight() > 0:
    h.poll(-1)
assert sorted(order) == list(range(N))
for i in range(N):
    assert rbufs[i].to_bytearray() == bytearray([i % 256]) * 16384, i
h.shutdown()

# Multi-conn: writes acknowledged on one connection, flushed on another, are seen everywhere.
hs = [nbd.NBD() for _ in range(4)]
for x in hs:
    x.connect_uri(sys.argv[1])
    assert x.can_multi_conn()
for k, x in enumerate(hs):
    x.pwrite(bytes([k + 1]) * 4096, (4 << 20) + k * 4096)
hs[0].flush()
for x in hs:
    for k in range(4):
        assert x.pread(4096, (4 << 20) + k * 4096) == bytes([k + 1]) * 4096
for x in hs:
    x.shutdown()
print("OK")
"#;

#[test]
fn nbdsh_structured_reads_holes_block_status_trim_zero_flush_fua() {
    if !require_python_nbd() {
        return;
    }
    let (srv, disk) = server();
    run_python(STRUCTURED, &srv.uri("disk0"));
    assert!(disk.flush_count() >= 1);
}

#[test]
fn nbdsh_concurrent_requests_and_multi_conn_over_tcp_and_unix() {
    if !require_python_nbd() {
        return;
    }
    let (srv, _) = server();
    run_python(CONCURRENT, &srv.uri("disk0"));
    run_python(CONCURRENT, &srv.tcp_uri("disk0"));
}
