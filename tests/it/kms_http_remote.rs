//! Remote keys for `serve`: two data directories on loopback — a KMS host (`kms serve`, the CMK
//! and the root key) and a storage host (volumes and wrapped DEKs only, `--kms-url`). A volume is
//! created through the remote KMS, served, written and read with nbdcopy; disabling the CMK on
//! the KMS host refuses the next attach with the KMS's reason while the attached volume keeps
//! working; with the KMS down, the next attach fails with a clear error naming the KMS URL.

use crate::common;
use crate::kms_http_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_http_support::*;

pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) log: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--kms-url U` for each of the comma-separated URLs in `urls`, and `--kms-credential`.
pub(crate) fn remote_args<'a>(urls: &'a str, cred: &'a Path) -> Vec<&'a str> {
    let mut a: Vec<&str> = urls.split(',').flat_map(|u| ["--kms-url", u]).collect();
    a.extend(["--kms-credential", cred.to_str().unwrap()]);
    a
}

pub(crate) fn start_serve(data: &Path, sock: &Path, url: &str, cred: &Path) -> Serve {
    let log = data.parent().unwrap().join("serve.log");
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(data)
        .args(["serve", "--socket", sock.to_str().unwrap()])
        .args(remote_args(url, cred))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start serve");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining after the caller stopped listening: the server's later lines must not
        // meet a closed pipe.
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("serve prints its exports");
        if l.starts_with("Serving") {
            break;
        }
    }
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    Serve { child, log }
}

pub(crate) fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Writes fresh random data through NBD and reads it back.
pub(crate) fn round_trip(sock: &Path, name: &str, tmp: &Path) {
    let src = tmp.join("src.bin");
    let back = tmp.join("back.bin");
    let _ = std::fs::remove_file(&back);
    let mut data = vec![0u8; 4 << 20];
    getrandom::getrandom(&mut data).unwrap();
    std::fs::write(&src, &data).unwrap();
    let (ok, out, err) = common::run_bounded(
        Command::new("nbdcopy").arg(&src).arg(uri(sock, name)),
        Duration::from_secs(120),
    );
    assert!(
        ok,
        "nbdcopy write failed: {out}{err}\nserve log:\n{}",
        std::fs::read_to_string(tmp.join("serve.log")).unwrap_or_default()
    );
    let (ok, out, err) = common::run_bounded(
        Command::new("nbdcopy").arg(uri(sock, name)).arg(&back),
        Duration::from_secs(120),
    );
    assert!(ok, "nbdcopy read failed: {out}{err}");
    let got = std::fs::read(&back).unwrap();
    assert_eq!(&got[..data.len()], &data[..], "data read back differs");
}

/// nbdinfo on an export that must be refused; returns its output plus the server's log.
pub(crate) fn refused(sock: &Path, name: &str, serve: &Serve) -> String {
    let (ok, out, err) = common::run_bounded(
        Command::new("nbdinfo").arg(uri(sock, name)),
        Duration::from_secs(120),
    );
    assert!(!ok, "attach of {name} should be refused: {out}");
    format!("{out}{err}{}", std::fs::read_to_string(&serve.log).unwrap())
}

/// A KMS host's data directory (`TMP/kms-host`) with the CMK `vols`, and the credential
/// `storage-1` (project p1, with `rights`) written to `TMP/storage.cred`.
pub(crate) fn kms_host(tmp: &Path, rights: &[&str]) -> (PathBuf, PathBuf) {
    let kms_dir = tmp.join("kms-host");
    let cred = tmp.join("storage.cred");
    cli(&kms_dir, &["kms", "init"]);
    cli(&kms_dir, &["kms", "create-key", "--alias", "vols"]);
    storage_credential(&kms_dir, &cred, rights);
    (kms_dir, cred)
}

/// `kms credential create storage-1 --project p1 RIGHTS… --output CRED`.
fn storage_credential(kms_dir: &Path, cred: &Path, rights: &[&str]) {
    let mut args = vec!["kms", "credential", "create", "storage-1"];
    args.extend(["--project", "p1"]);
    args.extend_from_slice(rights);
    args.extend(["--output", cred.to_str().unwrap()]);
    cli(kms_dir, &args);
}

#[test]
fn storage_host_without_cmks_serves_through_remote_kms() {
    if !common::require_tool("/usr/bin/nbdcopy") || !common::require_tool("/usr/bin/nbdinfo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("storage-host");
    let (kms_dir, cred) = kms_host(tmp.path(), &["--keys", "vols"]);
    let kms = KmsServer::start(&kms_dir, &[]);
    let url = kms.url.clone();

    let mut create = vec!["volume", "create", "v1", "--size", "8M", "--key", "vols"];
    create.extend(remote_args(&url, &cred));
    cli(&store, &create);
    assert!(!store.join("keystore.json").exists() && !store.join("root.key").exists());

    let sock = tmp.path().join("nbd.sock");
    let serve = start_serve(&store, &sock, &url, &cred);
    round_trip(&sock, "v1", tmp.path());

    // A second volume, created while the server runs, then the CMK is disabled on the KMS host.
    create[2] = "v2";
    cli(&store, &create);
    create[2] = "v3";
    cli(&store, &create);
    cli(&kms_dir, &["kms", "disable-key", "vols"]);
    let text = refused(&sock, "v2", &serve);
    assert!(
        text.contains("KMS.0209") && text.contains("disabled"),
        "{text}"
    );
    round_trip(&sock, "v1", tmp.path());

    // The KMS goes down: the next attach fails naming the KMS; v1 keeps working.
    cli(&kms_dir, &["kms", "enable-key", "vols"]);
    drop(kms);
    let text = refused(&sock, "v3", &serve);
    assert!(
        text.contains(&format!("cannot reach the KMS at {url}")),
        "{text}"
    );
    round_trip(&sock, "v1", tmp.path());

    let audit = audit_text(&kms_dir);
    assert!(audit.contains(r#""credential":"storage-1""#), "{audit}");
}

/// `volume rekey --kms-url`: the storage host re-wraps a volume's data key through the remote
/// KMS (re-encrypt with the volume's encryption context as source and destination context),
/// first under another key, then under a rotated version; the volume still attaches and reads
/// back what was written before the rekeys.
#[test]
fn remote_volume_rekey_rewraps_through_the_kms() {
    if !common::require_tool("/usr/bin/nbdcopy") || !common::require_tool("/usr/bin/nbdinfo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let kms_dir = tmp.path().join("kms-host");
    let store = tmp.path().join("storage-host");
    let cred = tmp.path().join("storage.cred");
    cli(&kms_dir, &["kms", "init"]);
    let key_id = |alias: &str| -> String {
        let out = cli(&kms_dir, &["kms", "create-key", "--alias", alias, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["key_id"].as_str().unwrap().to_string()
    };
    let old = key_id("vols");
    let new = key_id("vols-2024");
    storage_credential(&kms_dir, &cred, &["--admin"]);
    let kms = KmsServer::start(&kms_dir, &[]);
    let url = kms.url.clone();
    let with_remote = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(remote_args(&url, &cred));
        cli(&store, &a)
    };
    with_remote(&["volume", "create", "v1", "--size", "8M", "--key", "vols"]);
    let info = |name: &str| -> serde_json::Value {
        serde_json::from_str(&cli(&store, &["volume", "info", name, "--json"])).unwrap()
    };
    assert_eq!(info("v1")["key_id"], old.as_str());

    let sock = tmp.path().join("nbd.sock");
    let serve = start_serve(&store, &sock, &url, &cred);
    round_trip(&sock, "v1", tmp.path());
    drop(serve);

    let out = with_remote(&["volume", "rekey", "v1", "--key", "vols-2024"]);
    assert!(out.contains(&new), "{out}");
    assert_eq!(info("v1")["key_id"], new.as_str());
    cli(&kms_dir, &["kms", "rotate-key", "vols-2024"]);
    with_remote(&["volume", "rekey", "v1"]);
    assert_eq!(info("v1")["key_version"], 2);

    // The re-wrapped key still opens the volume through the KMS, and the data is unchanged.
    let sock = tmp.path().join("nbd2.sock");
    let serve = start_serve(&store, &sock, &url, &cred);
    let back = tmp.path().join("after-rekey.bin");
    let (ok, out, err) = common::run_bounded(
        Command::new("nbdcopy").arg(uri(&sock, "v1")).arg(&back),
        Duration::from_secs(120),
    );
    assert!(
        ok,
        "nbdcopy read failed: {out}{err}\nserve log:\n{}",
        std::fs::read_to_string(&serve.log).unwrap_or_default()
    );
    let before = std::fs::read(tmp.path().join("src.bin")).unwrap();
    assert_eq!(&std::fs::read(&back).unwrap()[..before.len()], &before[..]);
    round_trip(&sock, "v1", tmp.path());
    drop(serve);
    let audit = audit_text(&kms_dir);
    assert!(
        audit.contains(r#""operation":"http re-encrypt""#) && audit.contains("storage-1"),
        "{audit}"
    );
}
