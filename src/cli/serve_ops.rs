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
use std::net::SocketAddr;

use cryptnbd::exports::DataDirProvider;
use cryptnbd::metrics::MetricsAddr;
use cryptnbd::server::ServerHandle;
use cryptnbd::server::{Listener, Policy, TlsMode, UnixPeerPolicy};
use cryptnbd::systemd::{self, Inherited, InheritedSocket};
use prometheus_client::registry::Registry;
use tracing::info;

#[derive(Args, Debug, Default, Clone)]
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

    /// Exit (gracefully, as on SIGTERM) when the parent process exits: for servers started by a
    /// client tool, e.g. `nbdinfo -- [ cryptnbd serve … ]`.
    #[arg(long)]
    exit_with_parent: bool,
}

/// Takes the sockets of socket activation (`LISTEN_FDS`), after `--exit-with-parent` is set up
/// (before anything else, so a parent that dies during start-up is noticed).
pub fn take_inherited(args: &OpsArgs) -> anyhow::Result<Vec<Inherited>> {
    if args.exit_with_parent {
        systemd::exit_with_parent().context("--exit-with-parent")?;
    }
    let v = systemd::inherited_sockets()?;
    for s in &v {
        info!(
            name = s.name.as_deref().unwrap_or("-"),
            "inherited a listening socket (socket activation): {:?}", s.socket
        );
    }
    Ok(v)
}

/// The inherited TCP socket bound to `addr`, if any, in place of binding it.
pub fn inherited_tcp(v: &mut Vec<Inherited>, addr: SocketAddr) -> Option<Listener> {
    let i = v.iter().position(|s| match &s.socket {
        InheritedSocket::Tcp(t) => t.local_addr().ok() == Some(addr),
        InheritedSocket::Unix(_) => false,
    })?;
    match v.remove(i).socket {
        InheritedSocket::Tcp(t) => Some(Listener::from_tcp(t)),
        InheritedSocket::Unix(_) => None,
    }
}

/// The inherited Unix socket bound to `path`, if any, in place of binding it.
pub fn inherited_unix(v: &mut Vec<Inherited>, path: &Path) -> Option<Listener> {
    let i = v.iter().position(|s| match &s.socket {
        InheritedSocket::Unix(u) => {
            u.local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                == Some(path.to_path_buf())
        }
        InheritedSocket::Tcp(_) => false,
    })?;
    match v.remove(i).socket {
        InheritedSocket::Unix(u) => Some(Listener::from_unix(u)),
        InheritedSocket::Tcp(_) => None,
    }
}

/// Inherited sockets that stand for no configured listener: TCP ones get the rules of
/// `--listen` (TLS required, or refused without TLS unless --insecure-no-tls), Unix ones those
/// of `--socket` (TLS offered, peer credentials checked).
pub fn other_inherited(
    v: Vec<Inherited>,
    tls: bool,
    policy: &Arc<Policy>,
    insecure_no_tls: bool,
    peers: &UnixPeerPolicy,
) -> anyhow::Result<Vec<Listener>> {
    v.into_iter()
        .map(|s| match s.socket {
            InheritedSocket::Tcp(t) => {
                let mode = match (tls, insecure_no_tls) {
                    (true, _) => TlsMode::Required,
                    (false, true) => TlsMode::Off,
                    (false, false) => anyhow::bail!(
                        "an inherited TCP socket ({:?}) would serve disks without TLS: give \
                         --tls-cert/--tls-key, or --insecure-no-tls",
                        t.local_addr()
                    ),
                };
                Ok(Listener::from_tcp(t)
                    .with_tls(mode)
                    .with_policy(policy.clone()))
            }
            InheritedSocket::Unix(u) => {
                let mode = if tls { TlsMode::Optional } else { TlsMode::Off };
                Ok(Listener::from_unix(u)
                    .with_tls(mode)
                    .with_policy(policy.clone())
                    .with_peer_policy(peers.clone()))
            }
        })
        .collect()
}

/// What SIGHUP and `ctl reload` run: says what it reloaded, or why it kept the old settings.
pub type Reload = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What `serve` keeps running beside the NBD server.
pub struct Running {
    pub server: ServerHandle,
    _ctl: Option<ControlGuard>,
    metrics: Option<(MetricsAddr, Arc<Registry>)>,
}

impl Running {
    /// Tells the service manager the server is ready, and keeps its watchdog fed.
    pub fn ready(&self) {
        systemd::notify_ready();
        systemd::notify_status("serving");
        if let Some(every) = systemd::watchdog_interval() {
            tokio::spawn(async move {
                loop {
                    systemd::notify_watchdog();
                    tokio::time::sleep(every).await;
                }
            });
        }
    }

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
    reload: Reload,
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
        match ControlListener::bind(&path) {
            Ok(l) => {
                let reload = Box::new(move || reload());
                let svc = Service::new(provider, server.clone(), reload, grace);
                Some(
                    l.spawn(Arc::new(svc))
                        .context("starting the control socket")?,
                )
            }
            // The default control socket is a convenience: a second server on one data
            // directory (other exports, other sockets) leaves it to the first one, and a data
            // directory on a file system without sockets (some FUSE ones) has none. `--ctl PATH`
            // given explicitly must work.
            Err(e) if args.ctl.is_none() => {
                tracing::warn!(
                    "{e}: this server runs without a control socket (give it one with --ctl PATH)"
                );
                None
            }
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("opening the control socket {}", path.display())))
            }
        }
    };
    Ok(Running {
        server,
        _ctl: ctl,
        metrics,
    })
}
