//! The key store itself through its library API: init and what it refuses, the root of trust
//! (key file, passphrase, the wrong one), the store file replaced or corrupted, two handles and
//! concurrent writers on one store, and the audit log. Split from `kms_api` (the key and data
//! key operations), whose helpers it uses; each refusal is asserted by error variant.

use cryptnbd::crypto::SecretBytes;
use cryptnbd::kms::{InitRoot, KeyStore, KmsError, RootSecret};
use zeroize::Zeroizing;

use crate::kms_api::{ctx, new_store, reopen};

#[test]
fn init_refuses_an_existing_store() {
    let (dir, ks) = new_store();
    ks.create_key("keep", "").unwrap();
    let before = std::fs::read(dir.path().join("keystore.json")).unwrap();
    let root_before = std::fs::read(dir.path().join("root.key")).unwrap();
    assert!(matches!(
        KeyStore::init(dir.path(), InitRoot::GenerateKeyFile),
        Err(KmsError::StoreExists { .. })
    ));
    assert!(matches!(
        KeyStore::init(
            dir.path(),
            InitRoot::Passphrase(Zeroizing::new("long enough passphrase".into()))
        ),
        Err(KmsError::StoreExists { .. })
    ));
    assert_eq!(
        std::fs::read(dir.path().join("keystore.json")).unwrap(),
        before
    );
    assert_eq!(
        std::fs::read(dir.path().join("root.key")).unwrap(),
        root_before
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        KeyStore::open(empty.path(), RootSecret::KeyFile("x".into())),
        Err(KmsError::StoreMissing { .. })
    ));
    assert!(
        !empty.path().join("keystore.lock").exists(),
        "opening a missing store leaves nothing behind"
    );
    assert!(matches!(
        KeyStore::open(
            &empty.path().join("no/such/dir"),
            RootSecret::KeyFile("x".into())
        ),
        Err(KmsError::StoreMissing { .. })
    ));
}

#[test]
fn interrupted_init_leaves_an_orphan_key_that_init_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root.key"), [1u8; 32]).unwrap();
    match KeyStore::init(dir.path(), InitRoot::GenerateKeyFile) {
        Err(e @ KmsError::OrphanRootKey { .. }) => {
            assert!(e.to_string().contains("move it away"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read(dir.path().join("root.key")).unwrap(),
        [1u8; 32]
    );
    assert!(!KeyStore::exists(dir.path()));
}

#[test]
fn passphrase_root_and_wrong_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let pass = |s: &str| Zeroizing::new(s.to_string());
    assert!(matches!(
        KeyStore::init(dir.path(), InitRoot::Passphrase(pass("short"))),
        Err(KmsError::InvalidArgument(_))
    ));
    let ks = KeyStore::init(
        dir.path(),
        InitRoot::Passphrase(pass("correct horse battery")),
    )
    .unwrap();
    assert!(!dir.path().join("root.key").exists());
    ks.create_key("p", "").unwrap();
    let dk = ks.create_data_key("p", &ctx(&[]), 256).unwrap();
    let again = KeyStore::open(
        dir.path(),
        RootSecret::Passphrase(pass("correct horse battery")),
    )
    .unwrap();
    assert_eq!(
        again
            .decrypt_data_key("p", &dk.wrapped.cipher_text, &ctx(&[]))
            .unwrap()
            .plain_text,
        dk.plain_text
    );
    assert!(matches!(
        KeyStore::open(
            dir.path(),
            RootSecret::Passphrase(pass("correct horse battery!"))
        ),
        Err(KmsError::WrongRootKey { .. })
    ));
    assert!(matches!(
        KeyStore::open(dir.path(), RootSecret::KeyFile(dir.path().join("root.key"))),
        Err(KmsError::RootKindMismatch { .. })
    ));
}

#[test]
fn key_file_problems_are_refused_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _ks) = new_store();
    let key = dir.path().join("root.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    match KeyStore::open(dir.path(), RootSecret::KeyFile(key.clone())) {
        Err(e @ KmsError::KeyFilePermissions { mode: 0o644, .. }) => {
            assert!(e.to_string().contains("chmod 600"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        KeyStore::open(
            dir.path(),
            RootSecret::KeyFile(dir.path().join("missing.key"))
        ),
        Err(KmsError::KeyFileMissing { .. })
    ));
    assert!(matches!(
        KeyStore::open(
            dir.path(),
            RootSecret::Passphrase(Zeroizing::new("whatever it is".into()))
        ),
        Err(KmsError::RootKindMismatch { .. })
    ));
}

#[test]
fn store_sealed_under_another_root_is_refused() {
    let (d1, _s1) = new_store();
    let (d2, _s2) = new_store();
    // Present store 1 with store 2's key file.
    assert!(matches!(
        KeyStore::open(d1.path(), RootSecret::KeyFile(d2.path().join("root.key"))),
        Err(KmsError::WrongRootKey { .. })
    ));
}

#[test]
fn replaced_store_file_is_detected() {
    let (d1, s1) = new_store();
    let (d2, _s2) = new_store();
    std::fs::copy(
        d2.path().join("keystore.json"),
        d1.path().join("keystore.json"),
    )
    .unwrap();
    assert!(matches!(s1.list_keys(), Err(KmsError::Corrupt { .. })));
}

#[test]
fn corrupted_store_file_is_reported_not_panicking() {
    let (dir, ks) = new_store();
    ks.create_key("a", "").unwrap();
    let path = dir.path().join("keystore.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert!(matches!(ks.list_keys(), Err(KmsError::Corrupt { .. })));
    assert!(matches!(
        KeyStore::open(dir.path(), RootSecret::KeyFile(dir.path().join("root.key"))),
        Err(KmsError::Corrupt { .. })
    ));
    // Sealed material altered: the root still opens the verifier, so this is corruption.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m = v["keys"][0]["versions"][0]["material"]
        .as_str()
        .unwrap()
        .to_string();
    let flipped = format!(
        "{}{}",
        &m[..m.len() - 1],
        if m.ends_with('0') { "1" } else { "0" }
    );
    v["keys"][0]["versions"][0]["material"] = flipped.into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(matches!(
        ks.create_data_key("a", &ctx(&[]), 256),
        Err(KmsError::Corrupt { .. })
    ));
}

#[test]
fn two_handles_see_each_others_changes() {
    let (dir, ks) = new_store();
    ks.create_key("a", "").unwrap();
    let other = reopen(dir.path());
    other.disable_key("a").unwrap();
    assert!(matches!(
        ks.create_data_key("a", &ctx(&[]), 512),
        Err(KmsError::KeyNotUsable { .. })
    ));
}

#[test]
fn concurrent_writers_are_serialized() {
    let (dir, _ks) = new_store();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let d = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let ks = reopen(&d);
                for i in 0..10 {
                    ks.create_key(&format!("t{t}-{i}"), "").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(reopen(dir.path()).list_keys().unwrap().len(), 40);
}

#[test]
fn audit_log_records_operations_and_no_secrets() {
    let (dir, ks) = new_store();
    ks.create_key("a", "").unwrap();
    let c = ctx(&[("volume_id", "vol-7")]);
    let dk = ks.create_data_key("a", &c, 512).unwrap();
    let mine = SecretBytes::new(vec![0x5a; 32]);
    let w = ks.encrypt_data_key("a", &mine, &c).unwrap();
    ks.decrypt_data_key("a", &w.cipher_text, &c).unwrap();
    let rnd = ks.gen_random(64).unwrap();
    let _ = ks.decrypt_data_key("a", &w.cipher_text, &ctx(&[]));
    let tail = ks.audit_tail(Some(3)).unwrap();
    assert_eq!(tail.len(), 3);
    assert_eq!(tail[2].operation, "decrypt-datakey");
    assert_eq!(tail[2].outcome, "error");
    assert!(tail[2].error.as_deref().unwrap().contains("cannot decrypt"));
    assert_eq!(tail[0].operation, "decrypt-datakey");
    assert_eq!(tail[0].encryption_context, c);
    assert_eq!(tail[0].key_version, Some(1));

    let log = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let root = std::fs::read(dir.path().join("root.key")).unwrap();
    for secret in [
        dk.plain_text.dangerous_as_bytes(),
        mine.dangerous_as_bytes(),
        rnd.dangerous_as_bytes(),
        &root[..],
    ] {
        let hexed = hex::encode(secret);
        assert!(!log.contains(&hexed), "secret in audit log");
        assert!(!log.contains(&hexed.to_uppercase()));
    }
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
