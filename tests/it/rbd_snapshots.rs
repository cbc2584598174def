//! Snapshots, clones, flatten and copies of RBD volumes on a real Ceph cluster (feature `rbd`):
//! `volume snapshot NAME@SNAP` is RBD's own snapshot, served read-only to qemu-io; `volume clone`
//! is an RBD clone v2 whose reads of shared data go through librbd to the snapshot, and whose
//! TRIM / WRITE_ZEROES never let the snapshot's data show through; `volume flatten` ends the
//! dependency; `volume copy` moves data file → RBD → file and RBD → RBD with holes kept; kill -9
//! (failpoints) in the middle of a clone, flatten or snapshot leaves a consistent state that
//! `check` describes.
#![cfg(feature = "rbd")]

use crate::clients_common;
use crate::rbd_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clients_common::{allocated_bytes, have_tools, run_bounded, run_ok, DataDir, KEY_ALIAS, MIB};
use rbd_common::{
    ceph_conf, crash_at, create_rbd_volume, cryptnbd, rbd, text, unique_image, Gateway, ImageGuard,
    POOL,
};

/// Removes an image's snapshots, then the image, when dropped (declare clones after parents).
struct SnapGuard(ImageGuard);

impl Drop for SnapGuard {
    fn drop(&mut self) {
        let _ = rbd(
            &self.0.conf,
            &[
                "snap",
                "purge",
                "--no-progress",
                &format!("{POOL}/{}", self.0.image),
            ],
        );
    }
}

fn guard(conf: &Path, image: &str) -> SnapGuard {
    SnapGuard(ImageGuard {
        conf: conf.to_path_buf(),
        image: image.to_string(),
    })
}

/// A command that must fail with a message containing `want`.
fn refused(d: &DataDir, args: &[&str], want: &str) {
    let o = cryptnbd(d, None, args);
    assert!(!o.status.success(), "{args:?} should fail: {}", text(&o));
    assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
}

/// Runs `args` until it succeeds (at most 150 s): after a kill -9 the dead process's watch on
/// the image lingers until the cluster expires it (30 s by default), and until then its
/// exclusive lock counts as held by a live client.
fn until_ok(d: &DataDir, args: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    loop {
        let o = cryptnbd(d, None, args);
        if o.status.success() {
            return text(&o);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{args:?} still fails after 150 s: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    // Snapshots are read-only exports: open them read-only.
    if uri.contains('@') {
        c.arg("-r");
    }
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c);
    assert!(
        !out.contains("verification failed") && !out.contains("failed:"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

fn read_p(pattern: u8, off: u64, len: u64) -> String {
    format!("read -P {pattern:#x} {off} {len}")
}

fn write_p(pattern: u8, off: u64, len: u64) -> String {
    format!("write -P {pattern:#x} {off} {len}")
}

/// Bytes in the image's allocated objects (`rbd diff --whole-object`).
fn rbd_allocated(conf: &Path, image: &str) -> u64 {
    let o = rbd(
        conf,
        &[
            "diff",
            "--whole-object",
            "--format",
            "json",
            &format!("{POOL}/{image}"),
        ],
    );
    assert!(o.status.success(), "rbd diff: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("rbd diff json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|e| e["exists"] == "true" || e["exists"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

fn rbd_snaps(conf: &Path, image: &str) -> Vec<String> {
    let o = rbd(
        conf,
        &["snap", "ls", "--format", "json", &format!("{POOL}/{image}")],
    );
    assert!(o.status.success(), "rbd snap ls: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("rbd snap ls json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn clone_args<'a>(src: &'a str, new: &'a str, backend: &'a str, conf: &'a str) -> Vec<&'a str> {
    vec![
        "volume",
        "clone",
        src,
        new,
        "--backend",
        backend,
        "--ceph-conf",
        conf,
    ]
}

/// The whole life of an RBD snapshot with real clients: snapshot, serve it read-only beside the
/// head, clone it, write/trim/zero the clone (the snapshot's data never shows through again),
/// refuse deleting the snapshot while the clone needs it, flatten, then delete.
#[test]
fn rbd_snapshot_clone_flatten_with_qemu_io() {
    let test = "rbd_snapshot_clone_flatten_with_qemu_io";
    if !have_tools(test, &["qemu-io", "rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let confs = conf.to_str().unwrap();
    let d = DataDir::new();
    let image = unique_image("snap");
    let _g = create_rbd_volume(&d, &conf, "vm", &image, 24 * MIB, 4096);
    let _gs = guard(&conf, &image);

    let gw = Gateway::start(d.path(), &[]);
    qemu_io(
        &gw.uri("vm"),
        &[
            write_p(0xaa, 0, 8 * MIB),
            write_p(0x11, 12 * MIB, 4 * MIB),
            "flush".into(),
        ],
    );
    // While served: RBD's snapshot through the gateway's librbd (it holds the lock), with
    // every write acknowledged before it in, none after.
    d.cli(&["volume", "snapshot", "vm@live"]);
    qemu_io(
        &gw.uri("vm"),
        &[write_p(0x99, 18 * MIB, 64 << 10), "flush".into()],
    );
    qemu_io(
        &gw.uri("vm@live"),
        &[
            read_p(0xaa, 0, 8 * MIB),
            read_p(0x11, 12 * MIB, 4 * MIB),
            read_p(0, 18 * MIB, 64 << 10),
        ],
    );
    gw.stop();
    // A clone of the online snapshot (whose header has no layer id: the volume was never
    // snapshotted offline) works and checks clean.
    let limage = unique_image("liveclone");
    let _gl = guard(&conf, &limage);
    d.cli(&clone_args(
        "vm@live",
        "lc",
        &format!("rbd:{POOL}/{limage}"),
        confs,
    ));
    let o = cryptnbd(&d, None, &["check", "lc"]);
    assert!(o.status.success(), "check: {}", text(&o));
    // The snapshot removed behind cryptnbd's back: librbd keeps it in its trash for the clone,
    // which still reads, and `check` names the problem until the clone is flattened.
    let o = rbd(&conf, &["snap", "rm", &format!("{POOL}/{image}@live")]);
    assert!(o.status.success(), "rbd snap rm: {}", text(&o));
    let o = cryptnbd(&d, None, &["check", "lc"]);
    assert!(
        !o.status.success() && text(&o).contains("trash"),
        "check: {}",
        text(&o)
    );
    let gw = Gateway::start(d.path(), &[]);
    qemu_io(&gw.uri("lc"), &[read_p(0xaa, 0, 8 * MIB)]);
    gw.stop();
    d.cli(&["volume", "flatten", "lc"]);
    let o = cryptnbd(&d, None, &["check", "lc"]);
    assert!(o.status.success(), "check after flatten: {}", text(&o));
    d.cli(&["volume", "delete", "lc", "--yes"]);

    let out = d.cli(&["volume", "snapshot", "vm@s1"]);
    assert!(out.contains("vm@s1"), "{out}");
    assert!(
        rbd_snaps(&conf, &image).contains(&"s1".to_string()),
        "an RBD snapshot"
    );
    refused(&d, &["volume", "snapshot", "vm@s1"], "already exists");

    let cimage = unique_image("snapclone");
    let _gc = guard(&conf, &cimage);
    let backend = format!("rbd:{POOL}/{cimage}");
    d.cli(&clone_args("vm@s1", "c1", &backend, confs));
    let o = rbd(&conf, &["info", &format!("{POOL}/{cimage}")]);
    assert!(
        text(&o).contains(&format!("parent: {POOL}/{image}@s1")),
        "an RBD clone of the snapshot: {}",
        text(&o)
    );
    let info = d.volume_info("c1");
    assert_eq!(info["backend"], format!("rbd:{POOL}/{cimage}"));
    assert_eq!(info["parent"], "vm@s1");
    assert_ne!(info["volume_id"], d.volume_info("vm")["volume_id"]);
    // The RBD clone's (shared) data key wrapped under another CMK.
    d.cli(&["kms", "create-key", "--alias", "other"]);
    let other = d.cli(&["volume", "rekey", "c1", "--key", "alias/other"]);
    assert_ne!(
        d.volume_info("c1")["key_id"],
        d.volume_info("vm")["key_id"],
        "{other}"
    );
    // An unflattened clone can be deleted; the snapshot then no longer lists it.
    let c2image = unique_image("snapclone2");
    let _gc2 = guard(&conf, &c2image);
    d.cli(&clone_args(
        "vm@s1",
        "c2",
        &format!("rbd:{POOL}/{c2image}"),
        confs,
    ));
    d.cli(&["volume", "delete", "c2", "--yes"]);

    let gw = Gateway::start(d.path(), &[]);
    // The head moves on; the snapshot keeps the old data, served read-only beside it.
    qemu_io(&gw.uri("vm"), &[write_p(0xbb, 0, 4 * MIB), "flush".into()]);
    qemu_io(
        &gw.uri("vm@s1"),
        &[
            read_p(0xaa, 0, 8 * MIB),
            read_p(0x11, 12 * MIB, 4 * MIB),
            read_p(0, 20 * MIB, MIB),
        ],
    );
    let o = run_bounded(
        Command::new("qemu-io").args(["-f", "raw", &gw.uri("vm@s1"), "-c", "write 0 4096"]),
        Duration::from_secs(60),
    );
    assert!(
        !o.status.success() || text(&o).contains("failed"),
        "a snapshot must refuse writes: {}",
        text(&o)
    );
    qemu_io(
        &gw.uri("vm"),
        &[read_p(0xbb, 0, 4 * MIB), read_p(0xaa, 4 * MIB, 4 * MIB)],
    );

    // The clone reads the snapshot's data through librbd, and its own writes, trims and
    // zeroes win over the snapshot for good: whole objects and parts of objects.
    let c = gw.uri("c1");
    qemu_io(
        &c,
        &[
            read_p(0xaa, 0, 8 * MIB),
            read_p(0x11, 12 * MIB, 4 * MIB),
            write_p(0xcc, MIB, 64 << 10),
            format!("discard {} {}", 8 * MIB, 8 * MIB),
            format!("write -z {} {}", 2 * MIB, MIB),
            format!("discard {} {}", 5 * MIB, 8192),
            "flush".into(),
        ],
    );
    let expect_clone = [
        read_p(0xaa, 0, MIB),
        read_p(0xcc, MIB, 64 << 10),
        read_p(0xaa, MIB + (64 << 10), MIB - (64 << 10)),
        read_p(0, 2 * MIB, MIB),
        read_p(0xaa, 3 * MIB, 2 * MIB),
        read_p(0, 5 * MIB, 8192),
        read_p(0xaa, 5 * MIB + 8192, 3 * MIB - 8192),
        read_p(0, 8 * MIB, 8 * MIB),
    ];
    qemu_io(&c, &expect_clone);
    qemu_io(
        &gw.uri("vm@s1"),
        &[read_p(0xaa, 0, 8 * MIB), read_p(0x11, 12 * MIB, 4 * MIB)],
    );
    gw.stop();

    let list: serde_json::Value =
        serde_json::from_str(&d.cli(&["volume", "snapshot", "list", "vm", "--json"])).unwrap();
    assert_eq!(list[0]["name"], "vm@s1", "{list}");
    assert_eq!(list[0]["clones"], serde_json::json!(["c1"]), "{list}");
    refused(&d, &["volume", "snapshot", "delete", "vm@s1"], "c1");
    refused(&d, &["volume", "delete", "vm", "--yes"], "snapshots");
    let o = cryptnbd(&d, None, &["check", "c1", "vm", "vm@s1"]);
    assert!(o.status.success(), "check: {}", text(&o));
    let o = cryptnbd(&d, None, &["check", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("check --json");
    assert!(
        o.status.success() && report["volumes"] == serde_json::json!(["c1", "vm", "vm@s1"]),
        "check of everything covers the RBD snapshot: {}",
        text(&o)
    );
    // The parent volume gone from the data directory: check names the missing parent.
    let reference = d.path().join("volumes/vm.rbd");
    let aside = d.path().join("vm.rbd.aside");
    std::fs::rename(&reference, &aside).unwrap();
    let o = cryptnbd(&d, None, &["check", "c1"]);
    assert!(
        !o.status.success() && text(&o).contains("parent layer vm@s1 is missing"),
        "check: {}",
        text(&o)
    );
    std::fs::rename(&aside, &reference).unwrap();

    d.cli(&["volume", "flatten", "c1"]);
    assert!(
        !text(&rbd(&conf, &["info", &format!("{POOL}/{cimage}")])).contains("parent:"),
        "flattened"
    );
    assert_eq!(d.volume_info("c1")["parent"], serde_json::Value::Null);
    d.cli(&["volume", "snapshot", "delete", "vm@s1"]);
    assert!(!rbd_snaps(&conf, &image).contains(&"s1".to_string()));
    let gw = Gateway::start(d.path(), &[]);
    qemu_io(&gw.uri("c1"), &expect_clone);
    qemu_io(&gw.uri("vm"), &[read_p(0xbb, 0, 4 * MIB)]);
    gw.stop();
    d.cli(&["volume", "delete", "c1", "--yes"]);
    d.cli(&["volume", "delete", "vm", "--yes"]);
}

/// `volume copy` between a file volume and RBD, both ways, and RBD → RBD from a snapshot:
/// re-encrypted under new data keys, the data identical, holes still holes.
#[test]
fn rbd_copy_file_to_rbd_and_back_keeps_holes() {
    let test = "rbd_copy_file_to_rbd_and_back_keeps_holes";
    if !have_tools(test, &["qemu-io", "rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let confs = conf.to_str().unwrap();
    let d = DataDir::new();
    d.create_volume("f", 32 * MIB, 4096);
    let gw = Gateway::start(d.path(), &[]);
    let data = [
        write_p(0x5a, 0, MIB),
        write_p(0xa5, 20 * MIB, MIB),
        "flush".into(),
    ];
    qemu_io(&gw.uri("f"), &data);
    gw.stop();
    let check = [
        read_p(0x5a, 0, MIB),
        read_p(0, MIB, 19 * MIB),
        read_p(0xa5, 20 * MIB, MIB),
        read_p(0, 21 * MIB, 11 * MIB),
    ];

    let image = unique_image("copy");
    let _g = guard(&conf, &image);
    let to_rbd = |src: &str, dst: &str, img: &str| {
        d.cli(&[
            "volume",
            "copy",
            src,
            dst,
            "--key",
            KEY_ALIAS,
            "--backend",
            &format!("rbd:{POOL}/{img}"),
            "--ceph-conf",
            confs,
        ])
    };
    to_rbd("f", "r", &image);
    // The header object and the two objects holding data: the rest stayed holes.
    assert_eq!(
        rbd_allocated(&conf, &image),
        8 * MIB,
        "object 0 (header + first data) and object 5"
    );
    assert_ne!(
        d.volume_info("r")["volume_id"],
        d.volume_info("f")["volume_id"]
    );
    assert_ne!(d.unwrap_dek("r"), d.unwrap_dek("f"), "a new data key");

    d.cli(&["volume", "snapshot", "r@s"]);
    d.cli(&["volume", "copy", "r@s", "back", "--key", KEY_ALIAS]);
    let back = d.volume_path("back");
    assert!(
        allocated_bytes(&back) <= 4 * MIB,
        "holes stay holes in the file: {}",
        allocated_bytes(&back)
    );

    let image2 = unique_image("copy2");
    let _g2 = guard(&conf, &image2);
    to_rbd("r@s", "r2", &image2);
    assert_eq!(rbd_allocated(&conf, &image2), 8 * MIB);

    let gw = Gateway::start(d.path(), &[]);
    for v in ["r", "r@s", "back", "r2"] {
        qemu_io(&gw.uri(v), &check);
    }
    gw.stop();
}

/// kill -9 (failpoints) in the middle of RBD snapshot, clone and flatten: nothing half-made is
/// left visible, `check` says what was interrupted, and re-running the command finishes.
#[test]
fn rbd_snapshot_clone_flatten_survive_crashes() {
    let test = "rbd_snapshot_clone_flatten_survive_crashes";
    if !have_tools(test, &["qemu-io", "rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let confs = conf.to_str().unwrap();
    let d = DataDir::new();
    let image = unique_image("snapcrash");
    let _g = create_rbd_volume(&d, &conf, "vm", &image, 16 * MIB, 4096);
    let _gs = guard(&conf, &image);
    let gw = Gateway::start(d.path(), &[]);
    qemu_io(&gw.uri("vm"), &[write_p(0x42, 0, 16 * MIB), "flush".into()]);
    gw.stop();

    // A snapshot interrupted after its header update: no snapshot, the volume intact.
    crash_at(
        &d,
        "rbd-snapshot-after-header",
        &["volume", "snapshot", "vm@s"],
    );
    assert!(
        rbd_snaps(&conf, &image).is_empty(),
        "{:?}",
        rbd_snaps(&conf, &image)
    );
    until_ok(&d, &["volume", "snapshot", "vm@s"]);

    // A clone interrupted after the image was made, and after its header was written: the
    // clone does not exist, check names the half-made image and --repair removes it.
    for point in ["rbd-clone-after-image", "rbd-clone-after-header"] {
        let cimage = unique_image("crashclone");
        let _gc = guard(&conf, &cimage);
        let backend = format!("rbd:{POOL}/{cimage}");
        crash_at(&d, point, &clone_args("vm@s", "c", &backend, confs));
        refused(&d, &["volume", "info", "c"], "does not exist");
        let o = cryptnbd(&d, None, &["check"]);
        assert!(
            !o.status.success() && text(&o).contains("interrupted clone"),
            "{point}: {}",
            text(&o)
        );
        until_ok(&d, &["check", "--repair"]);
        assert!(
            !rbd(&conf, &["info", &format!("{POOL}/{cimage}")])
                .status
                .success(),
            "{point}: removed"
        );
    }

    // A copy onto RBD interrupted half-way: no volume, check --repair removes the image.
    let rimage = unique_image("crashcopy");
    let _gr = guard(&conf, &rimage);
    let rbackend = format!("rbd:{POOL}/{rimage}");
    crash_at(
        &d,
        "copy-half",
        &[
            "volume",
            "copy",
            "vm@s",
            "r",
            "--key",
            KEY_ALIAS,
            "--backend",
            &rbackend,
            "--ceph-conf",
            confs,
        ],
    );
    refused(&d, &["volume", "info", "r"], "does not exist");
    until_ok(&d, &["check", "--repair"]);
    assert!(
        !rbd(&conf, &["info", &format!("{POOL}/{rimage}")])
            .status
            .success(),
        "the half-copied image is removed"
    );

    let cimage = unique_image("crashclone");
    let _gc = guard(&conf, &cimage);
    d.cli(&clone_args(
        "vm@s",
        "c",
        &format!("rbd:{POOL}/{cimage}"),
        confs,
    ));
    // A flatten interrupted after librbd's flatten, before the header forgot its parent.
    crash_at(&d, "rbd-flatten-after-flatten", &["volume", "flatten", "c"]);
    let o = cryptnbd(&d, None, &["check", "c"]);
    assert!(
        text(&o).contains("flatten"),
        "check reports the interrupted flatten: {}",
        text(&o)
    );
    until_ok(&d, &["volume", "flatten", "c"]);
    let o = cryptnbd(&d, None, &["check", "c"]);
    assert!(
        o.status.success() && !text(&o).contains("flatten"),
        "{}",
        text(&o)
    );
    d.cli(&["volume", "snapshot", "delete", "vm@s"]);
    let gw = Gateway::start(d.path(), &[]);
    qemu_io(&gw.uri("c"), &[read_p(0x42, 0, 16 * MIB)]);
    gw.stop();
    d.cli(&["volume", "delete", "c", "--yes"]);
}

/// `volume clone NAME@SNAP NEW --key CMK` on RBD: a new image with its own DEK under another CMK,
/// which cryptnbd layers over the snapshot itself (as a file clone): shared data is read with
/// the snapshot's key (disabling that CMK makes the clone unattachable), the clone's writes,
/// trims and zeroes never let the snapshot's data show through, deleting the snapshot is
/// refused while the clone needs it, and flatten ends the dependency.
#[test]
fn rbd_clone_under_another_key_is_layered_by_cryptnbd() {
    let test = "rbd_clone_under_another_key_is_layered_by_cryptnbd";
    if !have_tools(test, &["qemu-io", "rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let confs = conf.to_str().unwrap();
    let d = DataDir::new();
    let image = unique_image("keysnap");
    let _g = create_rbd_volume(&d, &conf, "vm", &image, 16 * MIB, 4096);
    let _gs = guard(&conf, &image);
    let gw = Gateway::start(d.path(), &[]);
    qemu_io(
        &gw.uri("vm"),
        &[
            write_p(0xaa, 0, 8 * MIB),
            write_p(0x11, 8 * MIB, 8 * MIB),
            "flush".into(),
        ],
    );
    gw.stop();
    d.cli(&["volume", "snapshot", "vm@s"]);
    d.cli(&["kms", "create-key", "--alias", "other"]);

    let cimage = unique_image("keyclone");
    let _gc = guard(&conf, &cimage);
    let backend = format!("rbd:{POOL}/{cimage}");
    let args = [
        &clone_args("vm@s", "c", &backend, confs)[..],
        &["--key", "alias/other"],
    ]
    .concat();
    d.cli(&args);
    let info = d.volume_info("c");
    assert_eq!(info["parent"], "vm@s");
    assert_ne!(info["key_id"], d.volume_info("vm")["key_id"]);
    assert_ne!(d.unwrap_dek("c"), d.unwrap_dek("vm"), "its own data key");
    let o = rbd(&conf, &["info", &format!("{POOL}/{cimage}")]);
    assert!(
        !text(&o).contains("parent:"),
        "not an RBD clone: {}",
        text(&o)
    );

    let gw = Gateway::start(d.path(), &[]);
    let c = gw.uri("c");
    qemu_io(
        &c,
        &[
            read_p(0xaa, 0, 8 * MIB),
            read_p(0x11, 8 * MIB, 8 * MIB),
            write_p(0xcc, MIB, 64 << 10),
            // TRIM is advisory in a layered clone (crate::volume::layer): a trimmed sector the
            // clone wrote keeps the clone's data, never the snapshot's again.
            write_p(0xdd, 8 * MIB, MIB),
            format!("discard {} {}", 8 * MIB, 4 * MIB),
            format!("write -z {} {}", 12 * MIB, 4 * MIB),
            format!("write -z {} {}", 2 * MIB, 8192),
            "flush".into(),
        ],
    );
    let expect = [
        read_p(0xaa, 0, MIB),
        read_p(0xcc, MIB, 64 << 10),
        read_p(0xaa, MIB + (64 << 10), MIB - (64 << 10)),
        read_p(0, 2 * MIB, 8192),
        read_p(0xaa, 2 * MIB + 8192, 6 * MIB - 8192),
        read_p(0xdd, 8 * MIB, MIB),
        read_p(0x11, 9 * MIB, 3 * MIB),
        read_p(0, 12 * MIB, 4 * MIB),
    ];
    qemu_io(&c, &expect);
    qemu_io(
        &gw.uri("vm@s"),
        &[read_p(0xaa, 0, 8 * MIB), read_p(0x11, 8 * MIB, 8 * MIB)],
    );
    gw.stop();

    let o = cryptnbd(&d, None, &["check", "c"]);
    assert!(o.status.success(), "check: {}", text(&o));
    let list: serde_json::Value =
        serde_json::from_str(&d.cli(&["volume", "snapshot", "list", "vm", "--json"])).unwrap();
    assert_eq!(list[0]["clones"], serde_json::json!(["c"]), "{list}");
    refused(&d, &["volume", "snapshot", "delete", "vm@s"], "\"c\"");
    // The shared data needs the snapshot's key: with its CMK disabled the clone cannot attach.
    d.cli(&["kms", "disable-key", KEY_ALIAS]);
    refused(&d, &["volume", "export", "c", "--to", "/dev/null"], "vm@s");
    d.cli(&["kms", "enable-key", KEY_ALIAS]);

    // A snapshot of the layered clone, and a clone of that (layered by cryptnbd too, since
    // librbd does not know the clone's parent): both read through two layers.
    d.cli(&["volume", "snapshot", "c@x"]);
    let dimage = unique_image("keyclone2");
    let _gd = guard(&conf, &dimage);
    d.cli(&clone_args(
        "c@x",
        "d",
        &format!("rbd:{POOL}/{dimage}"),
        confs,
    ));
    assert_eq!(d.volume_info("d")["parent"], "c@x");
    refused(&d, &["volume", "snapshot", "delete", "vm@s"], "c@x");
    let gw = Gateway::start(d.path(), &[]);
    qemu_io(&gw.uri("c@x"), &expect);
    qemu_io(&gw.uri("d"), &expect);
    gw.stop();
    let o = cryptnbd(&d, None, &["check", "d", "c@x"]);
    assert!(o.status.success(), "check: {}", text(&o));
    d.cli(&["volume", "delete", "d", "--yes"]);
    d.cli(&["volume", "snapshot", "delete", "c@x"]);

    // A flatten killed half-way leaves a consistent clone; running it again finishes.
    crash_at(&d, "flatten-half", &["volume", "flatten", "c"]);
    assert_eq!(d.volume_info("c")["parent"], "vm@s");
    until_ok(&d, &["volume", "flatten", "c"]);
    assert_eq!(d.volume_info("c")["parent"], serde_json::Value::Null);
    d.cli(&["volume", "snapshot", "delete", "vm@s"]);
    d.cli(&["kms", "disable-key", KEY_ALIAS]);
    let gw = Gateway::start(d.path(), &[]);
    qemu_io(&gw.uri("c"), &expect);
    gw.stop();
    d.cli(&["kms", "enable-key", KEY_ALIAS]);
    d.cli(&["volume", "delete", "c", "--yes"]);
}
