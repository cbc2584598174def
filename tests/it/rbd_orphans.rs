//! Crash safety of the two-step RBD volume commands on a real Ceph cluster (feature `rbd`): the
//! debug build's failpoints (`CRYPTNBD_FAILPOINT`) abort `volume create`, `import` and `delete`
//! between their steps, as a crash would. Then the next create/delete or `cryptnbd check
//! --repair` completes or rolls back the operation from its intent record: an orphan image whose
//! header proves it ours is removed, an image that cannot be proven ours is reported and left
//! alone, a half-done delete is finished, a delete that had not started keeps the volume.
#![cfg(feature = "rbd")]

use crate::clients_common;
use crate::rbd_common;

use std::path::Path;

use clients_common::{have_tools, DataDir, KEY_ALIAS, MIB};
use rbd_common::{
    ceph_conf, crash_at, create_rbd_volume, cryptnbd, rbd, text, unique_image, ImageGuard, POOL,
};

fn image_exists(conf: &Path, image: &str) -> bool {
    rbd(conf, &["info", &format!("{POOL}/{image}")])
        .status
        .success()
}

fn create_args<'a>(name: &'a str, backend: &'a str, conf: &'a Path) -> Vec<&'a str> {
    vec![
        "volume",
        "create",
        name,
        "--size",
        "4M",
        "--key",
        KEY_ALIAS,
        "--backend",
        backend,
        "--ceph-conf",
        conf.to_str().unwrap(),
    ]
}

fn intent_files(d: &DataDir) -> Vec<String> {
    std::fs::read_dir(d.path().join("volumes"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".rbd-intent"))
                .collect()
        })
        .unwrap_or_default()
}

/// `check` (must fail, naming `want`), then `check --repair` (must succeed, naming `want`).
fn check_then_repair(d: &DataDir, want: &str) -> String {
    let o = cryptnbd(d, None, &["check"]);
    assert!(!o.status.success(), "check should report: {}", text(&o));
    assert!(text(&o).contains(want), "check: {}", text(&o));
    assert!(text(&o).contains("--repair"), "check: {}", text(&o));
    let o = cryptnbd(d, None, &["check", "--repair"]);
    assert!(o.status.success(), "check --repair: {}", text(&o));
    assert!(text(&o).contains(want), "check --repair: {}", text(&o));
    assert!(intent_files(d).is_empty(), "{:?}", intent_files(d));
    text(&o)
}

/// A create that crashes after formatting the image (before the reference): the volume does not
/// exist, `check` reports the image as a proven orphan and `--repair` removes it. A crash between
/// making and formatting the image leaves an image nobody can prove is ours: reported, kept.
#[test]
fn rbd_interrupted_create_leaves_no_orphan() {
    let test = "rbd_interrupted_create_leaves_no_orphan";
    if !have_tools(test, &["rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();

    let image = unique_image("orphan");
    let _g = ImageGuard {
        conf: conf.clone(),
        image: image.clone(),
    };
    let backend = format!("rbd:{POOL}/{image}");
    crash_at(
        &d,
        "rbd-create-after-format",
        &create_args("o1", &backend, &conf),
    );
    assert!(image_exists(&conf, &image), "the crash left the image");
    assert!(!d.cli(&["volume", "list"]).contains("o1"));
    let out = check_then_repair(&d, "orphan of ours");
    assert!(out.contains("repaired"), "{out}");
    assert!(!image_exists(&conf, &image), "--repair removed the orphan");
    assert!(cryptnbd(&d, None, &["check"]).status.success());

    // Crash between making the image and writing its header: not provably ours.
    let image2 = unique_image("orphan-raw");
    let _g2 = ImageGuard {
        conf: conf.clone(),
        image: image2.clone(),
    };
    let backend2 = format!("rbd:{POOL}/{image2}");
    crash_at(
        &d,
        "rbd-create-after-image",
        &create_args("o2", &backend2, &conf),
    );
    let o = cryptnbd(&d, None, &["check", "--repair"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("cannot be told")
            && text(&o).contains(&format!("rbd rm {POOL}/{image2}")),
        "{}",
        text(&o)
    );
    assert!(
        image_exists(&conf, &image2),
        "an unproven image is left alone"
    );
    // A new create of that name is refused until the operator decides.
    let o = cryptnbd(&d, None, &create_args("o2", &backend2, &conf));
    assert!(
        !o.status.success() && text(&o).contains("interrupted"),
        "{}",
        text(&o)
    );
    // The operator removes it; the record is then resolved and the name is free again.
    assert!(
        rbd(&conf, &["rm", "--no-progress", &format!("{POOL}/{image2}")])
            .status
            .success()
    );
    check_then_repair(&d, "no image had been made yet");
    d.cli(&create_args("o2", &backend2, &conf));
    d.cli(&["volume", "info", "o2"]);

    // A crash after the reference: the next create finds it completed and drops the record.
    let image3 = unique_image("orphan-done");
    let _g3 = ImageGuard {
        conf: conf.clone(),
        image: image3.clone(),
    };
    let backend3 = format!("rbd:{POOL}/{image3}");
    crash_at(
        &d,
        "rbd-create-after-reference",
        &create_args("o3", &backend3, &conf),
    );
    assert_eq!(intent_files(&d), [".o3.rbd-intent"]);
    d.cli(&["volume", "delete", "o2", "--yes"]);
    assert!(intent_files(&d).is_empty());
    d.cli(&["volume", "info", "o3"]);
    assert!(cryptnbd(&d, None, &["check"]).status.success());
}

/// An import that crashes after formatting, before the data is in: no volume (a server never
/// sees a half-imported one), and the next create removes the proven orphan.
#[test]
fn rbd_interrupted_import_is_rolled_back() {
    let test = "rbd_interrupted_import_is_rolled_back";
    if !have_tools(test, &["rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let src = d.path().join("src.raw");
    std::fs::write(&src, clients_common::pseudo_random(2 * MIB as usize, 3)).unwrap();
    let image = unique_image("import-crash");
    let _g = ImageGuard {
        conf: conf.clone(),
        image: image.clone(),
    };
    let backend = format!("rbd:{POOL}/{image}");
    let import = [
        "volume",
        "import",
        "imp",
        "--from",
        src.to_str().unwrap(),
        "--key",
        KEY_ALIAS,
        "--backend",
        &backend,
        "--ceph-conf",
        conf.to_str().unwrap(),
    ];
    crash_at(&d, "rbd-create-after-format", &import);
    assert!(image_exists(&conf, &image));
    assert!(!d.cli(&["volume", "list"]).contains("imp"));
    // The next create (of another volume) rolls the import back.
    let other = unique_image("import-other");
    let _g2 = create_rbd_volume(&d, &conf, "other", &other, 4 * MIB, 4096);
    assert!(!image_exists(&conf, &image), "the orphan was removed");
    assert!(intent_files(&d).is_empty());
    // And the import can be run again, completely this time.
    d.cli(&import);
    let info = d.volume_info("imp");
    assert_eq!(info["backend"], backend);
}

/// A delete that crashes after removing the image is finished by the next `volume delete`; one
/// that crashes before removing anything keeps the volume (check --repair says so).
#[test]
fn rbd_interrupted_delete_is_completed_or_kept() {
    let test = "rbd_interrupted_delete_is_completed_or_kept";
    if !have_tools(test, &["rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let image = unique_image("delete-crash");
    let _g = create_rbd_volume(&d, &conf, "d1", &image, 4 * MIB, 4096);
    crash_at(
        &d,
        "rbd-delete-after-image",
        &["volume", "delete", "d1", "--yes"],
    );
    assert!(!image_exists(&conf, &image), "the image was removed");
    assert!(
        d.cli(&["volume", "list"]).contains("d1"),
        "the reference is left"
    );
    d.cli(&["volume", "delete", "d1", "--yes"]);
    assert!(!d.cli(&["volume", "list"]).contains("d1"));
    assert!(intent_files(&d).is_empty());

    let image2 = unique_image("delete-early");
    let _g2 = create_rbd_volume(&d, &conf, "d2", &image2, 4 * MIB, 4096);
    crash_at(
        &d,
        "rbd-delete-after-intent",
        &["volume", "delete", "d2", "--yes"],
    );
    check_then_repair(&d, "the volume is kept");
    assert!(image_exists(&conf, &image2));
    d.cli(&["volume", "info", "d2"]);

    // And with check --repair instead of a delete: the half-done delete is finished.
    crash_at(
        &d,
        "rbd-delete-after-image",
        &["volume", "delete", "d2", "--yes"],
    );
    check_then_repair(&d, "finish the delete");
    assert!(!d.cli(&["volume", "list"]).contains("d2"));
}
