//! Prometheus metrics: the exposition endpoint (`GET /metrics` in the Prometheus text format,
//! from the `prometheus-client` crate's encoder) on a loopback TCP address or a Unix socket
//! ([`MetricsAddr`], [`spawn`]), the NBD server's metrics ([`nbd`]: read from the server's
//! relaxed-atomic counters at scrape time, so the hot path does nothing for them) and the KMS
//! HTTP service's ([`kms`]). Composition-level, like `crate::exports`: it may name `server`,
//! `datadir` and `kms` types; none of them knows it.
//!
//! What it exposes: counters and export names, never a key, a payload byte or a peer's address
//! (connections are counted, not listed); the listener still defaults to loopback, since export
//! names and traffic volumes are an operator's business.

pub mod kms;
pub mod nbd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

/// Where the metrics endpoint listens: `127.0.0.1:9101`, `[::1]:9101` or `unix:/run/x.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>()
            .map(MetricsAddr::Tcp)
            .map_err(|_| format!("{s:?} is neither ADDR:PORT nor unix:PATH"))
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    #[error("cannot listen for metrics on {what}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The Prometheus text content type (exposition format 0.0.4).
pub const CONTENT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut s = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut s, registry) {
        warn!("encoding metrics failed: {e}");
    }
    s
}

/// Serves `GET /metrics` on `addr` from `registry` on the current tokio runtime until it stops.
/// Must be called inside a runtime (it binds at once and spawns the server).
pub async fn spawn(addr: &MetricsAddr, registry: Arc<Registry>) -> Result<(), MetricsError> {
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let r = registry.clone();
            async move { ([(CONTENT_TYPE, CONTENT)], render(&r)) }
        }),
    );
    let bind = |what: String| move |source| MetricsError::Bind { what, source };
    match addr {
        MetricsAddr::Tcp(a) => {
            if !a.ip().is_loopback() {
                warn!(
                    "metrics on {a}: every host that reaches it sees export names and traffic \
                     (no secrets); prefer loopback or a Unix socket"
                );
            }
            let l = tokio::net::TcpListener::bind(a)
                .await
                .map_err(bind(a.to_string()))?;
            info!(
                "metrics on http://{}/metrics",
                l.local_addr().map_err(bind(a.to_string()))?
            );
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    warn!("metrics endpoint stopped: {e}");
                }
            });
        }
        MetricsAddr::Unix(p) => {
            let what = p.display().to_string();
            if p.exists() {
                std::fs::remove_file(p).map_err(bind(what.clone()))?;
            }
            let l = tokio::net::UnixListener::bind(p).map_err(bind(what.clone()))?;
            info!("metrics on unix:{what} (GET /metrics)");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    warn!("metrics endpoint stopped: {e}");
                }
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "127.0.0.1:9101".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9101".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/m.sock".into())
        );
        assert!("unix:".parse::<MetricsAddr>().is_err());
        assert!("localhost".parse::<MetricsAddr>().is_err());
    }
}
