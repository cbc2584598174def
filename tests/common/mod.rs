//! Shared helpers for the integration tests: start the real server in-process (library `serve`
//! on a temp Unix socket and on 127.0.0.1:0), the in-memory volumes it serves ([`fixture`]), the
//! key store + clock + data directory fixture ([`keys`]), a raw NBD client that can send anything
//! (for the malformed-input cases), the one assertion for refusals ([`assert_refusal`]), and the
//! "external tool missing" policy.
#![allow(dead_code)]

pub mod fixture;
pub mod keys;
pub mod raw;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cryptnbd::config::ServerConfig;
use cryptnbd::server::{serve, ExportProvider, Listener, ServerError};

/// A server running on its own runtime thread; stopped (gracefully) on `stop` or drop.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub fn start(provider: Arc<dyn ExportProvider>) -> Self {
        Self::start_with(ServerConfig::default(), provider)
    }

    pub fn start_with(config: ServerConfig, provider: Arc<dyn ExportProvider>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let unix = Listener::bind_unix(&socket).expect("bind unix socket");
        let tcp = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).expect("bind tcp");
        let tcp_addr = tcp.tcp_addr().expect("tcp address");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(serve(config, vec![unix, tcp], provider, async {
                let _ = rx.await;
            }))
        });
        Self {
            dir,
            socket,
            tcp: tcp_addr,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// `nbd+unix:///NAME?socket=…`
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.tcp)
    }

    /// Asks the server to shut down and waits (bounded) for `serve` to return.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.stop_inner().expect("server thread")
    }

    /// Triggers shutdown without waiting.
    pub fn trigger_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (at most 20 s) for the server thread after `trigger_stop`.
    pub fn join(mut self) -> Result<(), ServerError> {
        self.stop_inner().expect("server thread")
    }

    fn stop_inner(&mut self) -> Option<Result<(), ServerError>> {
        self.trigger_stop();
        let t = self.thread.take()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !t.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "server did not stop within 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(t.join().expect("server thread panicked"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            let _ = self.stop_inner();
        }
    }
}

/// Asserts that the refusal `e`, with its sources, says every one of `needles`, and that each
/// cause is printed once (no message repeats its source's text). Returns the one-line message a
/// user or client sees.
pub fn assert_refusal(e: &(dyn std::error::Error + 'static), needles: &[&str]) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(src) = cur.source() {
        let (outer, inner) = (cur.to_string(), src.to_string());
        assert!(
            !outer.contains(&inner),
            "the cause is printed twice: {outer:?} repeats its source {inner:?}"
        );
        cur = src;
    }
    let line = cryptnbd::server::error_chain(e);
    for n in needles {
        assert!(line.contains(n), "refusal {line:?} does not say {n:?}");
    }
    line
}

/// Finds an external tool; without it the test FAILS when `CI=true`, else is skipped loudly.
pub fn require_tool(path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    if ci {
        panic!("{path} is required (CI=true) but not installed");
    }
    eprintln!("SKIPPING: {path} is not installed (set CI=true to make this a failure)");
    false
}

/// Whether Debian's python has the libnbd bindings.
pub fn require_python_nbd() -> bool {
    if !require_tool("/usr/bin/python3") {
        return false;
    }
    let ok = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
        if ci {
            panic!("python3-libnbd (module nbd) is required (CI=true) but missing");
        }
        eprintln!("SKIPPING: /usr/bin/python3 cannot import nbd (install python3-libnbd)");
    }
    ok
}

/// Runs a command with a time limit; returns (status success, stdout, stderr).
pub fn run_bounded(cmd: &mut std::process::Command, limit: Duration) -> (bool, String, String) {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn command");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(_st) = child.try_wait().expect("wait") {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "command timed out after {limit:?}: {:?}\nstdout: {}\nstderr: {}",
                cmd,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for servers started as processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
