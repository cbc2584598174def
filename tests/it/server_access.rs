//! Who may attach, against the real binary and real clients: a Unix socket follows the same
//! rules as TCP once TLS or `--allow` is configured (`uid:`/`gid:` rules, the server's own user),
//! TLS on TCP needs client certificates unless `--tls-no-client-auth` says otherwise, hundreds of
//! idle handshakes from one address do not keep a certified client out, and a refused attach
//! tells the client what it can act on with a request id, never a path or a key id.

use crate::clients_common;
use crate::server_peercred::{as_nobody, open_dir};
use crate::server_tls::{run_fails, tls_tcp_uri, TlsSetup};

use std::process::Command;
use std::time::{Duration, Instant};

use crate::clients_common::certs::client_dir;
use clients_common::*;

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` (which must fail) with libnbd's debug output, which carries the server's message.
fn refusal_text(cmd: &mut Command) -> String {
    run_fails(cmd.env("LIBNBD_DEBUG", "1"))
}

#[test]
fn a_unix_socket_follows_the_rules_once_tls_is_configured() {
    if !is_root() {
        skip_environment("unix_rules", "needs root to run a client as another uid");
        return;
    }
    if !have_tools("unix_rules", &["nbdinfo", "setpriv"]) {
        return;
    }
    let t = TlsSetup::new();
    let dir = open_dir();
    let sock = dir.path().join("shared.sock");
    let sock_s = sock.to_str().unwrap();
    // The reproduction of the issue: a world-writable socket, TLS with client certificates and
    // a rule for one certificate. A plain local user gets nothing.
    let base = [
        "--socket",
        sock_s,
        "--socket-mode",
        "666",
        "--allow",
        "host-a=disk0",
    ];
    let s = t.serve(&base);
    for export in ["disk0", "disk1"] {
        let err = refusal_text(&mut as_nobody(&[
            "env",
            "LIBNBD_DEBUG=1",
            "nbdinfo",
            &nbd_uri(&sock, export),
        ]));
        assert!(!err.contains("export-size"), "{err}");
        assert!(err.contains("no --allow rule gives it"), "{err}");
    }
    let list = run_bounded(
        &mut as_nobody(&["nbdinfo", "--list", &nbd_uri(&sock, "")]),
        TOOL_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(!text.contains("disk0") && !text.contains("disk1"), "{text}");
    // The server's own user keeps plaintext access on its sockets.
    let info = run_ok(Command::new("nbdinfo").arg(nbd_uri(&sock, "disk1")));
    assert!(info.contains("export-size"), "{info}");
    s.stop();

    // A uid rule gives nobody one export, by name or number.
    for rule in ["uid:nobody=disk1", "uid:65534=disk1", "gid:nogroup=disk1"] {
        let mut args = base.to_vec();
        args.extend(["--allow", rule]);
        let s = t.serve(&args);
        let ok = run_ok(&mut as_nobody(&["nbdinfo", &nbd_uri(&sock, "disk1")]));
        assert!(ok.contains("export-size"), "{rule}: {ok}");
        let err = refusal_text(&mut as_nobody(&[
            "env",
            "LIBNBD_DEBUG=1",
            "nbdinfo",
            &nbd_uri(&sock, "disk0"),
        ]));
        assert!(err.contains("uid:65534"), "{rule}: {err}");
        s.stop();
    }
}

#[test]
fn tls_on_tcp_needs_client_certificates_or_an_explicit_opt_out() {
    if !have_tools("tls_client_auth", &["nbdinfo"]) {
        return;
    }
    let t = TlsSetup::new();
    let out = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .arg("--data-dir")
        .arg(t.data.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&t.server_cert)
        .arg("--tls-key")
        .arg(&t.server_key)
        .env_remove("CRYPTNBD_DATA_DIR")
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-client-ca") && err.contains("--tls-no-client-auth"),
        "{err}"
    );

    let s = t.data.serve_with(
        true,
        &[
            "--tls-cert",
            t.server_cert.to_str().unwrap(),
            "--tls-key",
            t.server_key.to_str().unwrap(),
            "--tls-no-client-auth",
        ],
    );
    assert!(
        s.log_text().contains("encrypted but not authenticated"),
        "{}",
        s.log_text()
    );
    let anonymous = client_dir(t.certs.path(), "anonymous", &t.ca, None);
    let info = run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &anonymous)));
    assert!(info.contains("export-size"), "{info}");
    s.stop();
}

#[test]
fn idle_handshakes_from_one_address_do_not_keep_a_certified_client_out() {
    if !have_tools("handshake_flood", &["nbdinfo"]) {
        return;
    }
    const IDLE: usize = 300;
    let t = TlsSetup::new();
    let s = t.serve(&[]);
    let addr = s.tcp.unwrap();
    // The attacker: 127.0.0.2 (still loopback), connections that never send a byte.
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(
            &"127.0.0.2:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .expect("bind 127.0.0.2");
        sock.connect(&addr.into()).expect("connect");
        idle.push(sock);
    }
    // Wait until the server has seen them all: all but its per-source share are refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.log_text().matches("--max-handshakes-per-source").count() < IDLE - 8 {
        assert!(Instant::now() < deadline, "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let good = t.client("host-good");
    let info = run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &good)));
    assert!(info.contains("export-size"), "{info}");
    drop(idle);
    s.stop();
}

#[test]
fn an_attach_refusal_names_no_path_and_carries_a_request_id() {
    if !have_tools("refusal_text", &["nbdinfo"]) {
        return;
    }
    let d = DataDir::new();
    d.cli(&["kms", "create-key", "--alias", "locked"]);
    d.cli(&[
        "volume",
        "create",
        "v",
        "--size",
        "8M",
        "--key",
        "alias/locked",
    ]);
    let key_id = d.volume_info("v")["key_id"]
        .as_str()
        .map(String::from)
        .unwrap_or_default();
    d.cli(&["kms", "disable-key", "alias/locked"]);
    let s = d.serve(&[]);
    let err = refusal_text(Command::new("nbdinfo").arg(s.uri("v")));
    let line = err
        .lines()
        .find_map(|l| l.split("server error message: ").nth(1))
        .unwrap_or_else(|| panic!("no server message in:\n{err}"));
    assert!(line.contains("its CMK is disabled"), "{line}");
    let data_dir = d.path().to_str().unwrap();
    assert!(
        !line.contains(data_dir) && !line.contains('/'),
        "a path: {line}"
    );
    assert!(
        key_id.is_empty() || !line.contains(&key_id),
        "the key id: {line}"
    );
    let rid = line
        .split("(request ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no request id: {line}"));
    let log = s.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(rid) && l.contains("attach refused")),
        "the log has no line for request {rid}:\n{log}"
    );
    s.stop();
}
