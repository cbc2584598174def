//! Golden key stores in `tests/data/keystore-v1*` (see the README there): they must keep opening
//! and unwrapping their blobs. A failure here means the store or blob format changed.

use std::path::{Path, PathBuf};

use cryptnbd::kms::{EncryptionContext, KeyState, KeyStore, KmsError, RootSecret};
use serde_json::Value;
use zeroize::Zeroizing;

pub(crate) fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Copies a golden store to a temp dir (opening writes the lock file and the audit log).
pub(crate) fn copy(name: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(data(name)).unwrap() {
        let e = e.unwrap();
        let to = tmp.path().join(e.file_name());
        std::fs::copy(e.path(), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    tmp
}

fn context(v: &Value) -> EncryptionContext {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn golden_key_file_store_opens_and_unwraps() {
    let dir = copy("keystore-v1");
    let before = std::fs::read(dir.path().join("keystore.json")).unwrap();
    let ks = KeyStore::open(dir.path(), RootSecret::KeyFile(dir.path().join("root.key"))).unwrap();
    let golden: Value =
        serde_json::from_slice(&std::fs::read(data("keystore-v1/blobs.json")).unwrap()).unwrap();
    let m = ks.describe_key("alias/golden").unwrap();
    assert_eq!(m.key_id.to_string(), golden["key_id"].as_str().unwrap());
    assert_eq!(m.key_description, "golden test key");
    assert_eq!(m.key_state, KeyState::Enabled);
    assert_eq!((m.current_version, m.version_count), (2, 2));
    for b in golden["blobs"].as_array().unwrap() {
        let ct = hex::decode(b["cipher_text"].as_str().unwrap()).unwrap();
        let ctx = context(&b["encryption_context"]);
        let un = ks.decrypt_data_key("golden", &ct, &ctx).unwrap();
        assert_eq!(
            hex::encode(un.plain_text.dangerous_as_bytes()),
            b["plain_text"].as_str().unwrap()
        );
        assert_eq!(
            u64::from(un.key_version),
            b["key_version"].as_u64().unwrap()
        );
        // And the binding still holds.
        assert!(matches!(
            ks.decrypt_data_key("golden", &ct, &EncryptionContext::new()),
            Err(KmsError::CannotDecrypt { .. })
        ));
    }
    // Reading does not rewrite the store.
    assert_eq!(
        std::fs::read(dir.path().join("keystore.json")).unwrap(),
        before
    );
}

#[test]
fn golden_passphrase_store_opens_and_unwraps() {
    let dir = copy("keystore-v1-passphrase");
    let ks = KeyStore::open(
        dir.path(),
        RootSecret::Passphrase(Zeroizing::new("cryptnbd golden passphrase".into())),
    )
    .unwrap();
    let b: Value =
        serde_json::from_slice(&std::fs::read(data("keystore-v1-passphrase/blob.json")).unwrap())
            .unwrap();
    let ct = hex::decode(b["cipher_text"].as_str().unwrap()).unwrap();
    let un = ks
        .decrypt_data_key("golden", &ct, &context(&b["encryption_context"]))
        .unwrap();
    assert_eq!(
        hex::encode(un.plain_text.dangerous_as_bytes()),
        b["plain_text"].as_str().unwrap()
    );
    assert!(matches!(
        KeyStore::open(
            dir.path(),
            RootSecret::Passphrase(Zeroizing::new("cryptnbd golden passphrasE".into()))
        ),
        Err(KmsError::WrongRootKey { .. })
    ));
}

#[test]
fn golden_store_under_another_root_is_refused() {
    let dir = copy("keystore-v1");
    std::fs::write(dir.path().join("root.key"), [0x41u8; 32]).unwrap();
    assert!(matches!(
        KeyStore::open(dir.path(), RootSecret::KeyFile(dir.path().join("root.key"))),
        Err(KmsError::WrongRootKey { .. })
    ));
}
