//! `nbdinfo` (libnbd) against the in-process server: exports, sizes, block sizes, flags and the
//! `base:allocation` context, over a Unix socket and over TCP.

use crate::common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::fixture::{TestProvider, TestVolume};
use common::{require_tool, run_bounded, TestServer};

const NBDINFO: &str = "/usr/bin/nbdinfo";

fn server() -> TestServer {
    let p = TestProvider::new()
        .with(
            "disk0",
            &TestVolume::new(64 << 20, 4096).with_description("first test disk"),
        )
        .with("ro512", &TestVolume::read_only(1 << 20, 512));
    TestServer::start(Arc::new(p))
}

fn nbdinfo(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run_bounded(Command::new(NBDINFO).args(args), Duration::from_secs(30));
    assert!(ok, "nbdinfo {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}\n{out}"))
}

fn check_disk0(e: &serde_json::Value) {
    assert_eq!(e["export-name"], "disk0");
    assert_eq!(e["export-size"], 64u64 << 20);
    assert_eq!(e["description"], "first test disk");
    assert_eq!(e["block_size_minimum"], 4096);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_fast_zero"], true);
    assert_eq!(e["can_cache"], true);
    assert_eq!(e["can_df"], true);
    let ctx = e["contexts"].as_array().expect("contexts");
    assert!(
        ctx.iter().any(|c| c == "base:allocation"),
        "contexts: {ctx:?}"
    );
}

#[test]
fn nbdinfo_json_shows_export_size_block_sizes_flags_and_contexts() {
    if !require_tool(NBDINFO) {
        return;
    }
    let srv = server();
    let v = nbdinfo(&["--json", &srv.uri("disk0")]);
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["TLS"], false);
    let exports = v["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1);
    check_disk0(&exports[0]);
    // Over TCP too, and a read-only 512-byte-sector export.
    let v = nbdinfo(&["--json", &srv.tcp_uri("ro512")]);
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["can_trim"], false);
}

#[test]
fn nbdinfo_list_shows_every_export() {
    if !require_tool(NBDINFO) {
        return;
    }
    let srv = server();
    let (ok, out, err) = run_bounded(
        Command::new(NBDINFO).args(["--list", "--json", &srv.uri("")]),
        Duration::from_secs(30),
    );
    assert!(ok, "nbdinfo --list failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("nbdinfo --list JSON ({ok}): {e}\n{out}\n{err}"));
    let exports = v["exports"].as_array().expect("exports");
    let names: Vec<&str> = exports
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert!(names.contains(&"disk0"), "{names:?}");
    assert!(names.contains(&"ro512"), "{names:?}");
    let d0 = exports
        .iter()
        .find(|e| e["export-name"] == "disk0")
        .unwrap();
    check_disk0(d0);
}

#[test]
fn nbdinfo_shows_the_refusal_reason() {
    if !require_tool(NBDINFO) {
        return;
    }
    let p = TestProvider::new()
        .with("disk0", &TestVolume::new(1 << 20, 4096))
        .with_refused("locked", "CMK alias/locked is disabled");
    let srv = TestServer::start(Arc::new(p));
    // libnbd shows the server's message only in its debug output.
    let (ok, _out, err) = run_bounded(
        Command::new(NBDINFO)
            .env("LIBNBD_DEBUG", "1")
            .arg(srv.uri("locked")),
        Duration::from_secs(30),
    );
    assert!(!ok);
    assert!(
        err.contains("server error message: export \"locked\" cannot be attached: CMK alias/locked is disabled"),
        "nbdinfo stderr: {err}"
    );
    // `--list` names the export that cannot be attached (libnbd stops at it).
    let (ok, _out, err) = run_bounded(
        Command::new(NBDINFO).args(["--list", &srv.uri("")]),
        Duration::from_secs(30),
    );
    assert!(!ok);
    assert!(err.contains("locked"), "{err}");
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    if !require_tool(NBDINFO) {
        return;
    }
    let disk = TestVolume::new(1 << 20, 4096);
    disk.write(64 * 1024, &[1u8; 8192]);
    let srv = TestServer::start(Arc::new(TestProvider::new().with("disk0", &disk)));
    let v = nbdinfo(&["--map", "--json", &srv.uri("disk0")]);
    let map = v.as_array().expect("map array");
    let data: Vec<_> = map.iter().filter(|m| m["type"] == 0).collect();
    assert_eq!(data.len(), 1, "{map:?}");
    assert_eq!(data[0]["offset"], 64 * 1024);
    assert_eq!(data[0]["length"], 8192);
    assert!(
        map.iter().any(|m| m["type"] == 3),
        "holes reported: {map:?}"
    );
}
