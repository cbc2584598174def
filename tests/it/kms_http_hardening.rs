//! Request hardening of `cryptnbd kms serve` (issue 20): signatures that cover the executed body,
//! replay refusal and re-encrypt's two contexts through the official SDK
//! (`tests/python/dew_sdk_hardening.py`); 1024 slow-body connections cut at the request deadline
//! while a client from another loopback address is served; the per-address rate and the single
//! answer for unknown access keys and bad signatures, with the refusals aggregated into counted
//! audit lines; and audit log rotation under load without a lost or torn line.

use crate::kms_http_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_http_support::*;
use serde_json::Value;

#[test]
fn official_sdk_re_encrypt_contexts_replay_and_signed_body() {
    let Some(py) = venv_python(&["huaweicloudsdkkms", "requests"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    let key = access_key(dir.path(), "hardening", &["--admin"]);
    let server = KmsServer::start(dir.path(), &[]);
    let out = run_python(
        &py,
        "dew_sdk_hardening.py",
        &[
            ("KMS_ENDPOINT", server.url.clone()),
            ("KMS_AK", key.ak.clone()),
            ("KMS_SK", key.sk.clone()),
            ("KMS_PROJECT", key.project.clone()),
        ],
        Duration::from_secs(300),
    );
    assert!(out.contains("ALL OK"), "{out}");
    let audit = audit_text(dir.path());
    assert!(audit.contains("replayed request"), "the replay is audited");
}

/// A raw HTTP/1.1 `POST path` to the server on `port`, signed as the SDK signs when `key` is
/// given (the exact bytes, so that a test can send them twice).
fn request_bytes(port: u16, key: Option<&AccessKey>, path: &str, body: &[u8]) -> Vec<u8> {
    let host = format!("127.0.0.1:{port}");
    let headers = match key {
        Some(key) => sdk_signed_headers(key, "POST", path, None, &host, body),
        None => vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("host".to_string(), host),
        ],
    };
    let mut msg = format!("POST {path} HTTP/1.1\r\n");
    for (n, v) in &headers {
        msg.push_str(&format!("{n}: {v}\r\n"));
    }
    msg.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = msg.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends `bytes` from the local address `from` (a 127.x address); returns (status, body) —
/// status 0 when the server closed the connection without an answer.
fn send_from(port: u16, from: &str, bytes: &[u8]) -> (u16, String) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    sock.connect_timeout(&server.into(), Duration::from_secs(10))
        .unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    if s.write_all(bytes).is_err() {
        return (0, String::new());
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A signed (or, without `key`, unsigned) request from `from`.
fn raw(port: u16, from: &str, key: Option<&AccessKey>, path: &str, body: &[u8]) -> (u16, String) {
    send_from(port, from, &request_bytes(port, key, path, body))
}

/// Raises the soft limit on open files to the hard limit (the test holds ~1100 sockets).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a plain struct owned by this frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Whether the server has closed `s` (EOF or reset) — without waiting.
fn closed_now(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 512];
    let r = match s.read(&mut b) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    r
}

#[test]
fn slow_body_connections_are_cut_and_another_address_is_served() {
    raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    cli(dir.path(), &["kms", "create-key", "--alias", "k"]);
    let key = access_key(dir.path(), "app", &["--admin"]);
    let timeout = 3u64;
    let mut server = KmsServer::start(
        dir.path(),
        &[
            "--request-timeout",
            &timeout.to_string(),
            "--audit-flush-secs",
            "3600",
        ],
    );
    let port = server.port();
    // 1024 clients on 127.0.0.1 announce a 64 KiB body and trickle it a byte at a time.
    let head = format!(
        "POST /v1.0/{}/kms/create-datakey HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\
         content-type: application/json\r\ncontent-length: 65536\r\n\r\n",
        key.project
    );
    let mut slow: Vec<TcpStream> = Vec::new();
    for _ in 0..1024 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(head.as_bytes());
        slow.push(s);
    }
    let writers: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut writers = writers;
            while !stop.load(Ordering::Relaxed) {
                for w in &mut writers {
                    let _ = w.write(b" ");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let held: Vec<usize> = (0..slow.len())
        .filter(|&i| !closed_now(&mut slow[i]))
        .collect();
    assert!(
        !held.is_empty() && held.len() <= 128,
        "the per-address cap (128) admits some, closes the rest at once: {} held",
        held.len()
    );

    // A well-behaved client on another loopback address is served meanwhile.
    let path = format!("/v1.0/{}/kms/create-datakey", key.project);
    let (st, body) = raw(
        port,
        "127.0.0.2",
        Some(&key),
        &path,
        br#"{"key_id":"alias/k"}"#,
    );
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["plain_text"].as_str().unwrap().len(), 64);
    let still_open = held.iter().filter(|&&i| !closed_now(&mut slow[i])).count();
    assert!(
        still_open > 0 && started.elapsed() < Duration::from_secs(timeout),
        "served while the slow clients were still held ({still_open} open)"
    );

    // Every held slow client is cut at the deadline, with a 408 when it can still be told.
    let mut answered_408 = 0;
    for &i in &held {
        let s = &mut slow[i];
        s.set_read_timeout(Some(Duration::from_secs(timeout + 20)))
            .unwrap();
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
            "slow connection {i} was not cut: {r:?}"
        );
        if String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408") {
            answered_408 += 1;
        }
    }
    assert!(answered_408 > 0, "the cut clients are told 408");
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();

    // The slow clients left no audit line each: one counted line, written at shutdown.
    assert!(!audit_text(dir.path()).contains("did not arrive in time"));
    server.stop();
    let audit = audit_text(dir.path());
    let lines: Vec<Value> = audit
        .lines()
        .filter(|l| l.contains("did not arrive in time"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{audit}");
    assert_eq!(lines[0]["source"], "127.0.0.1");
    // At least the ones held above (connections still in the kernel's accept queue then may
    // have taken a freed slot later and been cut in turn).
    let cut = lines[0]["count"].as_u64().unwrap();
    assert!(
        cut >= held.len() as u64 && cut <= 1024,
        "{cut} cut, {} held",
        held.len()
    );
}

#[test]
fn refusals_before_authentication_are_uniform_rate_limited_and_aggregated() {
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    cli(dir.path(), &["kms", "create-key", "--alias", "k"]);
    let key = access_key(dir.path(), "app", &["--admin"]);
    let mut server = KmsServer::start(
        dir.path(),
        &["--rate-per-address", "5", "--audit-flush-secs", "3600"],
    );
    let port = server.port();
    let path = format!("/v1.0/{}/kms/list-keys", key.project);
    let wrong_sk = AccessKey {
        ak: key.ak.clone(),
        sk: format!("{}x", key.sk),
        project: key.project.clone(),
    };
    let unknown = AccessKey {
        ak: "NOSUCHKEY0123456789".into(),
        sk: key.sk.clone(),
        project: key.project.clone(),
    };
    // One answer for an unknown access key and a wrong signature.
    let a = raw(port, "127.0.0.3", Some(&wrong_sk), &path, b"{}");
    let b = raw(port, "127.0.0.3", Some(&unknown), &path, b"{}");
    assert_eq!(a.0, 401);
    assert_eq!(a, b, "unknown access key and bad signature answer alike");
    // Vault: no token and an unknown token answer alike.
    let vault = |token: Option<&str>| {
        let mut r = ureq::post(&format!("{}/v1/transit/random", server.url));
        if let Some(t) = token {
            r = r.set("x-vault-token", t);
        }
        answer(r.send_bytes(b"{}"))
    };
    assert_eq!(vault(None), vault(Some("cnt.unknown")));
    assert_eq!(vault(None).0, 403);

    // 40 bad requests from 127.0.0.1: the per-address bucket (5/s, burst 10) runs dry.
    let statuses: Vec<u16> = (0..40)
        .map(|_| raw(port, "127.0.0.1", Some(&unknown), &path, b"{}").0)
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    // Another address is served.
    let (st, body) = raw(port, "127.0.0.2", Some(&key), &path, b"{}");
    assert_eq!(st, 200, "{body}");
    // The same signed bytes sent twice: a mutating operation is refused the second time, a
    // read is served again.
    let gen = request_bytes(
        port,
        Some(&key),
        &format!("/v1.0/{}/kms/gen-random", key.project),
        br#"{"random_data_length":"256"}"#,
    );
    assert_eq!(send_from(port, "127.0.0.2", &gen).0, 200);
    let (st, body) = send_from(port, "127.0.0.2", &gen);
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("replayed request"), "{body}");
    let list = request_bytes(port, Some(&key), &path, b"{}");
    assert_eq!(send_from(port, "127.0.0.2", &list).0, 200);
    assert_eq!(send_from(port, "127.0.0.2", &list).0, 200);

    // Nothing refused before authentication is written line by line...
    let before = audit_text(dir.path());
    assert!(!before.contains("unknown"), "{before}");
    // ...but as counted lines on shutdown.
    server.stop();
    let audit = audit_text(dir.path());
    let counted: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["source"] == "127.0.0.1")
        .filter(|v| !v["operation"].as_str().unwrap().contains("transit"))
        .collect();
    let total: u64 = counted.iter().map(|v| v["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 40, "{counted:?}");
    assert!(
        counted.iter().any(|v| v["error"]
            .as_str()
            .unwrap()
            .contains("access key is unknown")),
        "the audit keeps the real reason: {counted:?}"
    );
    assert!(
        counted
            .iter()
            .any(|v| v["error"].as_str().unwrap().starts_with("429")),
        "{counted:?}"
    );
}

#[test]
fn audit_log_rotates_under_load_without_losing_a_line() {
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    cli(dir.path(), &["kms", "create-key", "--alias", "k"]);
    let key = access_key(dir.path(), "app", &["--admin"]);
    let max = 4096u64;
    let server = KmsServer::start(
        dir.path(),
        &["--audit-max-size", &max.to_string(), "--audit-keep", "1000"],
    );
    let n = 60;
    std::thread::scope(|s| {
        for t in 0..4 {
            let (server, key) = (&server, &key);
            s.spawn(move || {
                for i in 0..n / 4 {
                    let body = format!(r#"{{"key_id":"alias/k","sequence":"{t}-{i}"}}"#);
                    let (st, v) =
                        signed_dew(server, key, "POST", "create-datakey", None, body.as_bytes());
                    assert_eq!(st, 200, "{v}");
                }
            });
        }
    });
    let mut files = vec![dir.path().join("audit.log")];
    for k in 1.. {
        let p = dir.path().join(format!("audit.log.{k}"));
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    assert!(files.len() > 3, "the log rotated: {} files", files.len());
    let mut lines = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.len() as u64 <= max,
            "{} is {} bytes",
            f.display(),
            text.len()
        );
        assert!(text.is_empty() || text.ends_with('\n'), "{}", f.display());
        for l in text.lines() {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}"));
            lines.push(v);
        }
    }
    let http = lines
        .iter()
        .filter(|v| v["operation"] == "http create-datakey")
        .count();
    assert_eq!(http, n, "every request's line survives rotation");
    // `kms audit` reads across the rotated files.
    let out = cli(dir.path(), &["kms", "audit", "--json"]);
    assert_eq!(out.lines().count(), lines.len());
    let tail = cli(dir.path(), &["kms", "audit", "--tail", "50", "--json"]);
    assert_eq!(tail.lines().count(), 50);
}
