//! `cryptnbd check`: a healthy data directory passes (exit 0); a damaged header copy, a key
//! reference to a missing version, tampered key material and a loose root.key mode are reported in
//! plain words with exit 1; a disabled CMK is a warning; nothing is changed without `--repair`,
//! and `--repair` rewrites only the damaged header copy from the good one.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use cryptnbd::backend::FileBackend;
use cryptnbd::datadir::{CreateOptions, DataDir};
use cryptnbd::kms::{store, InitRoot, KeyStore};
use cryptnbd::volume::header::BACKUP_OFFSET;
use cryptnbd::volume::VolumeHeader;

/// The data directory inside a temporary directory (removed on drop).
struct Data(std::path::PathBuf, tempfile::TempDir);

impl Data {
    fn path(&self) -> &Path {
        debug_assert!(self.0.starts_with(self.1.path()));
        &self.0
    }
}

fn check(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .arg("--data-dir")
        .arg(dir)
        .arg("check")
        .args(args)
        .env_remove("CRYPTNBD_PASSPHRASE")
        .output()
        .expect("run cryptnbd check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text)
}

/// A data directory as `kms init` makes it (0700), with volumes a and b.
fn setup() -> (Data, KeyStore, DataDir) {
    let t = tempfile::tempdir().unwrap();
    let data = Data(t.path().join("data"), t);
    let ks = KeyStore::init(data.path(), InitRoot::GenerateKeyFile).unwrap();
    ks.create_key("alias/default", "test").unwrap();
    let dd = DataDir::new(data.path());
    for n in ["a", "b"] {
        dd.create_volume(&ks, n, 1 << 20, "alias/default", CreateOptions::default())
            .unwrap();
    }
    (data, ks, dd)
}

#[test]
fn a_healthy_data_dir_passes() {
    let (t, _ks, _dd) = setup();
    let (code, out) = check(t.path(), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 volume(s): no problems"), "{out}");
    let (code, out) = check(t.path(), &["a", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["volumes"], serde_json::json!(["a"]));
}

#[test]
fn a_damaged_header_copy_is_reported_and_only_repair_rewrites_it() {
    let (t, _ks, dd) = setup();
    let path = dd.volume_path("a").unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[BACKUP_OFFSET as usize + 50] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();

    let (code, out) = check(t.path(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PROBLEM: volume a: the backup header copy is damaged")
            && out.contains("the primary copy is good")
            && out.contains("--repair"),
        "{out}"
    );
    assert!(!out.contains("volume b"), "{out}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "check changed the file"
    );

    let (code, out) = check(t.path(), &["a", "--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("repaired: volume a"), "{out}");
    let [p, b] = VolumeHeader::read_copies(&FileBackend::open(&path, true).unwrap()).unwrap();
    assert_eq!(p.unwrap(), b.unwrap());
    let (code, out) = check(t.path(), &[]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn key_problems_are_named() {
    let (t, ks, dd) = setup();
    // Volume b names a version its CMK does not have.
    let path = dd.volume_path("b").unwrap();
    let backend = FileBackend::open(&path, false).unwrap();
    let mut h = VolumeHeader::read_from(&backend).unwrap();
    h.key_version = 9;
    h.write_update(&backend).unwrap();
    drop(backend);
    let (code, out) = check(t.path(), &["--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let findings = v["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["subject"] == "volume b"
            && f["severity"] == "problem"
            && f["message"].as_str().unwrap().contains("version 9")
            && f["message"].as_str().unwrap().contains("only 1 version")),
        "{out}"
    );

    // A disabled key is a warning, not a failure.
    dd.delete("b").unwrap();
    ks.disable_key("alias/default").unwrap();
    let (code, out) = check(t.path(), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: volume a:") && out.contains("is disabled"),
        "{out}"
    );

    // Tampered key material in the store.
    let mut file = store::load(t.path()).unwrap();
    let m = &mut file.keys[0].versions[0].material;
    let last = if m.ends_with('0') { "1" } else { "0" };
    m.replace_range(m.len() - 1.., last);
    store::save(t.path(), &file).unwrap();
    let (code, out) = check(t.path(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PROBLEM: key store:") && out.contains("does not open under the root key"),
        "{out}"
    );
}

#[test]
fn a_root_key_others_can_read_is_a_problem() {
    let (t, _ks, _dd) = setup();
    let rk = t.path().join("root.key");
    std::fs::set_permissions(&rk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = check(t.path(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("root key file") && out.contains("0644"),
        "{out}"
    );
}
