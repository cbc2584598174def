//! What real clients write is ciphertext at rest: after `nbdcopy` and `qemu-io` write through NBD,
//! the volume file never contains the plaintext, and its data area decrypts with an independent
//! AES-256-XTS implementation (Python `cryptography`, run by Debian's `/usr/bin/python3`), given the
//! DEK recovered by hand with `volume info --json` + `kms decrypt-datakey`, to exactly what was
//! written. Tweak = number of the 512-byte unit from the data area start (dm-crypt plain64), so a
//! 4096-byte sector n uses tweak 8·n; an all-zero ciphertext sector is a never-written one.

use crate::clients_common;

use std::process::Command;

use clients_common::xts_oracle::{contains, oracle_decrypt, python_has_cryptography};
use clients_common::{
    have_tools, pseudo_random, report_missing, run_ok, DataDir, HEADER_BYTES, MIB,
};

const CANARY: &[u8] = b"CRYPTNBD-PLAINTEXT-CANARY-must-never-reach-the-disk|";

fn at_rest(sector: u32) {
    let d = DataDir::new();
    let size = 16 * MIB;
    d.create_volume("vault", size, sector);
    let vol = d.volume_path("vault");

    // The expected plaintext image of the whole export.
    let mut image = vec![0u8; size as usize];
    let canary_len = 3 * MIB as usize;
    for (i, b) in image[..canary_len].iter_mut().enumerate() {
        *b = CANARY[i % CANARY.len()];
    }
    image[8 * MIB as usize..9 * MIB as usize].copy_from_slice(&pseudo_random(MIB as usize, 9));
    let input = d.path().join("image.bin");
    std::fs::write(&input, &image).expect("write input image");

    let srv = d.serve(&["vault"]);
    let uri = srv.uri("vault");
    run_ok(Command::new("nbdcopy").arg(&input).arg(&uri));
    // An unaligned patch on top, through another client.
    let (po, pl) = (10_000_000usize, 5000usize);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        &format!("write -P 0xab {po} {pl}"),
        "-c",
        "flush",
    ]));
    image[po..po + pl].fill(0xab);

    // While the server runs (after the clients flushed), the file holds no plaintext.
    let live = std::fs::read(&vol).expect("read volume file");
    assert_eq!(live.len() as u64, HEADER_BYTES + size, "volume file size");
    assert!(
        !contains(&live, &CANARY[..24]),
        "plaintext canary found in the volume file"
    );
    assert!(
        !contains(&live, &[0xab; 64]),
        "the 0xab pattern found in the volume file"
    );
    srv.stop();

    let file = std::fs::read(&vol).expect("read volume file");
    assert!(
        !contains(&file, &CANARY[..24]),
        "plaintext canary found after stop"
    );
    assert!(
        !contains(&file, &[0xab; 64]),
        "the 0xab pattern found after stop"
    );
    assert!(
        !contains(&file, &image[8 * MIB as usize..8 * MIB as usize + 64]),
        "the random block is stored in the clear"
    );

    // An operator's recovery path: DEK by hand, standard XTS, no cryptnbd code involved.
    let dek = d.unwrap_dek("vault");
    let out = d.path().join("decrypted.bin");
    oracle_decrypt(&vol, &out, sector, &dek);
    let plain = std::fs::read(&out).expect("read oracle output");
    assert_eq!(plain.len(), image.len(), "decrypted data area size");
    let first_diff = plain.iter().zip(&image).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "independent XTS decryption differs from what was written through NBD (sector size {sector})"
    );
}

#[test]
fn at_rest_volume_file_is_xts_ciphertext_4096_sectors() {
    let name = "at_rest_volume_file_is_xts_ciphertext_4096_sectors";
    if !have_tools(name, &["nbdcopy", "qemu-io"]) {
        return;
    }
    if !python_has_cryptography() {
        report_missing(name, "/usr/bin/python3 with the `cryptography` module");
        return;
    }
    at_rest(4096);
}

#[test]
fn at_rest_volume_file_is_xts_ciphertext_512_sectors() {
    let name = "at_rest_volume_file_is_xts_ciphertext_512_sectors";
    if !have_tools(name, &["nbdcopy", "qemu-io"]) {
        return;
    }
    if !python_has_cryptography() {
        report_missing(name, "/usr/bin/python3 with the `cryptography` module");
        return;
    }
    at_rest(512);
}
