//! libnbd (Python bindings, run by Debian's `/usr/bin/python3`) sending sub-sector and unaligned
//! requests straight to a 4096-byte-sector export: libnbd's client-side alignment check is turned
//! off, so the server itself must do the read-modify-write, and four connections writing different
//! 512-byte parts of the same sectors at once must not tear each other's data (the per-sector lock).

use crate::clients_common;

use std::process::Command;

use clients_common::{report_missing, run_ok, DataDir, MIB};

const PYTHON: &str = "/usr/bin/python3";

const SCRIPT: &str = r#"
import sys, threading
import nbd

uri = sys.argv[1]
SECTORS = 256          # 1 MiB of 4096-byte sectors, each shared by all writers
WRITERS = 4            # one connection each
PIECES = 4096 // 512 // WRITERS

def connect():
    h = nbd.NBD()
    # libnbd refuses requests below the advertised minimum block size by default: we want the
    # server to see them.
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(uri)
    return h

h = connect()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096, \
    "minimum block size advertised: %d, expected the 4096-byte sector" % h.get_block_size(nbd.SIZE_MINIMUM)
assert h.can_multi_conn(), "several connections to one export must share one volume"

def piece(t, k, s):
    return bytes([(t * 37 + k * 11 + s) % 251 + 1]) * 512

errors = []
def writer(t):
    try:
        c = connect()
        for s in range(SECTORS):
            for k in range(PIECES):
                off = s * 4096 + (t * PIECES + k) * 512
                c.pwrite(piece(t, k, s), off)
        c.flush()
        c.shutdown()
    except Exception as e:
        errors.append(repr(e))

threads = [threading.Thread(target=writer, args=(t,)) for t in range(WRITERS)]
for th in threads: th.start()
for th in threads: th.join()
assert not errors, errors

for s in range(SECTORS):
    got = h.pread(4096, s * 4096)
    for t in range(WRITERS):
        for k in range(PIECES):
            i = (t * PIECES + k) * 512
            assert got[i:i + 512] == piece(t, k, s), "sector %d piece %d torn" % (s, t * PIECES + k)

# Unaligned odd-sized requests across sector boundaries, and their untouched neighbours.
base = 2 * 1024 * 1024
h.pwrite(b"\xee" * 3, base + 4094)
h.pwrite(b"\x5a" * 10000, base + 8192 + 100)
assert h.pread(3, base + 4094) == b"\xee" * 3
assert h.pread(4094, base) == bytes(4094)
assert h.pread(8192 + 100 - 4096, base + 4096) == b"\xee" + bytes(8192 + 100 - 4097)
assert h.pread(10000, base + 8192 + 100) == b"\x5a" * 10000
assert h.pread(512, base + 8192 + 10100) == bytes(512)
# The last byte of the export.
size = h.get_size()
h.pwrite(b"\x01", size - 1)
assert h.pread(2, size - 2) == b"\x00\x01"
h.shutdown()
print("ok")
"#;

#[test]
fn nbdsh_sub_sector_writes_from_four_connections_do_not_tear() {
    let name = "nbdsh_sub_sector_writes_from_four_connections_do_not_tear";
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        report_missing(
            name,
            "/usr/bin/python3 with libnbd's `nbd` module (python3-libnbd)",
        );
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", 8 * MIB, 4096);
    let srv = d.serve(&["disk"]);
    let script = d.path().join("sub_sector.py");
    std::fs::write(&script, SCRIPT).expect("write python script");
    let out = run_ok(Command::new(PYTHON).arg(&script).arg(srv.uri("disk")));
    assert_eq!(out.trim(), "ok", "python libnbd script output: {out}");
    srv.stop();
}
