//! `cryptnbd kms serve`: the key store as an HTTPS service (DEW KMS API + Vault Transit API).
//! The credentials it accepts and their rights are `kms_access.rs`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use cryptnbd::kms::audit::AuditRotation;
use cryptnbd::kms::KeyStore;
use cryptnbd::kms_http::{KmsHttpConfig, KmsHttpServer, Limits, Listen, TlsFiles};

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
    /// Seconds a client has to send a request's headers, and then its body.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    request_timeout: u64,
    /// Connections open at once from one IP address.
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_connections_per_address: usize,
    /// Sustained requests per second from one IP address, checked before authentication
    /// (bursts up to twice this).
    #[arg(long, value_name = "N", default_value_t = 1000.0)]
    rate_per_address: f64,
    /// Signatures of mutating requests remembered (15 minutes each) to refuse replays; when full
    /// of live ones, mutating requests are refused with 503 until some expire.
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    replay_cache: usize,
    /// Rotate the audit log when it would pass this size (audit.log → audit.log.1 → …).
    #[arg(long, value_name = "BYTES", default_value_t = cryptnbd::kms::audit::DEFAULT_MAX_BYTES)]
    audit_max_size: u64,
    /// Rotated audit logs kept (audit.log.1 … audit.log.N).
    #[arg(long, value_name = "N", default_value_t = cryptnbd::kms::audit::DEFAULT_KEEP)]
    audit_keep: u32,
    /// Seconds between the aggregated audit lines of failed authentications (one line per
    /// address and reason, with a count; also written at shutdown).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    audit_flush_secs: u64,
    /// Serve Prometheus metrics (GET /metrics) on ADDR:PORT (loopback advised) or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<cryptnbd::metrics::MetricsAddr>,
}

pub fn serve(mut ks: KeyStore, a: ServeArgs) -> anyhow::Result<()> {
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
            request_timeout: Duration::from_secs(a.request_timeout.max(1)),
            max_connections_per_address: a.max_connections_per_address,
            rate_per_address: a.rate_per_address,
            burst_per_address: a.rate_per_address * 2.0,
            replay_cache_entries: a.replay_cache,
            audit_flush_interval: Duration::from_secs(a.audit_flush_secs.max(1)),
        },
    };
    ks.set_audit_rotation(AuditRotation {
        max_bytes: a.audit_max_size,
        keep: a.audit_keep,
    });
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
