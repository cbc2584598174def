//! The vhost-user-blk front end: a VM's virtio-blk disk served straight from an open
//! [`Volume`], the NBD server's sibling over the same `Arc<Volume>` (it knows nothing of NBD).
//! QEMU maps the VM's RAM into this process over the socket (`vhost-user` protocol, handled by
//! rust-vmm's `vhost`/`vhost-user-backend`), and this module's workers read the virtqueues
//! themselves: a read is decrypted once into a bounded buffer and copied into guest memory, a
//! write copied out and encrypted once, with no socket and no QEMU copy in between.
//!
//! One socket serves one VM at a time. When the VM goes away, the volume is flushed and the socket
//! accepts the next connection — QEMU's `-chardev socket,…,reconnect=1` comes back to it, and a
//! restarted cryptnbd is found the same way. Requests of a queue are answered in order, each only
//! once done (`device`), so when the connection drops QEMU rewinds the queue to what was answered
//! and the next backend redoes the rest: requests in flight at a crash are redone, and nothing
//! acknowledged is lost (data acknowledged by FLUSH is on disk; as on a real disk, writes not yet
//! flushed may be lost at a power cut, not at a restart, since they are in the page cache).
//!
//! Access: whoever can open the socket file drives the VM's disk, so the caller sets the socket
//! file's mode and group (as for NBD's `--socket`). The peer's uid is not checked: the accepted
//! connection stays inside `vhost-user-backend`, which offers no hook to look at it.

mod device;
mod request;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{error, info, warn};
use vhost::vhost_user::{Error as VuError, Listener};
use vhost_user_backend::{Error, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::volume::Volume;
use device::BlkDevice;

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
}

/// A running vhost-user-blk socket; [`VhostBlkServer::shutdown`] stops it.
pub struct VhostBlkServer {
    socket: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    /// The connected VM's connection, to cut it at shutdown.
    conn: Mutex<Option<ShutdownHandle>>,
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
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
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
            c.shutdown();
        }
        // Wakes an accept that is waiting for the next VM.
        let _ = UnixStream::connect(&self.socket);
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
    // `vhost` takes the bound socket; `path: None`, so it does not unlink it on drop.
    let mut listener = Listener::from(listener);
    while !shared.stop.load(Ordering::Acquire) {
        let device = Arc::new(BlkDevice::new(export.volume.clone(), socket.clone()));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(socket.clone(), device.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                error!(socket = %socket, "cannot start the vhost-user device: {e}; the socket is closed");
                return;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            error!(socket = %socket, "accepting a VM failed: {e}; the socket is closed");
            stop_workers(&daemon);
            return;
        }
        if shared.stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        } else {
            info!(socket = %socket, export = %export.name, "VM connected");
        }
        *shared.conn.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        let result = daemon.wait();
        shared.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        stop_workers(&daemon);
        device.quiesce();
        match result {
            _ if device.started_without_memory() => error!(
                socket = %socket,
                "the VM started the disk but sent no memory it can share ({}): its RAM must be \
                 shared: QEMU needs `-object memory-backend-memfd,id=mem,size=…,share=on -numa \
                 node,memdev=mem` (or memory-backend-file with share=on)",
                result.err().map_or_else(|| "then left".to_string(), |e| e.to_string())
            ),
            Ok(()) | Err(Error::HandleRequest(VuError::Disconnected | VuError::PartialMessage)) => {
                info!(socket = %socket, "VM disconnected")
            }
            Err(e) => warn!(socket = %socket, "VM connection ended: {e}"),
        }
        if !export.volume.is_read_only() {
            if let Err(e) = export.volume.flush() {
                error!(socket = %socket, "flushing the volume after the VM left: {e}");
            }
        }
    }
}

fn stop_workers(daemon: &VhostUserDaemon<Arc<BlkDevice>>) {
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
}
