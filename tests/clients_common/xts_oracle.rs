//! An independent AES-256-XTS oracle for the at-rest tests: Python's `cryptography` decrypts a
//! volume's data area (a file or an exported RBD image) with the plain64 tweak in 512-byte units,
//! so the tests do not trust our own XTS code to check our own XTS code.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::{wait_bounded, HEADER_BYTES, TOOL_TIMEOUT};

/// Debian's python, which has python3-cryptography (the `python3` on PATH may be another build).
pub const PYTHON: &str = "/usr/bin/python3";

/// Decrypts the data area of a volume file or raw image (after the header) into `out`; all-zero
/// ciphertext sectors are holes and stay zero. The DEK comes on stdin, never on the command line.
const XTS_ORACLE: &str = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
vol, out, sector, header = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
key = bytes.fromhex(sys.stdin.read().strip())
assert len(key) == 64, "AES-256-XTS key must be 64 bytes"
units = sector // 512
with open(vol, "rb") as f, open(out, "wb") as o:
    f.seek(header)
    n = 0
    while True:
        s = f.read(sector)
        if not s:
            break
        if len(s) != sector:
            sys.exit("truncated sector %d: %d bytes" % (n, len(s)))
        if s.count(0) == sector:
            o.write(s)
        else:
            d = Cipher(algorithms.AES(key), modes.XTS((n * units).to_bytes(16, "little"))).decryptor()
            o.write(d.update(s) + d.finalize())
        n += 1
"#;

pub fn python_has_cryptography() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import cryptography.hazmat.primitives.ciphers"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn oracle_decrypt(vol: &Path, out: &Path, sector: u32, dek: &[u8]) {
    let mut child = Command::new(PYTHON)
        .arg("-c")
        .arg(XTS_ORACLE)
        .arg(vol)
        .arg(out)
        .arg(sector.to_string())
        .arg(HEADER_BYTES.to_string())
        .stdin(Stdio::piped())
        .spawn()
        .expect("start the python XTS oracle");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(hex::encode(dek).as_bytes())
            .expect("send DEK to oracle");
    }
    let st = wait_bounded(&mut child, TOOL_TIMEOUT).expect("python XTS oracle timed out");
    assert!(st.success(), "python XTS oracle failed: {st}");
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
