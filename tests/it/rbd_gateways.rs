//! Several gateways in front of one RBD volume (feature `rbd`, real cluster): two `cryptnbd serve`
//! processes with their own data directories (copies: the same key store, the same reference),
//! as on two hosts.
//! - read-write: the second gateway is refused while the first lives; after a SIGKILL of the first
//!   it takes over (breaking the lock and blocklisting the dead one) and serves the data;
//! - read-only: two gateways only with `--rbd-shared-read-only`;
//! - header changes (resize) are refused while a gateway serves the volume.
#![cfg(feature = "rbd")]

use crate::clients_common;
use crate::rbd_common;

use std::process::Command;
use std::time::{Duration, Instant};

use clients_common::{have_tools, run_bounded, DataDir, MIB};
use rbd_common::{ceph_conf, create_rbd_volume, second_host, unique_image, Gateway};

fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_with(&[], uri, cmds)
}

/// qemu-io opening the export read-only (as a read-only export requires).
fn qemu_io_ro(uri: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_with(&["-r"], uri, cmds)
}

fn qemu_io_with(opts: &[&str], uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(opts).args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_bounded(&mut c, Duration::from_secs(120));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io reports failed commands on stdout and may still exit 0.
    let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

fn blocklist() -> impl Fn(&std::path::Path) -> String {
    |conf| {
        let mut c = Command::new("ceph");
        c.arg("-c").arg(conf).args(["osd", "blocklist", "ls"]);
        let out = run_bounded(&mut c, Duration::from_secs(60));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

#[test]
fn rbd_second_gateway_refused_then_takes_over_after_sigkill() {
    let test = "rbd_second_gateway_refused_then_takes_over_after_sigkill";
    if !have_tools(test, &["qemu-io", "ceph"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let _guard = create_rbd_volume(
        &d,
        &conf,
        "shared",
        &unique_image("takeover"),
        16 * MIB,
        4096,
    );
    let host2 = second_host(&d);

    let gw1 = Gateway::start(d.path(), &[]);
    let (ok, out) = qemu_io(&gw1.uri("shared"), &["write -P 0x5a 0 2M", "flush"]);
    assert!(ok, "write through gateway 1: {out}");

    // While gateway 1 lives, gateway 2 refuses the volume, and says why.
    let gw2 = Gateway::start(host2.path(), &[]);
    let (ok, out) = qemu_io(&gw2.uri("shared"), &["read -P 0x5a 0 2M"]);
    assert!(
        !ok,
        "gateway 2 must not serve a volume gateway 1 holds: {out}"
    );
    let log = gw2.log_text();
    assert!(
        log.contains("is in use") && log.contains("exclusive lock is held by client."),
        "gateway 2 names the reason: {log}"
    );
    // Gateway 1 is untouched by the attempt.
    let (ok, out) = qemu_io(&gw1.uri("shared"), &["read -P 0x5a 0 2M"]);
    assert!(ok, "gateway 1 still serves: {out}");

    // Gateway 1 dies without releasing anything.
    gw1.kill();
    let killed_at = Instant::now();
    // Its watch expires (15 s in the dev cluster, 30 s by default); then gateway 2 takes over.
    let deadline = killed_at + Duration::from_secs(180);
    loop {
        let (ok, out) = qemu_io(&gw2.uri("shared"), &["read -P 0x5a 0 2M"]);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateway 2 did not take over within 180 s: {out}\nits log:\n{}",
            gw2.log_text()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!(
        "{test}: took over {:?} after the SIGKILL",
        killed_at.elapsed()
    );
    let log = gw2.log_text();
    assert!(log.contains("blocklisting it and taking over"), "{log}");
    // The dead holder's address, as gateway 2 logged it, is on the cluster's blocklist.
    let dead = log
        .lines()
        .find(|l| l.contains("blocklisting it and taking over"))
        .and_then(|l| l.split("owner=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no owner= in the takeover line: {log}"))
        .to_string();
    let listed = blocklist()(&conf);
    assert!(
        listed.contains(&dead),
        "the dead gateway {dead} is blocklisted: {listed}"
    );
    let (ok, out) = qemu_io(
        &gw2.uri("shared"),
        &[
            "write -P 0xa5 1M 1M",
            "read -P 0x5a 0 1M",
            "read -P 0xa5 1M 1M",
        ],
    );
    assert!(ok, "gateway 2 writes after the takeover: {out}");
    gw2.stop();
}

#[test]
fn rbd_two_read_only_gateways_only_when_asked() {
    let test = "rbd_two_read_only_gateways_only_when_asked";
    if !have_tools(test, &["qemu-io"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let _guard = create_rbd_volume(&d, &conf, "ro", &unique_image("ro"), 8 * MIB, 4096);
    {
        let gw = Gateway::start(d.path(), &[]);
        let (ok, out) = qemu_io(&gw.uri("ro"), &["write -P 0x33 0 1M", "flush"]);
        assert!(ok, "{out}");
        gw.stop();
    }
    let host2 = second_host(&d);

    // By default a read-only gateway also holds the lock: a second one is refused.
    let gw1 = Gateway::start(d.path(), &["--read-only", "ro"]);
    let (ok, out) = qemu_io_ro(&gw1.uri("ro"), &["read -P 0x33 0 1M"]);
    assert!(ok, "{out}");
    let gw2 = Gateway::start(host2.path(), &["--read-only", "ro"]);
    let (ok, out) = qemu_io_ro(&gw2.uri("ro"), &["read -P 0x33 0 1M"]);
    assert!(
        !ok,
        "a second read-only gateway without --rbd-shared-read-only: {out}"
    );
    gw2.stop();
    gw1.stop();

    // Asked for: both export it read-only at once, and neither accepts writes.
    let shared = ["--read-only", "ro", "--rbd-shared-read-only"];
    let gw1 = Gateway::start(d.path(), &shared);
    let gw2 = Gateway::start(host2.path(), &shared);
    for gw in [&gw1, &gw2] {
        let (ok, out) = qemu_io_ro(&gw.uri("ro"), &["read -P 0x33 0 1M"]);
        assert!(ok, "shared read-only read: {out}");
        let (ok, out) = qemu_io(&gw.uri("ro"), &["write -P 0x44 0 4k"]);
        assert!(!ok, "a read-only export refuses writes: {out}");
    }
    gw1.stop();
    gw2.stop();
}

#[test]
fn rbd_resize_refused_while_served() {
    let test = "rbd_resize_refused_while_served";
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let _guard = create_rbd_volume(&d, &conf, "busy", &unique_image("busy"), 8 * MIB, 4096);
    let gw = Gateway::start(d.path(), &[]);
    // Make sure the gateway has attached it (attach happens at start; a client makes it certain).
    let _ = qemu_io(&gw.uri("busy"), &["read 0 4k"]);
    let mut c = Command::new(env!("CARGO_BIN_EXE_cryptnbd"));
    c.arg("--data-dir")
        .arg(d.path())
        .args(["volume", "resize", "busy", "--size", "16M"]);
    let out = run_bounded(&mut c, Duration::from_secs(120));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "resize while served must fail");
    assert!(err.contains("in use"), "says why: {err}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_cryptnbd"));
    c.arg("--data-dir")
        .arg(d.path())
        .args(["volume", "delete", "busy", "--yes"]);
    let out = run_bounded(&mut c, Duration::from_secs(120));
    assert!(!out.status.success(), "delete while served must fail");
    gw.stop();
    d.cli(&["volume", "resize", "busy", "--size", "16M"]);
    assert_eq!(d.volume_info("busy")["size"].as_u64(), Some(16 * MIB));
}
