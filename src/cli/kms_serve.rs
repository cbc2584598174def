//! `cryptnbd kms serve` (the key store as an HTTPS service: DEW KMS API + Vault Transit API) and
//! the credentials it accepts: `kms credential create|list|delete` (DEW access keys) and
//! `kms token create` (Vault tokens). Secrets are printed once and never again.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use cryptnbd::kms::{CredentialKind, CredentialScope, KeyStore, NewSecret};
use cryptnbd::kms_http::{KmsHttpConfig, KmsHttpServer, Limits, Listen, TlsFiles};
use serde_json::json;

use super::{print_fields, print_json};

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  cryptnbd kms serve --listen 0.0.0.0:8443 --tls-cert kms.crt --tls-key kms.key
  cryptnbd kms serve --listen 127.0.0.1:8200 --insecure-http      # loopback tests only

DEW KMS API: POST https://HOST:PORT/v1.0/{project_id}/kms/create-datakey … (signed with an
access key from `cryptnbd kms credential create`). Vault Transit API: https://HOST:PORT/v1/transit/…
(X-Vault-Token from `cryptnbd kms token create`).")]
pub struct ServeArgs {
    /// TCP address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "unix")]
    listen: Option<SocketAddr>,
    /// Unix socket to listen on instead of TCP.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Certificate chain (PEM) for HTTPS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for HTTPS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP (only on loopback or a Unix socket): for tests and local tools.
    #[arg(long)]
    insecure_http: bool,
    /// Largest request body in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    max_body: usize,
    /// Requests handled at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_concurrent: usize,
    /// Sustained requests per second per credential (bursts up to twice this).
    #[arg(long, value_name = "N", default_value_t = 1000.0)]
    rate: f64,
    /// Serve Prometheus metrics (GET /metrics) on ADDR:PORT (loopback advised) or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<cryptnbd::metrics::MetricsAddr>,
}

#[derive(Subcommand, Debug)]
pub enum CredentialCommand {
    /// Create an access key (AK/SK) for the DEW KMS API; the secret key is shown only now.
    #[command(
        after_help = "Example:\n  cryptnbd kms credential create billing --project 0a1b2c --keys alias/apps \\\n      --output billing.cred"
    )]
    Create {
        /// A name for the credential (shown in the audit log).
        name: String,
        /// The project id it signs for (the {project_id} of the API path); any when omitted.
        #[arg(long, value_name = "ID")]
        project: Option<String>,
        /// Keys it may use (ids or aliases, comma-separated); all keys when omitted.
        #[arg(long, value_name = "KEY,…", value_delimiter = ',')]
        keys: Option<Vec<String>>,
        /// May use keys but not create or change them.
        #[arg(long)]
        read_only: bool,
        /// Also write {access_key, secret_key, project_id} to FILE (mode 0600, must not exist):
        /// the --kms-credential file of a storage host.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List credentials (names, access key ids, scopes; never secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a credential (access key or token) by name.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token for the Vault Transit API; it is shown only now (stored hashed).
    #[command(
        after_help = "Example:\n  cryptnbd kms token create rgw --keys alias/s3 > /etc/ceph/vault.token"
    )]
    Create {
        name: String,
        /// Keys it may use (Vault key names / aliases, comma-separated); all keys when omitted.
        #[arg(long, value_name = "KEY,…", value_delimiter = ',')]
        keys: Option<Vec<String>>,
        /// May use keys but not create, rotate or configure them.
        #[arg(long)]
        read_only: bool,
    },
}

pub fn serve(ks: KeyStore, a: ServeArgs) -> anyhow::Result<()> {
    let listen = match (a.listen, a.unix) {
        (Some(addr), None) => Listen::Tcp(addr),
        (None, Some(p)) => Listen::Unix(p),
        _ => bail!("give --listen ADDR:PORT or --unix PATH"),
    };
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert_chain), Some(private_key)) => Some(TlsFiles {
            cert_chain,
            private_key,
        }),
        _ if a.insecure_http => None,
        _ => bail!("give --tls-cert and --tls-key (or --insecure-http, on loopback only)"),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let config = KmsHttpConfig {
        listen,
        tls,
        limits: Limits {
            max_body_bytes: a.max_body,
            max_concurrent: a.max_concurrent,
            rate_per_credential: a.rate,
            burst_per_credential: a.rate * 2.0,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let observer = match &a.metrics {
            Some(addr) => {
                let m = Arc::new(cryptnbd::metrics::kms::KmsMetrics::default());
                cryptnbd::metrics::spawn(addr, Arc::new(m.registry())).await?;
                Some(m as Arc<dyn cryptnbd::kms_http::RequestObserver>)
            }
            None => None,
        };
        let server = KmsHttpServer::bind_observed(Arc::new(ks), config, observer).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "kms listening on {scheme}://{}", server.local_addr())?;
        out.flush()?;
        drop(out);
        server.serve(shutdown_signal()).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("kms serve: shutting down");
}

fn write_private_file(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn scope_fields(s: &NewSecret) -> Vec<(&'static str, String)> {
    vec![
        ("name", s.record.name.clone()),
        (
            "keys",
            s.record
                .keys
                .as_ref()
                .map(|k| k.join(","))
                .unwrap_or_else(|| "(all)".into()),
        ),
        ("read_only", s.record.read_only.to_string()),
    ]
}

pub fn credential(ks: &KeyStore, c: CredentialCommand) -> anyhow::Result<()> {
    match c {
        CredentialCommand::Create {
            name,
            project,
            keys,
            read_only,
            output,
            json: json_out,
        } => {
            let s = ks.create_credential(
                &name,
                CredentialKind::AccessKey,
                CredentialScope {
                    project_id: project.clone(),
                    keys,
                    read_only,
                },
            )?;
            let file = json!({
                "access_key": s.record.id,
                "secret_key": s.dangerous_secret(),
                "project_id": project,
            });
            if let Some(path) = &output {
                let mut bytes = serde_json::to_vec_pretty(&file)?;
                bytes.push(b'\n');
                write_private_file(path, &bytes)?;
            }
            if json_out {
                let mut v = file;
                v["name"] = json!(s.record.name);
                v["keys"] = json!(s.record.keys);
                v["read_only"] = json!(s.record.read_only);
                return print_json(&v);
            }
            let mut f = scope_fields(&s);
            f.insert(1, ("access_key", s.record.id.clone()));
            f.insert(2, ("secret_key", s.dangerous_secret().to_string()));
            f.insert(3, ("project_id", project.unwrap_or_else(|| "(any)".into())));
            print_fields(&f);
            eprintln!("The secret key is shown only now: keep it (it cannot be shown again).");
            Ok(())
        }
        CredentialCommand::List { json: json_out } => {
            let list = ks.list_credentials()?;
            if json_out {
                let v: Vec<_> = list
                    .iter()
                    .map(|c| {
                        json!({"name": c.name, "kind": c.kind, "id": c.id, "project_id": c.project_id,
                               "keys": c.keys, "read_only": c.read_only, "creation_date": c.creation_date})
                    })
                    .collect();
                return print_json(&json!({ "credentials": v }));
            }
            for c in list {
                println!(
                    "{:<20} {:<11} {:<22} keys={} {}",
                    c.name,
                    match c.kind {
                        CredentialKind::AccessKey => "access-key",
                        CredentialKind::Token => "token",
                    },
                    c.id,
                    c.keys
                        .map(|k| k.join(","))
                        .unwrap_or_else(|| "(all)".into()),
                    if c.read_only { "read-only" } else { "" }
                );
            }
            Ok(())
        }
        CredentialCommand::Delete { name } => {
            ks.delete_credential(&name)?;
            println!("deleted credential {name}");
            Ok(())
        }
    }
}

pub fn token(ks: &KeyStore, c: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Create {
        name,
        keys,
        read_only,
    } = c;
    let s = ks.create_credential(
        &name,
        CredentialKind::Token,
        CredentialScope {
            project_id: None,
            keys,
            read_only,
        },
    )?;
    // Only the token on stdout, so `> token-file` gives what RGW's rgw_crypt_vault_token_file wants.
    println!("{}", s.dangerous_secret());
    eprintln!(
        "token for {} (keys: {}{}) — shown only now",
        s.record.name,
        s.record
            .keys
            .as_ref()
            .map(|k| k.join(","))
            .unwrap_or_else(|| "all".into()),
        if s.record.read_only {
            ", read-only"
        } else {
            ""
        }
    );
    Ok(())
}
