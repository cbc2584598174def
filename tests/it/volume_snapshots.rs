//! Snapshots, clones, flatten and copy of file volumes in a data directory: a snapshot is a
//! point-in-time, read-only image served by the server as export `NAME@SNAP` (qemu-io reads it,
//! cannot write it); a clone under another CMK needs both keys until it is flattened; deleting a
//! snapshot merges it into the volume and is refused while clones depend on it; copy
//! re-encrypts under a new DEK and keeps holes; an attached volume's snapshot is refused
//! clearly; `check` reports a missing parent and an interrupted snapshot, which the next attach
//! undoes.

use crate::common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::keys::KeyFixture;
use common::{require_tool, run_bounded, TestServer};
use cryptnbd::datadir::{DataDir, DataDirError};
use cryptnbd::exports::{DataDirProvider, ExportSelection};
use cryptnbd::kms::KeyProvider;
use cryptnbd::volume::Volume;

const SIZE: u64 = 8 << 20;
const MIB: usize = 1 << 20;
const QEMU_IO: &str = "/usr/bin/qemu-io";

/// A store with keys `alias/a` and `alias/b`, volume `vol` (under a) holding 0xA1 over its
/// first MiB and 0x5C over its fourth.
fn setup() -> KeyFixture {
    let f = KeyFixture::new().with_key("alias/a").with_key("alias/b");
    f.volume("vol", SIZE, "alias/a");
    let v = f.dd.attach(f.keys(), "vol", false).unwrap();
    v.write(0, &mut vec![0xA1; MIB], false).unwrap();
    v.write(3 << 20, &mut vec![0x5C; MIB], true).unwrap();
    f
}

fn read(v: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read(off, &mut b).unwrap();
    b
}

fn attach(dd: &DataDir, keys: &dyn KeyProvider, name: &str) -> Volume {
    dd.attach(keys, name, false).unwrap()
}

#[test]
fn a_snapshot_is_point_in_time_and_served_read_only() {
    let f = setup();
    f.dd.snapshot("vol@s1").unwrap();
    let v = attach(&f.dd, f.keys(), "vol");
    v.write(0, &mut vec![0xB2; 65536], false).unwrap();
    v.write_zeroes(3 << 20, 65536, true, true).unwrap();
    drop(v);
    let snaps = f.dd.snapshots("vol").unwrap();
    assert_eq!(snaps.len(), 1);
    // A layered volume cannot be resized (flatten first), a snapshot not changed at all.
    let e = f.dd.resize("vol", 2 * SIZE).unwrap_err();
    assert!(e.to_string().contains("flatten"), "{e}");
    assert!(f.dd.rekey(f.keys(), "vol@s1", None).is_err());
    assert_eq!(snaps[0].name, "vol@s1");
    if !require_tool(QEMU_IO) {
        return;
    }
    let ks = f.reopen();
    let p = Arc::new(DataDirProvider::new(
        f.dd.clone(),
        ks,
        ExportSelection::default(),
    ));
    let srv = TestServer::start(p);
    let qemu_io = |export: &str, args: &[&str]| {
        let uri = srv.uri(export);
        let mut c = Command::new(QEMU_IO);
        c.args(["-f", "raw"]).args(args).arg(&uri);
        run_bounded(&mut c, Duration::from_secs(30))
    };
    // The snapshot: as it was when taken.
    let (ok, out, err) = qemu_io(
        "vol@s1",
        &[
            "-r",
            "-c",
            "read -P 0xa1 0 1M",
            "-c",
            "read -P 0x5c 3M 1M",
            "-c",
            "read -P 0 1M 2M",
        ],
    );
    assert!(
        ok && !out.contains("fail") && !out.contains("Pattern verification"),
        "{out}{err}"
    );
    // Read-only: qemu cannot open it for writing.
    let (ok, out, err) = qemu_io("vol@s1", &["-c", "write -P 1 0 4k"]);
    assert!(
        !ok || out.contains("denied") || err.contains("only"),
        "{out}{err}"
    );
    // The volume: its own writes over the snapshot's data.
    let (ok, out, err) = qemu_io(
        "vol",
        &[
            "-r",
            "-c",
            "read -P 0xb2 0 64k",
            "-c",
            "read -P 0xa1 64k 960k",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "read -P 0x5c 3136k 960k",
        ],
    );
    assert!(ok && !out.contains("Pattern verification"), "{out}{err}");
    srv.stop().unwrap();
}

#[test]
fn a_clone_under_another_key_needs_both_keys_until_flattened() {
    let f = setup();
    f.dd.snapshot("vol@s1").unwrap();
    let h =
        f.dd.clone_volume(f.keys(), "vol@s1", "c", Some("alias/b"))
            .unwrap();
    let b_id = f.ks.describe_key("alias/b").unwrap().key_id;
    assert_eq!(h.key_id, b_id);
    let c = attach(&f.dd, f.keys(), "c");
    c.write(4096, &mut vec![0xC3; 4096], true).unwrap();
    assert_eq!(read(&c, 0, 4096), vec![0xA1; 4096]);
    assert_eq!(read(&c, 4096, 4096), vec![0xC3; 4096]);
    drop(c);
    // The snapshot's key is needed for the shared data.
    f.ks.disable_key("alias/a").unwrap();
    let e = f.dd.attach(f.keys(), "c", false).unwrap_err();
    assert!(matches!(e, DataDirError::Kms { .. }), "{e}");
    f.ks.enable_key("alias/a").unwrap();
    // Deleting the snapshot is refused while the clone depends on it.
    let e = f.dd.delete_snapshot("vol@s1", |_, _| {}).unwrap_err();
    assert!(matches!(e, DataDirError::HasClones { .. }), "{e}");
    assert_eq!(f.dd.snapshots("vol").unwrap()[0].clones, ["c"]);
    let copied = f.dd.flatten(f.keys(), "c", |_, _| {}).unwrap();
    assert_eq!(copied, 2 * MIB as u64 - 4096);
    f.ks.disable_key("alias/a").unwrap();
    let c = attach(&f.dd, f.keys(), "c");
    assert!(c.parent().is_none());
    assert_eq!(read(&c, 0, 4096), vec![0xA1; 4096]);
    assert_eq!(read(&c, 4096, 4096), vec![0xC3; 4096]);
    assert_eq!(read(&c, 3 << 20, MIB), vec![0x5C; MIB]);
    drop(c);
    f.ks.enable_key("alias/a").unwrap();
    f.dd.delete_snapshot("vol@s1", |_, _| {}).unwrap();
    assert!(f.dd.snapshots("vol").unwrap().is_empty());
}

#[test]
fn deleting_snapshots_merges_them_into_the_volume() {
    let f = setup();
    f.dd.snapshot("vol@s1").unwrap();
    attach(&f.dd, f.keys(), "vol")
        .write(MIB as u64, &mut vec![0xD4; 4096], true)
        .unwrap();
    f.dd.snapshot("vol@s2").unwrap();
    let v = attach(&f.dd, f.keys(), "vol");
    v.write(0, &mut vec![0xE5; 4096], true).unwrap();
    // A trim over older data must not bring it back.
    v.trim(MIB as u64, 4096, true).unwrap();
    let before = read(&v, 0, SIZE as usize);
    drop(v);
    // The oldest first (merged into s2), then s2 (merged into the volume).
    f.dd.delete("vol@s1").unwrap();
    assert_eq!(
        read(
            &f.dd.attach(f.keys(), "vol@s2", true).unwrap(),
            MIB as u64,
            4096
        ),
        vec![0xD4; 4096]
    );
    f.dd.delete_snapshot("vol@s2", |_, _| {}).unwrap();
    let v = attach(&f.dd, f.keys(), "vol");
    assert!(v.parent().is_none());
    assert_eq!(read(&v, 0, SIZE as usize), before);
    let r = f.dd.check(Some(&f.ks), &[], false).unwrap();
    let volumes: Vec<_> = r
        .findings
        .iter()
        .filter(|x| x.subject.starts_with("volume"))
        .collect();
    assert!(volumes.is_empty(), "{volumes:?}");
    assert_eq!(r.volumes, ["vol"]);
}

#[test]
fn copy_reencrypts_under_a_new_key_and_keeps_holes() {
    let f = setup();
    f.dd.snapshot("vol@s1").unwrap();
    attach(&f.dd, f.keys(), "vol")
        .write(0, &mut vec![0xF6; 4096], true)
        .unwrap();
    let h =
        f.dd.copy_volume(f.keys(), "vol@s1", "cp", "alias/b", None, |_, _| {})
            .unwrap();
    assert_eq!(h.key_id, f.ks.describe_key("alias/b").unwrap().key_id);
    let cp = attach(&f.dd, f.keys(), "cp");
    assert!(cp.parent().is_none());
    assert_eq!(read(&cp, 0, MIB), vec![0xA1; MIB]);
    assert_eq!(read(&cp, 3 << 20, MIB), vec![0x5C; MIB]);
    let holes: u64 = cp
        .block_status(0, SIZE)
        .unwrap()
        .iter()
        .filter(|e| e.hole)
        .map(|e| e.length)
        .sum();
    assert_eq!(holes, SIZE - 2 * MIB as u64);
    let info = f.dd.info("cp").unwrap();
    assert!(
        info.allocated_bytes <= 3 * MIB as u64,
        "{}",
        info.allocated_bytes
    );
    let raw = std::fs::read(f.dd.volume_path("cp").unwrap()).unwrap();
    assert!(!raw.windows(64).any(|w| w.iter().all(|&b| b == 0xA1)));
}

#[test]
fn an_attached_volume_refuses_an_offline_snapshot_clearly() {
    let f = setup();
    let v = attach(&f.dd, f.keys(), "vol");
    let e = f.dd.snapshot("vol@s1").unwrap_err();
    assert!(matches!(e, DataDirError::SnapshotAttached { .. }), "{e}");
    assert!(e.to_string().contains("cryptnbd serve"), "{e}");
    drop(v);
    assert!(f.dd.snapshots("vol").unwrap().is_empty());
}

#[test]
fn check_reports_a_missing_parent_and_an_interrupted_snapshot() {
    let f = setup();
    f.dd.snapshot("vol@s1").unwrap();
    let vdir = f.dd.volumes_dir();
    // A crash between linking the snapshot and renaming the new head leaves two names for
    // the head file: reported, not listed, and undone by the next attach.
    std::fs::hard_link(vdir.join("vol.vol"), vdir.join("vol@s2.vol")).unwrap();
    assert_eq!(f.dd.snapshots("vol").unwrap().len(), 1);
    let r = f.dd.check(Some(&f.ks), &["vol".into()], false).unwrap();
    assert!(
        r.findings.iter().any(|x| x.message.contains("interrupted")),
        "{:?}",
        r.findings
    );
    drop(attach(&f.dd, f.keys(), "vol"));
    assert!(!vdir.join("vol@s2.vol").exists());
    // A missing parent: attach and check both say so.
    std::fs::rename(vdir.join("vol@s1.vol"), vdir.join("elsewhere")).unwrap();
    let e = f.dd.attach(f.keys(), "vol", false).unwrap_err();
    assert!(matches!(e, DataDirError::MissingParent { .. }), "{e}");
    let r = f.dd.check(Some(&f.ks), &["vol".into()], false).unwrap();
    assert!(
        r.findings
            .iter()
            .any(|x| x.message.contains("vol@s1 is missing")),
        "{:?}",
        r.findings
    );
}

#[test]
fn a_snapshot_beyond_the_chain_depth_limit_is_refused() {
    let f = setup();
    for i in 0..64 {
        f.dd.snapshot(&format!("vol@d{i}")).unwrap();
    }
    let e = f.dd.snapshot("vol@d64").unwrap_err();
    assert!(e.to_string().contains("layers"), "{e}");
    // The volume, 64 layers deep, still attaches and reads through them all.
    let v = attach(&f.dd, f.keys(), "vol");
    assert_eq!(read(&v, 0, 4096), vec![0xA1; 4096]);
}
