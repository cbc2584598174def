//! An RBD volume as a real Linux block device across a gateway switch (feature `rbd`, real
//! cluster): `nbdfuse` + `losetup` turn gateway 1's export into /dev/loopN; `mkfs.ext4`, files
//! written, everything detached, gateway 1 stopped; then gateway 2 (another data directory with
//! the same key store, as on another host) serves the same image: `fsck.ext4 -fn` is clean and
//! the files read back intact. The image holds no plaintext of the files.
//!
//! The attach helper is `clients_common::blockdev`, shared with `clients_blockdev.rs`.
#![cfg(feature = "rbd")]

use crate::clients_common;
use crate::rbd_common;

use std::process::Command;

use clients_common::blockdev::{environment_limit, Attached};
use clients_common::{
    have_tools, pseudo_random, run_bounded, run_ok, skip_environment, DataDir, MIB, TOOL_TIMEOUT,
};
use rbd_common::{ceph_conf, create_rbd_volume, export_image, second_host, unique_image, Gateway};

#[test]
fn rbd_ext4_on_nbdfuse_loop_survives_gateway_switch() {
    let test = "rbd_ext4_on_nbdfuse_loop_survives_gateway_switch";
    let tools = [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
        "rbd",
    ];
    if !have_tools(test, &tools) {
        return;
    }
    if let Some(why) = environment_limit() {
        skip_environment(test, &why);
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let image = unique_image("ext4");
    let _guard = create_rbd_volume(&d, &conf, "disk0", &image, 128 * MIB, 4096);
    let host2 = second_host(&d);
    let files: Vec<(String, Vec<u8>)> = vec![
        (
            "hello.txt".into(),
            b"cryptnbd on rbd on a loop device\n".repeat(200),
        ),
        (
            "dir/random.bin".into(),
            pseudo_random(3 * MIB as usize + 123, 5),
        ),
    ];

    let gw1 = Gateway::start(d.path(), &[]);
    let mut a = Attached::new(d.path(), &gw1.uri("disk0"), Some(4096));
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(a.dev()));
    a.mount();
    for (name, data) in &files {
        let p = a.fs_dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
    run_ok(&mut Command::new("sync"));
    a.detach();
    gw1.stop();

    let gw2 = Gateway::start(host2.path(), &[]);
    let mut a = Attached::new(host2.path(), &gw2.uri("disk0"), Some(4096));
    let fsck = run_bounded(
        Command::new("fsck.ext4").arg("-fn").arg(a.dev()),
        TOOL_TIMEOUT,
    );
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn not clean on gateway 2:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    a.mount();
    for (name, data) in &files {
        let back = std::fs::read(a.fs_dir.join(name)).expect("read back");
        assert!(back == *data, "{name} changed across the gateway switch");
    }
    a.detach();
    gw2.stop();

    let raw = d.path().join("raw.img");
    export_image(&conf, &image, &raw);
    let found = run_bounded(
        Command::new("grep")
            .args(["-q", "-a", "-F", "cryptnbd on rbd on a loop device"])
            .arg(&raw),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        found.status.code(),
        Some(1),
        "plaintext file content found in the RBD image"
    );
}
