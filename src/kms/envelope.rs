//! Envelope operations on data keys: create (with or without plaintext), encrypt, decrypt,
//! re-encrypt, and random bytes. New wraps use the key's newest version; any version still
//! unwraps. Only an enabled key does any of this; the error names the state otherwise.
//!
//! A wrapped key names its CMK and version in its header (see `blob.rs`); when the caller also
//! names a key, it must be that one, else "cannot decrypt" (the message gives the blob's key id,
//! which is public metadata, never any key material).

use super::lifecycle::{find_index, require_enabled};
use super::store::{KeyRecord, StoreFile};
use super::{
    blob, DataKey, EncryptionContext, KeyStore, KmsError, UnwrappedDataKey, WrappedDataKey,
};
use crate::crypto::{aead, SecretBytes};

/// Largest `gen-random` request (as AWS KMS GenerateRandom).
pub const MAX_RANDOM_BYTES: usize = 1024;
/// Upper bound on the encoded encryption context, so a caller cannot make the AAD huge.
const MAX_CONTEXT_BYTES: usize = 8192;

fn check_context(context: &EncryptionContext) -> Result<(), KmsError> {
    let size: usize = context.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_CONTEXT_BYTES {
        return Err(KmsError::InvalidArgument(format!(
            "the encryption context is {size} bytes, more than {MAX_CONTEXT_BYTES}"
        )));
    }
    if context.keys().any(|k| k.is_empty()) {
        return Err(KmsError::InvalidArgument(
            "an encryption context key must not be empty".into(),
        ));
    }
    Ok(())
}

/// A fresh data key of `length_bits` (256, or 512 for AES-256-XTS whose halves must differ).
fn fresh_data_key(length_bits: u32) -> Result<SecretBytes, KmsError> {
    match length_bits {
        256 => Ok(SecretBytes::random(32)),
        512 => loop {
            let k = SecretBytes::random(64);
            let b = k.dangerous_as_bytes();
            if b[..32] != b[32..] {
                return Ok(k);
            }
        },
        n => Err(KmsError::InvalidArgument(format!(
            "a data key is 256 or 512 bits, not {n}"
        ))),
    }
}

/// What a blob holds: a data key (≤ 64 bytes) or caller data (`encrypt-data`, Vault `encrypt`).
/// The two are sealed under different associated data, so neither passes for the other.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    DataKey,
    Data,
}

impl Kind {
    fn aad(
        self,
        file: &StoreFile,
        k: &KeyRecord,
        version: u32,
        context: &EncryptionContext,
    ) -> Vec<u8> {
        match self {
            Kind::DataKey => blob::datakey_aad(file.store_id, k.key_id, version, context),
            Kind::Data => blob::data_aad(file.store_id, k.key_id, version, context),
        }
    }

    fn max_blob(self) -> usize {
        match self {
            Kind::DataKey => blob::MAX_BLOB,
            Kind::Data => blob::MAX_DATA_BLOB,
        }
    }
}

impl KeyStore {
    /// Wraps `plain` under the newest version of `k`.
    fn wrap(
        &self,
        file: &StoreFile,
        k: &KeyRecord,
        plain: &[u8],
        context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        self.wrap_kind(file, k, plain, context, Kind::DataKey)
    }

    fn wrap_kind(
        &self,
        file: &StoreFile,
        k: &KeyRecord,
        plain: &[u8],
        context: &EncryptionContext,
        kind: Kind,
    ) -> Result<WrappedDataKey, KmsError> {
        let version = k.current_version().map(|v| v.version).unwrap_or(0);
        let material = self.material(file, k, version)?;
        let aad = kind.aad(file, k, version, context);
        let sealed = aead::seal(&material, &aad, plain);
        Ok(WrappedDataKey {
            key_id: k.key_id,
            key_version: version,
            cipher_text: blob::encode(k.key_id, version, &sealed),
        })
    }

    /// Unwraps a blob; `expected` is the index of the key the caller named, if any.
    fn unwrap(
        &self,
        file: &StoreFile,
        expected: Option<usize>,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<UnwrappedDataKey, KmsError> {
        self.unwrap_kind(file, expected, cipher_text, context, Kind::DataKey)
    }

    fn unwrap_kind(
        &self,
        file: &StoreFile,
        expected: Option<usize>,
        cipher_text: &[u8],
        context: &EncryptionContext,
        kind: Kind,
    ) -> Result<UnwrappedDataKey, KmsError> {
        let parsed =
            blob::parse_bounded(cipher_text, kind.max_blob()).map_err(KmsError::cannot_decrypt)?;
        let i = match expected {
            Some(i) if file.keys[i].key_id != parsed.key_id => {
                return Err(KmsError::cannot_decrypt(format!(
                    "the ciphertext was made under key {}, not under key {}",
                    parsed.key_id, file.keys[i].key_id
                )))
            }
            Some(i) => i,
            None => find_index(file, &parsed.key_id.to_string()).map_err(|e| match e {
                KmsError::KeyNotFound { .. } => KmsError::cannot_decrypt(format!(
                    "the ciphertext was made under key {}, which is not in this key store",
                    parsed.key_id
                )),
                other => other,
            })?,
        };
        let k = &file.keys[i];
        require_enabled(k)?;
        let material = self.material(file, k, parsed.key_version)?;
        let aad = kind.aad(file, k, parsed.key_version, context);
        let plain = aead::open(&material, &aad, parsed.sealed).map_err(|_| {
            KmsError::cannot_decrypt(
                "wrong encryption context, another key store, or the ciphertext was altered",
            )
        })?;
        Ok(UnwrappedDataKey {
            key_id: k.key_id,
            key_version: parsed.key_version,
            plain_text: plain,
        })
    }

    /// Looks up an enabled key and wraps `plain` under it.
    fn wrap_under(
        &self,
        key: &str,
        plain: &SecretBytes,
        context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        check_context(context)?;
        let file = self.snapshot()?;
        let k = &file.keys[find_index(&file, key)?];
        require_enabled(k)?;
        self.wrap(&file, k, plain.dangerous_as_bytes(), context)
    }

    /// `length_bits` is 256 or 512 (512 for an AES-256-XTS volume key).
    pub fn create_data_key(
        &self,
        key: &str,
        context: &EncryptionContext,
        length_bits: u32,
    ) -> Result<DataKey, KmsError> {
        let r = fresh_data_key(length_bits).and_then(|plain| {
            let wrapped = self.wrap_under(key, &plain, context)?;
            Ok(DataKey {
                plain_text: plain,
                wrapped,
            })
        });
        self.finish("create-datakey", Some(key), context, r, |d| {
            (Some(d.wrapped.key_id), Some(d.wrapped.key_version))
        })
    }

    pub fn create_data_key_without_plaintext(
        &self,
        key: &str,
        context: &EncryptionContext,
        length_bits: u32,
    ) -> Result<WrappedDataKey, KmsError> {
        let r = fresh_data_key(length_bits).and_then(|plain| self.wrap_under(key, &plain, context));
        self.finish(
            "create-datakey-without-plaintext",
            Some(key),
            context,
            r,
            |w| (Some(w.key_id), Some(w.key_version)),
        )
    }

    /// Wraps caller-supplied plaintext (1–64 bytes).
    pub fn encrypt_data_key(
        &self,
        key: &str,
        plain_text: &SecretBytes,
        context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        let r = if plain_text.is_empty() || plain_text.len() > blob::MAX_PLAINTEXT {
            Err(KmsError::InvalidArgument(format!(
                "the plaintext data key must be 1 to {} bytes, not {}",
                blob::MAX_PLAINTEXT,
                plain_text.len()
            )))
        } else {
            self.wrap_under(key, plain_text, context)
        };
        self.finish("encrypt-datakey", Some(key), context, r, |w| {
            (Some(w.key_id), Some(w.key_version))
        })
    }

    pub fn decrypt_data_key(
        &self,
        key: &str,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<UnwrappedDataKey, KmsError> {
        let r = self.snapshot().and_then(|file| {
            let i = find_index(&file, key)?;
            self.unwrap(&file, Some(i), cipher_text, context)
        });
        self.finish("decrypt-datakey", Some(key), context, r, |u| {
            (Some(u.key_id), Some(u.key_version))
        })
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
        let r = check_context(dest_context)
            .and_then(|_| self.snapshot())
            .and_then(|file| {
                let plain = self.unwrap(&file, None, cipher_text, source_context)?;
                let d = match dest_key {
                    Some(dk) => find_index(&file, dk)?,
                    None => find_index(&file, &plain.key_id.to_string())?,
                };
                let k = &file.keys[d];
                require_enabled(k)?;
                self.wrap(
                    &file,
                    k,
                    plain.plain_text.dangerous_as_bytes(),
                    dest_context,
                )
            });
        // The audit line carries the destination context; the source key is in `key`.
        let source = blob::parse(cipher_text)
            .map(|p| format!("{} (version {})", p.key_id, p.key_version))
            .unwrap_or_else(|_| "unreadable ciphertext".into());
        self.finish("re-encrypt", Some(&source), dest_context, r, |w| {
            (Some(w.key_id), Some(w.key_version))
        })
    }

    /// Seals caller data (1 byte to [`blob::MAX_DATA_PLAINTEXT`]) under the newest version of
    /// `key` (DEW `encrypt-data`, Vault transit `encrypt`). The blob names its key and version.
    pub fn encrypt_data(
        &self,
        key: &str,
        plain_text: &SecretBytes,
        context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        let r = if plain_text.is_empty() || plain_text.len() > blob::MAX_DATA_PLAINTEXT {
            Err(KmsError::InvalidArgument(format!(
                "the plaintext must be 1 to {} bytes, not {}",
                blob::MAX_DATA_PLAINTEXT,
                plain_text.len()
            )))
        } else {
            check_context(context).and_then(|_| {
                let file = self.snapshot()?;
                let k = &file.keys[find_index(&file, key)?];
                require_enabled(k)?;
                self.wrap_kind(
                    &file,
                    k,
                    plain_text.dangerous_as_bytes(),
                    context,
                    Kind::Data,
                )
            })
        };
        self.finish("encrypt-data", Some(key), context, r, |w| {
            (Some(w.key_id), Some(w.key_version))
        })
    }

    /// Opens an [`KeyStore::encrypt_data`] blob; `key`, when given, must be the key it names.
    pub fn decrypt_data(
        &self,
        key: Option<&str>,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<UnwrappedDataKey, KmsError> {
        let r = self.snapshot().and_then(|file| {
            let expected = key.map(|k| find_index(&file, k)).transpose()?;
            self.unwrap_kind(&file, expected, cipher_text, context, Kind::Data)
        });
        self.finish("decrypt-data", key, context, r, |u| {
            (Some(u.key_id), Some(u.key_version))
        })
    }

    /// Re-seals an [`KeyStore::encrypt_data`] blob under the newest version of its key (Vault
    /// transit `rewrap`), without handing the plaintext to the caller.
    pub fn rewrap_data(
        &self,
        key: &str,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        let r = self.snapshot().and_then(|file| {
            let i = find_index(&file, key)?;
            let plain = self.unwrap_kind(&file, Some(i), cipher_text, context, Kind::Data)?;
            self.wrap_kind(
                &file,
                &file.keys[i],
                plain.plain_text.dangerous_as_bytes(),
                context,
                Kind::Data,
            )
        });
        self.finish("rewrap-data", Some(key), context, r, |w| {
            (Some(w.key_id), Some(w.key_version))
        })
    }

    /// `bytes` (1–1024) random bytes from the OS CSPRNG.
    pub fn gen_random(&self, bytes: usize) -> Result<SecretBytes, KmsError> {
        let r = if bytes == 0 || bytes > MAX_RANDOM_BYTES {
            Err(KmsError::InvalidArgument(format!(
                "gen-random gives 1 to {MAX_RANDOM_BYTES} bytes, not {bytes}"
            )))
        } else {
            Ok(SecretBytes::random(bytes))
        };
        self.finish("gen-random", None, &EncryptionContext::new(), r, |_| {
            (None, None)
        })
    }
}
