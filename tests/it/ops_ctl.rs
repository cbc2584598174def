//! The control socket of `cryptnbd serve` and `cryptnbd ctl`: status with a live connection's
//! peer and counters, malformed requests over the raw socket (an error each, nothing changed),
//! detach (the client is closed, new connections refused, the volume file released so `volume
//! resize` works), attach (again, and a volume created after the server started), the volume
//! commands naming the server that holds a volume, and `ctl top` in batch mode.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::raw::RawClient;

/// A `cryptnbd serve` on a data directory of its own, with its default sockets.
pub(crate) struct Serve {
    pub child: Child,
    pub data: PathBuf,
    ctl: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Serve {
    /// Starts serve with `extra` arguments; waits (bounded) for both sockets.
    pub(crate) fn start(extra: &[&str]) -> Serve {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let child = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
            .arg("--data-dir")
            .arg(&data)
            .arg("serve")
            .args(extra)
            .env_remove("CRYPTNBD_PASSPHRASE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start cryptnbd serve");
        let ctl = extra
            .windows(2)
            .find(|w| w[0] == "--ctl")
            .map_or_else(|| data.join("ctl.sock"), |w| PathBuf::from(w[1]));
        let s = Serve {
            child,
            data,
            ctl,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(s.nbd_sock().exists() && s.ctl_sock().exists()) {
            assert!(Instant::now() < deadline, "serve did not open its sockets");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub(crate) fn nbd_sock(&self) -> PathBuf {
        self.data.join("nbd.sock")
    }

    pub(crate) fn ctl_sock(&self) -> PathBuf {
        self.ctl.clone()
    }

    /// Runs `cryptnbd --data-dir DATA ARGS…`.
    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .env_remove("CRYPTNBD_PASSPHRASE")
            .output()
            .unwrap()
    }

    /// `ctl --json ARGS…`, which must succeed; its JSON.
    pub(crate) fn ctl_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["ctl", "--json"];
        a.extend_from_slice(args);
        let o = self.cli(&a);
        assert!(o.status.success(), "ctl {args:?}: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    pub(crate) fn export<'a>(status: &'a Value, name: &str) -> &'a Value {
        status["exports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no export {name} in {status}"))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One request line over the raw socket, one response line back.
fn raw(path: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(line).unwrap();
    let mut l = String::new();
    BufReader::new(s).read_line(&mut l).unwrap();
    serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
}

#[test]
fn status_detach_attach_and_malformed_requests() {
    let s = Serve::start(&[]);
    let mode = std::fs::metadata(s.ctl_sock())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is owner-only");

    let st = s.ctl_json(&["status"]);
    assert_eq!(st["pid"], s.child.id());
    assert_eq!(Serve::export(&st, "disk0")["state"], "attached");

    // A client writes; status shows it with its peer identity and counters.
    let mut c = RawClient::unix(&s.nbd_sock());
    c.connect_export("disk0", true);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(1, 4096, &pattern, 0).error(), 0);
    let st = s.ctl_json(&["status"]);
    let conns = st["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{st}");
    let me = nix::unistd::geteuid().as_raw();
    assert_eq!(conns[0]["identity"], format!("uid:{me}"));
    assert_eq!(conns[0]["export"], "disk0");
    assert_eq!(conns[0]["requests"], 1);
    assert_eq!(conns[0]["bytes"], 8192);
    let e = Serve::export(&st, "disk0");
    assert_eq!(e["connections"], 1);
    assert_eq!(e["stats"]["writes"], 1);
    assert_eq!(e["stats"]["write_bytes"], 8192);
    assert_eq!(e["volume"]["key"]["version"], 1);
    assert_eq!(e["volume"]["key"]["cmk_state"], "enabled", "{st}");
    // Disabling the CMK shows in status while the attached volume keeps serving (as in EVS).
    for (op, want) in [("disable-key", "disabled"), ("enable-key", "enabled")] {
        let o = s.cli(&["kms", op, "alias/default"]);
        assert!(o.status.success(), "{}", text(&o));
        let st = s.ctl_json(&["status"]);
        let e = Serve::export(&st, "disk0");
        assert_eq!(e["volume"]["key"]["cmk_state"], want, "{st}");
        assert_eq!(e["state"], "attached", "{st}");
    }

    // Malformed requests: an error each, and nothing changed.
    let ctl = s.ctl_sock();
    for (line, kind) in [
        (&b"hello\n"[..], "bad_request"),
        (b"{\"v\":1,\"op\":\"detach\"}\n", "bad_request"),
        (
            b"{\"v\":1,\"op\":\"detach\",\"export\":\"disk0\",\"now\":1}\n",
            "bad_request",
        ),
        (
            b"{\"v\":2,\"op\":\"detach\",\"export\":\"disk0\"}\n",
            "unsupported_version",
        ),
        (
            b"{\"v\":1,\"op\":\"format\",\"export\":\"disk0\"}\n",
            "unknown_op",
        ),
        (
            b"{\"v\":1,\"op\":\"detach\",\"export\":\"nope\"}\n",
            "not_found",
        ),
    ] {
        let r = raw(&ctl, line);
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["error"]["kind"], kind, "{r}");
    }
    assert!(!c.is_closed(), "no malformed request detached anything");
    assert_eq!(c.read(2, 4096, 8192).unwrap(), pattern);

    // The volume commands name the server that holds the volume.
    let o = s.cli(&["volume", "resize", "disk0", "--size", "2G"]);
    assert!(!o.status.success());
    let msg = text(&o);
    for want in [
        format!("pid {}", s.child.id()),
        ctl.display().to_string(),
        "ctl detach disk0".to_string(),
    ] {
        assert!(msg.contains(&want), "missing {want:?} in {msg}");
    }

    // Detach: the client is closed, new connections refused, the volume file released.
    let d = s.ctl_json(&["detach", "disk0"]);
    assert_eq!(d["connections_closed"], 1, "{d}");
    assert_eq!(d["key_dropped"], true, "{d}");
    assert!(c.is_closed());
    let st = s.ctl_json(&["status"]);
    assert_eq!(Serve::export(&st, "disk0")["state"], "detached");
    assert!(Serve::export(&st, "disk0")["volume"].is_null());
    let mut refused = RawClient::unix(&s.nbd_sock());
    refused.start();
    let r = refused.info_go(nbd_opt_go(), "disk0", &[]);
    assert!(
        r.iter().any(|x| x.message().contains("detached")),
        "a detached export is refused with the reason"
    );
    let o = s.cli(&["volume", "resize", "disk0", "--size", "2G"]);
    assert!(
        o.status.success(),
        "detached: the lock is free: {}",
        text(&o)
    );

    // Attach it again: the data is there, at the new size.
    let a = s.ctl_json(&["attach", "disk0"]);
    assert_eq!(a["size"], 2u64 << 30);
    let mut c = RawClient::unix(&s.nbd_sock());
    c.connect_export("disk0", true);
    assert_eq!(c.read(1, 4096, 8192).unwrap(), pattern);

    // A volume created after serve started attaches on request.
    let o = s.cli(&[
        "volume",
        "create",
        "late",
        "--size",
        "16M",
        "--key",
        "alias/default",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let a = s.ctl_json(&["attach", "late"]);
    assert_eq!(a["size"], 16u64 << 20);
    let st = s.ctl_json(&["status"]);
    assert_eq!(Serve::export(&st, "late")["state"], "attached");

    // Reload without TLS says so.
    let r = s.ctl_json(&["reload"]);
    assert!(r["reloaded"].as_str().unwrap().contains("no TLS"), "{r}");
    // Human output names the exports and the connection.
    let o = s.cli(&["ctl", "status"]);
    let out = text(&o);
    assert!(
        out.contains("disk0") && out.contains("late") && out.contains("uid:"),
        "{out}"
    );
}

fn nbd_opt_go() -> u32 {
    cryptnbd::nbd::consts::OPT_GO
}

#[test]
fn ctl_top_shows_throughput_per_export() {
    let s = Serve::start(&[]);
    let data = s.data.clone();
    let top = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
            .arg("--data-dir")
            .arg(&data)
            .args(["ctl", "top", "--iterations", "3", "--interval", "300ms"])
            .output()
            .unwrap()
    });
    let mut c = RawClient::unix(&s.nbd_sock());
    c.connect_export("disk0", true);
    let block = vec![7u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cookie = 0;
    while !top.is_finished() {
        assert!(Instant::now() < deadline, "ctl top did not finish");
        cookie += 1;
        assert_eq!(
            c.write(cookie, (cookie % 100) * 65536, &block, 0).error(),
            0
        );
    }
    let o = top.join().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("disk0")).collect();
    assert_eq!(rows.len(), 3, "one row per refresh:\n{out}");
    assert!(out.contains("WRITE/s") && out.contains("W IOPS"), "{out}");
    // Writes went on during every interval: each row shows a nonzero write rate.
    for r in rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        let w_iops: f64 = cols[cols.len() - 4].parse().unwrap();
        assert!(w_iops > 0.0, "{r}");
    }
}

/// The peer's uid is checked even when the socket file's mode would let anyone connect: another
/// user gets no answer, the owner (root here) does.
#[test]
fn ctl_socket_refuses_other_users_by_peer_credentials() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("ctl_socket_refuses_other_users_by_peer_credentials: needs root to act as another user; the unit test control::listener covers the check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = dir.path().join("ctl.sock");
    let s = Serve::start(&["--ctl", ctl.to_str().unwrap()]);
    assert_eq!(
        std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Widen the file mode on purpose: only the peer-credential check stands in the way now.
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = r#"
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"v":1,"op":"detach","export":"disk0"}\n')
    print(repr(s.recv(4096)))
except (BrokenPipeError, ConnectionResetError):
    print("b''")
"#;
    let o = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(&ctl)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "b''",
        "no answer"
    );
    let st = Serve::export(
        &raw(&ctl, b"{\"v\":1,\"op\":\"status\"}\n")["result"],
        "disk0",
    )
    .clone();
    assert_eq!(
        st["state"], "attached",
        "the refused request changed nothing"
    );
    drop(s);
}
