//! Revocation as in EVS, with a real remote-KMS gateway: the gateway's credential has no rights
//! of its own; `volume create --grant-to` gives it create-datakey/decrypt-datakey on the CMK for
//! each volume's volume_id. Attaches work through the grants; a volume without a grant is
//! refused; revoking a volume's grant refuses its next attach, naming the grant situation;
//! disabling the credential refuses every new attach; a volume already attached keeps serving;
//! after a restart (everything detached) only the volumes still granted attach again.

use crate::common;
use crate::kms_http_remote::{refused, remote_args, round_trip, start_serve};
use crate::kms_http_support;

use serde_json::Value;

use kms_http_support::*;

#[test]
fn revoking_a_gateway_grant_stops_new_attaches_only() {
    if !common::require_tool("/usr/bin/nbdcopy") || !common::require_tool("/usr/bin/nbdinfo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let kms_dir = tmp.path().join("kms-host");
    let store = tmp.path().join("storage-host");
    let ops_cred = tmp.path().join("ops.cred");
    let gw_cred = tmp.path().join("storage-1.cred");
    cli(&kms_dir, &["kms", "init"]);
    cli(&kms_dir, &["kms", "create-key", "--alias", "vols"]);
    let credential = |name: &str, file: &std::path::Path, extra: &[&str]| -> Value {
        let mut args = vec!["--output", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        credential_json(&kms_dir, name, "p1", &args)
    };
    credential("ops", &ops_cred, &["--admin"]);
    let gw = credential("storage-1", &gw_cred, &[]);
    assert_eq!(gw["admin"], false);
    let gw_user = gw["user_id"].as_str().unwrap().to_string();
    let kms = KmsServer::start(&kms_dir, &[]);
    let url = kms.url.clone();

    // The operator creates volumes through the KMS with its admin credential and grants the
    // gateway each one; "nogrant" gets no grant. v2 and v3 come after the gateway started, so
    // their first attach is a new one.
    let create = |name: &str| {
        let mut create = vec!["volume", "create", name, "--size", "8M", "--key", "vols"];
        if name != "nogrant" {
            create.extend(["--grant-to", gw_user.as_str()]);
        }
        create.extend(remote_args(&url, &ops_cred));
        cli(&store, &create);
    };
    create("v1");
    create("nogrant");
    let sock = tmp.path().join("nbd.sock");
    let serve = start_serve(&store, &sock, &url, &gw_cred);
    create("v2");
    create("v3");
    let grants: Value =
        serde_json::from_str(&cli(&kms_dir, &["kms", "list-grants", "vols", "--json"])).unwrap();
    let grants = grants["grants"].as_array().unwrap().clone();
    assert_eq!(grants.len(), 3);
    let volume_id = |name: &str| -> String {
        let v: Value =
            serde_json::from_str(&cli(&store, &["volume", "info", name, "--json"])).unwrap();
        v["volume_id"].as_str().unwrap().to_string()
    };
    let grant_of = |name: &str| -> String {
        let id = volume_id(name);
        let g = grants
            .iter()
            .find(|g| g["encryption_context_subset"]["volume_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no grant for {name}: {grants:?}"));
        assert_eq!(g["grantee_principal"], gw_user.as_str());
        assert_eq!(
            g["operations"],
            serde_json::json!(["create-datakey", "decrypt-datakey"])
        );
        g["grant_id"].as_str().unwrap().to_string()
    };

    // The gateway serves with its own credential: attaches go through the grants.
    round_trip(&sock, "v1", tmp.path());
    let text = refused(&sock, "nogrant", &serve);
    assert!(
        text.contains("KMS.0207") && text.contains("no grant or scope for decrypt-datakey"),
        "{text}"
    );

    // Revoke v2's grant: v2's next attach is refused naming the grant; v1 keeps serving.
    cli(&kms_dir, &["kms", "revoke-grant", "vols", &grant_of("v2")]);
    let text = refused(&sock, "v2", &serve);
    assert!(
        text.contains("storage-1") && text.contains("grant") && text.contains("revoked"),
        "{text}"
    );
    round_trip(&sock, "v1", tmp.path());

    // Disable the credential: v3 (still granted) is refused too; v1 keeps serving.
    grant_of("v3");
    cli(&kms_dir, &["kms", "credential", "disable", "storage-1"]);
    let text = refused(&sock, "v3", &serve);
    assert!(
        text.contains("APIGW.0301") && text.contains("deleted or disabled on the KMS host"),
        "{text}"
    );
    round_trip(&sock, "v1", tmp.path());

    // Detach everything (restart the gateway) with the credential enabled again: v1 and v3
    // re-attach through their grants, v2's revoked grant still refuses it.
    cli(&kms_dir, &["kms", "credential", "enable", "storage-1"]);
    drop(serve);
    let _ = std::fs::remove_file(&sock);
    let serve = start_serve(&store, &sock, &url, &gw_cred);
    round_trip(&sock, "v1", tmp.path());
    round_trip(&sock, "v3", tmp.path());
    let text = refused(&sock, "v2", &serve);
    assert!(
        text.contains("KMS.0207") && text.contains("revoked"),
        "{text}"
    );

    // The KMS audit names the grant that allowed each gateway attach, and why later ones failed.
    let audit = audit_text(&kms_dir);
    let lines: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(lines.iter().any(|l| l["credential"] == "storage-1"
        && l["operation"] == "http decrypt-datakey"
        && l["grant"].as_str().is_some_and(|g| g.len() == 64)));
    assert!(lines.iter().any(|l| l["credential"] == "storage-1"
        && l["operation"] == "http decrypt-datakey"
        && l["grant"]
            .as_str()
            .is_some_and(|g| g.contains("require another encryption context"))));
}
