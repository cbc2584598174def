//! Failover between KMS instances: two `kms serve` processes on one key store (the same data
//! directory), and a storage host whose `volume` commands and gateway (`serve`) take several
//! `--kms-url`s. A volume is created and attached while the first URL is a stopped instance, a
//! closed port, or a fake server answering 503; a 4xx from the first URL is final (the second
//! instance's audit log shows it was not asked); with every URL down the error names each one
//! and why it failed. The client library is also driven alone against fakes that hang after
//! reading a request, answer 500/503, or never accept (a full accept queue: a dead host's connect
//! timeout on loopback). Everything on 127.0.0.1; every wait bounded.

use crate::common;
use crate::kms_http_remote::{kms_host, refused, remote_args, start_serve, uri, Serve};
use crate::kms_http_support::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A tiny HTTP server on 127.0.0.1:0 that answers every request with one fixed status and JSON
/// body (or, hanging, reads it and never answers), and counts the requests.
struct FakeKms {
    url: String,
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FakeKms {
    fn start(status: &'static str, body: &'static str) -> Self {
        Self::spawn(Some((status, body)))
    }

    fn hanging() -> Self {
        Self::spawn(None)
    }

    fn spawn(reply: Option<(&'static str, &'static str)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, halt) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                if !read_request(&mut c) {
                    continue;
                }
                n.fetch_add(1, Ordering::SeqCst);
                match reply {
                    Some((status, body)) => {
                        let _ = write!(
                            c,
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    None => held.push(c),
                }
            }
        });
        FakeKms {
            url: format!("http://127.0.0.1:{port}"),
            port,
            requests,
            stop,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FakeKms {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request's headers and its `content-length` body; false if the peer gave up.
fn read_request(c: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 64 * 1024 || c.read(&mut byte).unwrap_or(0) == 0 {
            return false;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(1 << 20)];
    c.read_exact(&mut body).is_ok()
}

/// A URL of 127.0.0.1 on which nothing listens (a port just bound, then closed).
fn closed_port_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// A listener that never accepts, its queue already full (backlog 0 plus the connections
/// made here), so the kernel drops further SYNs: on loopback, the way a dead host looks to a
/// client — the connect hangs until its timeout.
struct Blackhole {
    url: String,
    _listener: socket2::Socket,
    _queued: Vec<TcpStream>,
}

fn blackhole() -> Blackhole {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    // Fill the accept queue; stop at the first connect that does not complete.
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(c) => queued.push(c),
            Err(_) => break,
        }
    }
    Blackhole {
        url: format!("http://{addr}"),
        _listener: s,
        _queued: queued,
    }
}

/// A key store with a CMK `vols` and a credential for the storage host, served twice.
struct TwoInstances {
    kms_dir: PathBuf,
    a: KmsServer,
    b: KmsServer,
    cred: PathBuf,
}

fn two_instances(tmp: &Path) -> TwoInstances {
    let (kms_dir, cred) = kms_host(tmp, &["--admin"]);
    let a = KmsServer::start(&kms_dir, &[]);
    let b = KmsServer::start(&kms_dir, &[]);
    TwoInstances {
        kms_dir,
        a,
        b,
        cred,
    }
}

/// `cryptnbd volume create NAME` on the storage host with `--kms-url` for each of `urls`.
pub(crate) fn create(store: &Path, name: &str, urls: &str, cred: &Path) -> std::process::Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(store)
        .args(["volume", "create", name, "--size", "4M", "--key", "vols"])
        .args(remote_args(urls, cred))
        .output()
        .unwrap()
}

/// Attaches `name` (nbdinfo reads its size through the gateway) and asserts it works.
pub(crate) fn attaches(sock: &Path, name: &str, serve: &Serve) {
    let (ok, out, err) = common::run_bounded(
        Command::new("nbdinfo").arg("--size").arg(uri(sock, name)),
        Duration::from_secs(60),
    );
    assert!(
        ok && out.trim() == (4u64 << 20).to_string(),
        "attach of {name} failed: {out}{err}\nserve log:\n{}",
        std::fs::read_to_string(&serve.log).unwrap_or_default()
    );
}

fn decrypts_in_audit(kms_dir: &Path) -> usize {
    audit_text(kms_dir)
        .lines()
        .filter(|l| l.contains("decrypt-datakey"))
        .count()
}

#[test]
fn volumes_are_created_and_attached_while_the_first_kms_is_down() {
    if !common::require_tool("/usr/bin/nbdinfo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut kms = two_instances(tmp.path());
    let store = tmp.path().join("storage-host");
    let (a, b) = (kms.a.url.clone(), kms.b.url.clone());

    // Both instances serve the one store: a volume made through A attaches through B alone.
    let out = create(&store, "v1", &a, &kms.cred);
    assert!(out.status.success(), "{out:?}");
    let sock = tmp.path().join("b.sock");
    let serve = start_serve(&store, &sock, &b, &kms.cred);
    attaches(&sock, "v1", &serve);
    drop(serve);

    // A key made after both started is seen at once (each request re-reads the store).
    cli(&kms.kms_dir, &["kms", "create-key", "--alias", "later"]);

    // The first URL a closed port; a comma-separated list in one --kms-url.
    let closed = closed_port_url();
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(&store)
        .args(["volume", "create", "v2", "--size", "4M", "--key", "later"])
        .args(["--kms-url", &format!("{closed},{b}")])
        .args(["--kms-credential", kms.cred.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let sock = tmp.path().join("closed.sock");
    let serve = start_serve(&store, &sock, &format!("{closed},{b}"), &kms.cred);
    attaches(&sock, "v2", &serve);
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(log.contains(&closed) && log.contains(&b), "{log}");
    drop(serve);

    // A stopped: a gateway with `--kms-url A --kms-url B` attaches through B, and a volume is
    // created with A first.
    kms.a.stop();
    let ab = format!("{a},{b}");
    let out = create(&store, "v3", &ab, &kms.cred);
    assert!(out.status.success(), "{out:?}");
    let sock = tmp.path().join("ab.sock");
    let serve = start_serve(&store, &sock, &ab, &kms.cred);
    attaches(&sock, "v3", &serve);
    attaches(&sock, "v1", &serve);
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(
        log.contains("KMS instance serving") && log.contains(&format!("url={b}")),
        "{log}"
    );
    drop(serve);

    // The first URL a host that never answers the connect, passed over after
    // --kms-connect-timeout.
    let dead = blackhole();
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(&store)
        .args(["volume", "create", "v4", "--size", "4M", "--key", "vols"])
        .args(remote_args(&format!("{},{b}", dead.url), &kms.cred))
        .args(["--kms-connect-timeout", "300ms"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains(&dead.url), "{err}");

    // A answers 503 (overloaded): the request moves on to B.
    let busy = FakeKms::start(
        "503 Service Unavailable",
        r#"{"error":{"error_code":"APIGW.0308","error_msg":"retry later"}}"#,
    );
    let sock = tmp.path().join("busy.sock");
    let serve = start_serve(&store, &sock, &format!("{},{b}", busy.url), &kms.cred);
    attaches(&sock, "v2", &serve);
    assert!(busy.requests() >= 1, "the fake 503 server was not asked");
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(log.contains("APIGW.0308"), "{log}");
}

#[test]
fn a_refusal_is_final_and_all_down_names_every_url() {
    if !common::require_tool("/usr/bin/nbdinfo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let kms = two_instances(tmp.path());
    let store = tmp.path().join("storage-host");
    let b = kms.b.url.clone();
    let out = create(&store, "v1", &b, &kms.cred);
    assert!(out.status.success(), "{out:?}");

    // A refuses (404 KMS.0207, as for a revoked grant): the attach fails with A's answer, and
    // B is not asked (no decrypt-datakey in the store's audit log, which both instances share).
    let no = FakeKms::start(
        "404 Not Found",
        r#"{"error":{"error_code":"KMS.0207","error_msg":"key not found"}}"#,
    );
    let before = decrypts_in_audit(&kms.kms_dir);
    let sock = tmp.path().join("no.sock");
    let serve = start_serve(&store, &sock, &format!("{},{b}", no.url), &kms.cred);
    let text = refused(&sock, "v1", &serve);
    assert!(text.contains("KMS.0207"), "{text}");
    assert_eq!(no.requests(), 1, "a refusal must not be retried");
    assert_eq!(decrypts_in_audit(&kms.kms_dir), before, "B was asked");
    drop(serve);

    // Both URLs down: the CLI's error lists each and why.
    let (d1, d2) = (closed_port_url(), closed_port_url());
    let out = create(&store, "v2", &format!("{d1},{d2}"), &kms.cred);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for d in [&d1, &d2] {
        assert!(
            err.contains(&format!("{d}: no connection")),
            "{d} missing in: {err}"
        );
    }

    // And the gateway's attach error names both too (in its log).
    let sock = tmp.path().join("down.sock");
    let serve = start_serve(&store, &sock, &format!("{d1},{d2}"), &kms.cred);
    let text = refused(&sock, "v1", &serve);
    assert!(
        text.contains(&format!("cannot reach the KMS at {d1}, {d2}"))
            && text.contains(&format!("{d2}: no connection")),
        "{text}"
    );
}

/// The client library alone, against fake instances: a timeout after sending moves a repeatable
/// operation on, but stops one that changes the store (its outcome there is unknown), and so does
/// a 500; a connect timeout (a host that does not answer) and a 503 ("not done") move either on.
#[test]
fn store_changing_requests_are_not_resent_once_possibly_done() {
    use cryptnbd::kms_http::client::{RemoteKms, RemoteKmsConfig, Timeouts};
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let cred = tmp.path().join("c.cred");
    std::fs::write(
        &cred,
        r#"{"access_key":"AK","secret_key":"SK","project_id":"p"}"#,
    )
    .unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
    let client = |first: &str, second: &str| {
        RemoteKms::new(&RemoteKmsConfig {
            url: vec![first.to_string(), second.to_string()],
            credential_file: cred.clone(),
            ca_file: None,
        })
        .unwrap()
        .with_timeouts(Timeouts {
            connect: Duration::from_millis(300),
            request: Duration::from_millis(500),
        })
    };
    let ok = FakeKms::start(
        "200 OK",
        r#"{"random_data":"00","key_info":{"key_id":"k"}}"#,
    );
    let hung = FakeKms::hanging();

    let v = client(&hung.url, &ok.url)
        .call_json("gen-random", &json!({"random_data_length": "8"}))
        .unwrap();
    assert_eq!(v["random_data"], "00");
    assert_eq!((hung.requests(), ok.requests()), (1, 1));

    let e = client(&hung.url, &ok.url)
        .call_json("create-key", &json!({"key_alias": "x"}))
        .unwrap_err();
    let text = format!("{:#}", anyhow::Error::from(e));
    assert!(
        text.contains(&format!("{}: no answer", hung.url))
            && text.contains("create-key changes the key store"),
        "{text}"
    );
    assert_eq!(
        (hung.requests(), ok.requests()),
        (2, 1),
        "create-key was re-sent"
    );

    let failing = FakeKms::start("500 Internal Server Error", r#"{"error_code":"KMS.0101"}"#);
    let e = client(&failing.url, &ok.url)
        .call_json("create-key", &json!({"key_alias": "x"}))
        .unwrap_err();
    assert!(format!("{:#}", anyhow::Error::from(e)).contains("HTTP 500 KMS.0101"));
    assert_eq!(ok.requests(), 1, "create-key was re-sent after a 500");

    // A host that does not answer the connect: nothing was sent, so even create-key moves on.
    let dead = blackhole();
    let v = client(&dead.url, &ok.url)
        .call_json("create-key", &json!({"key_alias": "x"}))
        .unwrap();
    assert_eq!(v["key_info"]["key_id"], "k");
    assert_eq!(ok.requests(), 2);

    let busy = FakeKms::start("503 Service Unavailable", r#"{"error_code":"APIGW.0308"}"#);
    let v = client(&busy.url, &ok.url)
        .call_json("create-key", &json!({"key_alias": "x"}))
        .unwrap();
    assert_eq!(v["key_info"]["key_id"], "k");
    assert_eq!((busy.requests(), ok.requests()), (1, 3));
}
