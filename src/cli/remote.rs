//! `--kms-url/--kms-credential/--kms-ca`: where `serve` and `volume create/rekey/import/export`
//! get data keys. Without `--kms-url`, the embedded key store in the data directory; with it, a
//! remote `cryptnbd kms serve` through the DEW KMS API, so this host holds no CMK and no root key.
//! `--kms-url` repeats (or takes a comma-separated list, also as a `serve --config` array):
//! instances sharing one key store, tried in order with failover (`kms_http::failover`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use cryptnbd::kms::KeyProvider;
use cryptnbd::kms_http::client::{RemoteKms, RemoteKmsConfig, Timeouts};

use super::Global;

#[derive(Args, Debug, Clone, Default)]
pub struct RemoteKmsArgs {
    /// Get data keys from a remote KMS (`cryptnbd kms serve`) at this URL, e.g.
    /// https://kms.example:8443, instead of the key store in the data directory. Repeat it (or
    /// give a comma-separated list) for several instances sharing one key store: a request goes
    /// to the one that answered last, and on to the next when an instance cannot be reached,
    /// times out or answers 5xx; a refusal (4xx) is final.
    #[arg(
        long,
        value_name = "URL",
        global = true,
        requires = "kms_credential",
        value_delimiter = ','
    )]
    pub kms_url: Option<Vec<String>>,
    /// The access key file for --kms-url (JSON access_key/secret_key/project_id, mode 0600), as
    /// written by `cryptnbd kms credential create NAME --output FILE` on the KMS host.
    #[arg(long, value_name = "FILE", global = true, requires = "kms_url")]
    pub kms_credential: Option<PathBuf>,
    /// CA certificate(s) (PEM) to trust for --kms-url instead of the public web roots.
    #[arg(long, value_name = "FILE", global = true, requires = "kms_url")]
    pub kms_ca: Option<PathBuf>,
    /// Time to open the TCP connection to one --kms-url before trying the next (default 2s).
    #[arg(long, value_name = "DURATION", global = true, value_parser = humantime::parse_duration)]
    pub kms_connect_timeout: Option<Duration>,
    /// Time for one request to one --kms-url, connection included, before trying the next
    /// (default 10s).
    #[arg(long, value_name = "DURATION", global = true, value_parser = humantime::parse_duration)]
    pub kms_timeout: Option<Duration>,
}

impl RemoteKmsArgs {
    pub fn is_remote(&self) -> bool {
        self.kms_url.is_some()
    }

    fn timeouts(&self) -> Timeouts {
        let d = Timeouts::default();
        Timeouts {
            connect: self.kms_connect_timeout.unwrap_or(d.connect),
            request: self.kms_timeout.unwrap_or(d.request),
        }
    }
}

/// The key provider the arguments ask for.
pub fn key_provider(global: &Global, a: &RemoteKmsArgs) -> anyhow::Result<Box<dyn KeyProvider>> {
    match (&a.kms_url, &a.kms_credential) {
        (Some(urls), Some(cred)) => {
            let kms = RemoteKms::new(&RemoteKmsConfig {
                url: urls.clone(),
                credential_file: cred.clone(),
                ca_file: a.kms_ca.clone(),
            })
            .with_context(|| format!("setting up the KMS client for {}", urls.join(", ")))?
            .with_timeouts(a.timeouts());
            Ok(Box::new(kms))
        }
        _ => Ok(Box::new(super::kms::open_keystore(global)?)),
    }
}
