//! The NBD server: listeners (TCP and Unix), the connection limit, the handshake driver, the
//! per-connection transmission session, and graceful shutdown. It serves any [`Export`] from an
//! [`ExportProvider`]; payload crypto and keys live behind that trait, never here.
//!
//! Threading (decided from measurements, see DESIGN.md "Performance"): tokio is used only to
//! accept connections and to wait for the shutdown signal. Each accepted socket (TCP_NODELAY set)
//! becomes a blocking std socket served on its own OS threads: the handshake under one deadline,
//! then `workers_per_connection` workers in a leader/follower pattern (see [`session`]), so a
//! request is read, executed (decrypted/encrypted) and answered on one thread, with no queue in
//! between.
//!
//! Shutdown: when the shutdown future resolves, accepting stops, every socket's read side is shut
//! (blocked readers see end of stream, requests already read still run and reply), the server
//! waits for the connection threads to end (cutting connections still busy after
//! `shutdown_grace`, e.g. a client that stopped reading replies), then flushes every export that
//! was attached.

pub mod export;
mod handshake;
pub mod mem;
pub mod refusals;
mod session;
mod stream;
pub mod volumes;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{error, info, warn};

pub use export::{
    AttachError, Export, ExportError, ExportInfo, ExportProvider, Extent, ReadOutcome,
};
pub use handshake::HandshakeError;
pub use session::SessionError;

use crate::config::{ConfigError, ServerConfig};
use stream::Stream;

/// A bound listening socket handed to [`serve`].
#[derive(Debug)]
pub enum Listener {
    Tcp(StdTcpListener),
    /// A Unix socket; the file is removed when the server stops.
    Unix {
        listener: StdUnixListener,
        path: PathBuf,
    },
}

impl Listener {
    /// Binds a TCP listener (`127.0.0.1:0` picks a free port).
    pub fn bind_tcp(addr: SocketAddr) -> Result<Self, ServerError> {
        StdTcpListener::bind(addr)
            .map(Listener::Tcp)
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
        Ok(Listener::Unix {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The TCP address, if this is a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    /// Where clients connect, for logs and messages.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(_) => "tcp (unknown address)".into(),
            },
            Listener::Unix { path, .. } => format!("unix {}", path.display()),
        }
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
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
        source: ExportError,
    },
}

/// State shared by the accept loops and the connection threads.
struct ServerState {
    config: ServerConfig,
    provider: Arc<dyn ExportProvider>,
    /// Live connections (handshake or transmission), by id: a handle to shut each one down.
    conns: Mutex<HashMap<u64, Stream>>,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    /// Every export a connection attached, to flush at shutdown.
    attached: Mutex<Vec<Arc<dyn Export>>>,
}

impl ServerState {
    fn remember(&self, e: &Arc<dyn Export>) {
        let mut v = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        if !v.iter().any(|x| Arc::ptr_eq(x, e)) {
            v.push(e.clone());
        }
    }

    fn live(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

enum AsyncListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

/// Serves NBD on `listeners` until `shutdown` resolves, then stops accepting, lets requests in
/// flight finish, flushes every attached export and returns.
pub async fn serve(
    config: ServerConfig,
    listeners: Vec<Listener>,
    provider: Arc<dyn ExportProvider>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    config.validate()?;
    if listeners.is_empty() {
        return Err(
            ConfigError("no listeners: give at least one TCP or Unix socket".into()).into(),
        );
    }
    let state = Arc::new(ServerState {
        config,
        provider,
        conns: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        shutting_down: AtomicBool::new(false),
        attached: Mutex::new(Vec::new()),
    });
    let mut socket_files = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let what = l.describe();
        let lerr = |source| ServerError::Listener {
            what: what.clone(),
            source,
        };
        let al = match l {
            Listener::Tcp(t) => {
                t.set_nonblocking(true).map_err(lerr)?;
                AsyncListener::Tcp(tokio::net::TcpListener::from_std(t).map_err(lerr)?)
            }
            Listener::Unix { listener, path } => {
                listener.set_nonblocking(true).map_err(lerr)?;
                socket_files.push(path.clone());
                AsyncListener::Unix(
                    tokio::net::UnixListener::from_std(listener).map_err(lerr)?,
                    path,
                )
            }
        };
        info!("listening on {what}");
        tasks.spawn(accept_loop(al, state.clone()));
    }

    shutdown.await;
    info!("shutting down: no new connections; finishing requests in flight");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    state.shutting_down.store(true, Ordering::SeqCst);
    {
        let conns = state.conns.lock().unwrap_or_else(|p| p.into_inner());
        for s in conns.values() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }
    let grace = tokio::time::Instant::now() + state.config.shutdown_grace;
    let mut cut = false;
    while state.live() > 0 {
        if !cut && tokio::time::Instant::now() >= grace {
            // A client that stopped reading replies would block its writer forever.
            let conns = state.conns.lock().unwrap_or_else(|p| p.into_inner());
            warn!(
                "{} connection(s) still busy after {:?}: closing them",
                conns.len(),
                state.config.shutdown_grace
            );
            for s in conns.values() {
                let _ = s.shutdown(Shutdown::Both);
            }
            cut = true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for p in socket_files {
        let _ = std::fs::remove_file(p);
    }
    let attached = std::mem::take(&mut *state.attached.lock().unwrap_or_else(|p| p.into_inner()));
    let mut first_err = None;
    for e in attached {
        let name = e.name().to_string();
        let r = tokio::task::spawn_blocking(move || e.flush())
            .await
            .unwrap_or_else(|_| Err(ExportError::new(crate::nbd::EIO, "flush panicked")));
        match r {
            Ok(()) => info!(export = %name, "flushed"),
            Err(source) => {
                error!(export = %name, "flush at shutdown failed: {source}");
                first_err.get_or_insert(ServerError::Flush {
                    export: name,
                    source,
                });
            }
        }
    }
    info!("server stopped");
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn accept_loop(l: AsyncListener, state: Arc<ServerState>) {
    loop {
        let accepted = match &l {
            AsyncListener::Tcp(t) => t.accept().await.and_then(|(s, peer)| {
                s.set_nodelay(true)?;
                let s = s.into_std()?;
                Ok((Stream::Tcp(s), peer.to_string()))
            }),
            AsyncListener::Unix(u, path) => u.accept().await.and_then(|(s, _)| {
                Ok((
                    Stream::Unix(s.into_std()?),
                    format!("unix:{}", path.display()),
                ))
            }),
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if state.shutting_down.load(Ordering::SeqCst) {
            continue;
        }
        if let Err(e) = start_connection(&state, stream, peer.clone()) {
            warn!(peer = %peer, "could not start serving a connection: {e}");
        }
    }
}

/// Removes a connection from the registry when its thread ends, even by a panic.
struct ConnGuard {
    state: Arc<ServerState>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.state
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn start_connection(state: &Arc<ServerState>, stream: Stream, peer: String) -> io::Result<()> {
    // The async side hands over a non-blocking socket; the session uses blocking I/O.
    match &stream {
        Stream::Tcp(s) => s.set_nonblocking(false)?,
        Stream::Unix(s) => s.set_nonblocking(false)?,
    }
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let handle = stream.try_clone()?;
    {
        // Check and register under one lock, so listeners cannot overshoot the limit together.
        let mut conns = state.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() >= state.config.max_connections {
            warn!(
                peer = %peer,
                "refusing connection: {} connections already open (--max-connections {})",
                conns.len(),
                state.config.max_connections
            );
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        conns.insert(id, handle);
    }
    let guard = ConnGuard {
        state: state.clone(),
        id,
    };
    std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            let _guard = guard;
            connection(&_guard.state, stream, &peer, id);
        })
        .map(|_| ())
}

fn connection(state: &ServerState, mut stream: Stream, peer: &str, id: u64) {
    info!(conn = id, peer = %peer, "client connected");
    let neg = match handshake::run(&mut stream, &state.config, &*state.provider, peer) {
        Ok(handshake::HandshakeEnd::Transmission(n)) => n,
        Ok(handshake::HandshakeEnd::Aborted) => {
            info!(conn = id, peer = %peer, "client ended the handshake (NBD_OPT_ABORT)");
            return;
        }
        Err(HandshakeError::ClientClosed) => {
            info!(conn = id, peer = %peer, "client closed the connection during the handshake");
            return;
        }
        Err(e) => {
            warn!(conn = id, peer = %peer, "handshake failed: {}", error_chain(&e));
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    state.remember(&neg.export);
    let export = neg.name.clone();
    info!(
        conn = id,
        peer = %peer,
        export = %export,
        structured = neg.structured,
        flags = format_args!("{:#x}", neg.flags),
        "serving export"
    );
    match session::run(stream, neg, &state.config) {
        Ok(()) => info!(conn = id, peer = %peer, export = %export, "client disconnected"),
        Err(e) => {
            warn!(conn = id, peer = %peer, export = %export, "connection closed: {}", error_chain(&e))
        }
    }
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
