//! Limits and bad input of `cryptnbd kms serve`, with raw HTTP requests (ureq) signed by the
//! library's SDK-HMAC-SHA256 code: body size cap (413), malformed JSON and wrong field types
//! (400 naming the field), an unknown operation, a per-credential request rate (429 for one
//! credential while another is served), every refusal audited with the credential's name; and
//! HTTPS with a private CA (`--tls-cert/--tls-key` on the server, `--kms-ca` on a storage host),
//! plain HTTP refused off loopback.

use crate::kms_http_support;

use std::path::Path;
use std::process::Command;

use kms_http_support::*;
use serde_json::Value;

/// A signed DEW `POST /v1.0/{project}/kms/{op}`; returns (status, JSON body).
fn dew(server: &KmsServer, key: &AccessKey, op: &str, body: &[u8]) -> (u16, Value) {
    signed_dew(server, key, "POST", op, None, body)
}

fn vault(server: &KmsServer, token: &str, path: &str, body: &[u8]) -> (u16, Value) {
    answer(
        ureq::post(&format!("{}/v1/transit/{path}", server.url))
            .set("x-vault-token", token)
            .send_bytes(body),
    )
}

#[test]
fn bad_input_limits_and_rate_are_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    cli(dir.path(), &["kms", "create-key", "--alias", "k1"]);
    let key = access_key(dir.path(), "app", &["--admin"]);
    let scoped = access_key(dir.path(), "other", &["--keys", "k1", "--read-only"]);
    let token = cli(dir.path(), &["kms", "token", "create", "busy", "--admin"])
        .trim()
        .to_string();
    let calm = cli(dir.path(), &["kms", "token", "create", "calm", "--admin"])
        .trim()
        .to_string();
    let server = KmsServer::start(dir.path(), &["--max-body", "2048", "--rate", "5"]);

    let (st, v) = dew(&server, &key, "create-datakey", br#"{"key_id": 5}"#);
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["error_code"], "KMS.0202");
    assert!(
        v["error"]["error_msg"].as_str().unwrap().contains("key_id"),
        "{v}"
    );
    let (st, v) = dew(&server, &key, "create-datakey", b"{\"key_id\": ");
    assert_eq!(
        (st, v["error"]["error_code"].as_str()),
        (400, Some("KMS.0202")),
        "{v}"
    );
    let (st, v) = dew(&server, &key, "create-datakey", b"{}");
    assert_eq!(v["error"]["error_code"], "KMS.0204", "{st} {v}");
    assert!(v["error"]["error_msg"].as_str().unwrap().contains("key_id"));
    let (st, v) = dew(
        &server,
        &key,
        "create-datakey",
        br#"{"key_id":"k1","datakey_length":"100"}"#,
    );
    assert!(
        st == 400
            && v["error"]["error_msg"]
                .as_str()
                .unwrap()
                .contains("datakey_length"),
        "{v}"
    );
    let (st, _) = dew(&server, &key, "no-such-op", b"{}");
    assert_eq!(st, 404);
    let big = format!(r#"{{"key_id":"k1","pad":"{}"}}"#, "x".repeat(4000));
    let (st, _) = dew(&server, &key, "create-datakey", big.as_bytes());
    assert_eq!(st, 413);
    let (st, v) = dew(&server, &key, "create-datakey", br#"{"key_id":"k1"}"#);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["plain_text"].as_str().unwrap().len(), 64);

    // Scope: a read-only credential limited to k1 cannot create keys or touch others.
    let (st, v) = dew(&server, &scoped, "create-key", br#"{"key_alias":"x"}"#);
    assert_eq!(st, 403, "{v}");
    let (st, _) = dew(&server, &scoped, "disable-key", br#"{"key_id":"k1"}"#);
    assert_eq!(st, 403);
    let (st, _) = dew(&server, &scoped, "create-datakey", br#"{"key_id":"k1"}"#);
    assert_eq!(st, 200);
    let (st, v) = dew(&server, &scoped, "list-keys", b"{}");
    assert_eq!((st, v["total"].as_u64()), (200, Some(1)), "{v}");

    // Rate: 5/s with a burst of 10 — 30 quick calls from one token hit 429, another token is fine.
    let statuses: Vec<u16> = (0..30)
        .map(|_| vault(&server, &token, "random", b"{}").0)
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().filter(|s| **s == 200).count() >= 10,
        "{statuses:?}"
    );
    assert_eq!(vault(&server, &calm, "random", b"{}").0, 200);

    let audit = audit_text(dir.path());
    let refused_rate = audit
        .lines()
        .filter(|l| l.contains(r#""credential":"busy""#) && l.contains("429"))
        .count();
    assert!(
        refused_rate > 0,
        "rate refusals are audited with the credential's name"
    );
    assert!(audit.contains(r#""credential":"other""#) && audit.contains("403"));
    for secret in [&key.sk, &scoped.sk, &token, &calm] {
        assert!(!audit.contains(secret.as_str()));
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        st.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

#[test]
fn https_with_a_private_ca_and_no_plain_http_off_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    openssl(
        t,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test kms CA",
        ],
    );
    openssl(
        t,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "kms.key",
            "-out",
            "kms.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        t.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        t,
        &[
            "x509",
            "-req",
            "-in",
            "kms.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "kms.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );

    let kms_dir = t.join("kms");
    cli(&kms_dir, &["kms", "init"]);
    cli(&kms_dir, &["kms", "create-key", "--alias", "vols"]);
    let cred = t.join("s.cred");
    cli(
        &kms_dir,
        &[
            "kms",
            "credential",
            "create",
            "s",
            "--project",
            "p",
            "--admin",
            "--output",
            cred.to_str().unwrap(),
        ],
    );

    // Plain HTTP is refused on a non-loopback address.
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(&kms_dir)
        .args(["kms", "serve", "--listen", "0.0.0.0:0", "--insecure-http"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plain HTTP"));

    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(&kms_dir)
        .args(["kms", "serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(t.join("kms.pem"))
        .arg("--tls-key")
        .arg(t.join("kms.key"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("kms listening on ")
        .unwrap()
        .to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let store = t.join("store");
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .arg("--data-dir")
            .arg(&store)
            .args([
                "volume",
                "create",
                "v",
                "--size",
                "1M",
                "--key",
                "vols",
                "--kms-url",
                &url,
            ])
            .arg("--kms-credential")
            .arg(&cred)
            .args(extra)
            .output()
            .unwrap()
    };
    // Without the private CA the server's certificate is not trusted.
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&url),
        "the error names the KMS"
    );
    let out = run(&["--kms-ca", t.join("ca.pem").to_str().unwrap()]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A credential file others can read is refused.
    std::fs::set_permissions(&cred, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = run(&["--kms-ca", t.join("ca.pem").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("0644"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
