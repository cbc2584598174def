//! An export used as a real Linux block device. The kernel here has no `nbd` module, so the path
//! is `nbdfuse` (export → a file in a FUSE mount) + `losetup` (file → /dev/loopN): `mkfs.ext4`,
//! mount, write files, unmount, detach, stop the server, start it again, attach again, the files
//! are intact and `fsck.ext4 -fn` is clean.
//!
//! Needs root, /dev/fuse and loop devices. Where the machine lacks them (an unprivileged
//! container), the test is skipped with the exact reason, also in CI: that is an environment
//! limit, not a missing tool.

use crate::clients_common;

use std::process::Command;

use clients_common::blockdev::{environment_limit, Attached};
use clients_common::{
    have_tools, pseudo_random, run_bounded, run_ok, skip_environment, DataDir, Server, MIB,
    TOOL_TIMEOUT,
};

fn sample_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("hello.txt".into(), b"cryptnbd on a loop device\n".to_vec()),
        (
            "random-3M.bin".into(),
            pseudo_random(3 * MIB as usize + 17, 42),
        ),
        ("sub/dir/nested.bin".into(), pseudo_random(123_457, 7)),
    ]
}

fn ext4_survives_server_restart(test: &str, sector: u32) {
    if !have_tools(
        test,
        &[
            "nbdfuse",
            "fusermount3",
            "losetup",
            "mkfs.ext4",
            "fsck.ext4",
            "mount",
            "umount",
            "grep",
        ],
    ) {
        return;
    }
    if let Some(why) = environment_limit() {
        skip_environment(test, &why);
        return;
    }
    // One attachment at a time: two tests setting up FUSE mounts, loop devices and ext4 mounts
    // at once have been seen to keep each other's mounts busy.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = DataDir::new();
    d.create_volume("disk0", 256 * MIB, sector);
    let files = sample_files();

    // First attach: make a file system and fill it.
    let srv: Server = d.serve(&["disk0"]);
    let mut a = Attached::new(d.path(), &srv.uri("disk0"), Some(sector));
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "cryptnbd"])
            .arg(a.dev()),
    );
    a.mount();
    for (name, data) in &files {
        let p = a.fs_dir.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir in ext4");
        std::fs::write(&p, data).expect("write file on ext4");
    }
    run_ok(&mut Command::new("sync"));
    a.detach();
    srv.stop();

    // Second attach, after a full server restart (the DEK is unwrapped again).
    let srv = d.serve(&["disk0"]);
    let mut a = Attached::new(d.path(), &srv.uri("disk0"), Some(sector));
    let fsck = run_bounded(
        Command::new("fsck.ext4").arg("-fn").arg(a.dev()),
        TOOL_TIMEOUT,
    );
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn is not clean after the restart:\n{}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    a.mount();
    for (name, data) in &files {
        let back = std::fs::read(a.fs_dir.join(name)).expect("read file back from ext4");
        assert!(
            back == *data,
            "{name} changed across detach and server restart"
        );
    }
    a.detach();
    srv.stop();

    // The file system went to disk encrypted: a file's text is not in the clear. (grep, because a
    // byte-by-byte scan of 257 MiB in a debug build takes many seconds.)
    let found = run_bounded(
        Command::new("grep")
            .args(["-q", "-a", "-F", "cryptnbd on a loop device"])
            .arg(d.volume_path("disk0")),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        found.status.code(),
        Some(1),
        "grep should find no plaintext file content in the volume file (exit 0 = found)"
    );
}

#[test]
fn blockdev_ext4_on_nbdfuse_loop_survives_server_restart() {
    ext4_survives_server_restart(
        "blockdev_ext4_on_nbdfuse_loop_survives_server_restart",
        4096,
    );
}

/// The kernel's usual 512-byte logical blocks, on a volume with 512-byte encryption sectors.
#[test]
fn blockdev_ext4_512_byte_sectors_survives_server_restart() {
    ext4_survives_server_restart(
        "blockdev_ext4_512_byte_sectors_survives_server_restart",
        512,
    );
}
