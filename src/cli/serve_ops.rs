//! `serve`'s operator side: the control socket (`--ctl`, default `DATA/ctl.sock`) wired to the
//! composed server, and what a reload does (SIGHUP and `ctl reload` alike). Kept apart from
//! `serve.rs` so the listener and access options there stay the only concern of that file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use cryptnbd::control::listener::{ControlGuard, ControlListener};
use cryptnbd::control::service::Service;
use cryptnbd::control::SOCKET_NAME;
use cryptnbd::exports::DataDirProvider;
use cryptnbd::metrics::MetricsAddr;
use cryptnbd::server::{error_chain, ServerHandle, TlsConfig};
use prometheus_client::registry::Registry;

#[derive(Args, Debug, Default)]
pub struct OpsArgs {
    /// Control socket for `cryptnbd ctl` (owner-only; only this user and root may use it).
    /// Default: `ctl.sock` in the data directory.
    #[arg(long, value_name = "PATH")]
    ctl: Option<PathBuf>,

    /// Open no control socket.
    #[arg(long, conflicts_with = "ctl")]
    no_ctl: bool,

    /// Serve Prometheus metrics (GET /metrics) on ADDR:PORT (loopback advised: it shows export
    /// names and traffic, no secrets) or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<MetricsAddr>,
}

/// What `serve` keeps running beside the NBD server.
pub struct Running {
    pub server: ServerHandle,
    _ctl: Option<ControlGuard>,
    metrics: Option<(MetricsAddr, Arc<Registry>)>,
}

impl Running {
    /// Starts the metrics endpoint, if asked for, on the current runtime.
    pub async fn spawn_metrics(&self) -> anyhow::Result<()> {
        if let Some((addr, registry)) = &self.metrics {
            cryptnbd::metrics::spawn(addr, registry.clone()).await?;
        }
        Ok(())
    }
}

/// Where the control socket of the server on `data_dir` is, unless `--ctl` says otherwise.
pub fn default_ctl_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Opens the control socket (unless `--no-ctl`) over `provider` and a fresh server handle.
pub fn start(
    args: &OpsArgs,
    data_dir: &Path,
    provider: Arc<DataDirProvider>,
    tls: Option<Arc<TlsConfig>>,
    grace: Duration,
) -> anyhow::Result<Running> {
    let server = ServerHandle::new();
    let metrics = args.metrics.clone().map(|a| {
        let r = cryptnbd::metrics::nbd::registry(server.clone(), Some(provider.clone()));
        (a, Arc::new(r))
    });
    let ctl = if args.no_ctl {
        None
    } else {
        let path = args
            .ctl
            .clone()
            .unwrap_or_else(|| default_ctl_path(data_dir));
        let l = ControlListener::bind(&path)
            .with_context(|| format!("opening the control socket {}", path.display()))?;
        let reload = Box::new(move || reload(tls.as_ref()));
        let svc = Service::new(provider, server.clone(), reload, grace);
        Some(
            l.spawn(Arc::new(svc))
                .context("starting the control socket")?,
        )
    };
    Ok(Running {
        server,
        _ctl: ctl,
        metrics,
    })
}

/// Reloads what can change while serving: the TLS certificate, key and client CA. A broken file
/// keeps the old settings (and says why), so a botched rotation never stops the server.
pub fn reload(tls: Option<&Arc<TlsConfig>>) -> Result<String, String> {
    match tls {
        Some(t) => match t.reload() {
            Ok(()) => Ok("TLS certificate, key and client CA reloaded".into()),
            Err(e) => Err(format!(
                "keeping the previous TLS settings: {}",
                error_chain(&e)
            )),
        },
        None => Ok("no TLS configured, nothing to reload".into()),
    }
}
