//! The embedded key store (a small KMS): customer master keys (CMKs) with versions, aliases and
//! states, and the envelope operations on data keys, modelled on the DEW KMS / AWS KMS APIs.
//!
//! The store directory holds `keystore.json` (metadata + sealed CMK material, see [`store`]),
//! `keystore.lock`, `audit.log` (see [`audit`]) and, for a key-file root, `root.key` (see
//! [`root`]). Other components keep their own entries (e.g. `volumes/`) beside them; they are
//! ignored here. Every method takes `&self` and re-reads the store from disk, so several processes
//! (the CLI and a running server) see each other's changes; changes are serialized by a lock.
//!
//! Where the store's documents live is behind [`objects`] (files in the directory, the default, or
//! objects in a Ceph RADOS pool named by a marker file, see [`location`] and `rados.rs`), with
//! compare-and-swap writes; [`transfer`] copies a store between the two.
//!
//! Layout of this module: this file holds the public types; creating, opening and joining a store
//! is in `open.rs`; the CMK
//! lifecycle (create/enable/disable/delete/rotate/alias) is in `lifecycle.rs`, several aliases per
//! key in `aliases.rs`, the envelope
//! operations on data keys in `envelope.rs`, the key seam ([`KeyProvider`]) in `provider.rs`, the wrapped-key format and AADs in [`blob`], errors
//! in `error.rs`, the injectable time source in [`clock`]. Who may use keys over the network:
//! [`credentials`] (`credentials.json`: access keys, tokens, their user ids and roles),
//! [`grants`] (`grants.json`: DEW grants, indexed) and [`rights`] (the decision combining them).

mod aliases;
pub mod audit;
pub mod blob;
mod check;
pub mod clock;
pub mod credentials;
mod envelope;
mod error;
pub mod grants;
mod lifecycle;
pub mod location;
pub mod objects;
mod open;
pub mod provider;
#[cfg(feature = "rbd")]
mod rados;
pub mod rights;
pub mod root;
pub mod store;
pub mod transfer;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use objects::ObjectStore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::crypto::{Key256, SecretBytes};

pub use aliases::{AliasInfo, MAX_ALIASES_PER_KEY};
pub use audit::AuditRecord;
pub use check::KeyReference;
pub use clock::{Clock, ManualClock, SystemClock};
pub use credentials::{CredentialKind, CredentialRecord, CredentialScope, NewSecret};
pub use error::{KmsError, RemoteRefusal};
pub use grants::{Grant, GrantIndex, NewGrant, PrincipalType};
pub use lifecycle::normalize_alias;
pub use location::RadosStore;
pub use provider::KeyProvider;

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

/// A CMK state, with the KMS numeric codes. Serialized as the code in a string (`"2"`), as the
/// DEW KMS API does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    PendingActivation = 1,
    Enabled = 2,
    Disabled = 3,
    PendingDeletion = 4,
    PendingImport = 5,
}

impl KeyState {
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => KeyState::PendingActivation,
            2 => KeyState::Enabled,
            3 => KeyState::Disabled,
            4 => KeyState::PendingDeletion,
            5 => KeyState::PendingImport,
            _ => return None,
        })
    }

    /// Lower-case name, as shown to users.
    pub fn name(self) -> &'static str {
        match self {
            KeyState::PendingActivation => "pending activation",
            KeyState::Enabled => "enabled",
            KeyState::Disabled => "disabled",
            KeyState::PendingDeletion => "pending deletion",
            KeyState::PendingImport => "pending import",
        }
    }

    /// What a user can do about a key in this state refusing an operation.
    pub(crate) fn hint(self) -> &'static str {
        match self {
            KeyState::Disabled => "enable it first (`cryptnbd kms enable-key`)",
            KeyState::PendingDeletion => {
                "cancel its deletion first (`cryptnbd kms cancel-key-deletion`, then `enable-key`)"
            }
            _ => "it cannot be used in this state",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for KeyState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.code().to_string())
    }
}

impl<'de> Deserialize<'de> for KeyState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<u8>()
            .ok()
            .and_then(KeyState::from_code)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown key state {s:?}")))
    }
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
    /// Automatic rotation interval in days, when enabled.
    pub rotation_interval_days: Option<u32>,
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

/// An open key store. Cheap to share between threads (`&self` everywhere); holds the root key
/// in memory (zeroized on drop) and nothing else: all state is re-read from disk per operation.
pub struct KeyStore {
    /// The local data directory: root key file, audit log, store marker.
    dir: PathBuf,
    /// Where the store's objects are (the directory's files, or RADOS).
    objects: Arc<dyn ObjectStore>,
    store_id: Uuid,
    root: Key256,
    clock: Arc<dyn Clock>,
    audit_rotation: audit::AuditRotation,
    /// The parsed grants file, reused while it is unchanged (see `grants.rs`).
    grants_cache: grants::GrantCache,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("dir", &self.dir)
            .field("store", &self.objects.location())
            .field("store_id", &self.store_id)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    pub fn store_id(&self) -> Uuid {
        self.store_id
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the store's objects are: `file:DIR` or `rados:POOL[/NS]`.
    pub fn location(&self) -> String {
        self.objects.location()
    }

    /// The object store (for check, export and import).
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// When this process rotates the audit log (`kms serve --audit-max-size`).
    pub fn set_audit_rotation(&mut self, rotation: audit::AuditRotation) {
        self.audit_rotation = rotation;
    }

    /// The current time as the audit log writes it.
    pub fn audit_time(&self) -> String {
        clock::rfc3339(self.clock.now_unix())
    }

    /// Appends a record to the audit log (rotating it as configured) and fsyncs it.
    pub fn append_audit(&self, record: &AuditRecord) -> Result<(), KmsError> {
        audit::append(&self.dir, record, &self.audit_rotation)
    }

    /// The last `n` audit records (all when `None`), oldest first.
    pub fn audit_tail(&self, n: Option<usize>) -> Result<Vec<AuditRecord>, KmsError> {
        audit::tail(&self.dir, n)
    }

    /// Appends an audit record.
    fn audit(
        &self,
        operation: &str,
        key: Option<&str>,
        key_id: Option<Uuid>,
        key_version: Option<u32>,
        context: &EncryptionContext,
        error: Option<&KmsError>,
    ) -> Result<(), KmsError> {
        self.append_audit(&AuditRecord {
            time: clock::rfc3339(self.clock.now_unix()),
            operation: operation.into(),
            key: key.map(str::to_string),
            key_id,
            key_version,
            encryption_context: context.clone(),
            outcome: if error.is_some() { "error" } else { "success" }.into(),
            error: error.map(|e| e.to_string()),
            credential: None,
            source: None,
            count: None,
            grant: None,
        })
    }

    /// Records the outcome of an operation; a success that cannot be audited is reported as an
    /// error (an unaudited key operation is not acceptable), a failure keeps its own error.
    fn finish<T>(
        &self,
        operation: &str,
        key: Option<&str>,
        context: &EncryptionContext,
        result: Result<T, KmsError>,
        ids: impl Fn(&T) -> (Option<Uuid>, Option<u32>),
    ) -> Result<T, KmsError> {
        match &result {
            Ok(v) => {
                let (id, ver) = ids(v);
                self.audit(operation, key, id, ver, context, None)?;
            }
            Err(e) => {
                if let Err(ae) = self.audit(operation, key, e.key_id(), None, context, Some(e)) {
                    tracing::warn!(error = %ae, "could not write the audit log");
                }
            }
        }
        result
    }
}

impl KmsError {
    /// The key id an error is about, when it names one (for the audit log).
    fn key_id(&self) -> Option<Uuid> {
        match self {
            KmsError::KeyNotUsable { key_id, .. }
            | KmsError::WrongState { key_id, .. }
            | KmsError::KeyDeleted { key_id, .. }
            | KmsError::AliasExists { key_id, .. } => Some(*key_id),
            KmsError::AliasNotFound { key_id, .. } => *key_id,
            _ => None,
        }
    }
}
