//! The vhost-user-blk export with a real Linux guest (`tools/vhost-guest`): cryptnbd on the host
//! serves a read-write volume (two queues) and a read-only one to a QEMU guest (TCG) whose RAM is
//! shared; the guest checks the virtio configuration (4096-byte blocks, serial, flush, discard),
//! the read-only disk, a pattern written while cryptnbd is killed with SIGKILL and restarted under
//! it (QEMU reconnects), ext4 + fstrim + fsck, and finally opens the volume file with dm-crypt and
//! finds the same files. A second run boots with unshared RAM and expects cryptnbd's clear error.
//! Plus the option's refusals, which need no guest.

use crate::clients_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clients_common::{have_tools, run_bounded};

const STEPS: &[&str] = &[
    "GUEST-STEP modules ok",
    "GUEST-STEP virtio-config ok",
    "GUEST-STEP read-only-export ok",
    "GUEST-STEP pattern-before-restart ok",
    "GUEST-STEP restart-under-load ok",
    "GUEST-STEP ext4-fsck-fstrim ok",
    "GUEST-STEP dm-crypt-cross-check ok",
    "GUEST-RESULT PASS",
];

fn run_tool(extra: &[&str]) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run_bounded(
        Command::new(root.join("tools").join("vhost-guest"))
            .arg("--cryptnbd")
            .arg(env!("CARGO_BIN_EXE_cryptnbd"))
            .arg("--work")
            .arg(root.join("target").join("kernel-guest"))
            .args(["--timeout", "400"])
            .args(extra),
        Duration::from_secs(900),
    );
    let shown = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), shown)
}

fn tools_present(test: &str) -> bool {
    have_tools(
        test,
        &[
            "qemu-system-x86_64",
            "apt-get",
            "apt-cache",
            "dpkg",
            "ldd",
            "python3",
        ],
    )
}

#[test]
fn a_linux_guest_on_vhost_user_blk_survives_a_server_restart() {
    if !tools_present("a_linux_guest_on_vhost_user_blk_survives_a_server_restart") {
        return;
    }
    let (ok, shown) = run_tool(&[]);
    assert!(
        !shown.contains("GUEST-RESULT FAIL"),
        "a guest step failed:\n{shown}"
    );
    let mut at = 0;
    for marker in STEPS {
        match shown[at..].find(marker) {
            Some(i) => at += i + marker.len(),
            None => panic!("the guest did not report `{marker}` (in order):\n{shown}"),
        }
    }
    for host in ["server-killed-and-restarted", "server-sigterm-clean-exit"] {
        assert!(
            shown.contains(&format!("HOST-STEP {host} ok")),
            "{host}:\n{shown}"
        );
    }
    // The guest saw the volume as the export describes it.
    assert!(
        shown.contains("logical_block_size=4096 queues=2"),
        "{shown}"
    );
    assert!(ok, "tools/vhost-guest failed:\n{shown}");
}

#[test]
fn a_vm_without_shared_memory_gets_a_clear_error() {
    if !tools_present("a_vm_without_shared_memory_gets_a_clear_error") {
        return;
    }
    let (ok, shown) = run_tool(&["--unshared"]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains("HOST-STEP unshared-memory-error ok"),
        "{shown}"
    );
    assert!(
        shown.contains("share=on"),
        "the error does not say what to do:\n{shown}"
    );
}

fn serve_fails(args: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .args([
            "--data-dir",
            tmp.path().join("d").to_str().unwrap(),
            "serve",
        ])
        .args(["--socket", tmp.path().join("nbd.sock").to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn vhost_user_blk_options_that_cannot_work_are_refused() {
    let err = serve_fails(&["--vhost-user-blk", "no-equals-sign"]);
    assert!(err.contains("PATH=EXPORT"), "{err}");
    let err = serve_fails(&["--vhost-user-blk", "/tmp/cryptnbd-test-vu.sock=nosuch"]);
    assert!(err.contains("no exported volume named \"nosuch\""), "{err}");
    let err = serve_fails(&[
        "--vhost-user-blk",
        "/tmp/cryptnbd-test-vu2.sock=disk0",
        "--vhost-user-blk",
        "/tmp/cryptnbd-test-vu2.sock=disk0",
    ]);
    assert!(err.contains("given twice"), "{err}");
}
