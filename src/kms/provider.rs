//! The key seam: [`KeyProvider`], what attach and volume management ask for data keys.
//!
//! The embedded [`KeyStore`] is one implementation (below); a remote KMS client (the DEW API over
//! HTTPS) is another. Callers (`crate::datadir`, the composition in `crate::exports`) take
//! `&dyn KeyProvider`, so they never learn which one they talk to.

use super::{DataKey, EncryptionContext, KeyStore, KmsError, UnwrappedDataKey, WrappedDataKey};

/// What attach and volume management ask for data keys. The embedded `KeyStore` is one
/// implementation; a remote KMS client (DEW API over HTTPS) is another.
pub trait KeyProvider: Send + Sync {
    /// For logs and messages: "embedded key store at /dir" or "remote KMS https://host:port".
    fn describe(&self) -> String;
    fn create_data_key(
        &self,
        key: &str,
        context: &EncryptionContext,
        length_bits: u32,
    ) -> Result<DataKey, KmsError>;
    fn decrypt_data_key(
        &self,
        key: &str,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<UnwrappedDataKey, KmsError>;
    fn re_encrypt(
        &self,
        cipher_text: &[u8],
        source_context: &EncryptionContext,
        dest_key: Option<&str>,
        dest_context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError>;
    /// The state of the CMK `key_id` ("enabled", "disabled", "pending deletion", "deleted"), for
    /// status displays; `None` where the provider does not say (a remote KMS, whose credential
    /// may not be allowed to describe the key). Writes no audit line: it is read every second
    /// by `ctl top`.
    fn key_state(&self, key_id: uuid::Uuid) -> Option<String> {
        let _ = key_id;
        None
    }
}

impl KeyProvider for KeyStore {
    fn key_state(&self, key_id: uuid::Uuid) -> Option<String> {
        let keys = self.list_keys().ok()?;
        Some(match keys.iter().find(|k| k.key_id == key_id) {
            Some(k) => k.key_state.name().to_string(),
            // list_keys leaves deleted keys out.
            None => "deleted".to_string(),
        })
    }

    fn describe(&self) -> String {
        match self.location().strip_prefix("file:") {
            Some(_) => format!("embedded key store at {}", self.dir().display()),
            None => format!(
                "key store {} (from {})",
                self.location(),
                self.dir().display()
            ),
        }
    }

    fn create_data_key(
        &self,
        key: &str,
        context: &EncryptionContext,
        length_bits: u32,
    ) -> Result<DataKey, KmsError> {
        KeyStore::create_data_key(self, key, context, length_bits)
    }

    fn decrypt_data_key(
        &self,
        key: &str,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<UnwrappedDataKey, KmsError> {
        KeyStore::decrypt_data_key(self, key, cipher_text, context)
    }

    fn re_encrypt(
        &self,
        cipher_text: &[u8],
        source_context: &EncryptionContext,
        dest_key: Option<&str>,
        dest_context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        KeyStore::re_encrypt(self, cipher_text, source_context, dest_key, dest_context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::InitRoot;

    #[test]
    fn key_store_through_the_trait() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        ks.create_key("alias/t", "").unwrap();
        let p: &dyn KeyProvider = &ks;
        assert!(p.describe().starts_with("embedded key store at "));
        let ctx: EncryptionContext = [("volume_id".to_string(), "v".to_string())].into();
        let dk = p.create_data_key("alias/t", &ctx, 512).unwrap();
        let back = p
            .decrypt_data_key("alias/t", &dk.wrapped.cipher_text, &ctx)
            .unwrap();
        assert_eq!(
            back.plain_text.dangerous_as_bytes(),
            dk.plain_text.dangerous_as_bytes()
        );
        let re = p
            .re_encrypt(&dk.wrapped.cipher_text, &ctx, None, &ctx)
            .unwrap();
        assert_eq!(re.key_id, dk.wrapped.key_id);
        let other: EncryptionContext = [("volume_id".to_string(), "w".to_string())].into();
        assert!(p
            .decrypt_data_key("alias/t", &dk.wrapped.cipher_text, &other)
            .is_err());
    }
}
