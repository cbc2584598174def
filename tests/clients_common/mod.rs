//! Shared harness for the real-client integration tests (`tests/clients_*.rs`): a data directory
//! made with the real `cryptnbd` CLI (key store, CMK, volumes), the real `cryptnbd serve` binary on
//! a temporary Unix socket, external client tools run as subprocesses with a time bound, and the
//! "tool missing" policy (fail when `CI=true`, skip loudly otherwise).
//!
//! Everything here talks to the product through its command line and sockets only, as a user
//! would; nothing reaches into the library.
#![allow(dead_code)]

pub mod blockdev;
pub mod certs;
pub mod libnbd_phase;
pub mod xts_oracle;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// The header region in front of every volume's data area (DESIGN.md, "Volume file").
pub const HEADER_BYTES: u64 = MIB;

/// Default bound for one client command; generous because two cores are shared by many builds.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Looks `tool` up on PATH (and in the sbin directories, where losetup/mkfs live).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Whether every tool in `tools` is installed. A missing tool fails the test when `CI=true` (CI
/// installs them with `tools/test`); otherwise the test is skipped with a loud message.
pub fn have_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    report_missing(test, &format!("{missing:?}"))
}

/// Reports a missing tool (or module): fails when `CI=true`, else prints a loud skip notice.
/// Always returns false, so callers can `return` on it.
pub fn report_missing(test: &str, what: &str) -> bool {
    let msg = format!(
        "{test}: missing client tool(s) {what}; install them with \
         `apt-get install qemu-utils libnbd-bin nbdfuse fio python3-libnbd python3-cryptography \
         nbdkit e2fsprogs`"
    );
    assert!(!in_ci(), "{msg} (CI=true: a missing tool is a failure)");
    eprintln!("\n*** SKIPPED {msg} ***\n");
    false
}

/// Skips (loudly, also in CI) when the machine cannot do something for a reason that is not a
/// missing tool: e.g. no `/dev/fuse` inside an unprivileged container. `why` must say exactly what.
pub fn skip_environment(test: &str, why: &str) {
    eprintln!("\n*** SKIPPED {test}: this environment cannot run it: {why} ***\n");
}

/// Runs `cmd` to completion within `timeout`, capturing its output; kills it on timeout and fails.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    // Drain both pipes on threads so a chatty tool cannot block on a full pipe.
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let Some(status) = wait_bounded(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        let err = t_err.join().unwrap_or_default();
        panic!(
            "{desc} did not finish within {timeout:?}; killed it. stderr:\n{}",
            String::from_utf8_lossy(&err)
        )
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Like [`run_bounded`], and fails the test (showing the output) unless the command succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    run_ok_within(cmd, TOOL_TIMEOUT)
}

pub fn run_ok_within(cmd: &mut Command, timeout: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `child` until it exits or `timeout` passes (None).
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// `nbd+unix:///EXPORT?socket=SOCKET`, the URI form every libnbd and QEMU tool accepts.
pub fn nbd_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// A deterministic byte pattern (xorshift) so failures are reproducible.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Bytes of `path` actually allocated on disk (st_blocks · 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// A data directory with a key store (`kms init`), one CMK `alias/clients`, and volumes made with
/// `cryptnbd volume create`, in a temporary directory removed on drop.
pub struct DataDir {
    pub dir: tempfile::TempDir,
}

pub const KEY_ALIAS: &str = "alias/clients";

impl DataDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cryptnbd-clients-")
            .tempdir()
            .expect("tempdir");
        let d = DataDir { dir };
        d.cli(&["kms", "init"]);
        d.cli(&["kms", "create-key", "--alias", "clients"]);
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `cryptnbd --data-dir DIR ARGS…` and returns its standard output; fails on error.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cryptnbd"));
        c.arg("--data-dir")
            .arg(self.path())
            .args(args)
            .env_remove("CRYPTNBD_PASSPHRASE")
            .env_remove("CRYPTNBD_DATA_DIR");
        run_ok(&mut c)
    }

    /// `volume create NAME --size SIZE --key alias/clients --sector-size SECTOR`.
    pub fn create_volume(&self, name: &str, size: u64, sector: u32) {
        self.cli(&[
            "volume",
            "create",
            name,
            "--size",
            &size.to_string(),
            "--key",
            KEY_ALIAS,
            "--sector-size",
            &sector.to_string(),
        ]);
    }

    pub fn volume_path(&self, name: &str) -> PathBuf {
        self.path().join("volumes").join(format!("{name}.vol"))
    }

    pub fn volume_info(&self, name: &str) -> serde_json::Value {
        let out = self.cli(&["volume", "info", name, "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("volume info --json: {e}: {out}"))
    }

    /// The volume's 64-byte XTS data key, unwrapped by hand the way an operator would recover it:
    /// `volume info --json` (key id, wrapped DEK, context) → `kms decrypt-datakey --json`.
    pub fn unwrap_dek(&self, name: &str) -> Vec<u8> {
        let args = decrypt_datakey_args(&self.volume_info(name));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        dek_of_decrypt_output(&self.cli(&argv))
    }

    /// Starts `cryptnbd serve --socket DIR/nbd.sock --export NAME…` and waits until it accepts.
    pub fn serve(&self, exports: &[&str]) -> Server {
        Server::start(self.path(), exports, None, &[])
    }

    /// Like [`DataDir::serve`], also listening on TCP 127.0.0.1 at a port that was free just now.
    pub fn serve_tcp(&self, exports: &[&str]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free loopback port");
        Server::start(self.path(), exports, Some(port), &[])
    }

    /// `cryptnbd serve --socket DIR/nbd.sock [--listen 127.0.0.1:PORT] EXTRA…` (TLS and access
    /// options go in `extra`).
    pub fn serve_with(&self, tcp: bool, extra: &[&str]) -> Server {
        let port = tcp.then(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("find a free loopback port")
        });
        Server::start(self.path(), &[], port, extra)
    }
}

impl Default for DataDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `cryptnbd serve` process. Dropping it sends SIGTERM (graceful: flush and close) and
/// SIGKILLs it if it has not exited within 20 s.
pub struct Server {
    child: Option<Child>,
    pub socket: PathBuf,
    pub tcp: Option<std::net::SocketAddr>,
    log: PathBuf,
}

impl Server {
    fn start(
        data_dir: &Path,
        exports: &[&str],
        tcp: Option<std::net::SocketAddr>,
        extra: &[&str],
    ) -> Server {
        let socket = data_dir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let log = data_dir.join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let logf = std::fs::File::create(&log).expect("server log file");
        let mut c = Command::new(env!("CARGO_BIN_EXE_cryptnbd"));
        c.arg("--data-dir")
            .arg(data_dir)
            .arg("serve")
            .arg("--socket")
            .arg(&socket);
        if let Some(addr) = tcp {
            c.arg("--listen").arg(addr.to_string());
            if !extra.contains(&"--tls-cert") {
                c.arg("--insecure-no-tls");
            }
        }
        for e in exports {
            c.arg("--export").arg(e);
        }
        c.args(extra);
        c.env_remove("CRYPTNBD_PASSPHRASE")
            .env_remove("CRYPTNBD_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        let child = c.spawn().expect("start cryptnbd serve");
        let mut s = Server {
            child: Some(child),
            socket,
            tcp,
            log,
        };
        s.wait_ready(Duration::from_secs(30));
        s
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            let child = self.child.as_mut().expect("server running");
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "cryptnbd serve exited ({st}) before listening on {}; its log:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "cryptnbd serve did not listen on {} within {timeout:?}; its log:\n{}",
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn uri(&self, export: &str) -> String {
        nbd_uri(&self.socket, export)
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`; only for a server started with [`DataDir::serve_tcp`].
    pub fn tcp_uri(&self, export: &str) -> String {
        let addr = self.tcp.expect("server started with serve_tcp");
        format!("nbd://{addr}/{export}")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait for a clean exit (the server flushes every volume first).
    pub fn stop(mut self) {
        let st = self.terminate();
        assert!(
            st.map(|s| s.success()).unwrap_or(false),
            "cryptnbd serve did not exit cleanly on SIGTERM ({st:?}); its log:\n{}",
            self.log_text()
        );
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (try_wait
            // above returned None), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        match wait_bounded(&mut child, Duration::from_secs(20)) {
            Some(st) => Some(st),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// `kms decrypt-datakey KEY --cipher-text CT --json --context K=V…` for the wrapped DEK that
/// `volume info --json` shows (`info`): how an operator recovers a volume's key by hand.
pub fn decrypt_datakey_args(info: &serde_json::Value) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "kms".into(),
        "decrypt-datakey".into(),
        info["key_id"]
            .as_str()
            .expect("key_id in volume info")
            .into(),
        "--cipher-text".into(),
        info["cipher_text"]
            .as_str()
            .expect("cipher_text in volume info")
            .into(),
        "--json".into(),
    ];
    let ctx = info["encryption_context"]
        .as_object()
        .expect("encryption_context object in volume info");
    for (k, v) in ctx {
        let v = v
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string());
        args.push("--context".into());
        args.push(format!("{k}={v}"));
    }
    args
}

/// The 64-byte XTS key in `kms decrypt-datakey --json` output.
pub fn dek_of_decrypt_output(out: &str) -> Vec<u8> {
    let dk: serde_json::Value = serde_json::from_str(out).expect("decrypt-datakey --json");
    let key = hex::decode(dk["plain_text"].as_str().expect("plain_text")).expect("hex DEK");
    assert_eq!(key.len(), 64, "an AES-256-XTS data key is 64 bytes");
    key
}
