//! `--kms-url/--kms-credential/--kms-ca`: where `serve` and `volume create/rekey/import/export`
//! get data keys. Without `--kms-url`, the embedded key store in the data directory; with it, a
//! remote `cryptnbd kms serve` through the DEW KMS API, so this host holds no CMK and no root key.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use cryptnbd::kms::KeyProvider;
use cryptnbd::kms_http::client::{RemoteKms, RemoteKmsConfig};

use super::Global;

#[derive(Args, Debug, Clone, Default)]
pub struct RemoteKmsArgs {
    /// Get data keys from a remote KMS (`cryptnbd kms serve`) at this URL, e.g.
    /// https://kms.example:8443, instead of the key store in the data directory.
    #[arg(long, value_name = "URL", global = true, requires = "kms_credential")]
    pub kms_url: Option<String>,
    /// The access key file for --kms-url (JSON access_key/secret_key/project_id, mode 0600), as
    /// written by `cryptnbd kms credential create NAME --output FILE` on the KMS host.
    #[arg(long, value_name = "FILE", global = true, requires = "kms_url")]
    pub kms_credential: Option<PathBuf>,
    /// CA certificate(s) (PEM) to trust for --kms-url instead of the public web roots.
    #[arg(long, value_name = "FILE", global = true, requires = "kms_url")]
    pub kms_ca: Option<PathBuf>,
}

impl RemoteKmsArgs {
    pub fn is_remote(&self) -> bool {
        self.kms_url.is_some()
    }
}

/// The key provider the arguments ask for.
pub fn key_provider(global: &Global, a: &RemoteKmsArgs) -> anyhow::Result<Box<dyn KeyProvider>> {
    match (&a.kms_url, &a.kms_credential) {
        (Some(url), Some(cred)) => {
            let kms = RemoteKms::new(&RemoteKmsConfig {
                url: url.clone(),
                credential_file: cred.clone(),
                ca_file: a.kms_ca.clone(),
            })
            .with_context(|| format!("setting up the KMS client for {url}"))?;
            Ok(Box::new(kms))
        }
        _ => Ok(Box::new(super::kms::open_keystore(global)?)),
    }
}
