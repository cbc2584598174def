//! Shared harness for the tests on a real Ceph cluster (`tests/rbd_*.rs`, feature `rbd`): finding
//! the throw-away cluster `tools/ceph-dev-cluster` boots, RBD volumes made with the real CLI
//! (`volume create --backend rbd:POOL/IMAGE`), gateways (`cryptnbd serve` processes with any
//! arguments, killable with SIGKILL) and the `rbd` tool for looking at images from outside.
//!
//! A missing cluster fails the test when `CI=true` (`tools/test` starts one); otherwise the test is
//! skipped loudly.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::clients_common::{run_bounded, run_ok, wait_bounded, DataDir, KEY_ALIAS};
use std::process::Output;

pub const POOL: &str = "rbd";

/// The cluster's config file: `$CRYPTNBD_TEST_CEPH_CONF`, else the one `tools/ceph-dev-cluster`
/// writes (`target/ceph-dev/ceph.conf`), if the cluster answers.
pub fn ceph_conf(test: &str) -> Option<PathBuf> {
    let conf = std::env::var_os("CRYPTNBD_TEST_CEPH_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ceph-dev/ceph.conf"));
    let answers = conf.is_file()
        && Command::new("ceph")
            .arg("-c")
            .arg(&conf)
            .args(["--connect-timeout", "10", "mon", "stat"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if answers {
        return Some(conf);
    }
    let msg = format!(
        "{test}: no Ceph cluster at {} (start one with `tools/ceph-dev-cluster start`, or set \
         CRYPTNBD_TEST_CEPH_CONF)",
        conf.display()
    );
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    assert!(!ci, "{msg} (CI=true: a missing cluster is a failure)");
    eprintln!("\n*** SKIPPED {msg} ***\n");
    None
}

/// An image name no other test (or earlier run) uses.
pub fn unique_image(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Runs the `rbd` tool against the test cluster.
pub fn rbd(conf: &Path, args: &[&str]) -> std::process::Output {
    let mut c = Command::new("rbd");
    c.arg("-c").arg(conf).args(args);
    run_bounded(&mut c, Duration::from_secs(120))
}

/// Copies image `POOL/image` out of the cluster into the file `to` (`rbd export`): the bytes as
/// the cluster stores them, for checks from outside cryptnbd.
pub fn export_image(conf: &Path, image: &str, to: &Path) {
    let out = rbd(
        conf,
        &[
            "export",
            "--no-progress",
            &format!("{POOL}/{image}"),
            to.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "rbd export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes its image when dropped (best effort: the cluster is thrown away anyway).
pub struct ImageGuard {
    pub conf: PathBuf,
    pub image: String,
}

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(["rm", "--no-progress", &format!("{POOL}/{}", self.image)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `volume create NAME --backend rbd:rbd/IMAGE --ceph-conf CONF` in `d`.
pub fn create_rbd_volume(
    d: &DataDir,
    conf: &Path,
    name: &str,
    image: &str,
    size: u64,
    sector: u32,
) -> ImageGuard {
    d.cli(&[
        "volume",
        "create",
        name,
        "--size",
        &size.to_string(),
        "--key",
        KEY_ALIAS,
        "--sector-size",
        &sector.to_string(),
        "--backend",
        &format!("rbd:{POOL}/{image}"),
        "--ceph-conf",
        conf.to_str().expect("UTF-8 conf path"),
    ]);
    ImageGuard {
        conf: conf.to_path_buf(),
        image: image.to_string(),
    }
}

/// A copy of data directory `d` (key store and volume references): what a second gateway host
/// holds when it shares the key store (here embedded, copied) and the cluster.
pub fn second_host(d: &DataDir) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cryptnbd-gw2-")
        .tempdir()
        .expect("tempdir");
    let mut c = Command::new("cp");
    c.arg("-a")
        .arg(format!("{}/.", d.path().display()))
        .arg(dir.path());
    run_ok(&mut c);
    for e in std::fs::read_dir(dir.path()).expect("read copy").flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".sock") || n.ends_with(".log") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    dir
}

/// A `cryptnbd serve` process (a gateway) on `DIR/gw.sock`. Dropping it sends SIGTERM, then
/// SIGKILL after 20 s.
pub struct Gateway {
    child: Option<Child>,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Gateway {
    /// Starts `cryptnbd --data-dir DIR serve --socket DIR/gw.sock ARGS…` and waits until it
    /// accepts connections.
    pub fn start(data_dir: &Path, args: &[&str]) -> Gateway {
        let socket = data_dir.join("gw.sock");
        let _ = std::fs::remove_file(&socket);
        let log = data_dir.join(format!("{}.log", unique_image("gw")));
        let logf = std::fs::File::create(&log).expect("gateway log");
        let child = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env_remove("CRYPTNBD_DATA_DIR")
            .env_remove("CRYPTNBD_PASSPHRASE")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("start cryptnbd serve");
        let mut g = Gateway {
            child: Some(child),
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&g.socket).is_err() {
            if let Ok(Some(st)) = g.child.as_mut().expect("running").try_wait() {
                panic!("gateway exited ({st}) early; its log:\n{}", g.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not listen within 60 s; its log:\n{}",
                g.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&mut self, sig: libc::c_int) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own unreaped child, so the pid cannot have been reused.
            unsafe { libc::kill(pid, sig) };
        }
        let st = wait_bounded(&mut child, Duration::from_secs(20));
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        st
    }

    /// SIGKILL: the gateway dies without releasing anything (its lock, its watch).
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGTERM and a clean exit (volumes flushed, locks released).
    pub fn stop(mut self) {
        let st = self.signal(libc::SIGTERM);
        assert!(
            st.map(|s| s.success()).unwrap_or(false),
            "gateway did not exit cleanly ({st:?}); its log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
    }
}

/// `cryptnbd --data-dir D ARGS…` with `CRYPTNBD_FAILPOINT=point` (if any); its output, whatever
/// the exit status.
pub fn cryptnbd(d: &DataDir, failpoint: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cryptnbd"));
    c.arg("--data-dir")
        .arg(d.path())
        .args(args)
        .env_remove("CRYPTNBD_PASSPHRASE")
        .env_remove("CRYPTNBD_DATA_DIR")
        .env_remove("CRYPTNBD_FAILPOINT");
    if let Some(p) = failpoint {
        c.env("CRYPTNBD_FAILPOINT", p);
    }
    run_bounded(&mut c, Duration::from_secs(300))
}

/// Standard output then standard error, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command that must die at failpoint `point` (SIGABRT), like a crash between two steps.
pub fn crash_at(d: &DataDir, point: &str, args: &[&str]) {
    use std::os::unix::process::ExitStatusExt;
    let o = cryptnbd(d, Some(point), args);
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGABRT),
        "{args:?} should abort at failpoint {point}: {}",
        text(&o)
    );
    assert!(text(&o).contains(point), "{}", text(&o));
}
