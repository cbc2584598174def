//! The full cloud model on a real Ceph cluster (feature `rbd`): three roles, two data directories.
//! A KMS host (`kms serve` on loopback: the root key, the CMK, the credentials) and a storage
//! gateway whose data directory holds only RBD references (`volume create --backend rbd:POOL/IMG
//! --kms-url … --kms-credential …`) — no key store, no CMK, no root key. Real clients write and
//! read through the gateway; the RBD image's data area decrypts, from outside, with the DEK the
//! KMS host unwraps by hand; disabling the CMK on the KMS host refuses the next attach with the
//! KMS's reason while an attached volume keeps working, and a restarted gateway cannot attach.
#![cfg(feature = "rbd")]

use crate::clients_common;
use crate::kms_http_support;
use crate::rbd_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clients_common::xts_oracle::{contains, oracle_decrypt};
use clients_common::{have_tools, pseudo_random, run_bounded, run_ok, HEADER_BYTES, MIB};
use kms_http_support::{audit_text, cli, KmsServer};
use rbd_common::{ceph_conf, export_image, unique_image, Gateway, ImageGuard, POOL};

const CANARY: &[u8] = b"CRYPTNBD-RBD-REMOTE-KMS-CANARY|";

/// `volume create NAME` in the gateway's data dir on `rbd:POOL/IMAGE`, keys from the remote KMS.
fn create_remote_rbd_volume(
    gw_dir: &Path,
    conf: &Path,
    remote: &[&str],
    name: &str,
    image: &str,
    size: u64,
) -> ImageGuard {
    let size = size.to_string();
    let backend = format!("rbd:{POOL}/{image}");
    let mut args = vec![
        "volume",
        "create",
        name,
        "--size",
        &size,
        "--key",
        "vols",
        "--backend",
        &backend,
        "--ceph-conf",
        conf.to_str().expect("UTF-8 conf path"),
    ];
    args.extend_from_slice(remote);
    cli(gw_dir, &args);
    ImageGuard {
        conf: conf.to_path_buf(),
        image: image.to_string(),
    }
}

/// The volume's DEK, unwrapped on the KMS host (`kms decrypt-datakey` with the key id, wrapped
/// DEK and context that `volume info --json` shows on the gateway): what an operator with access
/// to the KMS could recover, and nobody on the gateway alone.
fn dek_from_kms_host(kms_dir: &Path, gw_dir: &Path, name: &str) -> Vec<u8> {
    let out = cli(gw_dir, &["volume", "info", name, "--json"]);
    let info: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("volume info --json: {e}: {out}"));
    let args = clients_common::decrypt_datakey_args(&info);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    clients_common::dek_of_decrypt_output(&cli(kms_dir, &argv))
}

/// Every regular file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() {
                out.push(p.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// nbdinfo on an export that must be refused: its output plus the gateway's log.
fn refused(gw: &Gateway, export: &str) -> String {
    let out = run_bounded(
        Command::new("nbdinfo").arg(gw.uri(export)),
        Duration::from_secs(120),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the attach of {export} should be refused: {text}"
    );
    format!("{text}{}", gw.log_text())
}

#[test]
fn rbd_gateway_with_remote_kms_holds_no_keys() {
    let test = "rbd_gateway_with_remote_kms_holds_no_keys";
    if !have_tools(test, &["nbdcopy", "nbdinfo", "qemu-io", "rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let kms_dir = tmp.path().join("kms-host");
    let gw_dir = tmp.path().join("gateway");
    let cred = tmp.path().join("gateway.cred");
    cli(&kms_dir, &["kms", "init"]);
    cli(&kms_dir, &["kms", "create-key", "--alias", "vols"]);
    cli(
        &kms_dir,
        &[
            "kms",
            "credential",
            "create",
            "gateway-1",
            "--project",
            "p1",
            "--keys",
            "vols",
            "--output",
            cred.to_str().unwrap(),
        ],
    );
    let kms = KmsServer::start(&kms_dir, &[]);
    let remote = [
        "--kms-url",
        kms.url.as_str(),
        "--kms-credential",
        cred.to_str().unwrap(),
    ];

    let size = 16 * MIB;
    let image1 = unique_image("remote-kms");
    let _g1 = create_remote_rbd_volume(&gw_dir, &conf, &remote, "v1", &image1, size);

    // Real client I/O through the gateway: nbdcopy writes, qemu-io overwrites and trims.
    let mut data = vec![0u8; size as usize];
    for (i, b) in data[..MIB as usize].iter_mut().enumerate() {
        *b = CANARY[i % CANARY.len()];
    }
    data[3 * MIB as usize..9 * MIB as usize].copy_from_slice(&pseudo_random(6 * MIB as usize, 41));
    let input = tmp.path().join("in.bin");
    std::fs::write(&input, &data).unwrap();
    let gw = Gateway::start(&gw_dir, &remote);
    run_ok(Command::new("nbdcopy").arg(&input).arg(gw.uri("v1")));
    let (po, pl) = (4_000_123usize, 9000usize);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &gw.uri("v1"),
        "-c",
        &format!("write -P 0xcd {po} {pl}"),
        "-c",
        &format!("discard {} {}", 6 * MIB, MIB),
        "-c",
        "flush",
    ]));
    data[po..po + pl].fill(0xcd);
    data[6 * MIB as usize..7 * MIB as usize].fill(0);
    let back = tmp.path().join("back.bin");
    run_ok(Command::new("nbdcopy").arg(gw.uri("v1")).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "what nbdcopy reads back through the gateway differs from what was written"
    );

    // The gateway's data dir: RBD references only, no key store, CMK or root key.
    let files = files_under(&gw_dir);
    for f in &files {
        let s = f.to_string_lossy();
        assert!(
            s.starts_with("volumes/") && s.ends_with(".rbd")
                || s.ends_with(".log")
                || s.ends_with(".lock"),
            "unexpected file {s} in the gateway's data dir: {files:?}"
        );
        assert!(!s.contains("keystore") && !s.contains("root.key"), "{s}");
    }
    assert!(
        files.iter().any(|f| f.ends_with("volumes/v1.rbd")),
        "{files:?}"
    );
    assert!(
        kms_dir.join("keystore.json").is_file(),
        "the KMS host keeps the key store"
    );

    // From outside: the image holds no plaintext, and its data area is standard XTS.
    let raw = tmp.path().join("raw.img");
    export_image(&conf, &image1, &raw);
    let raw_bytes = std::fs::read(&raw).unwrap();
    assert_eq!(raw_bytes.len() as u64, HEADER_BYTES + size);
    assert!(
        !contains(&raw_bytes, &CANARY[..20]),
        "plaintext in the image"
    );
    assert!(
        !contains(&raw_bytes, &[0xcd; 64]),
        "0xcd pattern in the image"
    );
    let dek = dek_from_kms_host(&kms_dir, &gw_dir, "v1");
    let plain = tmp.path().join("plain.bin");
    oracle_decrypt(&raw, &plain, 4096, &dek);
    assert!(
        std::fs::read(&plain).unwrap() == data,
        "the independent XTS decrypt of the RBD image differs from what the clients wrote"
    );

    // A second volume made while the gateway runs; then the CMK is disabled on the KMS host.
    let image2 = unique_image("remote-kms2");
    let _g2 = create_remote_rbd_volume(&gw_dir, &conf, &remote, "v2", &image2, 4 * MIB);
    cli(&kms_dir, &["kms", "disable-key", "vols"]);
    let text = refused(&gw, "v2");
    assert!(
        text.contains("KMS.0209") && text.contains("disabled"),
        "the refusal should carry the KMS's reason: {text}"
    );
    // The attached volume keeps working (as in EVS/EBS) ...
    let back2 = tmp.path().join("back2.bin");
    run_ok(Command::new("nbdcopy").arg(gw.uri("v1")).arg(&back2));
    assert!(std::fs::read(&back2).unwrap() == data, "v1 after disable");
    // ... until it is detached: a restarted gateway cannot attach it.
    gw.stop();
    let gw = Gateway::start(&gw_dir, &remote);
    let text = refused(&gw, "v1");
    assert!(
        text.contains("KMS.0209") && text.contains("disabled"),
        "the refusal should carry the KMS's reason: {text}"
    );
    gw.stop();

    let audit = audit_text(&kms_dir);
    assert!(audit.contains(r#""credential":"gateway-1""#), "{audit}");
}
