//! Real clients against volumes on a real Ceph RBD image (feature `rbd`, cluster from
//! `tools/ceph-dev-cluster`): nbdcopy in and out, qemu-io patterns and trims, fio verify over four
//! connections, the volume commands (import, export, info, resize, rekey, delete) on RBD, and the
//! image's data area checked from outside (`rbd export`) as standard AES-256-XTS with the DEK,
//! decrypted by Python's `cryptography` — the same format as a volume file.
#![cfg(feature = "rbd")]

use crate::clients_common;
use crate::rbd_common;

use std::process::Command;
use std::time::Duration;

use clients_common::xts_oracle::{contains, oracle_decrypt};
use clients_common::{
    have_tools, pseudo_random, run_ok, run_ok_within, DataDir, HEADER_BYTES, MIB,
};
use rbd_common::{
    ceph_conf, create_rbd_volume, export_image, rbd, unique_image, Gateway, ImageGuard, POOL,
};

const CANARY: &[u8] = b"CRYPTNBD-RBD-PLAINTEXT-CANARY|";

/// nbdcopy writes an image through a gateway, qemu-io overwrites a byte range and trims another,
/// nbdcopy reads it all back; then, from outside, the RBD image holds no plaintext and its data
/// area decrypts with the hand-unwrapped DEK to exactly what the clients see.
#[test]
fn rbd_clients_round_trip_and_image_is_standard_xts() {
    let test = "rbd_clients_round_trip_and_image_is_standard_xts";
    if !have_tools(test, &["nbdcopy", "qemu-io", "rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let image_name = unique_image("clients");
    let size = 24 * MIB;
    let _guard = create_rbd_volume(&d, &conf, "vault", &image_name, size, 4096);
    let info = d.volume_info("vault");
    assert_eq!(info["backend"], format!("rbd:{POOL}/{image_name}"));

    let mut image = vec![0u8; size as usize];
    for (i, b) in image[..2 * MIB as usize].iter_mut().enumerate() {
        *b = CANARY[i % CANARY.len()];
    }
    image[9 * MIB as usize..13 * MIB as usize].copy_from_slice(&pseudo_random(4 * MIB as usize, 7));
    let input = d.path().join("in.bin");
    std::fs::write(&input, &image).unwrap();

    let gw = Gateway::start(d.path(), &[]);
    let uri = gw.uri("vault");
    run_ok(Command::new("nbdcopy").arg(&input).arg(&uri));
    let (po, pl) = (5_000_000usize, 7000usize);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        &format!("write -P 0xab {po} {pl}"),
        "-c",
        // An aligned trim in the random region: must read back as zeroes.
        &format!("discard {} {}", 10 * MIB, MIB),
        "-c",
        &format!("read -P 0 {} {}", 10 * MIB, MIB),
        "-c",
        "flush",
    ]));
    image[po..po + pl].fill(0xab);
    image[10 * MIB as usize..11 * MIB as usize].fill(0);
    let back = d.path().join("back.bin");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == image,
        "what nbdcopy reads back differs from what was written"
    );
    gw.stop();

    // From outside: the raw image as the cluster stores it.
    let raw = d.path().join("raw.img");
    export_image(&conf, &image_name, &raw);
    let raw_bytes = std::fs::read(&raw).unwrap();
    assert_eq!(
        raw_bytes.len() as u64,
        HEADER_BYTES + size,
        "image = header + data area"
    );
    assert!(
        !contains(&raw_bytes, &CANARY[..20]),
        "plaintext canary in the RBD image"
    );
    assert!(
        !contains(&raw_bytes, &[0xab; 64]),
        "the 0xab pattern in the RBD image"
    );
    let dek = d.unwrap_dek("vault");
    let plain = d.path().join("plain.bin");
    oracle_decrypt(&raw, &plain, 4096, &dek);
    assert!(
        std::fs::read(&plain).unwrap() == image,
        "the independent XTS decrypt of the RBD image differs from what the clients wrote"
    );
}

/// fio's nbd engine, four connections to one gateway, random writes verified with crc32c.
#[test]
fn rbd_fio_verify_four_connections() {
    let test = "rbd_fio_verify_four_connections";
    if !have_tools(test, &["fio"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let _guard = create_rbd_volume(&d, &conf, "fio", &unique_image("fio"), 64 * MIB, 4096);
    let gw = Gateway::start(d.path(), &[]);
    const JOBS: u64 = 4;
    const PER_JOB: u64 = 8 * MIB;
    let mut c = Command::new("fio");
    c.current_dir(d.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", gw.uri("fio")),
        &format!("--numjobs={JOBS}"),
        &format!("--size={PER_JOB}"),
        &format!("--offset_increment={PER_JOB}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]);
    let out = run_ok_within(&mut c, Duration::from_secs(600));
    let json = &out[out.find('{').unwrap_or(0)..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    let jobs = report["jobs"].as_array().expect("fio jobs");
    assert_eq!(jobs.len() as u64, JOBS);
    for j in jobs {
        assert_eq!(j["error"].as_i64(), Some(0), "fio job failed: {j}");
        assert_eq!(j["write"]["io_bytes"].as_u64(), Some(PER_JOB), "{j}");
        assert_eq!(
            j["read"]["io_bytes"].as_u64(),
            Some(PER_JOB),
            "verified: {j}"
        );
    }
    gw.stop();
}

/// import → export round trip, info, resize (grows the image), rekey (header only: data still
/// reads back), list beside a file volume, delete (removes the image and the reference).
#[test]
fn rbd_volume_commands() {
    let test = "rbd_volume_commands";
    if !have_tools(test, &["rbd"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let image_name = unique_image("cmds");
    let _guard = ImageGuard {
        conf: conf.clone(),
        image: image_name.clone(),
    };
    let mut data = pseudo_random(3 * MIB as usize + 4096, 3);
    data[MIB as usize..2 * MIB as usize].fill(0);
    let src = d.path().join("src.raw");
    std::fs::write(&src, &data).unwrap();
    d.cli(&[
        "volume",
        "import",
        "imp",
        "--from",
        src.to_str().unwrap(),
        "--key",
        clients_common::KEY_ALIAS,
        "--backend",
        &format!("rbd:{POOL}/{image_name}"),
        "--ceph-conf",
        conf.to_str().unwrap(),
    ]);
    d.create_volume("plainfile", MIB, 4096);
    let list = d.cli(&["volume", "list"]);
    assert!(list.contains("imp") && list.contains("plainfile"), "{list}");

    let export = |to: &str| {
        let p = d.path().join(to);
        d.cli(&["volume", "export", "imp", "--to", p.to_str().unwrap()]);
        std::fs::read(p).unwrap()
    };
    assert_eq!(export("out1.raw"), data, "export after import");

    d.cli(&["volume", "resize", "imp", "--size", "8M"]);
    let info = d.volume_info("imp");
    assert_eq!(info["size"].as_u64(), Some(8 * MIB));
    let out = rbd(
        &conf,
        &["info", "--format", "json", &format!("{POOL}/{image_name}")],
    );
    let rbd_info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rbd info json");
    assert_eq!(
        rbd_info["size"].as_u64(),
        Some(HEADER_BYTES + 8 * MIB),
        "image grown"
    );

    d.cli(&["kms", "rotate-key", clients_common::KEY_ALIAS]);
    d.cli(&["volume", "rekey", "imp"]);
    assert_eq!(d.volume_info("imp")["key_version"].as_u64(), Some(2));
    let after = export("out2.raw");
    assert_eq!(&after[..data.len()], &data[..], "data unchanged by rekey");
    assert!(
        after[data.len()..].iter().all(|&b| b == 0),
        "grown part reads as zeroes"
    );

    d.cli(&["volume", "delete", "imp", "--yes"]);
    assert!(
        !d.path().join("volumes/imp.rbd").exists(),
        "reference removed"
    );
    let out = rbd(&conf, &["info", &format!("{POOL}/{image_name}")]);
    assert!(!out.status.success(), "the image is gone after delete");
}
