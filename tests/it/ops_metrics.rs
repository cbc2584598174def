//! `serve --metrics`: after fio writes and reads through the `nbd` engine, the Prometheus text
//! scraped from the endpoint counts exactly the requests and bytes fio reports, and the latency
//! histograms count every read and write.

use crate::common::free_port;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use crate::clients_common::{have_tools, run_ok_within};
use crate::ops_ctl::Serve;

/// `GET /metrics` over a plain socket: the body.
fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("text/plain; version=0.0.4"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the sample `name{labels}` (labels exactly as printed).
fn sample(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
        .trim()
        .parse::<f64>()
        .unwrap() as u64
}

/// fio with the nbd engine; its job report.
fn fio(dir: &std::path::Path, uri: &str, rw: &str) -> serde_json::Value {
    let mut c = Command::new("fio");
    c.current_dir(dir).args([
        "--name=m",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={rw}"),
        "--bs=4k",
        "--size=8M",
        "--iodepth=8",
        "--output-format=json",
    ]);
    let out = run_ok_within(&mut c, Duration::from_secs(120));
    let json = &out[out.find('{').unwrap_or(0)..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["jobs"][0].clone()
}

#[test]
fn metrics_count_what_fio_did() {
    if !have_tools("metrics_count_what_fio_did", &["fio"]) {
        return;
    }
    let port = free_port();
    let s = Serve::start(&["--metrics", &format!("127.0.0.1:{port}")]);
    let uri = format!("nbd+unix:///disk0?socket={}", s.nbd_sock().display());
    let w = fio(&s.data, &uri, "randwrite");
    let r = fio(&s.data, &uri, "randread");
    let (wb, wn) = (
        w["write"]["io_bytes"].as_u64().unwrap(),
        w["write"]["total_ios"].as_u64().unwrap(),
    );
    let (rb, rn) = (
        r["read"]["io_bytes"].as_u64().unwrap(),
        r["read"]["total_ios"].as_u64().unwrap(),
    );
    assert_eq!(wb, 8 << 20);
    assert_eq!(rb, 8 << 20);

    let body = scrape(port);
    let e = "export=\"disk0\"";
    assert_eq!(
        sample(
            &body,
            &format!("cryptnbd_bytes_total{{{e},direction=\"write\"}}")
        ),
        wb
    );
    assert_eq!(
        sample(
            &body,
            &format!("cryptnbd_bytes_total{{{e},direction=\"read\"}}")
        ),
        rb
    );
    assert_eq!(
        sample(
            &body,
            &format!("cryptnbd_requests_total{{{e},command=\"write\"}}")
        ),
        wn
    );
    assert_eq!(
        sample(
            &body,
            &format!("cryptnbd_requests_total{{{e},command=\"read\"}}")
        ),
        rn
    );
    for (cmd, n) in [("write", wn), ("read", rn)] {
        let series = format!("cryptnbd_request_duration_seconds_count{{{e},command=\"{cmd}\"}}");
        assert_eq!(sample(&body, &series), n);
        let inf = format!(
            "cryptnbd_request_duration_seconds_bucket{{{e},command=\"{cmd}\",le=\"+Inf\"}}"
        );
        assert_eq!(
            sample(&body, &inf),
            n,
            "the +Inf bucket holds every request"
        );
    }
    for kind in ["invalid", "no_memory", "volume"] {
        let series = format!("cryptnbd_request_errors_total{{{e},kind=\"{kind}\"}}");
        assert_eq!(sample(&body, &series), 0);
    }
    assert_eq!(
        sample(&body, &format!("cryptnbd_requests_in_flight{{{e}}}")),
        0
    );
    // fio's nbd engine connects once to size the export, then once per job.
    assert!(sample(&body, "cryptnbd_connections_accepted_total") >= 2);
    assert!(sample(&body, "cryptnbd_buffer_budget_bytes") > 0);
    assert!(
        !body.contains("root.key") && !body.contains("uid="),
        "{body}"
    );
}

/// `kms serve --metrics`: a successful create-datakey, a refused one and a burst over the rate
/// limit are counted by operation and status.
#[test]
fn kms_metrics_count_requests_by_operation_and_status() {
    use crate::kms_http_support::{access_key, cli, signed_dew, KmsServer};
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    cli(dir.path(), &["kms", "create-key", "--alias", "k1"]);
    let key = access_key(dir.path(), "app", &["--admin"]);
    let port = free_port();
    let server = KmsServer::start(
        dir.path(),
        &["--rate", "2", "--metrics", &format!("127.0.0.1:{port}")],
    );
    // Each body carries its own `sequence`: identical signed requests would be refused as replays.
    let dew = |key_id: &str, n: u32| {
        let body = format!(r#"{{"key_id":"{key_id}","sequence":"seq-{n}"}}"#);
        signed_dew(
            &server,
            &key,
            "POST",
            "create-datakey",
            None,
            body.as_bytes(),
        )
        .0
    };
    assert_eq!(dew("k1", 0), 200);
    assert_eq!(dew("nope", 1), 404);
    // The burst allowance is twice the rate: a few more in a row hit the limit.
    let limited = (0..8).filter(|n| dew("k1", 2 + n) == 429).count() as u64;
    assert!(limited > 0, "the rate limit refused some");
    let body = scrape(port);
    let ok = sample(
        &body,
        "cryptnbd_kms_requests_total{operation=\"create-datakey\",status=\"200\"}",
    );
    assert!(ok >= 1, "{body}");
    assert_eq!(
        sample(
            &body,
            "cryptnbd_kms_requests_total{operation=\"create-datakey\",status=\"404\"}"
        ),
        1
    );
    assert_eq!(sample(&body, "cryptnbd_kms_rate_limited_total"), limited);
    // Every authorized (or refused) create-datakey was decided by the admin role.
    assert_eq!(
        sample(&body, "cryptnbd_kms_grant_checks_total{result=\"admin\"}"),
        ok + 1
    );
    assert_eq!(
        sample(
            &body,
            "cryptnbd_kms_request_duration_seconds_count{operation=\"create-datakey\"}"
        ),
        ok + 1 + limited
    );
    assert!(!body.contains(&key.sk), "no secret in the metrics");
}
