//! Running under systemd: the unit files in tools/systemd pass `systemd-analyze verify`; libnbd
//! starts the server with socket activation (`nbdinfo -- [ cryptnbd serve … ]`); a TCP socket
//! passed by `systemd-socket-activate` is served (with --listen's rules: plain only with
//! --insecure-no-tls, refused otherwise); `sd_notify` sends READY=1, WATCHDOG=1 and STOPPING=1.

use crate::common::free_port;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::clients_common::{have_tools, run_ok_within};
use crate::common::raw::RawClient;

const BIN: &str = env!("CARGO_BIN_EXE_cryptnbd");

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    if !have_tools(
        "unit_files_pass_systemd_analyze_verify",
        &["systemd-analyze"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/systemd");
    for f in ["cryptnbd.socket", "cryptnbd.service"] {
        // verify checks that ExecStart= names an executable: point it at the one just built.
        let text = std::fs::read_to_string(src.join(f))
            .unwrap()
            .replace("/usr/local/bin/cryptnbd", BIN);
        std::fs::write(tmp.path().join(f), text).unwrap();
    }
    let service = std::fs::read_to_string(src.join("cryptnbd.service")).unwrap();
    for want in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/cryptnbd",
        "PrivateTmp=yes",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=\n",
        "LimitCORE=0",
        "LimitMEMLOCK=",
        "Type=notify",
    ] {
        assert!(service.contains(want), "cryptnbd.service lacks {want:?}");
    }
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(tmp.path().join("cryptnbd.socket"))
        .arg(tmp.path().join("cryptnbd.service"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify: {err}");
    // Unknown or misplaced settings are only warnings: none are allowed.
    assert!(
        err.trim().is_empty(),
        "systemd-analyze verify warned: {err}"
    );
}

#[test]
fn libnbd_starts_the_server_with_socket_activation() {
    if !have_tools(
        "libnbd_starts_the_server_with_socket_activation",
        &["nbdinfo"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut c = Command::new("nbdinfo");
    c.current_dir(tmp.path())
        .args(["--", "[", BIN, "--data-dir"])
        .arg(&data)
        .args(["serve", "--exit-with-parent", "]"]);
    let out = run_ok_within(&mut c, Duration::from_secs(120));
    assert!(out.contains("export=\"disk0\""), "{out}");
    assert!(out.contains("export-size: 1073741824"), "{out}");
    assert!(
        !data.join("nbd.sock").exists(),
        "an activated server opens no socket of its own"
    );
}

#[test]
fn an_inherited_tcp_socket_follows_the_listen_rules() {
    if !have_tools(
        "an_inherited_tcp_socket_follows_the_listen_rules",
        &["systemd-socket-activate"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let activate = |port: u16, extra: &[&str]| {
        Command::new("systemd-socket-activate")
            .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=nbd", BIN])
            .arg("--data-dir")
            .arg(&data)
            .args(["serve", "--no-ctl"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let connect = |port: u16| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(_) => return RawClient::tcp(format!("127.0.0.1:{port}").parse().unwrap()),
                Err(e) if Instant::now() > deadline => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };

    // Without TLS and without --insecure-no-tls, the inherited TCP socket is refused.
    let port = free_port();
    let child = activate(port, &[]);
    drop(connect(port));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without TLS"), "{err}");

    // With --insecure-no-tls it is served like --listen.
    let port = free_port();
    let mut child = activate(port, &["--insecure-no-tls"]);
    let mut c = connect(port);
    let (size, _) = c.connect_export("disk0", true);
    assert_eq!(size, 1 << 30);
    let data8k: Vec<u8> = (0..8192u32).map(|i| (i % 241) as u8).collect();
    assert_eq!(c.write(1, 0, &data8k, 0).error(), 0);
    assert_eq!(c.read(2, 0, 8192).unwrap(), data8k);
    drop(c);
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
}

#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let notify = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("serve")
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        let n = sock.recv(&mut buf).expect("a notification in time");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    assert!(
        tmp.path().join("data/nbd.sock").exists(),
        "ready means listening"
    );
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 in time");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
}
