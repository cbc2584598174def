//! The key store's library API: round trips for every key and data key operation (create,
//! describe, states, deletion, rotation, re-encrypt, aliases, random) and every refusal, asserted
//! by error variant. The store itself (init, root of trust, its files, concurrent handles, audit
//! log) is tested in `kms_store`, which shares this file's helpers.

use std::path::Path;

use cryptnbd::crypto::SecretBytes;
use cryptnbd::kms::{
    EncryptionContext, InitRoot, KeyState, KeyStore, KmsError, ManualClock, RootSecret,
};

use crate::common;
use common::keys::KeyFixture;

pub(crate) fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(crate) fn new_store() -> (tempfile::TempDir, KeyStore) {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
    (dir, ks)
}

pub(crate) fn reopen(dir: &Path) -> KeyStore {
    KeyStore::open(dir, RootSecret::KeyFile(dir.join("root.key"))).unwrap()
}

#[test]
fn create_describe_list_and_reopen() {
    let (dir, ks) = new_store();
    assert!(KeyStore::exists(dir.path()));
    let a = ks.create_key("vol", "volume keys").unwrap();
    assert_eq!(a.key_alias, "alias/vol");
    assert_eq!(a.key_state, KeyState::Enabled);
    assert_eq!((a.current_version, a.version_count), (1, 1));
    let b = ks.create_key("alias/apps", "").unwrap();
    assert_eq!(ks.describe_key("vol").unwrap().key_id, a.key_id);
    assert_eq!(ks.describe_key("alias/vol").unwrap().key_id, a.key_id);
    assert_eq!(
        ks.describe_key(&b.key_id.to_string()).unwrap().key_alias,
        "alias/apps"
    );
    let ks2 = reopen(dir.path());
    assert_eq!(ks2.store_id(), ks.store_id());
    let ids: Vec<_> = ks2.list_keys().unwrap().iter().map(|m| m.key_id).collect();
    assert_eq!(ids, vec![a.key_id, b.key_id]);
}

#[test]
fn unknown_key_and_duplicate_alias_are_refused() {
    let (_dir, ks) = new_store();
    let a = ks.create_key("vol", "").unwrap();
    assert!(matches!(
        ks.describe_key("nope"),
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(matches!(
        ks.describe_key("6f1c2a3b-0000-4000-8000-000000000000"),
        Err(KmsError::KeyNotFound { .. })
    ));
    match ks.create_key("alias/vol", "") {
        Err(KmsError::AliasExists { key_id, .. }) => assert_eq!(key_id, a.key_id),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ks.create_key("bad alias", ""),
        Err(KmsError::InvalidArgument(_))
    ));
}

#[test]
fn data_key_round_trips_in_every_form() {
    let (_dir, ks) = new_store();
    ks.create_key("vol", "").unwrap();
    let c = ctx(&[("volume_id", "v1"), ("purpose", "test")]);
    for bits in [256, 512] {
        let dk = ks.create_data_key("vol", &c, bits).unwrap();
        assert_eq!(dk.plain_text.len() as u32 * 8, bits);
        let un = ks
            .decrypt_data_key("vol", &dk.wrapped.cipher_text, &c)
            .unwrap();
        assert_eq!(un.plain_text, dk.plain_text);
        assert_eq!((un.key_id, un.key_version), (dk.wrapped.key_id, 1));
    }
    let w = ks
        .create_data_key_without_plaintext("vol", &c, 512)
        .unwrap();
    assert_eq!(
        ks.decrypt_data_key("vol", &w.cipher_text, &c)
            .unwrap()
            .plain_text
            .len(),
        64
    );
    let mine = SecretBytes::new((0u8..48).collect());
    let w = ks.encrypt_data_key("vol", &mine, &c).unwrap();
    assert_eq!(
        ks.decrypt_data_key("vol", &w.cipher_text, &c)
            .unwrap()
            .plain_text,
        mine
    );
    assert!(matches!(
        ks.create_data_key("vol", &c, 128),
        Err(KmsError::InvalidArgument(_))
    ));
    assert!(matches!(
        ks.encrypt_data_key("vol", &SecretBytes::new(vec![]), &c),
        Err(KmsError::InvalidArgument(_))
    ));
    assert!(matches!(
        ks.encrypt_data_key("vol", &SecretBytes::new(vec![1; 65]), &c),
        Err(KmsError::InvalidArgument(_))
    ));
}

#[test]
fn wrong_context_wrong_key_and_tampering_cannot_decrypt() {
    let (_dir, ks) = new_store();
    ks.create_key("a", "").unwrap();
    ks.create_key("b", "").unwrap();
    let c = ctx(&[("volume_id", "v1")]);
    let dk = ks.create_data_key("a", &c, 512).unwrap();
    let ct = &dk.wrapped.cipher_text;
    for other in [
        ctx(&[]),
        ctx(&[("volume_id", "v2")]),
        ctx(&[("volume_id", "v1"), ("x", "y")]),
    ] {
        assert!(matches!(
            ks.decrypt_data_key("a", ct, &other),
            Err(KmsError::CannotDecrypt { .. })
        ));
    }
    match ks.decrypt_data_key("b", ct, &c) {
        Err(e @ KmsError::CannotDecrypt { .. }) => {
            assert!(e.to_string().starts_with("cannot decrypt data key:"), "{e}");
            assert!(
                e.to_string().contains(&dk.wrapped.key_id.to_string()),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    for i in 0..ct.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = ct.clone();
            t[i] ^= bit;
            let r = ks.decrypt_data_key("a", &t, &c);
            assert!(
                matches!(r, Err(KmsError::CannotDecrypt { .. })),
                "flip at byte {i}: {r:?}"
            );
        }
    }
    for n in [0, 10, ct.len() - 1] {
        assert!(matches!(
            ks.decrypt_data_key("a", &ct[..n], &c),
            Err(KmsError::CannotDecrypt { .. })
        ));
    }
    let mut longer = ct.clone();
    longer.push(0);
    assert!(matches!(
        ks.decrypt_data_key("a", &longer, &c),
        Err(KmsError::CannotDecrypt { .. })
    ));
}

#[test]
fn another_store_cannot_decrypt() {
    let (_d1, s1) = new_store();
    let (_d2, s2) = new_store();
    let k = s1.create_key("a", "").unwrap();
    s2.create_key("a", "").unwrap();
    let dk = s1.create_data_key("a", &ctx(&[]), 256).unwrap();
    assert!(matches!(
        s2.decrypt_data_key("a", &dk.wrapped.cipher_text, &ctx(&[])),
        Err(KmsError::CannotDecrypt { .. })
    ));
    assert!(matches!(
        s2.re_encrypt(&dk.wrapped.cipher_text, &ctx(&[]), None, &ctx(&[])),
        Err(KmsError::CannotDecrypt { .. })
    ));
    assert_eq!(dk.wrapped.key_id, k.key_id);
}

#[test]
fn disabled_key_refuses_everything_but_describe_list_enable() {
    let (_dir, ks) = new_store();
    ks.create_key("a", "").unwrap();
    let c = ctx(&[]);
    let dk = ks.create_data_key("a", &c, 512).unwrap();
    assert_eq!(ks.disable_key("a").unwrap().key_state, KeyState::Disabled);
    assert_eq!(ks.describe_key("a").unwrap().key_state, KeyState::Disabled);
    assert_eq!(ks.list_keys().unwrap().len(), 1);
    let refused = |r: Result<(), KmsError>| match r {
        Err(
            e @ KmsError::KeyNotUsable {
                state: KeyState::Disabled,
                ..
            },
        ) => assert!(e.to_string().contains("disabled"), "{e}"),
        other => panic!("{other:?}"),
    };
    refused(ks.create_data_key("a", &c, 512).map(drop));
    refused(ks.create_data_key_without_plaintext("a", &c, 512).map(drop));
    refused(
        ks.encrypt_data_key("a", &SecretBytes::new(vec![1; 32]), &c)
            .map(drop),
    );
    refused(
        ks.decrypt_data_key("a", &dk.wrapped.cipher_text, &c)
            .map(drop),
    );
    refused(
        ks.re_encrypt(&dk.wrapped.cipher_text, &c, None, &c)
            .map(drop),
    );
    refused(ks.rotate_key("a").map(drop));
    assert_eq!(ks.enable_key("a").unwrap().key_state, KeyState::Enabled);
    ks.decrypt_data_key("a", &dk.wrapped.cipher_text, &c)
        .unwrap();
}

#[test]
fn pending_deletion_refuses_and_cancel_returns_to_disabled() {
    let (_dir, ks) = new_store();
    ks.create_key("a", "").unwrap();
    let c = ctx(&[]);
    let dk = ks.create_data_key("a", &c, 512).unwrap();
    for bad in [0, 6, 1097] {
        assert!(matches!(
            ks.schedule_key_deletion("a", bad),
            Err(KmsError::InvalidArgument(_))
        ));
    }
    let m = ks.schedule_key_deletion("a", 7).unwrap();
    assert_eq!(m.key_state, KeyState::PendingDeletion);
    assert!(m.scheduled_deletion_date.unwrap() >= m.creation_date + 7 * 86_400);
    match ks.decrypt_data_key("a", &dk.wrapped.cipher_text, &c) {
        Err(
            e @ KmsError::KeyNotUsable {
                state: KeyState::PendingDeletion,
                ..
            },
        ) => assert!(e.to_string().contains("pending deletion"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ks.create_data_key("a", &c, 256),
        Err(KmsError::KeyNotUsable { .. })
    ));
    assert!(matches!(
        ks.enable_key("a"),
        Err(KmsError::WrongState { .. })
    ));
    assert!(matches!(
        ks.disable_key("a"),
        Err(KmsError::WrongState { .. })
    ));
    assert!(matches!(
        ks.update_alias("a", "b"),
        Err(KmsError::KeyNotUsable { .. })
    ));
    assert!(matches!(
        ks.schedule_key_deletion("a", 30),
        Err(KmsError::WrongState { .. })
    ));
    let m = ks.cancel_key_deletion("a").unwrap();
    assert_eq!(m.key_state, KeyState::Disabled);
    assert_eq!(m.scheduled_deletion_date, None);
    assert!(matches!(
        ks.cancel_key_deletion("a"),
        Err(KmsError::WrongState { .. })
    ));
    ks.enable_key("a").unwrap();
    ks.decrypt_data_key("a", &dk.wrapped.cipher_text, &c)
        .unwrap();
}

#[test]
fn deleted_key_after_its_date_is_shredded() {
    let KeyFixture { dir, ks, clock, .. } = KeyFixture::at(ManualClock::new(1_800_000_000));
    let k = ks.create_key("doomed", "").unwrap();
    let c = ctx(&[("volume_id", "v")]);
    let dk = ks.create_data_key("doomed", &c, 512).unwrap();
    ks.schedule_key_deletion("doomed", 7).unwrap();
    clock.advance_days(6);
    assert!(matches!(
        ks.describe_key("doomed").unwrap().key_state,
        KeyState::PendingDeletion
    ));
    clock.advance_days(1);
    let deleted = |r: Result<(), KmsError>| match r {
        Err(e @ KmsError::KeyDeleted { .. }) => {
            assert!(e.to_string().contains("was deleted on 2027-01-"), "{e}")
        }
        other => panic!("{other:?}"),
    };
    deleted(
        ks.decrypt_data_key("doomed", &dk.wrapped.cipher_text, &c)
            .map(drop),
    );
    deleted(
        ks.decrypt_data_key(&k.key_id.to_string(), &dk.wrapped.cipher_text, &c)
            .map(drop),
    );
    deleted(ks.describe_key(&k.key_id.to_string()).map(drop));
    deleted(ks.cancel_key_deletion("doomed").map(drop));
    deleted(
        ks.re_encrypt(&dk.wrapped.cipher_text, &c, None, &c)
            .map(drop),
    );
    assert!(ks.list_keys().unwrap().is_empty());
    // The material is gone from the file, and the alias is free again.
    let text = std::fs::read_to_string(dir.path().join("keystore.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["keys"][0]["versions"].as_array().unwrap().len(), 0);
    let fresh = ks.create_key("doomed", "").unwrap();
    assert_ne!(fresh.key_id, k.key_id);
    // Even a process with the normal clock sees the tombstone.
    deleted(
        reopen(dir.path())
            .describe_key(&k.key_id.to_string())
            .map(drop),
    );
    let ops: Vec<_> = ks
        .audit_tail(None)
        .unwrap()
        .into_iter()
        .map(|r| r.operation)
        .collect();
    assert!(ops.contains(&"delete-key".to_string()), "{ops:?}");
}

#[test]
fn rotation_keeps_old_versions_decrypting() {
    let (_dir, ks) = new_store();
    ks.create_key("r", "").unwrap();
    let c = ctx(&[("v", "1")]);
    let old = ks.create_data_key("r", &c, 512).unwrap();
    let m = ks.rotate_key("r").unwrap();
    assert_eq!((m.current_version, m.version_count), (2, 2));
    let new = ks.create_data_key("r", &c, 512).unwrap();
    assert_eq!((old.wrapped.key_version, new.wrapped.key_version), (1, 2));
    for dk in [&old, &new] {
        let u = ks
            .decrypt_data_key("r", &dk.wrapped.cipher_text, &c)
            .unwrap();
        assert_eq!(u.plain_text, dk.plain_text);
        assert_eq!(u.key_version, dk.wrapped.key_version);
    }
}

#[test]
fn automatic_rotation_is_applied_lazily() {
    let KeyFixture {
        dir: _dir,
        ks,
        clock,
        ..
    } = KeyFixture::at(ManualClock::new(1_800_000_000));
    ks.create_key("r", "").unwrap();
    assert!(matches!(
        ks.enable_key_rotation("r", 10),
        Err(KmsError::InvalidArgument(_))
    ));
    assert_eq!(
        ks.enable_key_rotation("r", 30)
            .unwrap()
            .rotation_interval_days,
        Some(30)
    );
    clock.advance_days(29);
    assert_eq!(ks.describe_key("r").unwrap().current_version, 1);
    clock.advance_days(1);
    assert_eq!(ks.describe_key("r").unwrap().current_version, 2);
    assert_eq!(ks.describe_key("r").unwrap().current_version, 2);
    ks.disable_key_rotation("r").unwrap();
    clock.advance_days(100);
    assert_eq!(ks.describe_key("r").unwrap().current_version, 2);
}

#[test]
fn re_encrypt_moves_to_newest_version_or_another_key() {
    let (_dir, ks) = new_store();
    ks.create_key("a", "").unwrap();
    let b = ks.create_key("b", "").unwrap();
    let (c1, c2) = (ctx(&[("volume_id", "1")]), ctx(&[("volume_id", "2")]));
    let dk = ks.create_data_key("a", &c1, 512).unwrap();
    ks.rotate_key("a").unwrap();
    let same = ks
        .re_encrypt(&dk.wrapped.cipher_text, &c1, None, &c1)
        .unwrap();
    assert_eq!(same.key_version, 2);
    assert_eq!(
        ks.decrypt_data_key("a", &same.cipher_text, &c1)
            .unwrap()
            .plain_text,
        dk.plain_text
    );
    let moved = ks
        .re_encrypt(&dk.wrapped.cipher_text, &c1, Some("b"), &c2)
        .unwrap();
    assert_eq!((moved.key_id, moved.key_version), (b.key_id, 1));
    assert_eq!(
        ks.decrypt_data_key("b", &moved.cipher_text, &c2)
            .unwrap()
            .plain_text,
        dk.plain_text
    );
    assert!(matches!(
        ks.re_encrypt(&dk.wrapped.cipher_text, &c2, Some("b"), &c2),
        Err(KmsError::CannotDecrypt { .. })
    ));
    ks.disable_key("b").unwrap();
    assert!(matches!(
        ks.re_encrypt(&dk.wrapped.cipher_text, &c1, Some("b"), &c2),
        Err(KmsError::KeyNotUsable { .. })
    ));
}

#[test]
fn update_alias_frees_the_old_one() {
    let (_dir, ks) = new_store();
    let a = ks.create_key("old", "").unwrap();
    ks.create_key("taken", "").unwrap();
    assert!(matches!(
        ks.update_alias("old", "taken"),
        Err(KmsError::AliasExists { .. })
    ));
    assert_eq!(
        ks.update_alias("old", "new").unwrap().key_alias,
        "alias/new"
    );
    assert_eq!(ks.describe_key("new").unwrap().key_id, a.key_id);
    assert!(matches!(
        ks.describe_key("old"),
        Err(KmsError::KeyNotFound { .. })
    ));
    ks.create_key("old", "").unwrap();
}

#[test]
fn gen_random_bounds() {
    let (_dir, ks) = new_store();
    assert_eq!(ks.gen_random(32).unwrap().len(), 32);
    assert_ne!(ks.gen_random(32).unwrap(), ks.gen_random(32).unwrap());
    assert!(matches!(
        ks.gen_random(0),
        Err(KmsError::InvalidArgument(_))
    ));
    assert!(matches!(
        ks.gen_random(1025),
        Err(KmsError::InvalidArgument(_))
    ));
}
