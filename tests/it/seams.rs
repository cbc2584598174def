//! The key seam and the composition above the server, as their users see them: attach asks any
//! [`KeyProvider`] (here one that is not the key store) for the data key, once per export, and a
//! refused attach reaches the caller with its cause still typed (data directory error, then the
//! key provider's), printed once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::fixture::pattern;
use crate::common::keys::KeyFixture;
use crate::common::raw::RawClient;
use crate::common::{assert_refusal, TestServer};
use cryptnbd::datadir::DataDirError;
use cryptnbd::exports::{DataDirProvider, ExportSelection};
use cryptnbd::kms::{
    DataKey, EncryptionContext, KeyProvider, KeyStore, KmsError, UnwrappedDataKey, WrappedDataKey,
};
use cryptnbd::server::{AttachError, ExportProvider};

/// A key provider that is not the key store (as a remote KMS client is not): it forwards to one
/// and counts the unwraps.
struct Counting {
    inner: KeyStore,
    unwraps: Arc<AtomicUsize>,
}

impl KeyProvider for Counting {
    fn describe(&self) -> String {
        format!("counting provider over {}", self.inner.describe())
    }
    fn create_data_key(
        &self,
        key: &str,
        context: &EncryptionContext,
        length_bits: u32,
    ) -> Result<DataKey, KmsError> {
        KeyProvider::create_data_key(&self.inner, key, context, length_bits)
    }
    fn decrypt_data_key(
        &self,
        key: &str,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<UnwrappedDataKey, KmsError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        KeyProvider::decrypt_data_key(&self.inner, key, cipher_text, context)
    }
    fn re_encrypt(
        &self,
        cipher_text: &[u8],
        source_context: &EncryptionContext,
        dest_key: Option<&str>,
        dest_context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        KeyProvider::re_encrypt(
            &self.inner,
            cipher_text,
            source_context,
            dest_key,
            dest_context,
        )
    }
}

#[test]
fn attach_asks_any_key_provider_once_per_export() {
    let f = KeyFixture::new().with_key("alias/default");
    f.volume("vol", 1 << 20, "alias/default");
    let unwraps = Arc::new(AtomicUsize::new(0));
    let keys = Counting {
        inner: f.reopen(),
        unwraps: unwraps.clone(),
    };
    assert!(keys.describe().contains("embedded key store at "));
    let p = DataDirProvider::new(f.dd.clone(), keys, ExportSelection::default());
    let v = p.attach("vol").expect("attach");
    assert!(
        Arc::ptr_eq(&v, &p.attach("vol").unwrap()),
        "one shared volume"
    );
    assert_eq!(unwraps.load(Ordering::SeqCst), 1);

    // Served, through two connections: still one unwrap.
    let srv = TestServer::start(Arc::new(p));
    let data = pattern(8192, 3);
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("vol", false);
    assert_eq!(c.write(1, 4096, &data, 0).error(), 0);
    let mut d = RawClient::unix(&srv.socket);
    d.connect_export("vol", true);
    assert_eq!(d.read(2, 4096, 8192).unwrap(), data);
    assert_eq!(unwraps.load(Ordering::SeqCst), 1);
    // The data went through the volume the provider attached.
    let mut back = vec![0u8; 8192];
    v.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn a_refused_attach_keeps_its_typed_cause() {
    let f = KeyFixture::new().with_key("alias/locked");
    f.volume("secret", 1 << 20, "alias/locked");
    f.ks.disable_key("alias/locked").unwrap();
    let p = DataDirProvider::new(f.dd.clone(), f.reopen(), ExportSelection::default());
    let e = p.attach("secret").unwrap_err();
    let AttachError::Refused { source, .. } = &e else {
        panic!("expected a refusal, got {e:?}");
    };
    let dd = source
        .downcast_ref::<DataDirError>()
        .expect("the data directory's own error");
    assert!(
        matches!(
            dd,
            DataDirError::Kms {
                source: KmsError::KeyNotUsable { .. },
                ..
            }
        ),
        "{dd:?}"
    );
    assert_refusal(&e, &["\"secret\"", "cannot be attached", "disabled"]);
    // Names that cannot be volumes are simply not exports.
    assert!(matches!(p.attach("../x"), Err(AttachError::NotFound(_))));
    assert!(matches!(p.attach("missing"), Err(AttachError::NotFound(_))));
}
