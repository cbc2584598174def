//! The DEW KMS API of `cryptnbd kms serve`, driven by the official Huawei Cloud SDK
//! (huaweicloudsdkcore + huaweicloudsdkkms): the user-application envelope flow, lifecycle calls,
//! error cases (unknown key, disabled, pending deletion, wrong digest, tampered ciphertext, bad
//! signature, expired date) and list-keys pagination — see `tests/python/dew_sdk.py`.

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
    let key = access_key(dir.path(), "billing-app", &[]);
    let server = KmsServer::start(dir.path(), &[]);
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
