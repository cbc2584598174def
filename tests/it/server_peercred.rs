//! Unix socket access control against the real binary: a socket outside the data directory with
//! `--socket-mode`/`--socket-group`, and SO_PEERCRED checked against `--allow-uid`/`--allow-gid`.
//! A refused local user (run as `nobody` through `setpriv`) gets an NBD error, never the disk,
//! and the server logs its uid and pid; the server's own user and allowed users get in.

use crate::clients_common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use clients_common::*;

const NOBODY: u32 = 65534;

pub(crate) fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--reset-env",
    ])
    .args(args);
    c
}

/// A directory anyone may enter, for a socket outside the 0700 data directory.
pub(crate) fn open_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("cryptnbd-sock-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn peer_credentials_decide_who_gets_the_disk() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_environment(
            "peer_credentials",
            "needs root to run a client as another uid",
        );
        return;
    }
    if !have_tools("peer_credentials", &["nbdinfo", "setpriv"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk0", 16 * MIB, 4096);
    let dir = open_dir();
    let sock = dir.path().join("shared.sock");
    let s = d.serve_with(
        false,
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--socket-mode",
            "666",
            "--socket-group",
            "nogroup",
            "--allow-uid",
            "1234",
        ],
    );
    let md = std::fs::metadata(&sock).expect("socket exists");
    assert_eq!(md.mode() & 0o777, 0o666, "--socket-mode");
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    assert_eq!(md.gid(), nogroup.gid.as_raw(), "--socket-group");

    let uri = nbd_uri(&sock, "disk0");
    // nobody can open the socket file (mode 666) but is not on the allow list.
    let out = run_bounded(&mut as_nobody(&["nbdinfo", &uri]), TOOL_TIMEOUT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "nobody got the disk:\n{text}");
    assert!(!text.contains("export-size"), "{text}");
    eprintln!("refused client saw: {text}");
    let log = s.log_text();
    assert!(
        log.contains("refusing a Unix peer") && log.contains(&format!("uid={NOBODY}")),
        "{log}"
    );
    assert!(log.contains("pid="), "{log}");
    // The server's own user (root here) always gets in.
    let info = run_ok(Command::new("nbdinfo").arg(&uri));
    assert!(info.contains("export-size"), "{info}");
    s.stop();

    // Once allowed by uid, nobody gets in; and by group too.
    for allow in [["--allow-uid", "65534"], ["--allow-gid", "nogroup"]] {
        let mut args = vec!["--socket", sock.to_str().unwrap(), "--socket-mode", "666"];
        args.extend_from_slice(&allow);
        let s = d.serve_with(false, &args);
        let out = run_ok(&mut as_nobody(&["nbdinfo", &uri]));
        assert!(out.contains("export-size"), "{allow:?}: {out}");
        s.stop();
    }

    // A supplementary group counts (SO_PEERGROUPS), not only the primary one; without it the
    // same user is refused.
    let args = [
        "--socket",
        sock.to_str().unwrap(),
        "--socket-mode",
        "666",
        "--allow-gid",
        "4242",
    ];
    let s = d.serve_with(false, &args);
    let mut with_group = Command::new("setpriv");
    with_group
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--groups=4242",
            "--reset-env",
        ])
        .args(["nbdinfo", &uri]);
    let out = run_ok(&mut with_group);
    assert!(out.contains("export-size"), "supplementary group: {out}");
    let out = run_bounded(&mut as_nobody(&["nbdinfo", &uri]), TOOL_TIMEOUT);
    assert!(!out.status.success(), "nobody without group 4242 got in");
    s.stop();
}

#[test]
fn zero_config_serve_listens_only_on_the_data_dir_socket() {
    if !have_tools("zero_config_serve", &["nbdinfo"]) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("fresh");
    let out_path = root.path().join("stdout.txt");
    let err_path = root.path().join("stderr.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .arg("--data-dir")
        .arg(&data)
        .arg("serve")
        .env_remove("CRYPTNBD_PASSPHRASE")
        .env_remove("CRYPTNBD_DATA_DIR")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("start serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let sock = data.join("nbd.sock");
    while !(sock.exists()
        && std::fs::read_to_string(&out_path)
            .unwrap()
            .contains("Attach"))
    {
        assert!(std::time::Instant::now() < deadline, "serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let info = run_ok(Command::new("nbdinfo").arg(nbd_uri(&sock, "disk0")));
    assert!(info.contains("export-size"), "{info}");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let st = wait_bounded(&mut child, std::time::Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| s.success()),
        "serve did not stop cleanly"
    );
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    assert!(stdout.contains("nbd+unix:///disk0"), "{stdout}");
    assert!(
        !stdout.contains("nbd://"),
        "no TCP attach command expected:\n{stdout}"
    );
    let listening: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("listening on"))
        .collect();
    assert_eq!(listening.len(), 1, "{stderr}");
    assert!(listening[0].contains("unix"), "{stderr}");
    let mode = std::fs::metadata(&data).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir mode {mode:o}");
}
