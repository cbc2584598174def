//! Test clients written as libnbd Python scripts that run in phases: one script per test module,
//! started once per phase with the export's URI, a mode and integer arguments, printing a line
//! starting with "ok" when every check of the phase passed. The shared prelude connects and
//! defines `pat(off, n)`, the 4 KiB-block pattern (`pattern` here) the phases write and expect.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::xts_oracle::PYTHON;
use super::{run_bounded, Server};

/// What every phase script starts with: `uri`, `mode`, `args`, a connected handle `h`, `size`,
/// `MIB` and `pat`.
pub const PRELUDE: &str = r#"
import errno, random, sys, time
import nbd

uri, mode = sys.argv[1], sys.argv[2]
args = [int(a) for a in sys.argv[3:]]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
MIB = 1 << 20

def pat(off, n):
    # 4 KiB blocks, each one byte value derived from its index; off and n are 4 KiB multiples.
    return b"".join(bytes([(b * 7) % 251 + 1]) * 4096 for b in range(off // 4096, (off + n) // 4096))
"#;

/// The bytes `pat(off, n)` gives in the scripts.
pub fn pattern(off: u64, n: u64) -> Vec<u8> {
    (off / 4096..(off + n) / 4096)
        .flat_map(|b| std::iter::repeat_n(((b * 7) % 251 + 1) as u8, 4096))
        .collect()
}

/// Runs phase `mode` of the script `PRELUDE + body` (written once to `script`) against export
/// "disk" of `srv`, within `timeout`; fails the test (with the server's log) unless the script
/// succeeded and printed "ok…". Returns what it printed, trimmed.
pub fn run_phase(
    script: &Path,
    body: &str,
    srv: &Server,
    mode: &str,
    args: &[u64],
    timeout: Duration,
) -> String {
    if !script.exists() {
        std::fs::write(script, format!("{PRELUDE}{body}")).expect("write the client script");
    }
    let mut c = Command::new(PYTHON);
    c.arg(script).arg(srv.uri("disk")).arg(mode);
    c.args(args.iter().map(u64::to_string));
    let out = run_bounded(&mut c, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && stdout.starts_with("ok"),
        "client phase {mode} failed: {stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        srv.log_text()
    );
    stdout
}
