//! The DEW KMS API of `cryptnbd kms serve`, driven by the official Huawei Cloud SDK
//! (huaweicloudsdkcore + huaweicloudsdkkms): the user-application envelope flow, lifecycle calls,
//! error cases (unknown key, disabled, pending deletion, wrong digest, tampered ciphertext, bad
//! signature, expired date) and list-keys pagination — see `tests/python/dew_sdk.py`; and the alias
//! endpoints — see `tests/python/dew_sdk_aliases.py`.

use crate::kms_http_support;

use std::time::Duration;

use kms_http_support::*;

#[test]
fn official_sdk_envelope_flow_lifecycle_and_errors() {
    let Some(py) = venv_python(&["huaweicloudsdkkms", "cryptography"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    let key = access_key(dir.path(), "billing-app", &["--admin"]);
    let mut server = KmsServer::start(dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let out = run_python(
        &py,
        "dew_sdk.py",
        &[
            ("KMS_ENDPOINT", server.url.clone()),
            ("KMS_AK", key.ak.clone()),
            ("KMS_SK", key.sk.clone()),
            ("KMS_PROJECT", key.project.clone()),
            ("WORKDIR", work.path().display().to_string()),
        ],
        Duration::from_secs(300),
    );
    assert!(out.contains("ALL OK"), "{out}");
    // Failed authentications are written as aggregated lines, at the latest on shutdown.
    server.stop();
    // Every request is audited with the credential's name, refused ones included, no secret.
    let audit = audit_text(dir.path());
    assert!(
        audit.contains(r#""operation":"http create-datakey""#),
        "{audit}"
    );
    assert!(audit.contains(r#""credential":"billing-app""#));
    assert!(
        audit.contains("signature does not match"),
        "the bad signature is audited"
    );
    assert!(
        !audit.contains(&key.sk),
        "the secret key never reaches the audit log"
    );
    let on_disk = std::fs::read_to_string(dir.path().join("credentials.json")).unwrap();
    assert!(
        !on_disk.contains(&key.sk),
        "the secret key is stored sealed"
    );
}

/// The alias endpoints (create-alias, list-aliases with pagination, associate-alias,
/// delete-alias) through the official SDK, with key scopes and read-only credentials — see
/// `tests/python/dew_sdk_aliases.py`.
#[test]
fn official_sdk_alias_endpoints() {
    let Some(py) = venv_python(&["huaweicloudsdkkms"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    let id = |alias: &str| -> String {
        let out = cli(
            dir.path(),
            &["kms", "create-key", "--alias", alias, "--json"],
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["key_id"].as_str().expect("key_id").to_string()
    };
    let orders = id("orders");
    let billing = id("billing");
    let full = access_key(dir.path(), "alias-admin", &["--admin"]);
    let scoped = access_key(dir.path(), "orders-app", &["--keys", "alias/orders"]);
    let ro = access_key(dir.path(), "auditor", &["--admin", "--read-only"]);
    let server = KmsServer::start(dir.path(), &[]);
    let out = run_python(
        &py,
        "dew_sdk_aliases.py",
        &[
            ("KMS_ENDPOINT", server.url.clone()),
            ("KMS_PROJECT", full.project.clone()),
            ("KMS_AK", full.ak.clone()),
            ("KMS_SK", full.sk.clone()),
            ("SCOPED_AK", scoped.ak.clone()),
            ("SCOPED_SK", scoped.sk.clone()),
            ("RO_AK", ro.ak.clone()),
            ("RO_SK", ro.sk.clone()),
            ("ORDERS_ID", orders.clone()),
            ("BILLING_ID", billing.clone()),
        ],
        Duration::from_secs(300),
    );
    assert!(out.contains("ALL OK"), "{out}");
    // The CLI sees what the API did: the moved alias names the billing key, the store is sound.
    let described = cli(
        dir.path(),
        &["kms", "describe-key", "alias/orders-5", "--json"],
    );
    assert!(described.contains(&billing), "{described}");
    let listed = cli(dir.path(), &["kms", "list-keys"]);
    assert!(listed.contains("alias/orders"), "{listed}");
    cli(dir.path(), &["check"]);
    // Every alias request is audited under its credential, refused ones included.
    let audit = audit_text(dir.path());
    for op in [
        "create-alias",
        "list-aliases",
        "delete-alias",
        "associate-alias",
    ] {
        assert!(
            audit.contains(&format!(r#""operation":"http {op}""#)),
            "{op} audited: {audit}"
        );
    }
    assert!(audit.contains(r#""credential":"orders-app""#), "{audit}");
    // The refusal answers "not found" to the caller; the audit line says why (no right applied).
    assert!(
        audit.contains(r#""grant":"none: no role, key scope or grant of credential orders-app"#),
        "scope refusals audited with their reason: {audit}"
    );
}
