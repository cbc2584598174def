//! The NBD server: listeners (TCP and Unix), the connection limit, the handshake driver, the
//! per-connection transmission session, and graceful shutdown. It serves [`Volume`]s found by name
//! through an [`ExportProvider`] (the storage seam, see [`export`]); requests are validated by
//! [`crate::nbd::validate`] before they reach a volume. Which volumes and which key provider is
//! decided above the server (`crate::exports`): this module knows neither `kms` nor `datadir`.
//!
//! Threading (decided from measurements, see DESIGN.md "Performance"): tokio is used only to
//! accept connections and to wait for the shutdown signal. Each accepted socket (TCP_NODELAY set
//! on TCP, a larger send buffer on Unix, see `UNIX_SEND_BUFFER`) becomes a blocking std socket
//! served on its own OS threads: the handshake under one deadline, then `workers_per_connection`
//! workers in a leader/follower pattern (see `session`), so a request is read, executed
//! (decrypted/encrypted) and answered on one thread, with no queue in between.
//!
//! Shutdown: when the shutdown future resolves, accepting stops, every socket's read side is shut
//! (blocked readers see end of stream, requests already read still run and reply), the server
//! waits for the connection threads to end (cutting connections still busy after
//! `shutdown_grace`, e.g. a client that stopped reading replies), then flushes every export that
//! was attached.

mod accept;
pub mod access;
mod budget;
mod conns;
pub mod export;
mod handle;
mod handshake;
mod inflight;
pub mod peer;
pub mod policy;
pub mod refusals;
mod session;
pub mod stats;
mod stream;
pub mod tls;
mod transport;

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{error, info, warn};

pub use access::{AllowEntry, AllowList, ExportAccess, Principal, RuleError};
pub use conns::ConnInfo;
pub use export::{errno_for, error_chain, AttachError, ExportInfo, ExportProvider};
pub use handle::{Detached, ServerHandle};
pub use handshake::HandshakeError;
pub use peer::{TlsMode, UnixPeerPolicy};
pub use policy::{Policy, Rules};
pub use session::SessionError;
pub use tls::{TlsConfig, TlsError, TlsFiles};

use crate::config::{ConfigError, ServerConfig};
use crate::volume::{Volume, VolumeError};

/// A bound listening socket handed to [`serve`], with who may use it: its TLS mode and (Unix)
/// which local users may connect. Built plain; add security with the `with_*` methods.
#[derive(Debug)]
pub struct Listener {
    kind: ListenerKind,
    tls: TlsMode,
    peers: UnixPeerPolicy,
    policy: Arc<Policy>,
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(StdTcpListener),
    /// A Unix socket; the file is removed when the server stops, unless it was inherited.
    Unix {
        listener: StdUnixListener,
        path: PathBuf,
        owned: bool,
    },
}

impl Listener {
    /// Offers or requires TLS on this listener.
    pub fn with_tls(mut self, tls: TlsMode) -> Self {
        self.tls = tls;
        self
    }

    /// Decides who gets which export by `policy` (shared by the listeners of one server, and
    /// replaced as a whole on reload). Default: no TLS, no rules.
    pub fn with_policy(mut self, policy: Arc<Policy>) -> Self {
        self.policy = policy;
        self
    }

    /// Checks Unix peer credentials against `peers` (ignored on TCP listeners).
    pub fn with_peer_policy(mut self, peers: UnixPeerPolicy) -> Self {
        self.peers = peers;
        self
    }

    pub fn tls(&self) -> TlsMode {
        self.tls
    }

    /// The socket file, if this is a Unix listener.
    pub fn unix_path(&self) -> Option<&Path> {
        match &self.kind {
            ListenerKind::Unix { path, .. } => Some(path),
            ListenerKind::Tcp(_) => None,
        }
    }

    fn plain(kind: ListenerKind) -> Self {
        Self {
            kind,
            tls: TlsMode::Off,
            peers: UnixPeerPolicy::default(),
            policy: Arc::new(Policy::default()),
        }
    }

    /// Binds a TCP listener (`127.0.0.1:0` picks a free port).
    pub fn bind_tcp(addr: SocketAddr) -> Result<Self, ServerError> {
        StdTcpListener::bind(addr)
            .map(|l| Listener::plain(ListenerKind::Tcp(l)))
            .map_err(|e| ServerError::Bind {
                what: addr.to_string(),
                source: e,
            })
    }

    /// Binds a Unix socket at `path`, replacing a stale socket file nobody listens on.
    pub fn bind_unix(path: &Path) -> Result<Self, ServerError> {
        use std::os::unix::fs::FileTypeExt;
        let err = |source| ServerError::Bind {
            what: path.display().to_string(),
            source,
        };
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another server is listening on this socket",
                    )));
                }
                std::fs::remove_file(path).map_err(err)?;
            }
        }
        let listener = StdUnixListener::bind(path).map_err(err)?;
        Ok(Listener::plain(ListenerKind::Unix {
            listener,
            path: path.to_path_buf(),
            owned: true,
        }))
    }

    /// A TCP listener bound by someone else (socket activation).
    pub fn from_tcp(listener: StdTcpListener) -> Self {
        Listener::plain(ListenerKind::Tcp(listener))
    }

    /// A Unix listener bound by someone else (socket activation): its file is left in place at
    /// shutdown, it belongs to whoever bound it.
    pub fn from_unix(listener: StdUnixListener) -> Self {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("(inherited socket)"));
        Listener::plain(ListenerKind::Unix {
            listener,
            path,
            owned: false,
        })
    }

    /// The TCP address, if this is a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            ListenerKind::Tcp(l) => l.local_addr().ok(),
            ListenerKind::Unix { .. } => None,
        }
    }

    /// Where clients connect, for logs and messages.
    pub fn describe(&self) -> String {
        let tls = match &self.tls {
            TlsMode::Off => "",
            TlsMode::Optional => " (TLS offered)",
            TlsMode::Required => " (TLS required)",
        };
        match &self.kind {
            ListenerKind::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp {a}{tls}"),
                Err(_) => format!("tcp (unknown address){tls}"),
            },
            ListenerKind::Unix { path, .. } => format!("unix {}{tls}", path.display()),
        }
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {what}")]
    Bind {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot hand listener {what} to the async runtime")]
    Listener {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("flushing export {export:?} at shutdown failed")]
    Flush {
        export: String,
        #[source]
        source: VolumeError,
    },
    #[error("flushing export {export:?} at shutdown did not finish (the flush thread panicked)")]
    FlushPanicked { export: String },
}

/// TCP keepalive: first probe after this much silence, then every interval, given up after the
/// retries (about 2 minutes in all for a vanished peer).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 6;

/// Kernel send buffer asked for on every accepted Unix socket (the kernel doubles it): room for
/// a 1 MiB READ reply, so a worker's `writev` copies it into the socket and returns instead of
/// sleeping on the 212 KiB default until the client has read part of it (holding the
/// connection's writer lock meanwhile). Measured with fio, 1 MiB reads at queue depth 8, one
/// connection, 2 cores (`tools/bench-peers`, 5 rounds, side by side): 5.3 against 3.3 GiB/s,
/// and 4.8 → 0.8 server context switches per request. Larger is worse once two connections
/// share the cores (4 MiB: 0.89× the default with two connections; the queued replies no
/// longer stay in the caches until the client copies them out), 512 KiB is level there. TCP
/// keeps the kernel's autotuning, which grows to `net.ipv4.tcp_wmem` on its own (a fixed 4 MiB
/// measured 0.96–1.04× it).
const UNIX_SEND_BUFFER: usize = 512 << 10;

/// State shared by the accept loops and the connection threads.
struct ServerState {
    config: ServerConfig,
    provider: Arc<dyn ExportProvider>,
    /// Live connections (handshake or transmission), by id, and the connection limit.
    conns: conns::Registry,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    /// Every export a connection attached (by name), to flush at shutdown.
    attached: Mutex<Vec<(String, Arc<Volume>)>>,
    /// Request buffer memory shared by every connection.
    budget: Arc<budget::Budget>,
    /// Counters and detached exports, shared with the operator's handle.
    handle: ServerHandle,
}

impl ServerState {
    fn remember(&self, name: &str, e: &Arc<Volume>) {
        let mut v = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        if !v.iter().any(|(_, x)| Arc::ptr_eq(x, e)) {
            v.push((name.to_string(), e.clone()));
        }
    }

    /// Drops the server's reference to `name`'s volume (detach), returning it.
    fn forget(&self, name: &str) -> Option<Arc<Volume>> {
        let mut v = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        let i = v.iter().position(|(n, _)| n == name)?;
        Some(v.remove(i).1)
    }

    fn live(&self) -> usize {
        self.conns.len()
    }
}

enum AsyncListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

/// What an accept loop hands every connection it accepts.
struct ListenerPolicy {
    tls: TlsMode,
    peers: UnixPeerPolicy,
    policy: Arc<Policy>,
}

/// Serves NBD on `listeners` until `shutdown` resolves, then stops accepting, lets requests in
/// flight finish, flushes every attached export and returns.
pub async fn serve(
    config: ServerConfig,
    listeners: Vec<Listener>,
    provider: Arc<dyn ExportProvider>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    serve_with(config, listeners, provider, shutdown, ServerHandle::new()).await
}

/// [`serve`], observed and driven through `handle` (counters, connections, detach).
pub async fn serve_with(
    config: ServerConfig,
    listeners: Vec<Listener>,
    provider: Arc<dyn ExportProvider>,
    shutdown: impl Future<Output = ()>,
    handle: ServerHandle,
) -> Result<(), ServerError> {
    config.validate()?;
    if listeners.is_empty() {
        return Err(
            ConfigError("no listeners: give at least one TCP or Unix socket".into()).into(),
        );
    }
    let state = Arc::new(ServerState {
        provider,
        conns: conns::Registry::new(conns::Limits {
            serving: config.max_connections,
            handshakes_per_source: config.max_handshakes_per_source,
            per_client: config.max_connections_per_client,
        }),
        next_id: AtomicU64::new(1),
        shutting_down: AtomicBool::new(false),
        attached: Mutex::new(Vec::new()),
        budget: budget::Budget::new(config.buffer_budget),
        config,
        handle: handle.clone(),
    });
    handle.bind(&state);
    let mut socket_files = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut watched: Vec<Arc<Policy>> = Vec::new();
    for l in listeners {
        if !watched.iter().any(|p| Arc::ptr_eq(p, &l.policy)) {
            watched.push(l.policy.clone());
            tasks.spawn(recheck_on_reload(l.policy.subscribe(), state.clone()));
        }
        let what = l.describe();
        let lerr = |source| ServerError::Listener {
            what: what.clone(),
            source,
        };
        let policy = Arc::new(ListenerPolicy {
            tls: l.tls,
            peers: l.peers,
            policy: l.policy,
        });
        if let (ListenerKind::Tcp(_), TlsMode::Off) = (&l.kind, &policy.tls) {
            warn!(
                "{what} serves without TLS: anyone who can reach it reads and writes the \
                 decrypted disks"
            );
        }
        let al = match l.kind {
            ListenerKind::Tcp(t) => {
                t.set_nonblocking(true).map_err(lerr)?;
                AsyncListener::Tcp(tokio::net::TcpListener::from_std(t).map_err(lerr)?)
            }
            ListenerKind::Unix {
                listener,
                path,
                owned,
            } => {
                listener.set_nonblocking(true).map_err(lerr)?;
                if owned {
                    socket_files.push(path.clone());
                }
                AsyncListener::Unix(
                    tokio::net::UnixListener::from_std(listener).map_err(lerr)?,
                    path,
                )
            }
        };
        info!("listening on {what}");
        tasks.spawn(accept::accept_loop(al, policy, state.clone()));
    }

    shutdown.await;
    info!("shutting down: no new connections; finishing requests in flight");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    state.shutting_down.store(true, Ordering::SeqCst);
    state.conns.shutdown_all(Shutdown::Read);
    let grace = tokio::time::Instant::now() + state.config.shutdown_grace;
    let mut cut = false;
    while state.live() > 0 {
        if !cut && tokio::time::Instant::now() >= grace {
            // A client that stopped reading replies would block its writer forever.
            warn!(
                "{} connection(s) still busy after {:?}: closing them",
                state.conns.len(),
                state.config.shutdown_grace
            );
            state.conns.shutdown_all(Shutdown::Both);
            cut = true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for p in socket_files {
        let _ = std::fs::remove_file(p);
    }
    let attached = std::mem::take(&mut *state.attached.lock().unwrap_or_else(|p| p.into_inner()));
    let mut first_err = None;
    for (name, e) in attached {
        match tokio::task::spawn_blocking(move || e.flush()).await {
            Ok(Ok(())) => info!(export = %name, "flushed"),
            Ok(Err(source)) => {
                error!(export = %name, "flush at shutdown failed: {}", error_chain(&source));
                first_err.get_or_insert(ServerError::Flush {
                    export: name,
                    source,
                });
            }
            Err(_) => {
                error!(export = %name, "flush at shutdown panicked");
                first_err.get_or_insert(ServerError::FlushPanicked { export: name });
            }
        }
    }
    info!("server stopped");
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Checks serving connections again whenever the access settings are replaced.
async fn recheck_on_reload(
    mut rx: tokio::sync::watch::Receiver<Arc<Rules>>,
    state: Arc<ServerState>,
) {
    while rx.changed().await.is_ok() {
        let rules = rx.borrow_and_update().clone();
        let closed = state.conns.recheck(&rules);
        info!(
            "access settings replaced: {closed} serving connection(s) refused by them are closing"
        );
    }
}
