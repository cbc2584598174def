//! Shared driver for the crash-consistency tests (`tests/durability_*.rs`): runs rounds of
//! `tools/durability_client.py` (libnbd through Debian's `/usr/bin/python3`) against a server,
//! crashes the server at a random moment of each round, and checks the client's verdicts.
//!
//! The client owns the model (which write is durable, which may or may not have landed); this
//! module only decides when to crash and collects the counts it prints.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::clients_common::{report_missing, wait_bounded};

pub const PYTHON: &str = "/usr/bin/python3";

/// The client script, from the source tree (the same one `tools/crash-loop` runs).
pub fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/durability_client.py")
}

/// Whether Debian's python with libnbd's `nbd` module is there (fails in CI when it is not).
pub fn have_python_nbd(test: &str) -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok || report_missing(test, "python3-libnbd (`import nbd` in /usr/bin/python3)")
}

/// One round of the client: verify what the last round left, then (unless `verify_only`) write
/// until the server goes away or `seconds` pass.
pub struct Round {
    child: Child,
    ready: PathBuf,
    out: PathBuf,
}

impl Round {
    pub fn start(uri: &str, work: &Path, seconds: f64, verify_only: bool) -> Round {
        let ready = work.join("client.ready");
        let out = work.join("client.out");
        let _ = std::fs::remove_file(&ready);
        let mut c = Command::new(PYTHON);
        c.arg(client_script())
            .arg(uri)
            .arg(work.join("client.state.json"))
            .arg(&ready)
            .arg("--seconds")
            .arg(seconds.to_string());
        if verify_only {
            c.arg("--verify-only");
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("client output file"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the durability client");
        Round { child, ready, out }
    }

    /// Waits until the client has verified the previous round and started writing.
    pub fn wait_writing(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.ready.exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "the durability client exited ({st}) before writing: {}",
                    std::fs::read_to_string(&self.out).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the client did not start writing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the client's verdict: its JSON summary, and whether it found no lost or garbage
    /// pieces (exit status 0).
    pub fn finish(mut self, timeout: Duration) -> (bool, serde_json::Value) {
        let st = wait_bounded(&mut self.child, timeout).unwrap_or_else(|| {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("the durability client did not finish within {timeout:?}")
        });
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let line = text.lines().last().unwrap_or_default();
        let v = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("client summary is not JSON ({e}): {text}"));
        (st.success(), v)
    }
}

/// Sends SIGKILL to `pid` (a server we started), through kill(1) so no `unsafe` is needed here.
pub fn kill9(pid: u32) {
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -KILL {pid} failed");
}

/// Asserts the client's summary of one check shows nothing lost and nothing garbled.
pub fn assert_clean(ok: bool, v: &serde_json::Value, what: &str) {
    let c = &v["check"];
    assert!(
        ok && c["lost"] == 0 && c["garbage"] == 0,
        "{what}: the client found lost or garbage data: {v:#}"
    );
}
