//! The vhost-user-blk front end: a VM's virtio-blk disk served straight from an open
//! [`Volume`], the NBD server's sibling over the same `Arc<Volume>` (it knows nothing of NBD).
//! QEMU maps the VM's RAM into this process over the socket (the `vhost-user` protocol: `vhost`
//! parses the messages, `handler` acts on them), and this module's workers (`queue`, one per
//! virtqueue) read the virtqueues themselves: a read is decrypted once into a bounded buffer and
//! copied into guest memory, a write copied out and encrypted once, with no socket and no QEMU
//! copy in between.
//!
//! One socket serves one VM at a time. When the VM goes away, the volume is flushed and the socket
//! accepts the next connection — QEMU's `-chardev socket,…,reconnect=1` comes back to it, and a
//! restarted cryptnbd is found the same way. Requests of a queue are answered in order, each only
//! once done, and recorded in QEMU's inflight region while in hand (`inflight`), so after a crash
//! the next backend redoes exactly the requests taken but not answered, and nothing acknowledged
//! is lost (data acknowledged by FLUSH is on disk; as on a real disk, writes not yet flushed may
//! be lost at a power cut, not at a restart, since they are in the page cache).
//!
//! Access: the connection is accepted here and its peer (SO_PEERCRED) checked with the NBD Unix
//! listeners' rule before any message is read: `--allow-uid`/`--allow-gid`, then the `--allow`
//! rules (`uid:`/`gid:` must give the export), the server's own user keeping everything. A
//! refused peer's connection is closed and logged with the socket and its uid. The socket file's
//! mode and group (as for NBD's `--socket`) decide who can connect at all.

mod device;
mod handler;
mod inflight;
mod queue;
mod request;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tracing::{error, info, warn};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::server::access::Principal;
use crate::server::peer::{self, PeerCred};
use crate::server::policy::Peer;
use crate::server::{Policy, UnixPeerPolicy};
use crate::volume::Volume;
use device::BlkDevice;
use handler::Handler;

/// Errors of starting a vhost-user-blk export.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("cannot listen on the vhost-user socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another server is listening on the vhost-user socket {path}")]
    InUse { path: String },
    #[error("cannot start the vhost-user worker for {path}: {source}")]
    Start {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What one vhost-user-blk socket serves.
#[derive(Debug, Clone)]
pub struct VhostBlkExport {
    /// The Unix socket QEMU connects to (`-chardev socket,path=…`).
    pub socket: PathBuf,
    /// The export's name, for logs.
    pub name: String,
    pub volume: Arc<Volume>,
    /// Who may connect.
    pub access: VhostAccess,
}

/// The NBD Unix listeners' access settings, applied to the VM's connection.
#[derive(Debug, Clone)]
pub struct VhostAccess {
    /// `--allow-uid`/`--allow-gid`.
    pub peers: UnixPeerPolicy,
    /// `--allow` rules (reloadable: read at each connection).
    pub policy: Arc<Policy>,
    /// The server's own uid, which keeps everything.
    pub own_uid: u32,
}

impl VhostAccess {
    /// Whether the peer of `stream` may drive the disk of `export`; `Err` says why not.
    fn admit(&self, stream: &UnixStream, export: &str) -> Result<(), String> {
        let cred = getsockopt(stream, PeerCredentials)
            .map_err(|e| format!("the peer's credentials could not be read: {e}"))?;
        let groups = peer::peer_groups(stream).unwrap_or_default();
        self.peers.check(
            Some(PeerCred {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: Some(cred.pid()),
                groups: groups.clone(),
            }),
            self.own_uid,
        )?;
        let mut principals = vec![Principal::Uid(cred.uid()), Principal::Gid(cred.gid())];
        principals.extend(
            groups
                .into_iter()
                .filter(|g| *g != cred.gid())
                .map(Principal::Gid),
        );
        let peer = Peer {
            principals,
            own_user: cred.uid() == self.own_uid,
            ..Peer::default()
        };
        if self.policy.current().exports_for(&peer).permits(export) {
            Ok(())
        } else {
            Err(format!(
                "no --allow rule gives {export:?} to {}",
                peer.label()
            ))
        }
    }
}

/// A running vhost-user-blk socket; [`VhostBlkServer::shutdown`] stops it.
pub struct VhostBlkServer {
    socket: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    /// The listening socket (a clone), to wake the accept at shutdown.
    listener: UnixListener,
    /// The connected VM's connection, to cut it at shutdown.
    conn: Mutex<Option<UnixStream>>,
}

/// Binds `export.socket` (replacing a stale socket file no server answers on) and serves one
/// VM at a time on it until [`VhostBlkServer::shutdown`]. The caller sets the socket file's
/// permissions right after this returns, before a VM connects.
pub fn start(export: VhostBlkExport) -> Result<VhostBlkServer, VhostError> {
    let path = export.socket.clone();
    let shown = path.display().to_string();
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        if md.file_type().is_socket() {
            if UnixStream::connect(&path).is_ok() {
                return Err(VhostError::InUse { path: shown });
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    let listener = UnixListener::bind(&path).map_err(|source| VhostError::Bind {
        path: shown.clone(),
        source,
    })?;
    let woken = listener.try_clone().map_err(|source| VhostError::Bind {
        path: shown.clone(),
        source,
    })?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        listener: woken,
        conn: Mutex::new(None),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vhost-{}", export.name))
        .spawn(move || serve_loop(listener, export, &s))
        .map_err(|source| VhostError::Start {
            path: shown.clone(),
            source,
        })?;
    info!(socket = %shown, "vhost-user-blk socket ready");
    Ok(VhostBlkServer {
        socket: path,
        shared,
        thread: Some(thread),
    })
}

impl VhostBlkServer {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops accepting, disconnects the VM (QEMU with `reconnect=` waits for the next server),
    /// waits for the requests being worked on, flushes the volume and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        if let Some(c) = self
            .shared
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Wakes an accept that is waiting for the next VM (shutdown(2) on a listening socket
        // makes accept fail at once, even if the socket file was removed meanwhile).
        let _ = nix::sys::socket::shutdown(
            self.shared.listener.as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
        let _ = thread.join();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for VhostBlkServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn serve_loop(listener: UnixListener, export: VhostBlkExport, shared: &Shared) {
    let socket = export.socket.display().to_string();
    let device = Arc::new(BlkDevice::new(export.volume.clone(), socket.clone()));
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(socket = %socket, "accepting a VM failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if let Err(why) = export.access.admit(&stream, &export.name) {
            let uid = getsockopt(&stream, PeerCredentials).map_or(u32::MAX, |c| c.uid());
            warn!(socket = %socket, uid, "refusing a VM connection: {why}");
            continue;
        }
        info!(socket = %socket, export = %export.name, "VM connected");
        serve_vm(stream, &device, shared);
        if !export.volume.is_read_only() {
            if let Err(e) = export.volume.flush() {
                error!(socket = %socket, "flushing the volume after the VM left: {e}");
            }
        }
    }
}

/// Runs one VM's connection until it ends (or shutdown cuts it), then stops its queues.
fn serve_vm(stream: UnixStream, device: &Arc<BlkDevice>, shared: &Shared) {
    let socket = &device.socket;
    *shared.conn.lock().unwrap_or_else(|p| p.into_inner()) = stream.try_clone().ok();
    // Shutdown may have come between accept and here.
    if shared.stop.load(Ordering::Acquire) {
        return;
    }
    let handler = Arc::new(Mutex::new(Handler::new(device.clone())));
    let mut conn = BackendReqHandler::from_stream(stream, handler.clone());
    let end = loop {
        if let Err(e) = conn.handle_request() {
            break e;
        }
    };
    shared.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
    let mut h = handler.lock().unwrap_or_else(|p| p.into_inner());
    h.stop_all();
    if h.started && !h.mapped() {
        error!(
            socket = %socket,
            "the VM started the disk but sent no memory it can share ({end}): its RAM must be \
             shared: QEMU needs `-object memory-backend-memfd,id=mem,size=…,share=on -numa \
             node,memdev=mem` (or memory-backend-file with share=on)"
        );
        return;
    }
    match end {
        VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_) => {
            info!(socket = %socket, "VM disconnected")
        }
        _ if shared.stop.load(Ordering::Acquire) => info!(socket = %socket, "VM disconnected"),
        e => warn!(socket = %socket, "VM connection ended: {e}"),
    }
}

#[cfg(test)]
#[path = "vhost_tests.rs"]
mod tests;
