//! Shared helpers for the KMS HTTP service tests: a key store in a temp dir, `cryptnbd kms serve`
//! started as a real process on 127.0.0.1:0 (plain HTTP on loopback), credentials made with the
//! real CLI, and the Python venv (`target/pyvenv`, made by `tools/test`) that holds the official
//! clients. Without the venv a test FAILS when `CI=true`, else it is skipped loudly.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cryptnbd::kms_http::sign;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_cryptnbd");

/// The venv's interpreter, if the venv has the packages the tests need.
pub fn venv_python(modules: &[&str]) -> Option<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyvenv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .arg("-c")
            .arg(format!("import {}", modules.join(", ")))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if ok {
        return Some(py);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "{} with {modules:?} is required (CI=true) but missing: run tools/test",
            py.display()
        );
    }
    eprintln!(
        "SKIPPING: {} lacks {modules:?} (run tools/test to make it)",
        py.display()
    );
    None
}

/// Runs the CLI against `dir`; panics with its stderr on failure; returns stdout.
pub fn cli(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run cryptnbd");
    assert!(
        out.status.success(),
        "cryptnbd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// An access key made with `kms credential create --json`.
pub struct AccessKey {
    pub ak: String,
    pub sk: String,
    pub project: String,
}

pub fn access_key(dir: &Path, name: &str, extra: &[&str]) -> AccessKey {
    let v = credential_json(dir, name, "proj1", extra);
    AccessKey {
        ak: v["access_key"].as_str().unwrap().into(),
        sk: v["secret_key"].as_str().unwrap().into(),
        project: "proj1".into(),
    }
}

/// `kms credential create NAME --project PROJECT --json EXTRA…`: its JSON answer (access key,
/// secret key, user id, rights).
pub fn credential_json(dir: &Path, name: &str, project: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "kms",
        "credential",
        "create",
        name,
        "--project",
        project,
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&cli(dir, &args)).expect("json")
}

/// `cryptnbd kms serve` on 127.0.0.1:0; killed on drop.
pub struct KmsServer {
    pub child: Child,
    pub url: String,
}

impl KmsServer {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("--data-dir")
            .arg(dir)
            .args(["kms", "serve", "--listen", "127.0.0.1:0", "--insecure-http"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kms serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("kms serve printed its address");
        let url = line
            .trim()
            .strip_prefix("kms listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        KmsServer { child, url }
    }

    /// Stops the server as an operator would (SIGTERM) and waits for it: it writes its pending
    /// aggregated audit lines on the way out.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for KmsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a script from `tests/python/` with `py`, bounded in time; panics with its output on failure.
pub fn run_python(py: &Path, script: &str, env: &[(&str, String)], limit: Duration) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let mut child = Command::new(py)
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait python") {
            let out = child.wait_with_output().expect("python output");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(status.success(), "{script} failed:\n{text}");
            return text;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("python output");
            panic!(
                "{script} did not finish in {limit:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The audit log's text.
pub fn audit_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("audit.log")).unwrap_or_default()
}

/// Unix seconds now (for `X-Sdk-Date`).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A DEW request to `/v1.0/{project}/kms/{rest}`, signed (SDK-HMAC-SHA256) by the library's own
/// signing code as the SDK would; returns (status, JSON body, or the text when it is not JSON).
pub fn signed_dew(
    server: &KmsServer,
    key: &AccessKey,
    method: &str,
    rest: &str,
    query: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let path = format!("/v1.0/{}/kms/{rest}", key.project);
    let host = format!("127.0.0.1:{}", server.port());
    let headers = sdk_signed_headers(key, method, &path, query, &host, body);
    let url = match query {
        Some(q) => format!("{}{path}?{q}", server.url),
        None => format!("{}{path}", server.url),
    };
    let mut r = ureq::request(method, &url);
    for (n, v) in &headers {
        r = r.set(n, v);
    }
    answer(r.send_bytes(body))
}

/// The headers the SDK sends (content-type, host, x-sdk-date) and the `authorization` header
/// signing them and `body` with `key` (SDK-HMAC-SHA256, by the library's own signing code).
pub fn sdk_signed_headers(
    key: &AccessKey,
    method: &str,
    path: &str,
    query: Option<&str>,
    host: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    let date = sign::format_sdk_date(now());
    let mut headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("host".to_string(), host.to_string()),
        ("x-sdk-date".to_string(), date.clone()),
    ];
    let names: Vec<String> = headers.iter().map(|h| h.0.clone()).collect();
    let req = sign::Request {
        method,
        path,
        query,
        headers: &headers,
        body,
    };
    let sts = sign::string_to_sign(&req, &names, &date).unwrap();
    let auth = format!(
        "SDK-HMAC-SHA256 Access={}, SignedHeaders={}, Signature={}",
        key.ak,
        names.join(";"),
        sign::signature(key.sk.as_bytes(), &sts)
    );
    headers.push(("authorization".to_string(), auth));
    headers
}

/// (status, JSON body, or the text when it is not JSON) of a ureq result, error statuses included.
pub fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}
