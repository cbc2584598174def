//! The `cryptnbd serve` binary: on an empty data directory it sets up the embedded default (key
//! store with a generated root key, CMK `alias/default`, 1 GiB volume `disk0`), prints the attach
//! commands, serves, stops cleanly on SIGTERM, and serves the same data after a restart.

use crate::common;
use crate::common::free_port;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::raw::RawClient;

struct Served {
    child: Child,
    stdout: String,
}

/// Starts `cryptnbd serve`, waits (bounded) until it printed the nbdinfo line and the socket exists.
fn start(data: &Path, sock: &Path, port: u16) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "serve",
            "--socket",
            sock.to_str().unwrap(),
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--insecure-no-tls",
        ])
        .env_remove("CRYPTNBD_PASSPHRASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start cryptnbd serve");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stdout = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                stdout.push_str(&l);
                stdout.push('\n');
                if l.contains("nbdinfo") && l.contains(&port.to_string()) {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("serve did not print its attach commands in time; stdout so far:\n{stdout}");
            }
        }
    }
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    Served { child, stdout }
}

fn stop(mut s: Served) {
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    let rc = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            assert!(st.success(), "serve exited with {st}");
            return;
        }
        if Instant::now() > deadline {
            let _ = s.child.kill();
            panic!("serve did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_on_an_empty_data_dir_sets_up_disk0_and_prints_attach_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sock = tmp.path().join("nbd.sock");
    let port = free_port();
    let s = start(&data, &sock, port);
    let out = s.stdout.clone();
    let sockp = sock.display().to_string();
    for want in [
        format!("nbd-client -N disk0 -b 4096 -unix {sockp} /dev/nbd0"),
        format!("nbd-client -N disk0 -b 4096 127.0.0.1 {port} /dev/nbd0"),
        format!("-drive file=nbd+unix:///disk0?socket={sockp},format=raw"),
        format!("-blockdev driver=nbd,node-name=disk0,export=disk0,server.type=unix,server.path={sockp}"),
        format!("server.type=inet,server.host=127.0.0.1,server.port={port}"),
        format!("fio --name=test --ioengine=nbd --uri='nbd+unix:///disk0?socket={sockp}'"),
        format!("nbdinfo 'nbd://127.0.0.1:{port}/disk0'"),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
    assert!(data.join("root.key").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the data dir holds keys: owner only");
    assert!(data.join("volumes").join("disk0.vol").exists());

    let mut c = RawClient::unix(&sock);
    let (size, _) = c.connect_export("disk0", true);
    assert_eq!(size, 1 << 30);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(c.write(1, 12345, &pattern, 0).error(), 0);
    drop(c);
    let mut t = RawClient::tcp(format!("127.0.0.1:{port}").parse().unwrap());
    t.connect_export("disk0", false);
    assert_eq!(t.read(1, 12345, 8192).unwrap(), pattern);
    drop(t);
    stop(s);
    assert!(!sock.exists(), "the socket file is removed on shutdown");

    // Restart on the existing data dir: no new setup, same data.
    let s = start(&data, &sock, port);
    assert!(!s.stdout.contains("Set up"), "{}", s.stdout);
    let mut c = RawClient::unix(&sock);
    c.connect_export("disk0", false);
    assert_eq!(c.read(1, 12345, 8192).unwrap(), pattern);
    drop(c);
    stop(s);
}

#[test]
fn a_second_signal_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sock = tmp.path().join("nbd.sock");
    let port = free_port();
    let mut s = start(&data, &sock, port);
    // A client that never reads its replies keeps the graceful shutdown waiting (10 s grace).
    let mut c = RawClient::unix(&sock);
    c.connect_export("disk0", false);
    for i in 0..64 {
        c.request(cryptnbd::nbd::CMD_READ, 0, i, 0, 1 << 20);
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = s.child.id() as i32;
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "still draining after one signal"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "second signal did not exit at once"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
}

#[test]
fn serve_refuses_to_ignore_a_passphrase_on_a_fresh_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .args(["--data-dir", tmp.path().join("d").to_str().unwrap()])
        .args(["--passphrase-file", pass.to_str().unwrap(), "serve"])
        .args(["--socket", tmp.path().join("s").to_str().unwrap()])
        .env_remove("CRYPTNBD_PASSPHRASE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cryptnbd kms init --passphrase-file"), "{err}");
    assert!(!tmp.path().join("d").join("root.key").exists());
}
