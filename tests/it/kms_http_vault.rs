//! The Vault Transit API of `cryptnbd kms serve`, driven by hvac (keys create/read/list/rotate/
//! config, encrypt/decrypt/rewrap, datakey plaintext/wrapped, random, errors) and by RGW-style
//! raw requests (no `bits`, the token header twice) — see `tests/python/vault_hvac.py`.

use crate::kms_http_support;

use std::time::Duration;

use kms_http_support::*;

#[test]
fn hvac_transit_and_rgw_style_requests() {
    let Some(py) = venv_python(&["hvac", "requests"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    cli(dir.path(), &["kms", "create-key", "--alias", "frozen"]);
    cli(dir.path(), &["kms", "disable-key", "frozen"]);
    cli(dir.path(), &["kms", "create-key", "--alias", "scoped-key"]);
    let token = cli(dir.path(), &["kms", "token", "create", "rgw", "--admin"])
        .trim()
        .to_string();
    let scoped = cli(
        dir.path(),
        &["kms", "token", "create", "scoped", "--keys", "scoped-key"],
    )
    .trim()
    .to_string();
    assert!(token.starts_with("cnt.") && scoped.starts_with("cnt."));
    let server = KmsServer::start(dir.path(), &[]);
    let out = run_python(
        &py,
        "vault_hvac.py",
        &[
            ("VAULT_ADDR", server.url.clone()),
            ("VAULT_TOKEN", token.clone()),
            ("VAULT_TOKEN_SCOPED", scoped.clone()),
        ],
        Duration::from_secs(300),
    );
    assert!(out.contains("ALL OK"), "{out}");
    let audit = audit_text(dir.path());
    assert!(audit.contains(r#""credential":"rgw""#), "{audit}");
    assert!(audit.contains(r#""credential":"scoped""#));
    assert!(!audit.contains(&token) && !audit.contains(&scoped));
    let on_disk = std::fs::read_to_string(dir.path().join("credentials.json")).unwrap();
    assert!(!on_disk.contains(&token), "tokens are stored hashed");
}
