//! Keys live on locked, non-dumpable pages (issue #10, defect 6): the key store's root key and
//! unsealed CMK material (`Key256`), data keys (`XtsKey`) — and, in unit tests beside the code,
//! the key store's root and the portable XTS path's round keys. Checked from the outside: the
//! kernel's view of the mapping holding the key bytes (`/proc/self/smaps` VmFlags: `dd` = not in
//! core dumps, `lo` = locked in RAM). Before the fix these keys sat in ordinary heap memory.
//! Variable-length secrets (`SecretBytes`: unsealed CMK material, plaintext data keys, unsealed
//! credential secrets, random bytes) too: unsealing decrypts in place inside locked pages.

use cryptnbd::crypto::locked::vm_flags_of;
use cryptnbd::crypto::{aead, Key256, SecretBytes, XtsKey};
use cryptnbd::kms::{CredentialKind, CredentialScope, EncryptionContext, InitRoot, KeyStore};

fn assert_protected(what: &str, addr: usize, locked: bool) {
    let flags = vm_flags_of(addr).unwrap_or_else(|| panic!("{what}: no mapping found"));
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    assert!(has("dd"), "{what} is in dumpable memory (VmFlags: {flags})");
    if locked {
        assert!(has("lo"), "{what} says locked but VmFlags are {flags}");
    }
}

#[test]
fn key256_and_xts_keys_are_on_locked_non_dumpable_pages() {
    let k = Key256::generate();
    assert_protected(
        "a generated Key256",
        k.dangerous_as_bytes().as_ptr() as usize,
        k.is_locked(),
    );
    let k = Key256::from_slice(&[7u8; 32]).unwrap();
    assert_protected(
        "a Key256 from bytes",
        k.dangerous_as_bytes().as_ptr() as usize,
        k.is_locked(),
    );
    let x = XtsKey::generate();
    assert_protected(
        "a generated XtsKey",
        x.dangerous_as_bytes().as_ptr() as usize,
        x.is_locked(),
    );
    let mut bytes = [1u8; 64];
    bytes[40] = 2;
    let x = XtsKey::from_slice(&bytes).unwrap();
    assert_protected(
        "an XtsKey from bytes",
        x.dangerous_as_bytes().as_ptr() as usize,
        x.is_locked(),
    );
    // As root (CI), mlock works: then the keys must really be locked.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(k.is_locked() && x.is_locked());
    }
}

#[test]
fn a_passphrase_derived_root_key_is_protected_too() {
    let k = Key256::try_fill(|out| {
        out.copy_from_slice(&[3u8; 32]);
        Ok::<_, ()>(())
    })
    .unwrap();
    assert_protected(
        "a filled Key256",
        k.dangerous_as_bytes().as_ptr() as usize,
        k.is_locked(),
    );
    assert!(Key256::try_fill(|_| Err::<(), _>("kdf failed")).is_err());
}

/// The check discriminates: ordinary heap memory (where the keys were before) is dumpable.
#[test]
fn ordinary_heap_memory_is_not_protected() {
    let plain = Box::new([9u8; 32]);
    let flags = vm_flags_of(plain.as_ptr() as usize).expect("mapping");
    assert!(
        !flags.split_whitespace().any(|f| f == "dd"),
        "ordinary heap memory reported as non-dumpable: {flags}"
    );
}

/// Every byte of a `SecretBytes` (first and last: it may span pages) is on protected pages.
fn assert_secret_protected(what: &str, s: &SecretBytes) {
    let b = s.dangerous_as_bytes();
    assert!(!b.is_empty(), "{what}: empty");
    assert_protected(what, b.as_ptr() as usize, s.is_locked());
    assert_protected(what, b.as_ptr() as usize + b.len() - 1, s.is_locked());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(s.is_locked(), "{what}: mlock failed as root");
    }
}

#[test]
fn random_and_copied_secret_bytes_are_on_locked_non_dumpable_pages() {
    for len in [1, 32, 64, 4096, 5000] {
        let r = SecretBytes::random(len);
        assert_eq!(r.len(), len);
        assert_secret_protected("SecretBytes::random", &r);
        let c = SecretBytes::new(vec![5u8; len]);
        assert_eq!(c.dangerous_as_bytes(), &vec![5u8; len][..]);
        assert_secret_protected("SecretBytes::new", &c);
        let d = c.clone();
        assert_secret_protected("a cloned SecretBytes", &d);
    }
}

/// What the key store does to unseal a CMK version's material (`aead::open` under the root key,
/// in place in locked pages), with the AEAD's refusals intact.
#[test]
fn unsealed_cmk_material_is_on_locked_non_dumpable_pages() {
    let root = Key256::generate();
    let material = [0x5Au8; 32];
    let sealed = aead::seal(&root, b"material aad", &material);
    let plain = aead::open(&root, b"material aad", &sealed).unwrap();
    assert_eq!(plain.dangerous_as_bytes(), &material);
    assert_secret_protected("unsealed CMK material", &plain);
    assert!(aead::open(&root, b"other aad", &sealed).is_err());
    let mut bad = sealed.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert!(aead::open(&root, b"material aad", &bad).is_err());
    // A sealed empty plaintext opens to an empty secret.
    let empty = aead::open(&root, b"x", &aead::seal(&root, b"x", b"")).unwrap();
    assert!(empty.is_empty());
}

/// Through the key store: a created and a decrypted data key, and an unsealed credential
/// secret, all on protected pages.
#[test]
fn key_store_data_keys_and_credential_secrets_are_on_protected_pages() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
    ks.create_key("vol", "").unwrap();
    let ctx: EncryptionContext = [("volume".to_string(), "v1".to_string())]
        .into_iter()
        .collect();
    for bits in [256, 512] {
        let dk = ks.create_data_key("vol", &ctx, bits).unwrap();
        assert_secret_protected("a created data key", &dk.plain_text);
        let back = ks
            .decrypt_data_key("vol", &dk.wrapped.cipher_text, &ctx)
            .unwrap();
        assert_eq!(back.plain_text, dk.plain_text);
        assert_secret_protected("a decrypted data key", &back.plain_text);
    }
    let cred = ks
        .create_credential("app", CredentialKind::AccessKey, CredentialScope::default())
        .unwrap();
    let (_, sk) = ks.access_key(&cred.record.id).unwrap().expect("credential");
    assert_eq!(sk.dangerous_as_bytes(), cred.dangerous_secret().as_bytes());
    assert_secret_protected("an unsealed credential secret", &sk);
}
