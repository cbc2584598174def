//! The golden credentials and grants files in `tests/data/kms-access` (over the store in
//! `keystore-v2`): a format-1 credentials file keeps its meaning (no `keys` = admin, `keys` = every
//! operation on those keys, by id) with stable user ids, and is written back as format 2 only when
//! migrated; format 2 and the grants file read as written.

use cryptnbd::kms::rights::{decide, Allowed};
use cryptnbd::kms::{grants, EncryptionContext, KeyStore, RootSecret};
use serde_json::Value;

use super::kms_golden::{copy, data};

fn store_with(credentials: &str) -> (tempfile::TempDir, KeyStore, Value) {
    let dir = copy("keystore-v2");
    for (from, to) in [
        (credentials, "credentials.json"),
        ("grants-v1.json", "grants.json"),
    ] {
        std::fs::copy(data(&format!("kms-access/{from}")), dir.path().join(to)).unwrap();
    }
    let ks = KeyStore::open(dir.path(), RootSecret::KeyFile(dir.path().join("root.key"))).unwrap();
    let secrets: Value =
        serde_json::from_slice(&std::fs::read(data("kms-access/secrets.json")).unwrap()).unwrap();
    (dir, ks, secrets)
}

#[test]
fn format_1_credentials_keep_their_meaning_and_migrate_explicitly() {
    let (dir, ks, secrets) = store_with("credentials-v1.json");
    let golden = ks.resolve_key_id("alias/golden").unwrap();
    let list = ks.list_credentials().unwrap();
    let by = |n: &str| list.iter().find(|c| c.name == n).unwrap().clone();
    assert!(
        by("full").admin && by("rgw").admin,
        "no keys meant every key"
    );
    let scoped = by("scoped");
    assert!(!scoped.admin);
    assert_eq!(scoped.scopes.len(), 1);
    assert_eq!(
        scoped.scopes[0].key_id, golden,
        "the alias is held as its id"
    );
    assert!(scoped.scopes[0]
        .operations
        .iter()
        .any(|o| o == "decrypt-datakey"));
    // The user ids are stable across reads, and the secrets still open.
    let again = ks.list_credentials().unwrap();
    for (a, b) in list.iter().zip(&again) {
        assert_eq!(a.user_id, b.user_id);
        assert!(grants::valid_principal(&a.user_id));
    }
    let (_, sk) = ks.access_key(&by("full").id).unwrap().unwrap();
    assert_eq!(
        sk.dangerous_as_bytes(),
        secrets["full"].as_str().unwrap().as_bytes()
    );
    assert!(ks
        .token(secrets["rgw"].as_str().unwrap())
        .unwrap()
        .is_some());
    // Reading never rewrote it; migrating does, once, saying what each credential became.
    let raw = || std::fs::read_to_string(dir.path().join("credentials.json")).unwrap();
    assert!(raw().contains(r#""version": 1"#));
    let notes = ks.migrate_credentials().unwrap();
    assert_eq!(notes.len(), 3, "{notes:?}");
    assert!(notes
        .iter()
        .any(|n| n.contains("full") && n.contains("admin")));
    assert!(raw().contains(r#""version": 2"#));
    assert!(ks.migrate_credentials().unwrap().is_empty());
    let after = ks.list_credentials().unwrap();
    for (a, b) in list.iter().zip(&after) {
        assert_eq!(a.user_id, b.user_id, "the migrated file keeps the user ids");
        assert_eq!(a.admin, b.admin);
        assert_eq!(a.scopes, b.scopes);
    }
    // Moving the alias afterwards does not move the scope.
    ks.update_alias("alias/golden", "alias/elsewhere").unwrap();
    ks.create_key("alias/golden", "").unwrap();
    assert_eq!(ks.list_credentials().unwrap()[1].scopes[0].key_id, golden);
}

#[test]
fn format_2_credentials_and_grants_read_as_written() {
    let (_dir, ks, secrets) = store_with("credentials-v2.json");
    let golden = ks.resolve_key_id("alias/golden").unwrap();
    let list = ks.list_credentials().unwrap();
    assert_eq!(list[0].user_id, "bf765be5931ed909ce07886a77fadc38");
    assert!(list[0].admin && !list[1].admin && list[2].admin);
    assert_eq!(list[1].scopes[0].key_id, golden);
    let (_, sk) = ks.access_key(&list[1].id).unwrap().unwrap();
    assert_eq!(
        sk.dangerous_as_bytes(),
        secrets["scoped"].as_str().unwrap().as_bytes()
    );
    assert!(ks.migrate_credentials().unwrap().is_empty());

    let ix = ks.grant_index().unwrap();
    assert_eq!(ix.len(), 1);
    let g = ix.on_key(golden).next().unwrap();
    assert_eq!(g.name.as_deref(), Some("gw1"));
    // A credential with that user id may decrypt-datakey for that volume only.
    let mut gw = list[1].clone();
    gw.scopes.clear();
    gw.user_id = "0123456789abcdef0123456789abcdef".into();
    let domain = ks.store_id().simple().to_string();
    let mut ctx = EncryptionContext::new();
    ctx.insert(
        "volume_id".into(),
        "11111111-2222-3333-4444-555555555555".into(),
    );
    assert_eq!(
        decide(&gw, &ix, &domain, golden, "decrypt-datakey", &ctx),
        Ok(Allowed::Grant(g.grant_id.clone()))
    );
    ctx.insert("volume_id".into(), "another".into());
    assert!(decide(&gw, &ix, &domain, golden, "decrypt-datakey", &ctx).is_err());
    assert!(decide(&gw, &ix, &domain, golden, "manage", &ctx).is_err());
}
