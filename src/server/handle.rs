//! The operator's handle on a running server ([`ServerHandle`]): its counters, its live
//! connections with their peers, and detaching one export (closing its connections after their
//! requests in flight have replied, flushing it and handing its volume back so the caller can
//! drop it, and with it the unwrapped data key). The control socket and the metrics endpoint
//! (composed above the server, in `crate::control` and `crate::metrics`) read and drive the
//! server through this handle only.

use std::collections::HashSet;
use std::net::Shutdown;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::conns::ConnInfo;
use super::stats::Stats;
use super::ServerState;
use crate::volume::{Volume, VolumeError};

/// Created before [`super::serve_with`] (so metrics can be registered first) and cloned freely.
#[derive(Clone, Default)]
pub struct ServerHandle {
    stats: Arc<Stats>,
    /// Weak: the server's state holds this handle, and a strong reference back would keep the
    /// state (its provider, and so every attached volume with its file lock and data key) alive
    /// after the server stopped.
    state: Arc<OnceLock<Weak<ServerState>>>,
    /// Exports being detached or detached: a connection that finishes its handshake for one of
    /// them afterwards is closed at once (the provider refuses new attaches; this catches a
    /// handshake that got the volume just before).
    detached: Arc<Mutex<HashSet<String>>>,
}

/// What a detach did.
#[derive(Debug)]
pub struct Detached {
    /// Connections that were closed.
    pub closed: usize,
    /// Whether some had to be cut after the grace period (their client stopped reading).
    pub cut: bool,
    /// The server's reference to the volume, flushed (`None` if no connection ever used it).
    pub volume: Option<Arc<Volume>>,
}

impl ServerHandle {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub(super) fn bind(&self, state: &Arc<ServerState>) {
        let _ = self.state.set(Arc::downgrade(state));
    }

    /// The server's state while it runs.
    fn server(&self) -> Option<Arc<ServerState>> {
        self.state.get().and_then(Weak::upgrade)
    }

    /// Whether the server is running (started and not yet gone).
    pub fn running(&self) -> bool {
        self.server().is_some()
    }

    /// Live connections (handshake and serving), by id.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.server()
            .map(|s| s.conns.snapshot())
            .unwrap_or_default()
    }

    /// Request buffer memory reserved now, and the budget.
    pub fn budget_in_use(&self) -> (usize, usize) {
        self.server().map(|s| s.budget.in_use()).unwrap_or((0, 0))
    }

    pub(super) fn is_detached(&self, export: &str) -> bool {
        self.lock().contains(export)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.detached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `export` again after [`Self::detach`] (the provider must attach it anew).
    pub fn undetach(&self, export: &str) {
        self.lock().remove(export);
    }

    /// Detaches `export`: its connections stop reading requests, those in flight reply, then
    /// they close (cut after `grace` if a client stops reading replies); the volume is flushed
    /// and the server's reference returned. Blocking; call it off the async runtime.
    pub fn detach(&self, export: &str, grace: Duration) -> Result<Detached, VolumeError> {
        self.lock().insert(export.to_string());
        let Some(state) = self.server() else {
            return Ok(Detached {
                closed: 0,
                cut: false,
                volume: None,
            });
        };
        let deadline = Instant::now() + grace;
        let mut closed = 0;
        let mut cut = false;
        loop {
            let how = if cut { Shutdown::Both } else { Shutdown::Read };
            let n = state.conns.shutdown_export(export, how);
            closed = closed.max(n);
            if n == 0 {
                break;
            }
            if !cut && Instant::now() >= deadline {
                cut = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let volume = state.forget(export);
        if let Some(v) = &volume {
            v.flush()?;
        }
        Ok(Detached {
            closed,
            cut,
            volume,
        })
    }
}
