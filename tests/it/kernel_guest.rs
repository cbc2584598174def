//! The Linux kernel's own NBD client against cryptnbd, in a QEMU guest (this machine's kernel has
//! no nbd module): `tools/kernel-guest` builds a guest from Debian packages (kernel with nbd.ko
//! and dm-crypt, busybox, nbd-client, cryptsetup), boots it with no network, and inside it
//! cryptnbd serves volumes on a Unix socket while the kernel attaches them as /dev/nbdX:
//! `-b 4096` and 512-byte kernel I/O, ext4 with checksummed files, fstrim, server restart, fsck,
//! O_DIRECT writes at odd 512-byte offsets, `-connections 4`, the kernel client over TLS with a
//! client certificate (`-certfile/-keyfile/-cacertfile`, ext4 on top), and finally the README's by-hand
//! recovery (the DEK unwrapped with the CLI, the volume file opened by dm-crypt) finding the same
//! files. This test runs the tool and checks every step's marker in its output.

use crate::clients_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clients_common::{have_tools, run_bounded};

/// Every step the guest must report, in order.
const STEPS: &[&str] = &[
    "modules",
    "setup",
    "serve",
    "attach-b4096-mkfs",
    "files",
    "fstrim",
    "detach",
    "server-restart",
    "attach-512-fsck",
    "odirect-512",
    "multi-conn-4",
    "raw-after-restart",
    "tls-client-cert",
    "dm-crypt-recovery",
];

#[test]
fn kernel_nbd_client_and_dm_crypt_in_a_qemu_guest() {
    let test = "kernel_nbd_client_and_dm_crypt_in_a_qemu_guest";
    if !have_tools(
        test,
        &["qemu-system-x86_64", "apt-get", "apt-cache", "dpkg", "ldd"],
    ) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = root.join("target").join("kernel-guest");
    // The guest's own limit (its watchdog powers it off with a diagnosis) is below ours.
    let out = run_bounded(
        Command::new(root.join("tools").join("kernel-guest"))
            .arg("--cryptnbd")
            .arg(env!("CARGO_BIN_EXE_cryptnbd"))
            .arg("--work")
            .arg(&work)
            .args(["--timeout", "600"]),
        Duration::from_secs(1200),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        !stdout.contains("GUEST-RESULT FAIL"),
        "a guest step failed:\n{shown}"
    );
    let mut at = 0;
    for step in STEPS {
        let marker = format!("GUEST-STEP {step} ok");
        match stdout[at..].find(&marker) {
            Some(i) => at += i + marker.len(),
            None => panic!("the guest did not report `{marker}` (in order):\n{shown}"),
        }
    }
    assert!(
        stdout.contains("GUEST-RESULT PASS") && out.status.success(),
        "tools/kernel-guest did not pass ({}):\n{shown}",
        out.status
    );
    // Without -b the kernel used 512-byte logical blocks: sub-sector I/O really happened.
    assert!(
        stdout.contains("/dev/nbd0 vol  logical_block_size=512"),
        "the 512-byte attach is missing:\n{shown}"
    );
}
