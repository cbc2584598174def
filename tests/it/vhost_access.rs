//! Who may drive a VM's disk, against the real binary: the `--vhost-user-blk` socket applies the
//! NBD Unix sockets' rule before it answers any vhost-user message. A process running as a user
//! the rules do not give the export (`nobody`, through `setpriv`) has its connection closed
//! unanswered, and the server logs the socket and the uid; once the rules give it the export, its
//! first message (GET_FEATURES) is answered. The probe is a few lines of Python speaking the
//! vhost-user header, as QEMU would.

use crate::clients_common;
use crate::server_peercred::{as_nobody, open_dir};

use std::path::Path;
use std::time::{Duration, Instant};

use clients_common::*;

const NOBODY: u32 = 65534;

/// Sends VHOST_USER_GET_FEATURES (request 1, version 1, no payload) and says whether a reply
/// (12-byte header + u64) came back or the connection was cut (a refused peer may find it
/// closed before its first write).
const PROBE: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
data = b""
try:
    s.sendall(struct.pack("<III", 1, 1, 0))
    while len(data) < 20:
        chunk = s.recv(64)
        if not chunk:
            break
        data += chunk
except (ConnectionResetError, BrokenPipeError):
    pass
print("ANSWERED" if len(data) >= 20 else "CUT-OFF")
"#;

fn probe_as_nobody(sock: &Path) -> String {
    let out = run_bounded(
        &mut as_nobody(&["python3", "-c", PROBE, sock.to_str().unwrap()]),
        TOOL_TIMEOUT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the probe failed: {text}");
    text
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_vhost_socket_refuses_users_the_rules_do_not_name() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_environment("vhost_access", "needs root to run a client as another uid");
        return;
    }
    if !have_tools("vhost_access", &["setpriv", "python3"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk0", 16 * MIB, 4096);
    d.create_volume("disk1", 16 * MIB, 4096);
    let dir = open_dir();
    let sock = dir.path().join("vm.sock");
    let spec = format!("{}=disk0", sock.display());
    let serve = |access: &[&str]| {
        let mut args = vec!["--vhost-user-blk", &spec, "--socket-mode", "666"];
        args.extend_from_slice(access);
        let s = d.serve_with(false, &args);
        wait_for(&sock);
        s
    };

    // --allow-uid names someone else: nobody is cut off and logged.
    let s = serve(&["--allow-uid", "1234"]);
    let seen = probe_as_nobody(&sock);
    assert!(seen.contains("CUT-OFF"), "nobody was answered: {seen}");
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("refusing a VM connection"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(
        line.contains(&format!("uid={NOBODY}")) && line.contains(&sock.display().to_string()),
        "the refusal does not name the uid and the socket: {line}"
    );
    s.stop();

    // An --allow rule that gives nobody another export is no better.
    let s = serve(&["--allow", "uid:65534=disk1"]);
    assert!(probe_as_nobody(&sock).contains("CUT-OFF"));
    assert!(s.log_text().contains("no --allow rule gives \"disk0\""));
    s.stop();

    // Given the export (by rule, or by --allow-uid), nobody's VM gets its answer.
    for access in [["--allow", "uid:65534=disk0"], ["--allow-uid", "65534"]] {
        let s = serve(&access);
        let seen = probe_as_nobody(&sock);
        assert!(seen.contains("ANSWERED"), "{access:?}: {seen}");
        s.stop();
    }
}
