//! Grants through the official Huawei Cloud SDK (`tests/python/dew_sdk_grants.py`): the five
//! grant calls, pagination, validation, retiring, a grantee using its grant and being refused
//! key management, and the encryption-context constraint; then the audit log names the grant
//! that allowed each grantee request and why the refused ones had none. And the CLI side.

use crate::kms_http_support;

use std::time::Duration;

use kms_http_support::*;
use serde_json::Value;

/// A credential made with the CLI: (access key, secret key, user id).
fn credential(dir: &std::path::Path, name: &str, extra: &[&str]) -> (String, String, String) {
    let v = credential_json(dir, name, "p1", extra);
    let s = |f: &str| v[f].as_str().unwrap().to_string();
    (s("access_key"), s("secret_key"), s("user_id"))
}

fn key_id(dir: &std::path::Path, alias: &str) -> String {
    let v: Value = serde_json::from_str(&cli(
        dir,
        &["kms", "create-key", "--alias", alias, "--json"],
    ))
    .unwrap();
    v["key_id"].as_str().unwrap().to_string()
}

#[test]
fn official_sdk_grants() {
    let Some(py) = venv_python(&["huaweicloudsdkkms"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    let vols = key_id(dir.path(), "vols");
    let other = key_id(dir.path(), "other");
    let admin = credential(dir.path(), "ops", &["--admin"]);
    let gw = credential(dir.path(), "gateway", &[]);
    let ret = credential(dir.path(), "retirer", &[]);
    let server = KmsServer::start(dir.path(), &[]);
    let out = run_python(
        &py,
        "dew_sdk_grants.py",
        &[
            ("KMS_ENDPOINT", server.url.clone()),
            ("KMS_PROJECT", "p1".into()),
            ("KMS_AK", admin.0.clone()),
            ("KMS_SK", admin.1.clone()),
            ("ADMIN_USER", admin.2.clone()),
            ("GW_AK", gw.0.clone()),
            ("GW_SK", gw.1.clone()),
            ("GW_USER", gw.2.clone()),
            ("RET_AK", ret.0.clone()),
            ("RET_SK", ret.1.clone()),
            ("RET_USER", ret.2.clone()),
            ("VOLS_ID", vols.clone()),
            ("OTHER_ID", other),
        ],
        Duration::from_secs(300),
    );
    assert!(out.contains("ALL OK"), "{out}");
    // Every decision is audited with the credential, the key id and the grant (or why none).
    let lines: Vec<Value> = audit_text(dir.path())
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let by_gateway = |op: &str| {
        lines
            .iter()
            .filter(|l| l["credential"] == "gateway" && l["operation"] == format!("http {op}"))
            .collect::<Vec<_>>()
    };
    let allowed = by_gateway("create-datakey")
        .into_iter()
        .find(|l| l["outcome"] == "success")
        .expect("an allowed create-datakey");
    assert_eq!(allowed["key_id"], vols.as_str());
    assert_eq!(allowed["grant"].as_str().unwrap().len(), 64, "{allowed}");
    let refused = by_gateway("schedule-key-deletion");
    assert!(
        refused[0]["grant"]
            .as_str()
            .unwrap()
            .starts_with("none: no role, key scope or grant of credential gateway"),
        "{:?}",
        refused[0]
    );
    let constrained = lines.iter().any(|l| {
        l["grant"]
            .as_str()
            .is_some_and(|g| g.contains("require another encryption context"))
    });
    assert!(
        constrained,
        "a constrained refusal says so in the audit log"
    );
    assert!(lines.iter().any(|l| l["operation"] == "http create-grant"
        && l["credential"] == "ops"
        && l["grant"] == "admin"));
}

#[test]
fn cli_grants_and_least_privilege() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cli(d, &["kms", "init"]);
    let vols = key_id(d, "vols");
    let (_, _, user) = credential(d, "gw", &[]);
    let listed = cli(d, &["kms", "credential", "list"]);
    assert!(
        listed.contains(&format!("user={user}")) && listed.contains("none (grants only)"),
        "{listed}"
    );
    let scoped = credential(
        d,
        "app",
        &["--key", "alias/vols", "--ops", "decrypt-datakey"],
    );
    let listed = cli(d, &["kms", "credential", "list", "--json"]);
    let v: Value = serde_json::from_str(&listed).unwrap();
    let app = &v["credentials"][1];
    assert_eq!(app["user_id"], scoped.2.as_str());
    assert_eq!(app["scopes"][0]["key_id"], vols.as_str(), "held by id");
    assert_eq!(app["scopes"][0]["operations"][0], "decrypt-datakey");
    let g: Value = serde_json::from_str(&cli(
        d,
        &[
            "kms",
            "create-grant",
            "alias/vols",
            "--grantee",
            &user,
            "--ops",
            "decrypt-datakey,create-datakey",
            "--context",
            "volume_id=v1",
            "--name",
            "gw-v1",
            "--json",
        ],
    ))
    .unwrap();
    let gid = g["grant_id"].as_str().unwrap();
    assert_eq!(g["key_id"], vols.as_str());
    assert_eq!(g["encryption_context_subset"]["volume_id"], "v1");
    let listed = cli(d, &["kms", "list-grants", "vols"]);
    assert!(
        listed.contains(gid) && listed.contains("context volume_id=v1"),
        "{listed}"
    );
    cli(d, &["kms", "revoke-grant", "vols", gid]);
    assert!(cli(d, &["kms", "list-grants", "vols"]).contains("no grants"));
    // Refusals name what is wrong.
    let out = std::process::Command::new(BIN)
        .arg("--data-dir")
        .arg(d)
        .args([
            "kms",
            "create-grant",
            "vols",
            "--grantee",
            &user,
            "--ops",
            "create-grant",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("besides create-grant"));
    // Every new command explains itself with examples.
    for cmd in [
        "create-grant",
        "list-grants",
        "revoke-grant",
        "retire-grant",
    ] {
        let help = cli(d, &["kms", cmd, "--help"]);
        assert!(help.contains("Example"), "{cmd}: {help}");
    }
    let help = cli(d, &["kms", "credential", "create", "--help"]);
    assert!(help.contains("--admin") && help.contains("--ops"), "{help}");
    let help = cli(d, &["kms", "token", "create", "--help"]);
    assert!(help.contains("datakey,decrypt"), "{help}");
    // Tokens: Transit rights map onto operations.
    let tok = std::process::Command::new(BIN)
        .arg("--data-dir")
        .arg(d)
        .args([
            "kms",
            "token",
            "create",
            "rgw",
            "--key",
            "vols",
            "--ops",
            "datakey,decrypt",
        ])
        .output()
        .unwrap();
    assert!(tok.status.success());
    let v: Value = serde_json::from_str(&cli(d, &["kms", "credential", "list", "--json"])).unwrap();
    let rgw = &v["credentials"][2];
    assert_eq!(
        rgw["scopes"][0]["operations"],
        serde_json::json!([
            "create-datakey",
            "create-datakey-without-plaintext",
            "decrypt-data"
        ])
    );
}

/// Vault tokens get Transit rights: a token with `--key s3 --ops datakey,decrypt` makes and opens
/// data keys on s3 only; encrypt, rotate and other keys answer like unknown keys (404); a token
/// with no rights can do nothing; one granted (by its user id) decrypt-data can decrypt.
#[test]
fn vault_tokens_have_transit_rights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cli(d, &["kms", "init"]);
    cli(d, &["kms", "create-key", "--alias", "s3"]);
    cli(d, &["kms", "create-key", "--alias", "other"]);
    let token = |name: &str, extra: &[&str]| {
        let mut args = vec!["kms", "token", "create", name];
        args.extend_from_slice(extra);
        cli(d, &args).trim().to_string()
    };
    let rgw = token("rgw", &["--key", "s3", "--ops", "datakey,decrypt"]);
    let none = token("nobody", &[]);
    let server = KmsServer::start(d, &[]);
    let vault = |tok: &str, path: &str, body: &str| {
        answer(
            ureq::post(&format!("{}/v1/transit/{path}", server.url))
                .set("x-vault-token", tok)
                .send_bytes(body.as_bytes()),
        )
    };
    let (st, v) = vault(&rgw, "datakey/plaintext/s3", "{}");
    assert_eq!(st, 200, "{v}");
    let ct = v["data"]["ciphertext"].as_str().unwrap().to_string();
    let body = serde_json::json!({ "ciphertext": ct }).to_string();
    let (st, v) = vault(&rgw, "decrypt/s3", &body);
    assert_eq!(st, 200, "{v}");
    for (tok, path, b) in [
        (&rgw, "encrypt/s3", r#"{"plaintext":"aGk="}"#),
        (&rgw, "keys/s3/rotate", "{}"),
        (&rgw, "datakey/plaintext/other", "{}"),
        (&rgw, "datakey/plaintext/nosuchkey", "{}"),
        (&none, "decrypt/s3", body.as_str()),
    ] {
        let (st, v) = vault(tok, path, b);
        assert_eq!(st, 404, "{path}: {v}");
        assert!(v["errors"][0]
            .as_str()
            .unwrap()
            .contains("was not found, or no role"));
    }
    // A grant to the rightless token's user id lets it decrypt.
    let list: Value =
        serde_json::from_str(&cli(d, &["kms", "credential", "list", "--json"])).unwrap();
    let user = list["credentials"][1]["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    cli(
        d,
        &[
            "kms",
            "create-grant",
            "s3",
            "--grantee",
            &user,
            "--ops",
            "decrypt-data",
        ],
    );
    let (st, v) = vault(&none, "decrypt/s3", &body);
    assert_eq!(st, 200, "{v}");
}
