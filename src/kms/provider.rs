//! The key seam: what attach and volume management ask for data keys, so a volume can be served
//! with the embedded [`KeyStore`] or with a remote KMS (DEW API over HTTPS) behind the same calls.

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
}

impl KeyProvider for KeyStore {
    fn describe(&self) -> String {
        format!("embedded key store at {}", self.dir().display())
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
