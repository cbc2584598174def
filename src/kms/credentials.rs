//! Credentials for the key store's network APIs: DEW-style access keys (AK/SK, for the signed
//! KMS API) and Vault-style tokens. They live in `credentials.json` beside `keystore.json`, so the
//! key store file format (and its golden files) stay as they are.
//!
//! A secret key is needed in plaintext to verify a signature (HMAC), so it is stored sealed under
//! the root key (AES-256-GCM, bound to the store id and the access key id) and unsealed per
//! request; a token only has to be recognised, so only its SHA-256 is stored (tokens are 256-bit
//! random, so a plain hash is not open to guessing). Both are shown once, at creation.
//!
//! The object is changed like the store's (see `objects.rs`): a compare-and-swap, which for the
//! file backend is the temp file + fsync + rename + directory fsync under the store's lock.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::objects::{self, Obj};
use super::rights::{self, KeyScope};
use super::{blob, clock, store, KeyStore, KmsError};
use crate::crypto::{aead, SecretBytes};

pub const CREDENTIALS_FILE: &str = "credentials.json";
const FORMAT_NAME: &str = "cryptnbd-credentials";
/// Version 2 gives each credential a user id and explicit rights (`admin`, `scopes`); version 1
/// (`keys`, where none meant every key) is read and migrated (see `rights.rs`).
const FORMAT_VERSION: u32 = 2;
const FORMAT_VERSION_1: u32 = 1;
/// Prefix of every token, so a leaked one is recognisable in a secret scanner.
const TOKEN_PREFIX: &str = "cnt.";

/// What kind of secret a credential holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    AccessKey,
    Token,
}

/// One credential as stored (never a plaintext secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub name: String,
    pub kind: CredentialKind,
    /// The access key id (AK); for a token, the first characters of its hash (to name it).
    pub id: String,
    /// The stable principal to grant to (`grantee_principal`): 32 hex digits, never reused.
    #[serde(default)]
    pub user_id: String,
    /// The project id the credential signs for (DEW API path `/v1.0/{project_id}/kms/…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// Every key, every operation, and creating keys and grants (format 2).
    #[serde(default)]
    pub admin: bool,
    /// Named operations on named keys (by id), besides grants (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<KeyScope>,
    /// Format 1 only: the keys (ids or aliases) it could use, `None` meaning all keys. Read to
    /// migrate, never written.
    #[serde(default, rename = "keys", skip_serializing)]
    pub legacy_keys: Option<Vec<String>>,
    #[serde(default)]
    pub read_only: bool,
    /// A disabled credential authenticates nothing until enabled again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    pub creation_date: u64,
    /// Access key: hex of the secret key sealed under the root key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_secret: Option<String>,
    /// Token: hex SHA-256 of the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CredentialsFile {
    format: String,
    version: u32,
    credentials: Vec<CredentialRecord>,
}

/// What a new credential may do. Nothing by default: no key until `admin` or `scopes` (or a
/// grant, given separately) say so.
#[derive(Debug, Clone, Default)]
pub struct CredentialScope {
    pub project_id: Option<String>,
    pub admin: bool,
    /// (key id or alias, operations): aliases are resolved to ids now.
    pub scopes: Vec<(String, Vec<String>)>,
    pub read_only: bool,
}

/// A freshly created credential's secret, shown once (zeroized on drop, no byte-printing Debug).
pub struct NewSecret {
    pub record: CredentialRecord,
    secret: Zeroizing<String>,
}

impl NewSecret {
    /// The secret key or token. The caller shows it once and must not log or store it.
    pub fn dangerous_secret(&self) -> &str {
        &self.secret
    }
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// `len` characters drawn uniformly from `alphabet` (rejection sampling: no modulo bias).
fn random_text(len: usize, alphabet: &[u8]) -> Zeroizing<String> {
    let limit = 256 - 256 % alphabet.len();
    let mut out = Zeroizing::new(String::with_capacity(len));
    while out.len() < len {
        let raw = SecretBytes::random(len * 2);
        for b in raw.dangerous_as_bytes() {
            if (*b as usize) < limit && out.len() < len {
                out.push(alphabet[*b as usize % alphabet.len()] as char);
            }
        }
    }
    out
}

/// Parses a credentials object (`None`: missing, i.e. no credentials yet).
fn parse(bytes: Option<&[u8]>, p: &Path) -> Result<CredentialsFile, KmsError> {
    let Some(buf) = bytes else {
        return Ok(CredentialsFile {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            credentials: Vec::new(),
        });
    };
    let corrupt = |reason: String| KmsError::Corrupt {
        path: p.to_path_buf(),
        reason,
    };
    let file: CredentialsFile = serde_json::from_slice(buf).map_err(|e| corrupt(e.to_string()))?;
    if file.format != FORMAT_NAME || !(FORMAT_VERSION_1..=FORMAT_VERSION).contains(&file.version) {
        return Err(corrupt(format!(
            "format {:?} version {} (this program reads {FORMAT_NAME} version {FORMAT_VERSION})",
            file.format, file.version
        )));
    }
    Ok(file)
}

/// The bytes of a credentials object, always written in the newest format.
fn encode(file: &mut CredentialsFile) -> Vec<u8> {
    file.version = FORMAT_VERSION;
    let mut bytes = serde_json::to_vec_pretty(file).expect("the credentials file serializes");
    bytes.push(b'\n');
    bytes
}

/// Checks a credentials object's bytes; returns how many credentials it holds.
pub(super) fn check_bytes(bytes: &[u8], p: &Path) -> Result<usize, KmsError> {
    Ok(parse(Some(bytes), p)?.credentials.len())
}

/// The bytes of a credentials object holding none.
pub(super) fn empty_bytes() -> Vec<u8> {
    encode(&mut parse(None, Path::new("")).expect("an empty credentials object"))
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl KeyStore {
    /// The credentials with format-1 records given their format-2 meaning (in memory).
    fn load_credentials(&self) -> Result<(CredentialsFile, Vec<String>), KmsError> {
        let read = self.objects.read(Obj::Credentials)?;
        self.credentials_from(read.as_ref().map(|(b, _)| b.as_slice()))
    }

    fn credentials_from(
        &self,
        bytes: Option<&[u8]>,
    ) -> Result<(CredentialsFile, Vec<String>), KmsError> {
        let mut file = parse(bytes, &self.objects.path(Obj::Credentials))?;
        let mut notes = Vec::new();
        if file.version == FORMAT_VERSION_1 {
            // The store is replaced whole: reading it without its lock sees a whole version.
            let store = store::load_from(&*self.objects)?;
            notes = rights::migrate_v1(&mut file.credentials, &store);
        }
        Ok((file, notes))
    }

    /// Read-modify-write of the credentials (compare-and-swap, retried: `f` may run again);
    /// `f` says whether to write.
    fn change_credentials<R>(
        &self,
        mut f: impl FnMut(&mut CredentialsFile, &[String]) -> Result<(bool, R), KmsError>,
    ) -> Result<R, KmsError> {
        objects::update(&*self.objects, Obj::Credentials, |bytes| {
            let (mut file, notes) = self.credentials_from(bytes)?;
            let (write, r) = f(&mut file, &notes)?;
            Ok((write.then(|| encode(&mut file)), r))
        })
    }

    /// Rewrites a format-1 credentials file as format 2; returns what each credential became
    /// (nothing when there was nothing to migrate).
    pub fn migrate_credentials(&self) -> Result<Vec<String>, KmsError> {
        let notes = self.change_credentials(|_, notes| Ok((!notes.is_empty(), notes.to_vec())))?;
        if notes.is_empty() {
            return Ok(notes);
        }
        let none = super::EncryptionContext::new();
        self.audit("migrate-credentials", None, None, None, &none, None)?;
        Ok(notes)
    }

    /// Creates a named credential. Names are unique across both kinds.
    pub fn create_credential(
        &self,
        name: &str,
        kind: CredentialKind,
        scope: CredentialScope,
    ) -> Result<NewSecret, KmsError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(KmsError::InvalidArgument(format!(
                "credential name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        // Keys are resolved to ids now (a typo is found at creation; moving an alias later
        // does not move the right).
        let mut scopes: Vec<KeyScope> = Vec::new();
        for (k, ops) in &scope.scopes {
            let key_id = self.resolve_key_id(k)?;
            let operations = rights::scope_operations(ops)?;
            match scopes.iter_mut().find(|s| s.key_id == key_id) {
                Some(s) => {
                    s.operations.extend(operations);
                    s.operations.sort();
                    s.operations.dedup();
                }
                None => scopes.push(KeyScope { key_id, operations }),
            }
        }
        const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        const MIXED: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        const HEX: &[u8] = b"0123456789abcdef";
        let now = self.clock.now_unix();
        let (id, secret, sealed, hash) = match kind {
            CredentialKind::AccessKey => {
                let ak = random_text(20, UPPER);
                let sk = random_text(40, MIXED);
                let sealed = aead::seal(
                    &self.root,
                    &blob::credential_aad(self.store_id, &ak),
                    sk.as_bytes(),
                );
                (ak.to_string(), sk, Some(hex::encode(sealed)), None)
            }
            CredentialKind::Token => {
                let body = random_text(32, MIXED);
                let token = Zeroizing::new(format!("{TOKEN_PREFIX}{}", body.as_str()));
                let hash = token_hash(&token);
                (hash[..12].to_string(), token, None, Some(hash))
            }
        };
        let record = CredentialRecord {
            name: name.into(),
            kind,
            id,
            user_id: random_text(32, HEX).to_string(),
            project_id: scope.project_id,
            admin: scope.admin,
            scopes,
            legacy_keys: None,
            read_only: scope.read_only,
            disabled: false,
            creation_date: now,
            sealed_secret: sealed,
            token_sha256: hash,
        };
        self.change_credentials(|file, _| {
            if file.credentials.iter().any(|c| c.name == name) {
                return Err(KmsError::InvalidArgument(format!(
                    "a credential named {name:?} already exists"
                )));
            }
            file.credentials.push(record.clone());
            Ok((true, ()))
        })?;
        let none = super::EncryptionContext::new();
        self.audit("create-credential", Some(name), None, None, &none, None)?;
        Ok(NewSecret { record, secret })
    }

    /// All credentials (no secrets: sealed keys and hashes only), format-1 ones as migrated.
    pub fn list_credentials(&self) -> Result<Vec<CredentialRecord>, KmsError> {
        let _lock = self.objects.lock(false)?;
        Ok(self.load_credentials()?.0.credentials)
    }

    /// The credential named `name`, with `f` applied under the exclusive lock and saved.
    fn change_credential(
        &self,
        operation: &str,
        name: &str,
        f: impl Fn(&mut CredentialsFile, usize),
    ) -> Result<(), KmsError> {
        self.change_credentials(|file, _| {
            let Some(i) = file.credentials.iter().position(|c| c.name == name) else {
                return Err(KmsError::InvalidArgument(format!(
                    "no credential named {name:?}"
                )));
            };
            f(file, i);
            Ok((true, ()))
        })?;
        let none = super::EncryptionContext::new();
        self.audit(operation, Some(name), None, None, &none, None)
    }

    /// Removes a credential by name; later requests signed with it are refused.
    pub fn delete_credential(&self, name: &str) -> Result<(), KmsError> {
        self.change_credential("delete-credential", name, |file, i| {
            file.credentials.remove(i);
        })
    }

    /// Disables (or enables again) a credential: while disabled it authenticates nothing.
    pub fn set_credential_disabled(&self, name: &str, disabled: bool) -> Result<(), KmsError> {
        let op = if disabled {
            "disable-credential"
        } else {
            "enable-credential"
        };
        self.change_credential(op, name, |file, i| file.credentials[i].disabled = disabled)
    }

    /// The credential with access key id `ak` and its unsealed secret key, if there is one and
    /// it is not disabled.
    pub fn access_key(
        &self,
        ak: &str,
    ) -> Result<Option<(CredentialRecord, SecretBytes)>, KmsError> {
        let file = {
            let _lock = self.objects.lock(false)?;
            self.load_credentials()?.0
        };
        let Some(c) = file
            .credentials
            .into_iter()
            .find(|c| c.kind == CredentialKind::AccessKey && c.id == ak && !c.disabled)
        else {
            return Ok(None);
        };
        let corrupt = |reason: &str| KmsError::Corrupt {
            path: self.objects.path(Obj::Credentials),
            reason: format!("credential {:?}: {reason}", c.name),
        };
        let sealed = hex::decode(c.sealed_secret.as_deref().unwrap_or_default())
            .map_err(|_| corrupt("the sealed secret key is not hex"))?;
        let sk = aead::open(
            &self.root,
            &blob::credential_aad(self.store_id, ak),
            &sealed,
        )
        .map_err(|_| corrupt("the secret key does not open under the root key"))?;
        Ok(Some((c, sk)))
    }

    /// The token credential whose hash matches `token`, if any and not disabled (compared in
    /// constant time).
    pub fn token(&self, token: &str) -> Result<Option<CredentialRecord>, KmsError> {
        let file = {
            let _lock = self.objects.lock(false)?;
            self.load_credentials()?.0
        };
        let want = token_hash(token);
        Ok(file.credentials.into_iter().find(|c| {
            c.kind == CredentialKind::Token
                && !c.disabled
                && c.token_sha256
                    .as_deref()
                    .is_some_and(|h| bool::from(h.as_bytes().ct_eq(want.as_bytes())))
        }))
    }

    /// Records one network request in the audit log: which credential (by name, never its
    /// secret), which operation on which key, the right that allowed it (`admin`, `scope`, a
    /// grant id) or why none did, and how it ended.
    #[allow(clippy::too_many_arguments)]
    pub fn audit_request(
        &self,
        credential: Option<&str>,
        operation: &str,
        key: Option<&str>,
        key_id: Option<uuid::Uuid>,
        grant: Option<&str>,
        status: u16,
        error: Option<&str>,
    ) -> Result<(), KmsError> {
        self.append_audit(&super::AuditRecord {
            time: clock::rfc3339(self.clock.now_unix()),
            operation: format!("http {operation}"),
            key: key.map(str::to_string),
            key_id,
            key_version: None,
            encryption_context: super::EncryptionContext::new(),
            outcome: if status < 400 { "success" } else { "error" }.into(),
            error: error.map(|e| format!("{status}: {e}")),
            credential: Some(credential.unwrap_or("(none)").to_string()),
            source: None,
            count: None,
            grant: grant.map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::InitRoot;

    #[test]
    fn access_keys_and_tokens_round_trip_without_plaintext_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        let ak = ks
            .create_credential("app", CredentialKind::AccessKey, CredentialScope::default())
            .unwrap();
        let tok = ks
            .create_credential("rgw", CredentialKind::Token, CredentialScope::default())
            .unwrap();
        let on_disk = std::fs::read_to_string(dir.path().join(CREDENTIALS_FILE)).unwrap();
        assert!(!on_disk.contains(ak.dangerous_secret()));
        assert!(!on_disk.contains(tok.dangerous_secret()));
        let (rec, sk) = ks.access_key(&ak.record.id).unwrap().unwrap();
        assert_eq!(rec.name, "app");
        assert_eq!(sk.dangerous_as_bytes(), ak.dangerous_secret().as_bytes());
        assert_eq!(
            ks.token(tok.dangerous_secret()).unwrap().unwrap().name,
            "rgw"
        );
        assert!(ks.token("cnt.nope").unwrap().is_none());
        assert!(ks.access_key("NOPE").unwrap().is_none());
        assert!(ks
            .create_credential("app", CredentialKind::Token, CredentialScope::default())
            .is_err());
        ks.delete_credential("app").unwrap();
        assert!(ks.access_key(&ak.record.id).unwrap().is_none());
    }
}
