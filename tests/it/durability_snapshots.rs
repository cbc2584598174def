//! Crashes (an abort at a failpoint: no unwinding, no cleanup, like `kill -9`) in the middle of
//! `volume snapshot` (offline, and online: the serving server killed mid-snapshot), `copy`,
//! `flatten` and `snapshot delete`, through the real binary: after
//! each, every volume still reads exactly what it held, `check` finds no problem (a leftover is
//! at most a warning), and running the command again completes it. The same on the power-loss
//! file system (tests/lazyfs): each command, finished, survives a torn power loss; interrupted,
//! it leaves the old state after one; an online snapshot, interrupted or finished, likewise.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use cryptnbd::datadir::FAILPOINT_ENV;

use crate::clients_common::{find_tool, report_missing, skip_environment};
use crate::common::raw::RawClient;
use crate::lazyfs;

const MIB: usize = 1 << 20;

fn cmd(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("cryptnbd").unwrap();
    c.arg("--data-dir")
        .arg(dir)
        .env_remove("CRYPTNBD_PASSPHRASE")
        .env_remove("CRYPTNBD_DATA_DIR")
        .env_remove(FAILPOINT_ENV);
    c.timeout(std::time::Duration::from_secs(60));
    c
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = cmd(dir).args(args).assert().success().get_output().clone();
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `args` with the failpoint `point` set: the process must die there.
fn crash_at(dir: &Path, point: &str, args: &[&str]) {
    let out = cmd(dir)
        .env(FAILPOINT_ENV, point)
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} did not crash at {point}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("failpoint {point}")), "{err}");
}

/// The decrypted contents of volume (or snapshot) `name`.
fn contents(dir: &Path, name: &str) -> Vec<u8> {
    contents_via(dir, dir, name)
}

/// [`contents`], exporting through a file in `work`.
fn contents_via(dir: &Path, work: &Path, name: &str) -> Vec<u8> {
    let to = work.join(format!("export-{name}.raw"));
    let _ = std::fs::remove_file(&to);
    ok(
        dir,
        &["volume", "export", name, "--to", to.to_str().unwrap()],
    );
    let b = std::fs::read(&to).unwrap();
    std::fs::remove_file(&to).unwrap();
    b
}

fn check_clean(dir: &Path) {
    // Exit 0: no problems (warnings, e.g. a leftover temporary file, are allowed).
    ok(dir, &["check"]);
}

/// An 8 MiB image: pattern over [0, 2 MiB) and [5 MiB, 6 MiB), holes elsewhere.
fn image() -> Vec<u8> {
    let mut b = vec![0u8; 8 * MIB];
    for (i, x) in b[..2 * MIB].iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31) | 1;
    }
    b[5 * MIB..6 * MIB].fill(0x77);
    b
}

/// A key store in `d` with keys `alias/a` and `alias/b`, and volume `v` (under a) imported from
/// [`image`] (written in `work`); returns the image.
fn setup(d: &Path, work: &Path) -> Vec<u8> {
    ok(d, &["kms", "init"]);
    ok(d, &["kms", "create-key", "--alias", "a"]);
    ok(d, &["kms", "create-key", "--alias", "b"]);
    let img = work.join("img.raw");
    std::fs::write(&img, image()).unwrap();
    let from = img.to_str().unwrap();
    ok(
        d,
        &["volume", "import", "v", "--from", from, "--key", "alias/a"],
    );
    image()
}

#[test]
fn snapshot_copy_flatten_and_delete_survive_a_crash_at_each_step() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let want = setup(d, d);

    // Snapshot: crash between linking the snapshot and putting the new live layer in place.
    crash_at(d, "snapshot-linked", &["volume", "snapshot", "v@s1"]);
    check_clean(d);
    assert_eq!(contents(d, "v"), want);
    assert!(ok(d, &["volume", "snapshot", "list", "v"]).contains("no snapshots"));
    ok(d, &["volume", "snapshot", "v@s1"]);
    assert_eq!(contents(d, "v@s1"), want);

    // Copy: crash half-way; no volume `w` appears, the retry completes.
    crash_at(
        d,
        "copy-half",
        &["volume", "copy", "v@s1", "w", "--key", "alias/b"],
    );
    check_clean(d);
    assert!(!ok(d, &["volume", "list", "--json"]).contains("\"w\""));
    // Undone, not resumed: what it had written is one partial file, reported by `check` and
    // removed by `check --repair` (or by the next copy or create of that name).
    let partial = || {
        std::fs::read_dir(d.join("volumes"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".w.vol."))
            .count()
    };
    assert_eq!(partial(), 1);
    assert!(ok(d, &["check"]).contains("partial volume"));
    assert!(ok(d, &["check", "--repair"]).contains("removed"));
    assert_eq!(partial(), 0);
    crash_at(
        d,
        "copy-half",
        &["volume", "copy", "v@s1", "w", "--key", "alias/b"],
    );
    ok(d, &["volume", "copy", "v@s1", "w", "--key", "alias/b"]);
    assert_eq!(partial(), 0, "the retry removed what the crash left");
    assert_eq!(contents(d, "w"), want);

    // Flatten: crash half-way; the clone reads the same, the retry completes.
    ok(d, &["volume", "clone", "v@s1", "c", "--key", "alias/b"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(d, &["volume", "info", "c", "--json"])).unwrap();
    assert_eq!(info["parent"], "v@s1");
    let v_info: serde_json::Value =
        serde_json::from_str(&ok(d, &["volume", "info", "v", "--json"])).unwrap();
    assert_eq!(info["parent_key_id"], v_info["key_id"]);
    assert_ne!(info["key_id"], v_info["key_id"]);
    crash_at(d, "flatten-half", &["volume", "flatten", "c"]);
    check_clean(d);
    assert_eq!(contents(d, "c"), want);
    ok(d, &["volume", "flatten", "c"]);
    assert_eq!(contents(d, "c"), want);

    // Snapshot delete: crash after the merge, before the live layer is re-pointed.
    crash_at(
        d,
        "snapshot-delete-merged",
        &["volume", "snapshot", "delete", "v@s1"],
    );
    check_clean(d);
    assert_eq!(contents(d, "v"), want);
    assert_eq!(contents(d, "v@s1"), want);
    ok(d, &["volume", "snapshot", "delete", "v@s1"]);
    assert_eq!(contents(d, "v"), want);
    assert!(ok(d, &["volume", "snapshot", "list", "v"]).contains("no snapshots"));
    check_clean(d);
}

/// A power-loss file system (tests/lazyfs) mounted for `test`, and a work directory beside it;
/// `None` (reported) where FUSE is not available.
fn power_loss_fs(test: &str) -> Option<(tempfile::TempDir, tempfile::TempDir, lazyfs::Mounted)> {
    if !std::path::Path::new("/dev/fuse").exists() {
        skip_environment(test, "no /dev/fuse");
        return None;
    }
    if find_tool("fusermount3").is_none() {
        report_missing(test, "fusermount3 (Debian package fuse3)");
        return None;
    }
    let mnt = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    match lazyfs::LazyFs::mount(mnt.path()) {
        Ok(m) => Some((mnt, work, m)),
        Err(e) => {
            skip_environment(test, &format!("cannot mount FUSE: {e}"));
            None
        }
    }
}

#[test]
fn snapshot_copy_flatten_and_delete_survive_power_loss() {
    let Some((mnt, work, mounted)) =
        power_loss_fs("snapshot_copy_flatten_and_delete_survive_power_loss")
    else {
        return;
    };
    let fs = &mounted.fs;
    let mut rng = rand::thread_rng();
    let d = &mnt.path().join("data");
    let w = work.path();
    let want = setup(d, w);
    let same = |names: &[&str]| {
        for n in names {
            assert_eq!(contents_via(d, w, n), want, "{n} after a power loss");
        }
    };
    // Interrupted, then the plug pulled: the old state.
    crash_at(d, "snapshot-linked", &["volume", "snapshot", "v@s1"]);
    fs.power_loss_torn(&mut rng);
    same(&["v"]);
    check_clean(d);
    // Each command finished, then the plug pulled: its result is there.
    let steps: [&[&str]; 5] = [
        &["volume", "snapshot", "v@s1"],
        &["volume", "clone", "v@s1", "c", "--key", "alias/b"],
        &["volume", "copy", "v@s1", "w", "--key", "alias/b"],
        &["volume", "flatten", "c"],
        &["volume", "snapshot", "delete", "v@s1"],
    ];
    for (i, step) in steps.iter().enumerate() {
        if i == 3 {
            crash_at(d, "flatten-half", step);
            fs.power_loss_torn(&mut rng);
            same(&["v", "c"]);
        }
        ok(d, step);
        fs.power_loss_torn(&mut rng);
        match i {
            0 => same(&["v", "v@s1"]),
            1 => same(&["v", "v@s1", "c"]),
            2 => same(&["v", "v@s1", "c", "w"]),
            3 => {
                same(&["v", "c", "w"]);
                let info = ok(d, &["volume", "info", "c", "--json"]);
                assert!(info.contains("\"parent\": null"), "{info}");
            }
            _ => same(&["v", "c", "w"]),
        }
        check_clean(d);
    }
    assert!(ok(d, &["volume", "snapshot", "list", "v"]).contains("no snapshots"));
}

/// `serve` on `d` that dies at failpoint `point` (if any), with its sockets in `socks`;
/// returns once they are there.
fn serve_crashing_at(d: &Path, socks: &Path, point: Option<&str>) -> std::process::Child {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cryptnbd"));
    c.arg("--data-dir")
        .arg(d)
        .arg("serve")
        .arg("--socket")
        .arg(socks.join("nbd.sock"))
        .arg("--ctl")
        .arg(socks.join("ctl.sock"))
        .env_remove("CRYPTNBD_PASSPHRASE")
        .env_remove(FAILPOINT_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = point {
        c.env(FAILPOINT_ENV, p);
    }
    let child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(socks.join("nbd.sock").exists() && socks.join("ctl.sock").exists()) {
        assert!(Instant::now() < deadline, "serve did not open its sockets");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn an_online_snapshot_survives_the_server_killed_at_each_step() {
    // Killed after linking the snapshot (the files say: not taken), and after renaming the new
    // live layer in place, before the open volume followed (the files say: taken).
    for (point, taken) in [
        ("snapshot-linked", false),
        ("snapshot-online-renamed", true),
    ] {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let mut want = setup(d, d);
        let mut srv = serve_crashing_at(d, d, Some(point));
        // A write acknowledged before the snapshot, not flushed: the process dies, the page
        // cache does not.
        let mut c = RawClient::unix(&d.join("nbd.sock"));
        c.connect_export("v", true);
        let at = 7 * MIB;
        assert_eq!(c.write(1, at as u64, &[0xEE; 65536], 0).error(), 0);
        want[at..at + 65536].fill(0xEE);
        let out = cmd(d)
            .args(["volume", "snapshot", "v@s1"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{point}: the server should have died"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = srv.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{point}: serve still runs");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "{point}");
        check_clean(d);
        assert_eq!(contents(d, "v"), want, "{point}: the volume");
        let list = ok(d, &["volume", "snapshot", "list", "v"]);
        if taken {
            assert!(list.contains("v@s1"), "{point}: {list}");
            assert_eq!(contents(d, "v@s1"), want, "{point}: the snapshot");
        } else {
            assert!(list.contains("no snapshots"), "{point}: {list}");
            ok(d, &["volume", "snapshot", "v@s1"]);
            assert_eq!(contents(d, "v@s1"), want, "{point}: the retried snapshot");
        }
        check_clean(d);
    }
}

fn exited(srv: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = srv.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "serve still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_online_snapshot_survives_power_loss() {
    let Some((mnt, work, mounted)) = power_loss_fs("an_online_snapshot_survives_power_loss") else {
        return;
    };
    let fs = &mounted.fs;
    let mut rng = rand::thread_rng();
    let d = &mnt.path().join("data");
    let w = work.path();
    let mut want = setup(d, w);
    let ctl = w.join("ctl.sock");
    let fua = cryptnbd::nbd::consts::CMD_FLAG_FUA;

    // Interrupted (the server dies after linking the snapshot), then the plug pulled: no
    // snapshot, and every write made durable (FUA) before it is there.
    let mut srv = serve_crashing_at(d, w, Some("snapshot-linked"));
    let mut c = RawClient::unix(&w.join("nbd.sock"));
    c.connect_export("v", true);
    assert_eq!(c.write(1, 7 << 20, &[0xEE; 65536], fua).error(), 0);
    want[7 * MIB..7 * MIB + 65536].fill(0xEE);
    let o = cmd(d)
        .args(["ctl", "--ctl", ctl.to_str().unwrap(), "snapshot", "v@s1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    exited(&mut srv);
    fs.power_loss_torn(&mut rng);
    assert_eq!(contents_via(d, w, "v"), want, "interrupted: the volume");
    assert!(ok(d, &["volume", "snapshot", "list", "v"]).contains("no snapshots"));
    check_clean(d);

    // Completed, then more durable writes, then the plug pulled: the snapshot holds what was
    // written before it, the volume everything.
    let _ = std::fs::remove_file(w.join("nbd.sock"));
    let _ = std::fs::remove_file(&ctl);
    let mut srv = serve_crashing_at(d, w, None);
    let mut c = RawClient::unix(&w.join("nbd.sock"));
    c.connect_export("v", true);
    let o = cmd(d)
        .args(["ctl", "--ctl", ctl.to_str().unwrap(), "snapshot", "v@s1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let snap = want.clone();
    assert_eq!(c.write(2, 6 << 20, &[0xDD; 65536], fua).error(), 0);
    want[6 * MIB..6 * MIB + 65536].fill(0xDD);
    let _ = srv.kill();
    exited(&mut srv);
    fs.power_loss_torn(&mut rng);
    assert_eq!(
        contents_via(d, w, "v@s1"),
        snap,
        "the snapshot after a power loss"
    );
    assert_eq!(
        contents_via(d, w, "v"),
        want,
        "the volume after a power loss"
    );
    check_clean(d);
}
