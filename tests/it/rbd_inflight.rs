//! The asynchronous RBD data path (`server::inflight`, feature `rbd`) against real clients on a real
//! cluster: requests that take it (whole sectors up to 1 MiB) and requests that do not (partial
//! sectors, larger than 1 MiB, FUA) mixed in one queue read back exactly; clients killed with
//! requests in flight leave a gateway that still serves and then stops cleanly (its teardown
//! waited for every completion instead of hanging or crashing).
#![cfg(feature = "rbd")]

use crate::clients_common;
use crate::rbd_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use clients_common::{have_tools, run_ok, DataDir, MIB};
use rbd_common::{ceph_conf, create_rbd_volume, unique_image, Gateway};

/// qemu-io queues these together (aio_*), so async and blocking requests are in flight at once.
#[test]
fn rbd_mixed_async_and_blocking_requests_read_back() {
    let test = "rbd_mixed_async_and_blocking_requests_read_back";
    if !have_tools(test, &["qemu-io"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let _g = create_rbd_volume(&d, &conf, "mix", &unique_image("mix"), 16 * MIB, 4096);
    let gw = Gateway::start(d.path(), &[]);
    let uri = gw.uri("mix");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "aio_write -P 0x11 0 64k",
        "-c",
        "aio_write -P 0x22 1M 3M",
        "-c",
        "aio_write -P 0x33 8M 4k",
        "-c",
        "aio_write -P 0x44 9M 1M",
        "-c",
        "aio_write -P 0x55 12M 1M",
        "-c",
        "aio_flush",
        // Partial sectors (read-modify-write) and FUA, after the first batch landed.
        "-c",
        "aio_write -P 0x66 5000 100",
        "-c",
        "aio_write -f -P 0x77 10M 8k",
        "-c",
        "aio_write -P 0x88 11M 512k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x11 0 5000",
        "-c",
        "read -P 0x66 5000 100",
        "-c",
        "read -P 0x11 5100 60436",
        "-c",
        "read -P 0x22 1M 3M",
        "-c",
        "read -P 0x33 8M 4k",
        "-c",
        "read -P 0x44 9M 1M",
        "-c",
        "read -P 0x77 10M 8k",
        "-c",
        "read -P 0 10248k 760k",
        "-c",
        "read -P 0x88 11M 512k",
        "-c",
        "read -P 0x55 12M 1M",
        "-c",
        "read -P 0 13M 3M",
    ]));
    gw.stop();
}

/// fio with 64 requests in flight, killed mid-run (writes, then reads): the gateway keeps
/// serving other clients and exits cleanly on SIGTERM.
#[test]
fn rbd_clients_killed_with_requests_in_flight() {
    let test = "rbd_clients_killed_with_requests_in_flight";
    if !have_tools(test, &["fio", "qemu-io"]) {
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let _g = create_rbd_volume(&d, &conf, "kill", &unique_image("kill"), 64 * MIB, 4096);
    let gw = Gateway::start(d.path(), &[]);
    for rw in ["randwrite", "randread", "write"] {
        let mut fio = Command::new("fio")
            .current_dir(d.path())
            .args([
                "--name=killed",
                "--ioengine=nbd",
                &format!("--uri={}", gw.uri("kill")),
                &format!("--rw={rw}"),
                "--bs=4k",
                "--iodepth=64",
                // The first half only: requests the killed client had already sent are still
                // run (they are in the socket), so the check below uses the other half.
                "--size=32M",
                "--time_based",
                "--runtime=60",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fio");
        std::thread::sleep(Duration::from_secs(3));
        fio.kill().expect("kill fio");
        let _ = fio.wait();
        // Another client is served as before.
        run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            &gw.uri("kill"),
            "-c",
            "write -P 0x5a 40M 64k",
            "-c",
            "read -P 0x5a 40M 64k",
        ]));
    }
    let log = gw.log_text();
    assert!(!log.contains("panicked"), "{log}");
    gw.stop();
}
