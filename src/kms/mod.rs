//! The embedded key store (a small KMS): customer master keys (CMKs) with versions, aliases and
//! states, and the envelope operations on data keys, modelled on the DEW KMS / AWS KMS APIs.
//!
//! SKELETON: the public API below is fixed (other modules code against it); bodies are to be
//! written. Every method takes `&self` and re-reads the store from disk, so several processes
//! (CLI and a running server) see each other's changes; changes are serialized by a lock file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::crypto::SecretBytes;

/// The encryption context: key/value pairs bound into a wrapped data key's associated data.
pub type EncryptionContext = BTreeMap<String, String>;

/// How to obtain the root key of an existing store.
pub enum RootSecret {
    /// A 32-byte key file (mode 0600; refused if group/world readable).
    KeyFile(PathBuf),
    /// A passphrase, stretched with Argon2id using the parameters stored in the key store.
    Passphrase(Zeroizing<String>),
}

/// How to create the root key of a new store.
pub enum InitRoot {
    /// Generate a random 32-byte key into `root.key` in the store directory (mode 0600).
    GenerateKeyFile,
    /// Derive the root key from a passphrase (Argon2id, fresh salt).
    Passphrase(Zeroizing<String>),
}

/// A CMK state, with the KMS numeric codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KeyState {
    PendingActivation = 1,
    Enabled = 2,
    Disabled = 3,
    PendingDeletion = 4,
    PendingImport = 5,
}

/// What `describe-key`/`list-keys` show of a CMK (never key material).
#[derive(Debug, Clone, Serialize)]
pub struct KeyMetadata {
    pub key_id: Uuid,
    pub key_alias: String,
    pub key_description: String,
    pub key_state: KeyState,
    /// Unix seconds.
    pub creation_date: u64,
    /// Unix seconds; set while pending deletion.
    pub scheduled_deletion_date: Option<u64>,
    /// The version new data keys are wrapped under.
    pub current_version: u32,
    /// Number of versions (all of which still unwrap).
    pub version_count: u32,
}

/// A wrapped (encrypted) data key and the CMK version that wrapped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDataKey {
    pub key_id: Uuid,
    pub key_version: u32,
    /// Self-describing ciphertext blob (names its CMK and version; AES-256-GCM sealed).
    pub cipher_text: Vec<u8>,
}

/// A fresh data key: its plaintext and its wrapped form.
#[derive(Debug)]
pub struct DataKey {
    pub plain_text: SecretBytes,
    pub wrapped: WrappedDataKey,
}

/// A decrypted data key and which CMK version had wrapped it.
#[derive(Debug)]
pub struct UnwrappedDataKey {
    pub key_id: Uuid,
    pub key_version: u32,
    pub plain_text: SecretBytes,
}

/// Key store errors. (SKELETON: to be completed.)
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("not implemented")]
    Unimplemented,
}

/// An open key store.
pub struct KeyStore {
    _dir: PathBuf,
}

#[allow(unused_variables)]
impl KeyStore {
    pub fn exists(dir: &Path) -> bool {
        unimplemented!()
    }
    pub fn init(dir: &Path, root: InitRoot) -> Result<KeyStore, KmsError> {
        unimplemented!()
    }
    pub fn open(dir: &Path, root: RootSecret) -> Result<KeyStore, KmsError> {
        unimplemented!()
    }
    pub fn store_id(&self) -> Uuid {
        unimplemented!()
    }
    /// `key` is a key id (UUID) or an alias (`alias/name`, or `name`).
    pub fn describe_key(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        unimplemented!()
    }
    pub fn create_key(&self, alias: &str, description: &str) -> Result<KeyMetadata, KmsError> {
        unimplemented!()
    }
    pub fn list_keys(&self) -> Result<Vec<KeyMetadata>, KmsError> {
        unimplemented!()
    }
    pub fn enable_key(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        unimplemented!()
    }
    pub fn disable_key(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        unimplemented!()
    }
    pub fn schedule_key_deletion(
        &self,
        key: &str,
        pending_days: u32,
    ) -> Result<KeyMetadata, KmsError> {
        unimplemented!()
    }
    pub fn cancel_key_deletion(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        unimplemented!()
    }
    pub fn rotate_key(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        unimplemented!()
    }
    pub fn update_alias(&self, key: &str, new_alias: &str) -> Result<KeyMetadata, KmsError> {
        unimplemented!()
    }
    /// `length_bits` is 256 or 512 (512 for an AES-256-XTS volume key).
    pub fn create_data_key(
        &self,
        key: &str,
        context: &EncryptionContext,
        length_bits: u32,
    ) -> Result<DataKey, KmsError> {
        unimplemented!()
    }
    pub fn create_data_key_without_plaintext(
        &self,
        key: &str,
        context: &EncryptionContext,
        length_bits: u32,
    ) -> Result<WrappedDataKey, KmsError> {
        unimplemented!()
    }
    pub fn encrypt_data_key(
        &self,
        key: &str,
        plain_text: &SecretBytes,
        context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        unimplemented!()
    }
    pub fn decrypt_data_key(
        &self,
        key: &str,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<UnwrappedDataKey, KmsError> {
        unimplemented!()
    }
    /// Re-wraps under the newest version of `dest_key` (or of the source key when `None`)
    /// without handing the plaintext to the caller.
    pub fn re_encrypt(
        &self,
        cipher_text: &[u8],
        source_context: &EncryptionContext,
        dest_key: Option<&str>,
        dest_context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        unimplemented!()
    }
    pub fn gen_random(&self, bytes: usize) -> Result<SecretBytes, KmsError> {
        unimplemented!()
    }
}
