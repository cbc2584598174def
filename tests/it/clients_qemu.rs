//! QEMU's block layer as a client of `cryptnbd serve`: `qemu-io` writes and reads patterns at
//! unaligned offsets on 512- and 4096-byte-sector volumes, `qemu-img convert` copies a qcow2 image
//! into an export that `qemu-img compare` then confirms, and QEMU over TCP answers promptly.
//!
//! QEMU aligns requests to the export's advertised minimum block size itself (its own
//! read-modify-write), so these tests check what a QEMU guest sees; the server's read-modify-write
//! of sub-sector requests is driven directly by `clients_nbdsh.rs`.

use crate::clients_common;

use std::process::Command;

use clients_common::{have_tools, run_bounded, run_ok, DataDir, MIB, TOOL_TIMEOUT};

/// Runs one qemu-io session (`-c` commands in order) against `uri`; fails the test with qemu-io's
/// output if any command fails (qemu-io exits 1 on a failed command or a pattern mismatch).
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw").arg(uri);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run_ok(&mut c);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// Writes (offset, length, pattern) triples with `write -P`, then reads every one back with
/// `read -P` in a second session (a fresh connection), and checks untouched gaps read as zero.
fn unaligned_patterns_round_trip(sector: u32) {
    let d = DataDir::new();
    d.create_volume("disk", 64 * MIB, sector);
    let srv = d.serve(&["disk"]);
    let uri = srv.uri("disk");

    // Offsets and lengths chosen to straddle 512- and 4096-byte boundaries, to be smaller than a
    // sector, to cover a whole sector exactly, and to touch the last byte of the volume.
    let ios: &[(u64, u64, u8)] = &[
        (1000, 5000, 0xab),
        (8191, 2, 0x11),
        (12288 + 1, 511, 0x22),
        (4 * 4096, 4096, 0x33),
        (MIB - 1, 513, 0x44),
        (5 * MIB + 100, 300_000, 0x55),
        (64 * MIB - 700, 700, 0x66),
        // 512-byte aligned I/O (what the kernel and many guests send) at odd 512 offsets.
        (20 * MIB + 512, 512, 0x77),
        (20 * MIB + 1536, 1024, 0x88),
    ];
    let writes: Vec<String> = ios
        .iter()
        .map(|(o, l, p)| format!("write -P 0x{p:02x} {o} {l}"))
        .collect();
    qemu_io(&uri, &writes);

    let mut reads: Vec<String> = ios
        .iter()
        .map(|(o, l, p)| format!("read -P 0x{p:02x} {o} {l}"))
        .collect();
    // The unwritten neighbours, in the same encryption sectors as the writes, still read as zero:
    // read-modify-write must not smear a pattern beyond the bytes asked for.
    let zeroes: &[(u64, u64)] = &[
        (0, 1000),
        (6000, 8191 - 6000),
        (8193, 12289 - 8193),
        (12800, 16384 - 12800),
        (20480, 4096),
        (MIB - 4096, 4095),
        (MIB + 512, 4096 - 512),
        (20 * MIB, 512),
        (20 * MIB + 1024, 512),
        (20 * MIB + 2560, 4096 - 2560),
        (64 * MIB - 4096, 4096 - 700),
    ];
    reads.extend(zeroes.iter().map(|(o, l)| format!("read -P 0 {o} {l}")));
    qemu_io(&uri, &reads);

    // A pattern mismatch must be detected by this very check (guards against a vacuous test).
    let bad = run_bounded(
        Command::new("qemu-io")
            .args(["-f", "raw", &uri, "-c"])
            .arg("read -P 0x99 1000 5000"),
        TOOL_TIMEOUT,
    );
    assert!(
        !bad.status.success() || String::from_utf8_lossy(&bad.stdout).contains("Pattern"),
        "qemu-io did not notice a wrong pattern"
    );
    srv.stop();
}

#[test]
fn qemu_io_unaligned_patterns_on_4096_sector_volume() {
    if !have_tools(
        "qemu_io_unaligned_patterns_on_4096_sector_volume",
        &["qemu-io"],
    ) {
        return;
    }
    unaligned_patterns_round_trip(4096);
}

#[test]
fn qemu_io_unaligned_patterns_on_512_sector_volume() {
    if !have_tools(
        "qemu_io_unaligned_patterns_on_512_sector_volume",
        &["qemu-io"],
    ) {
        return;
    }
    unaligned_patterns_round_trip(512);
}

#[test]
fn qemu_img_convert_qcow2_into_export_then_compare() {
    let name = "qemu_img_convert_qcow2_into_export_then_compare";
    if !have_tools(name, &["qemu-img", "qemu-io"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("vm", 64 * MIB, 4096);
    let qcow = d.path().join("src.qcow2");
    let qcow_s = qcow.to_str().expect("utf-8 temp path");
    run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", qcow_s, "64M"]));
    // Data, an unaligned patch, a zeroed cluster and the very end of the image.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2", qcow_s]);
    for cmd in [
        "write -P 0x5a 0 1M",
        "write -P 0xa5 10M 3M",
        "write -P 0x3c 12345 6789",
        "write -z 20M 1M",
        "write -P 0xc3 63M 1M",
    ] {
        c.arg("-c").arg(cmd);
    }
    run_ok(&mut c);

    let srv = d.serve(&["vm"]);
    let uri = srv.uri("vm");
    // -n: the target exists (the export); qemu-img must not try to create it.
    run_ok(
        Command::new("qemu-img").args(["convert", "-n", "-f", "qcow2", "-O", "raw", qcow_s, &uri]),
    );
    let out = run_ok(
        Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw", qcow_s, &uri]),
    );
    assert!(
        out.contains("Images are identical"),
        "qemu-img compare: {out}"
    );

    // The comparison must be able to fail: change one byte through NBD and compare again.
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x01 30M 1"]));
    let diff = run_bounded(
        Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw", qcow_s, &uri]),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        diff.status.code(),
        Some(1),
        "qemu-img compare should report a difference at 30M: {}",
        String::from_utf8_lossy(&diff.stdout)
    );
    srv.stop();
}

/// QEMU over TCP (`nbd://127.0.0.1:PORT/EXPORT`): many small synchronous requests, each answered
/// promptly. (Replies stalled by Nagle's algorithm under pipelining are checked with fio in
/// `clients_fio.rs`.)
#[test]
fn qemu_io_over_tcp_small_requests_do_not_stall() {
    if !have_tools("qemu_io_over_tcp_small_requests_do_not_stall", &["qemu-io"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", 16 * MIB, 4096);
    let srv = d.serve_tcp(&["disk"]);
    let uri = srv.tcp_uri("disk");
    const ROUND_TRIPS: u64 = 300;
    let mut cmds = Vec::new();
    for i in 0..ROUND_TRIPS / 2 {
        cmds.push(format!("write -P 0x{:02x} {} 4k", i % 200 + 1, i * 4096));
        cmds.push(format!("read -P 0x{:02x} {} 4k", i % 200 + 1, i * 4096));
    }
    let t = std::time::Instant::now();
    qemu_io(&uri, &cmds);
    let took = t.elapsed();
    // A healthy server answers all of them in well under a second, even as a debug build.
    assert!(
        took < std::time::Duration::from_secs(6),
        "{ROUND_TRIPS} synchronous 4 KiB requests over TCP took {took:?}: replies are delayed"
    );
    srv.stop();
}
