//! `cryptnbd kms …` through the real binary: the main flows, `--json` field names, and the
//! one-line `error: …` messages with exit code 1.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

struct Env {
    _tmp: tempfile::TempDir,
    data: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        Env { _tmp: tmp, data }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("cryptnbd").unwrap();
        c.env_remove("CRYPTNBD_PASSPHRASE")
            .env_remove("CRYPTNBD_DATA_DIR")
            .env("RUST_LOG", "warn")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("kms");
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self
            .cmd()
            .args(args)
            .assert()
            .success()
            .get_output()
            .clone();
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Runs a command that must fail with exit code 1 and exactly one `error: …` line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).assert().code(1).get_output().clone();
        let err = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<_> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one error line expected, got {err:?}");
        assert!(lines[0].starts_with("error: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        lines[0].to_string()
    }

    fn init(&self) {
        self.ok(&["init"]);
    }
}

fn has_fields(v: &Value, fields: &[&str]) {
    for f in fields {
        assert!(v.get(f).is_some(), "field {f} missing in {v}");
    }
}

#[test]
fn init_create_describe_list() {
    let e = Env::new();
    let out = e.ok(&["init"]);
    assert!(out.contains("created key store"), "{out}");
    assert!(e.data.join("root.key").exists());
    let k = e.json(&["create-key", "--alias", "apps", "--description", "app keys"]);
    has_fields(
        &k,
        &[
            "key_id",
            "key_alias",
            "key_state",
            "key_description",
            "creation_date",
            "scheduled_deletion_date",
        ],
    );
    assert_eq!(k["key_alias"], "alias/apps");
    assert_eq!(k["key_state"], "2");
    assert_eq!(k["key_description"], "app keys");
    let id = k["key_id"].as_str().unwrap().to_string();
    let d = e.json(&["describe-key", &id]);
    assert_eq!(d["key_alias"], "alias/apps");
    let text = e.ok(&["describe-key", "alias/apps"]);
    assert!(
        text.contains("key_state:") && text.contains("2 (enabled)"),
        "{text}"
    );
    let list = e.json(&["list-keys"]);
    assert_eq!(list["keys"][0]["key_id"], id.as_str());
    assert_eq!(list["total"], 1);
    assert!(e.ok(&["list-keys"]).contains("alias/apps"));
}

#[test]
fn datakey_round_trip_and_errors() {
    let e = Env::new();
    e.init();
    e.ok(&["create-key", "--alias", "apps"]);
    let dk = e.json(&[
        "create-datakey",
        "apps",
        "--context",
        "app=billing",
        "--length-bits",
        "512",
    ]);
    has_fields(
        &dk,
        &[
            "key_id",
            "plain_text",
            "cipher_text",
            "encryption_context",
            "key_version",
        ],
    );
    assert_eq!(dk["plain_text"].as_str().unwrap().len(), 128);
    assert_eq!(dk["encryption_context"]["app"], "billing");
    let ct = dk["cipher_text"].as_str().unwrap();
    let un = e.json(&[
        "decrypt-datakey",
        "apps",
        "--cipher-text",
        ct,
        "--context",
        "app=billing",
    ]);
    assert_eq!(un["plain_text"], dk["plain_text"]);

    let err = e.fails(&[
        "decrypt-datakey",
        "apps",
        "--cipher-text",
        ct,
        "--context",
        "app=payroll",
    ]);
    assert!(err.starts_with("error: cannot decrypt data key:"), "{err}");
    let err = e.fails(&["decrypt-datakey", "apps", "--cipher-text", "zz"]);
    assert!(err.contains("not valid hex"), "{err}");
    // A usage error is clap's: exit code 2 and a pointer to --help.
    e.cmd()
        .args(["create-datakey", "apps", "--length-bits", "128"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("256 or 512"));

    let w = e.json(&[
        "encrypt-datakey",
        "apps",
        "--plain-text",
        "00112233445566778899aabbccddeeff",
    ]);
    assert!(w.get("plain_text").is_none());
    let un = e.json(&[
        "decrypt-datakey",
        "apps",
        "--cipher-text",
        w["cipher_text"].as_str().unwrap(),
    ]);
    assert_eq!(un["plain_text"], "00112233445566778899aabbccddeeff");

    let np = e.json(&["create-datakey-without-plaintext", "apps"]);
    assert!(np.get("plain_text").is_none());
    assert!(np["cipher_text"].as_str().unwrap().len() > 64);
}

#[test]
fn rotate_and_re_encrypt() {
    let e = Env::new();
    e.init();
    e.ok(&["create-key", "--alias", "a"]);
    e.ok(&["create-key", "--alias", "b"]);
    let dk = e.json(&["create-datakey", "a", "--context", "v=1"]);
    let ct = dk["cipher_text"].as_str().unwrap();
    let r = e.json(&["rotate-key", "a"]);
    assert_eq!(r["current_version"], 2);
    let same = e.json(&["re-encrypt", "--cipher-text", ct, "--source-context", "v=1"]);
    assert_eq!(same["key_version"], 2);
    assert!(same.get("plain_text").is_none());
    let moved = e.json(&[
        "re-encrypt",
        "--cipher-text",
        ct,
        "--source-context",
        "v=1",
        "--destination-key",
        "b",
        "--destination-context",
        "v=2",
    ]);
    let un = e.json(&[
        "decrypt-datakey",
        "b",
        "--cipher-text",
        moved["cipher_text"].as_str().unwrap(),
        "--context",
        "v=2",
    ]);
    assert_eq!(un["plain_text"], dk["plain_text"]);
    // The old version still decrypts after rotation.
    let un = e.json(&[
        "decrypt-datakey",
        "a",
        "--cipher-text",
        ct,
        "--context",
        "v=1",
    ]);
    assert_eq!(un["key_version"], 1);
    assert_eq!(un["plain_text"], dk["plain_text"]);
    let err = e.fails(&[
        "decrypt-datakey",
        "b",
        "--cipher-text",
        ct,
        "--context",
        "v=1",
    ]);
    assert!(err.contains("cannot decrypt data key"), "{err}");
}

#[test]
fn states_and_their_error_lines() {
    let e = Env::new();
    e.init();
    e.ok(&["create-key", "--alias", "k"]);
    let dk = e.json(&["create-datakey", "k"]);
    let ct = dk["cipher_text"].as_str().unwrap();
    assert_eq!(e.json(&["disable-key", "k"])["key_state"], "3");
    let err = e.fails(&["decrypt-datakey", "k", "--cipher-text", ct]);
    assert!(err.contains("disabled (state 3)"), "{err}");
    assert!(err.contains("enable-key"), "{err}");
    assert_eq!(e.json(&["enable-key", "k"])["key_state"], "2");
    let err = e.fails(&["schedule-key-deletion", "k", "--pending-days", "3"]);
    assert!(err.contains("7 to 1096"), "{err}");
    let s = e.json(&["schedule-key-deletion", "k", "--pending-days", "7"]);
    assert_eq!(s["key_state"], "4");
    assert!(s["scheduled_deletion_date"].as_u64().is_some());
    let err = e.fails(&["create-datakey", "k"]);
    assert!(err.contains("pending deletion (state 4)"), "{err}");
    assert!(err.contains("cancel-key-deletion"), "{err}");
    assert_eq!(e.json(&["cancel-key-deletion", "k"])["key_state"], "3");
    e.ok(&["enable-key", "k"]);
    let u = e.json(&["update-alias", "k", "--alias", "alias/renamed"]);
    assert_eq!(u["key_alias"], "alias/renamed");
    let err = e.fails(&["describe-key", "k"]);
    assert!(err.contains("not found"), "{err}");
    let err = e.fails(&["create-key", "--alias", "renamed"]);
    assert!(err.contains("already used"), "{err}");
    let r = e.json(&["enable-key-rotation", "renamed", "--interval-days", "90"]);
    assert_eq!(r["rotation_interval_days"], 90);
}

#[test]
fn gen_random_and_audit() {
    let e = Env::new();
    e.init();
    let r = e.json(&["gen-random", "--bytes", "24"]);
    assert_eq!(r["random_data"].as_str().unwrap().len(), 48);
    assert_eq!(e.ok(&["gen-random", "--bytes", "8"]).trim().len(), 16);
    e.fails(&["gen-random", "--bytes", "2000"]);
    e.ok(&["create-key", "--alias", "a"]);
    let dk = e.json(&["create-datakey", "a", "--context", "volume_id=vol-1"]);
    e.fails(&["describe-key", "nope"]);
    let out = e.ok(&["audit", "--tail", "2", "--json"]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["operation"], "create-datakey");
    assert_eq!(lines[0]["encryption_context"]["volume_id"], "vol-1");
    assert_eq!(lines[0]["outcome"], "success");
    assert_eq!(lines[1]["operation"], "describe-key");
    assert_eq!(lines[1]["outcome"], "error");
    has_fields(&lines[0], &["time", "key_id", "key_version"]);
    let text = e.ok(&["audit"]);
    assert!(
        text.contains("create-key") && text.contains("gen-random"),
        "{text}"
    );
    let log = std::fs::read_to_string(e.data.join("audit.log")).unwrap();
    assert!(!log.contains(dk["plain_text"].as_str().unwrap()));
    assert!(!log.contains(r["random_data"].as_str().unwrap()));
}

#[test]
fn init_refuses_an_existing_store() {
    let e = Env::new();
    e.init();
    let before = std::fs::read(e.data.join("keystore.json")).unwrap();
    let err = e.fails(&["init"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(e.data.join("keystore.json")).unwrap(), before);
}

#[test]
fn missing_store_says_how_to_create_one() {
    let e = Env::new();
    let err = e.fails(&["list-keys"]);
    assert!(err.contains("no key store in"), "{err}");
    assert!(err.contains("cryptnbd kms init"), "{err}");
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn key_file_errors() {
    let e = Env::new();
    e.init();
    let key = e.data.join("root.key");
    chmod(&key, 0o644);
    let err = e.fails(&["list-keys"]);
    assert!(err.contains("mode 0644"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    chmod(&key, 0o600);
    std::fs::rename(&key, e.data.join("root.key.bak")).unwrap();
    let err = e.fails(&["list-keys"]);
    assert!(err.contains("does not exist"), "{err}");
    // Another store's key file: wrong root.
    let other = Env::new();
    other.init();
    std::fs::copy(other.data.join("root.key"), &key).unwrap();
    chmod(&key, 0o600);
    let err = e.fails(&["list-keys"]);
    assert!(err.contains("cannot unlock the key store"), "{err}");
}

#[test]
fn passphrase_store() {
    let e = Env::new();
    let pf = e._tmp.path().join("pass");
    std::fs::write(&pf, "a good long passphrase\n").unwrap();
    let pf = pf.to_str().unwrap();
    e.ok(&["init", "--passphrase-file", pf]);
    assert!(!e.data.join("root.key").exists());
    e.ok(&["--passphrase-file", pf, "create-key", "--alias", "p"]);
    // $CRYPTNBD_PASSPHRASE works too (the file's trailing newline is not part of it).
    e.cmd()
        .env("CRYPTNBD_PASSPHRASE", "a good long passphrase")
        .args(["describe-key", "p"])
        .assert()
        .success();
    let out = e
        .cmd()
        .env("CRYPTNBD_PASSPHRASE", "a wrong passphrase")
        .args(["describe-key", "p"])
        .assert()
        .code(1)
        .get_output()
        .clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: cannot unlock the key store"),
        "{err}"
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    let err = e.fails(&["describe-key", "p"]);
    assert!(err.contains("--passphrase-file"), "{err}");
}

#[test]
fn every_command_has_help() {
    let e = Env::new();
    for sub in [
        "init",
        "create-key",
        "list-keys",
        "describe-key",
        "enable-key",
        "disable-key",
        "schedule-key-deletion",
        "cancel-key-deletion",
        "rotate-key",
        "update-alias",
        "create-datakey",
        "create-datakey-without-plaintext",
        "encrypt-datakey",
        "decrypt-datakey",
        "re-encrypt",
        "gen-random",
        "audit",
    ] {
        e.cmd()
            .args([sub, "--help"])
            .assert()
            .success()
            .stdout(predicate::str::contains("Usage:"));
    }
    e.cmd()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("Getting started"));
}

#[test]
fn deleted_key_error_line() {
    let e = Env::new();
    e.init();
    let k = e.json(&["create-key", "--alias", "gone"]);
    let dk = e.json(&["create-datakey", "gone"]);
    e.ok(&["schedule-key-deletion", "gone", "--pending-days", "7"]);
    // Let the waiting period pass by moving the date into the past (the binary has no clock
    // override; the library tests use an injected clock instead).
    let path = e.data.join("keystore.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["keys"][0]["scheduled_deletion_date"] = 1_000_000_000u64.into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = e.fails(&[
        "decrypt-datakey",
        "gone",
        "--cipher-text",
        dk["cipher_text"].as_str().unwrap(),
    ]);
    assert!(err.contains("was deleted on 2001-09-09"), "{err}");
    let err = e.fails(&["describe-key", k["key_id"].as_str().unwrap()]);
    assert!(err.contains("was deleted on"), "{err}");
    assert_eq!(e.json(&["list-keys"])["total"], 0);
    let text = std::fs::read_to_string(&path).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["keys"][0]["versions"].as_array().unwrap().is_empty());
    assert!(e.ok(&["audit"]).contains("delete-key"));
}

#[test]
fn aliases_are_created_listed_moved_and_deleted() {
    let e = Env::new();
    e.init();
    let a = e.json(&["create-key", "--alias", "vols"])["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = e.json(&["create-key", "--alias", "vols-2027"])["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let made = e.json(&["create-alias", "alias/vols", "--alias", "tenant-a/vols"]);
    assert_eq!(made["aliases"][0]["alias"], "alias/tenant-a/vols");
    assert_eq!(made["aliases"][0]["key_id"], a.as_str());
    // The new alias names the key everywhere a key is named.
    let dk = e.json(&["create-datakey", "tenant-a/vols"]);
    assert_eq!(dk["key_id"], a.as_str());

    let listed = e.json(&["list-aliases"]);
    let names: Vec<(&str, &str)> = listed["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["alias"].as_str().unwrap(), x["key_id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("alias/vols", a.as_str()),
            ("alias/tenant-a/vols", a.as_str()),
            ("alias/vols-2027", b.as_str())
        ]
    );
    let text = e.ok(&["list-aliases"]);
    assert!(text.starts_with("ALIAS"), "{text}");
    assert!(text.contains("alias/tenant-a/vols"), "{text}");

    // Moving the alias: new data keys go to the other key, old ones still unwrap under theirs.
    let moved = e.json(&["associate-alias", "tenant-a/vols", "--key", "vols-2027"]);
    assert_eq!(moved["aliases"][0]["key_id"], b.as_str());
    assert_eq!(
        e.json(&["create-datakey", "tenant-a/vols"])["key_id"],
        b.as_str()
    );
    let old = e.json(&[
        "decrypt-datakey",
        &a,
        "--cipher-text",
        dk["cipher_text"].as_str().unwrap(),
    ]);
    assert_eq!(old["plain_text"], dk["plain_text"]);

    // Taken aliases and unknown ones are refused with one error line; nothing changes.
    let err = e.fails(&["create-alias", "vols", "--alias", "vols-2027"]);
    assert!(err.contains("vols-2027"), "{err}");
    let err = e.fails(&[
        "delete-alias",
        "vols-2027",
        "--alias",
        "tenant-a/vols",
        "--alias",
        "nope",
    ]);
    assert!(err.contains("nope") && err.contains("not found"), "{err}");
    assert_eq!(
        e.json(&["list-aliases"])["aliases"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let gone = e.json(&["delete-alias", "vols-2027", "--alias", "tenant-a/vols"]);
    assert_eq!(gone["key_id"], b.as_str());
    let err = e.fails(&["create-datakey", "tenant-a/vols"]);
    assert!(err.contains("tenant-a/vols"), "{err}");
    assert_eq!(
        e.json(&["list-aliases"])["aliases"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
