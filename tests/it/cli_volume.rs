//! `cryptnbd volume …` through the real binary (assert_cmd): create, list, info (text and JSON),
//! resize, rekey, delete, import and export; and recovering a volume's data by hand from
//! `volume info --json` + `kms decrypt-datakey` + an independent AES-XTS implementation.

use std::path::Path;

use aes::cipher::KeyInit;
use aes::Aes256;
use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn cmd(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("cryptnbd").unwrap();
    c.arg("--data-dir")
        .arg(dir)
        .env_remove("CRYPTNBD_PASSPHRASE")
        .env_remove("CRYPTNBD_DATA_DIR");
    c.timeout(std::time::Duration::from_secs(60));
    c
}

fn run_ok(dir: &Path, args: &[&str]) -> String {
    let out = cmd(dir)
        .args(args)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap()
}

fn json(dir: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&run_ok(dir, args)).unwrap()
}

fn setup() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    run_ok(t.path(), &["kms", "init"]);
    run_ok(
        t.path(),
        &[
            "kms",
            "create-key",
            "--alias",
            "vol",
            "--description",
            "volumes",
        ],
    );
    t
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 4)
        .collect()
}

#[test]
fn cli_create_list_info_json() {
    let t = setup();
    let d = t.path();
    let out = run_ok(
        d,
        &[
            "volume",
            "create",
            "disk0",
            "--size",
            "64M",
            "--key",
            "alias/vol",
        ],
    );
    assert!(out.contains("created volume disk0"), "{out}");
    run_ok(
        d,
        &[
            "volume",
            "create",
            "small",
            "--size",
            "1M",
            "--key",
            "vol",
            "--sector-size",
            "512",
            "--no-discard",
        ],
    );
    let list = run_ok(d, &["volume", "list"]);
    assert!(list.contains("disk0") && list.contains("small"), "{list}");
    let lj = json(d, &["volume", "list", "--json"]);
    assert_eq!(lj.as_array().unwrap().len(), 2);
    let info = json(d, &["volume", "info", "disk0", "--json"]);
    assert_eq!(info["size"], 64 * MIB);
    assert_eq!(info["sector_size"], 4096);
    assert_eq!(info["key_version"], 1);
    assert!(info["allocated_bytes"].as_u64().unwrap() < 4 * MIB);
    assert_eq!(info["encryption_context"]["volume_id"], info["volume_id"]);
    assert!(info["cipher_text"].as_str().unwrap().len() > 128);
    let small = json(d, &["volume", "info", "small", "--json"]);
    assert_eq!(
        (small["sector_size"].as_u64(), small["discard"].as_bool()),
        (Some(512), Some(false))
    );
    let text = run_ok(d, &["volume", "info", "disk0"]);
    for f in [
        "key_id:",
        "key_version:",
        "cipher_text:",
        "encryption_context:",
        "allocated_bytes:",
    ] {
        assert!(text.contains(f), "{f} missing in {text}");
    }
    let mode = std::fs::metadata(d.join("volumes/disk0.vol")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    cmd(d)
        .args(["volume", "create", "disk0", "--size", "1M", "--key", "vol"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("already exists"));
    cmd(d)
        .args(["volume", "create", "bad", "--size", "1M", "--key", "nokey"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("not found"));
    cmd(d)
        .args(["volume", "create", "odd", "--size", "1000", "--key", "vol"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("multiple"));
}

#[test]
fn cli_import_export_round_trip_and_manual_recovery_with_kms_decrypt_datakey() {
    use xts_mode::{get_tweak_default, Xts128};
    let t = setup();
    let d = t.path();
    let img = d.join("in.raw");
    let data = pattern(3 * MIB as usize + 1000, 8);
    {
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(8 * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&data, 2 * MIB).unwrap();
    }
    run_ok(
        d,
        &[
            "volume",
            "import",
            "vm",
            "--from",
            img.to_str().unwrap(),
            "--key",
            "vol",
        ],
    );
    let out = d.join("out.raw");
    run_ok(
        d,
        &["volume", "export", "vm", "--to", out.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    use std::os::unix::fs::MetadataExt;
    assert!(
        std::fs::metadata(&out).unwrap().blocks() * 512 < 6 * MIB,
        "export is sparse"
    );

    // By hand: header fields -> kms decrypt-datakey -> xts-mode over the data area.
    let info = json(d, &["volume", "info", "vm", "--json"]);
    let ctx = format!("volume_id={}", info["volume_id"].as_str().unwrap());
    let dk = json(
        d,
        &[
            "kms",
            "decrypt-datakey",
            info["key_id"].as_str().unwrap(),
            "--cipher-text",
            info["cipher_text"].as_str().unwrap(),
            "--context",
            &ctx,
            "--json",
        ],
    );
    let key = hex::decode(dk["plain_text"].as_str().unwrap()).unwrap();
    assert_eq!(key.len(), 64);
    let oracle = Xts128::new(Aes256::new(key[..32].into()), Aes256::new(key[32..].into()));
    let file = std::fs::read(d.join("volumes/vm.vol")).unwrap();
    let mut area = file[MIB as usize..].to_vec();
    assert_eq!(area.len() as u64, 8 * MIB);
    for (i, s) in area.chunks_exact_mut(4096).enumerate() {
        if s.iter().any(|&b| b != 0) {
            oracle.decrypt_sector(s, get_tweak_default((i * 8) as u128));
        }
    }
    assert_eq!(
        &area[2 * MIB as usize..2 * MIB as usize + data.len()],
        &data[..]
    );
    assert!(area[..2 * MIB as usize].iter().all(|&b| b == 0));

    cmd(d)
        .args(["volume", "export", "vm", "--to", out.to_str().unwrap()])
        .assert()
        .failure()
        .stderr(predicate::str::contains("exists"));
}

#[test]
fn cli_resize_grows_and_refuses_shrink() {
    let t = setup();
    let d = t.path();
    run_ok(
        d,
        &["volume", "create", "v", "--size", "4M", "--key", "vol"],
    );
    run_ok(d, &["volume", "resize", "v", "--size", "16M"]);
    assert_eq!(
        json(d, &["volume", "info", "v", "--json"])["size"],
        16 * MIB
    );
    cmd(d)
        .args(["volume", "resize", "v", "--size", "8M"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("cannot shrink"));
}

#[test]
fn cli_rekey_after_rotation_and_to_another_key() {
    let t = setup();
    let d = t.path();
    run_ok(
        d,
        &["volume", "create", "v", "--size", "4M", "--key", "vol"],
    );
    let before = json(d, &["volume", "info", "v", "--json"]);
    run_ok(d, &["kms", "rotate-key", "vol"]);
    run_ok(d, &["volume", "rekey", "v"]);
    let after = json(d, &["volume", "info", "v", "--json"]);
    assert_eq!(after["key_version"], 2);
    assert_eq!(after["key_id"], before["key_id"]);
    assert_ne!(after["cipher_text"], before["cipher_text"]);
    run_ok(d, &["kms", "create-key", "--alias", "other"]);
    run_ok(d, &["volume", "rekey", "v", "--key", "alias/other"]);
    let other = json(d, &["volume", "info", "v", "--json"]);
    assert_ne!(other["key_id"], before["key_id"]);
    // The volume now attaches under the other key even with the first one disabled.
    run_ok(d, &["kms", "disable-key", "vol"]);
    run_ok(
        d,
        &[
            "volume",
            "export",
            "v",
            "--to",
            d.join("e.raw").to_str().unwrap(),
        ],
    );
    // And refuses when its key is disabled, naming the volume and the reason.
    run_ok(d, &["kms", "disable-key", "other"]);
    cmd(d)
        .args([
            "volume",
            "export",
            "v",
            "--to",
            d.join("f.raw").to_str().unwrap(),
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("\"v\"").and(predicate::str::contains("disabled")));
    assert!(!d.join("f.raw").exists());
}

#[test]
fn cli_delete_needs_confirmation() {
    let t = setup();
    let d = t.path();
    run_ok(
        d,
        &["volume", "create", "v", "--size", "1M", "--key", "vol"],
    );
    cmd(d)
        .args(["volume", "delete", "v"])
        .write_stdin("")
        .assert()
        .failure()
        .stderr(predicate::str::contains("--yes"));
    assert!(d.join("volumes/v.vol").exists());
    run_ok(d, &["volume", "delete", "v", "--yes"]);
    assert!(!d.join("volumes/v.vol").exists());
    assert!(run_ok(d, &["volume", "list"]).contains("no volumes"));
    cmd(d)
        .args(["volume", "info", "v"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("does not exist"));
    cmd(d)
        .args(["volume", "info", "../x"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("invalid volume name"));
}
