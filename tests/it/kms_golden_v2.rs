//! The golden version-2 key store in `tests/data/keystore-v2` (a key with several aliases, see the
//! README there): every alias must keep naming its key and unwrapping its blobs, and a store that
//! loses its extra aliases goes back to being written as version 1.

use cryptnbd::kms::{store, EncryptionContext, KeyStore, KmsError, RootSecret};
use serde_json::Value;

use super::kms_golden::{copy, data};

#[test]
fn golden_v2_store_opens_through_every_alias() {
    let dir = copy("keystore-v2");
    let before = std::fs::read(dir.path().join("keystore.json")).unwrap();
    let ks = KeyStore::open(dir.path(), RootSecret::KeyFile(dir.path().join("root.key"))).unwrap();
    let golden: Value =
        serde_json::from_slice(&std::fs::read(data("keystore-v2/blobs.json")).unwrap()).unwrap();
    let id = golden["key_id"].as_str().unwrap();
    for alias in ["alias/golden", "golden-2", "alias/golden/moved"] {
        let m = ks.describe_key(alias).unwrap();
        assert_eq!(m.key_id.to_string(), id, "{alias}");
        assert_eq!(
            m.key_alias, "alias/golden",
            "the first alias stays the main one"
        );
    }
    let aliases = ks.list_aliases().unwrap();
    let names: Vec<&str> = aliases.iter().map(|a| a.alias.as_str()).collect();
    assert_eq!(
        names,
        ["alias/golden", "alias/golden-2", "alias/golden/moved"]
    );
    assert_eq!(
        aliases[2].update_date - aliases[2].creation_date,
        60,
        "dates are kept"
    );
    for b in golden["blobs"].as_array().unwrap() {
        let ct = hex::decode(b["cipher_text"].as_str().unwrap()).unwrap();
        let ctx: EncryptionContext = b["encryption_context"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let un = ks.decrypt_data_key("golden-2", &ct, &ctx).unwrap();
        assert_eq!(
            hex::encode(un.plain_text.dangerous_as_bytes()),
            b["plain_text"].as_str().unwrap()
        );
    }
    assert_eq!(ks.check_integrity().unwrap(), Vec::<String>::new());
    // Reading does not rewrite the store.
    assert_eq!(
        std::fs::read(dir.path().join("keystore.json")).unwrap(),
        before
    );
    // Dropping the extra aliases makes it a version 1 store again, readable by older programs.
    ks.delete_aliases(id, &["alias/golden-2".into(), "alias/golden/moved".into()])
        .unwrap();
    let f = store::load(dir.path()).unwrap();
    assert_eq!(f.version, 1);
    assert!(!std::fs::read_to_string(dir.path().join("keystore.json"))
        .unwrap()
        .contains("more_aliases"));
    assert!(matches!(
        ks.describe_key("golden-2"),
        Err(KmsError::KeyNotFound { .. })
    ));
}

#[test]
fn a_version_1_file_with_several_aliases_is_refused_as_corrupt() {
    let dir = copy("keystore-v2");
    let path = dir.path().join("keystore.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"version\": 2", "\"version\": 1", 1)).unwrap();
    assert!(matches!(
        KeyStore::open(dir.path(), RootSecret::KeyFile(dir.path().join("root.key"))),
        Err(KmsError::Corrupt { .. })
    ));
}
