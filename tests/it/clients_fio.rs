//! fio's `nbd` engine as a client: random writes with `verify=crc32c` from several jobs, each job
//! its own NBD connection to the same export (so they share one open volume), then a verify pass.

use crate::clients_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clients_common::{have_tools, run_ok_within, DataDir, MIB};

const JOBS: u64 = 4;
const PER_JOB: u64 = 16 * MIB;

/// Runs `JOBS` fio jobs (one NBD connection each) with `extra` options; returns fio's JSON report.
fn fio_verify(dir: &Path, uri: &str, extra: &[&str]) -> serde_json::Value {
    let mut c = Command::new("fio");
    // fio drops state files into its working directory: keep them in the temporary data dir.
    c.current_dir(dir);
    c.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--numjobs={JOBS}"),
        // Each job owns its own region so one job's verify never sees another's writes.
        &format!("--size={PER_JOB}"),
        &format!("--offset_increment={PER_JOB}"),
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
        "--group_reporting=0",
    ]);
    c.args(extra);
    let out = run_ok_within(&mut c, Duration::from_secs(300));
    // fio prints warnings before the JSON document on some versions.
    let json = &out[out.find('{').unwrap_or(0)..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {out}"))
}

fn check_jobs(report: &serde_json::Value, what: &str) {
    let jobs = report["jobs"].as_array().expect("fio jobs array");
    assert_eq!(jobs.len() as u64, JOBS, "{what}: one report per job");
    for j in jobs {
        assert_eq!(j["error"].as_i64(), Some(0), "{what}: job failed: {j}");
        let written = j["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert_eq!(
            written, PER_JOB,
            "{what}: every job writes its whole region: {j}"
        );
        let verified = j["read"]["io_bytes"].as_u64().unwrap_or(0);
        assert_eq!(
            verified, PER_JOB,
            "{what}: every job verifies its whole region: {j}"
        );
    }
}

#[test]
fn fio_randwrite_verify_crc32c_four_connections() {
    if !have_tools("fio_randwrite_verify_crc32c_four_connections", &["fio"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", JOBS * PER_JOB, 4096);
    let srv = d.serve(&["disk"]);
    let r = fio_verify(d.path(), &srv.uri("disk"), &["--rw=randwrite", "--bs=4k"]);
    check_jobs(&r, "randwrite 4k");
    srv.stop();
}

/// Mixed request sizes from 512 bytes to 64 KiB on a 512-byte-sector volume. (On a 4096-byte
/// volume libnbd itself refuses requests below the advertised minimum block size, so sub-sector
/// writes there are covered by `clients_nbdsh.rs`, which turns that client-side check off.)
#[test]
fn fio_randwrite_mixed_sizes_verify_512_sector_volume() {
    if !have_tools(
        "fio_randwrite_mixed_sizes_verify_512_sector_volume",
        &["fio"],
    ) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", JOBS * PER_JOB, 512);
    let srv = d.serve(&["disk"]);
    let r = fio_verify(
        d.path(),
        &srv.uri("disk"),
        &["--rw=randwrite", "--bsrange=512-64k", "--blockalign=512"],
    );
    check_jobs(&r, "randwrite 512-64k");
    srv.stop();
}

/// Random 4 KiB reads at queue depth 16 for `secs` seconds; returns fio's read IOPS.
fn randread_iops(dir: &Path, uri: &str, secs: u32) -> f64 {
    let mut c = Command::new("fio");
    c.current_dir(dir).args([
        "--name=latency",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--time_based",
        &format!("--runtime={secs}"),
        "--output-format=json",
    ]);
    let out = run_ok_within(&mut c, Duration::from_secs(120));
    let json = &out[out.find('{').unwrap_or(0)..];
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {out}"));
    v["jobs"][0]["read"]["iops"].as_f64().expect("read iops")
}

/// Pipelined small requests over TCP must not be much slower than over a Unix socket. Without
/// TCP_NODELAY on accepted sockets, Nagle's algorithm holds small replies back until the client's
/// delayed ACK (~40 ms), which shows as a few hundred IOPS instead of thousands.
#[test]
fn fio_tcp_pipelined_reads_are_not_stalled_by_nagle() {
    if !have_tools("fio_tcp_pipelined_reads_are_not_stalled_by_nagle", &["fio"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", 16 * MIB, 4096);
    let srv = d.serve_tcp(&["disk"]);
    // Written data, so reads decrypt real sectors instead of skipping holes.
    let mut c = Command::new("fio");
    c.current_dir(d.path()).args([
        "--name=fill",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("disk")),
        "--rw=write",
        "--bs=1M",
        "--size=16M",
    ]);
    run_ok_within(&mut c, Duration::from_secs(120));
    let unix = randread_iops(d.path(), &srv.uri("disk"), 3);
    let tcp = randread_iops(d.path(), &srv.tcp_uri("disk"), 3);
    eprintln!("randread 4k qd16: unix {unix:.0} IOPS, tcp {tcp:.0} IOPS");
    assert!(unix > 0.0, "no reads completed over the Unix socket");
    assert!(
        tcp >= unix / 4.0,
        "TCP reaches {tcp:.0} IOPS against {unix:.0} over a Unix socket: replies are held back \
         (is TCP_NODELAY set on accepted sockets?)"
    );
    srv.stop();
}
