//! The control operations over the composed server: the data-directory provider (which volumes
//! exist, which are attached or detached) and the server's [`ServerHandle`] (connections,
//! counters, closing an export's clients). This is composition, like `crate::exports`: the server
//! itself learns nothing about the data directory or the key provider.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde_json::{json, Value};
use tracing::{info, warn};

use super::{ControlError, ErrorKind, Ops, Request};
use crate::datadir::DataDirError;
use crate::exports::DataDirProvider;
use crate::server::stats::{ErrorKind as ReqError, ExportStats, Histogram, LATENCY_BOUNDS_US};
use crate::server::{error_chain, AttachError, ServerHandle};

/// What `reload` runs (the same as SIGHUP): says what it reloaded, or why it kept the old.
pub type Reload = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

pub struct Service {
    provider: Arc<DataDirProvider>,
    server: ServerHandle,
    reload: Reload,
    started: Instant,
    /// How long a detach lets requests in flight finish before cutting the connections.
    grace: Duration,
}

impl Service {
    pub fn new(
        provider: Arc<DataDirProvider>,
        server: ServerHandle,
        reload: Reload,
        grace: Duration,
    ) -> Self {
        Self {
            provider,
            server,
            reload,
            started: Instant::now(),
            grace,
        }
    }

    fn known(&self, export: &str) -> Result<(), ControlError> {
        if self.provider.names().iter().any(|n| n == export) {
            Ok(())
        } else {
            Err(ControlError::new(
                ErrorKind::NotFound,
                format!("no export named {export:?}"),
            ))
        }
    }

    fn status(&self) -> Value {
        let conns = self.server.connections();
        let exports: Vec<Value> = self
            .provider
            .names()
            .into_iter()
            .map(|name| {
                let vol = self.provider.attached_volume(&name);
                let state = if vol.is_some() {
                    "attached"
                } else if self.provider.is_detached(&name) {
                    "detached"
                } else {
                    "not attached"
                };
                let volume = vol.as_ref().map(|v| {
                    let h = v.header();
                    json!({
                        "id": h.volume_id.to_string(),
                        "size": v.size(),
                        "sector_size": v.sector_size(),
                        "read_only": v.is_read_only(),
                        "key": {
                            "id": h.key_id.to_string(),
                            "version": h.key_version,
                            "state": "unwrapped in memory",
                            "cmk_state": self.provider.key_state(h.key_id),
                        },
                    })
                });
                let n = conns
                    .iter()
                    .filter(|c| c.export.as_deref() == Some(&name))
                    .count();
                json!({
                    "name": name,
                    "state": state,
                    "volume": volume,
                    "connections": n,
                    "stats": stats_json(&self.server.stats().export(&name)),
                })
            })
            .collect();
        let connections: Vec<Value> = conns
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "peer": c.peer,
                    "identity": c.identity,
                    "export": c.export,
                    "requests": c.requests,
                    "bytes": c.bytes,
                    "connected_at": c.connected_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                    "uptime_s": c.uptime.as_secs_f64(),
                })
            })
            .collect();
        let (used, limit) = self.server.budget_in_use();
        json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "exports": exports,
            "connections": connections,
            "buffer_budget": {"in_use": used, "limit": limit},
        })
    }

    fn detach(&self, export: &str) -> Result<Value, ControlError> {
        self.known(export)?;
        let cached = self.provider.detach(export);
        let d = self
            .server
            .detach(export, self.grace)
            .map_err(|e| ControlError::new(ErrorKind::Failed, error_chain(&e)))?;
        // Both references go here; the sessions' went when their connections closed.
        let volume = d.volume.or(cached);
        let held_elsewhere = volume.as_ref().map_or(0, |v| Arc::strong_count(v) - 1);
        let was_attached = volume.is_some();
        drop(volume);
        info!(
            export,
            connections = d.closed,
            cut = d.cut,
            "detached by the operator: connections closed, volume flushed and closed"
        );
        if held_elsewhere > 0 {
            warn!(
                export,
                "the volume is still referenced {held_elsewhere} time(s)"
            );
        }
        Ok(json!({
            "export": export,
            "was_attached": was_attached,
            "connections_closed": d.closed,
            "connections_cut": d.cut,
            "key_dropped": held_elsewhere == 0,
        }))
    }

    fn attach(&self, export: &str) -> Result<Value, ControlError> {
        self.known(export)?;
        self.server.undetach(export);
        match self.provider.attach_now(export) {
            Ok(v) => {
                let h = v.header();
                Ok(json!({
                    "export": export,
                    "volume_id": h.volume_id.to_string(),
                    "key_id": h.key_id.to_string(),
                    "key_version": h.key_version,
                    "size": v.size(),
                }))
            }
            Err(AttachError::NotFound(_)) => Err(ControlError::new(
                ErrorKind::NotFound,
                format!("no export named {export:?}"),
            )),
            Err(e) => Err(ControlError::new(ErrorKind::Failed, error_chain(&e))),
        }
    }
}

impl Service {
    fn snapshot(&self, export: &str, snap: &str) -> Result<Value, ControlError> {
        self.known(export)?;
        let target = format!("{export}@{snap}");
        match self.provider.snapshot(&target) {
            Ok(s) => Ok(json!({
                "snapshot": target,
                "online": s.writes_held.is_some(),
                "layer_id": s.header.layer_id,
                "size": s.header.size,
                "writes_held_ms": s.writes_held.map(|d| d.as_secs_f64() * 1000.0),
            })),
            Err(DataDirError::InvalidName { .. }) => Err(ControlError::new(
                ErrorKind::BadRequest,
                format!(
                    "{target:?} is not a snapshot name (NAME@SNAP, letters, digits, '.', '_', '-')"
                ),
            )),
            Err(e @ DataDirError::AlreadyExists { .. }) => Err(ControlError::new(
                ErrorKind::Failed,
                format!("snapshot {target} already exists: {e}"),
            )),
            Err(e) => Err(ControlError::new(ErrorKind::Failed, error_chain(&e))),
        }
    }
}

impl Ops for Service {
    fn handle(&self, req: Request) -> Result<Value, ControlError> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Detach { export } => self.detach(&export),
            Request::Attach { export } => self.attach(&export),
            Request::Snapshot { export, snapshot } => self.snapshot(&export, &snapshot),
            Request::Reload => (self.reload)()
                .map(|m| json!({ "reloaded": m }))
                .map_err(|e| ControlError::new(ErrorKind::Failed, e)),
        }
    }
}

fn latency_json(h: &Histogram) -> Value {
    let (buckets, sum_us) = h.read();
    json!({
        "count": buckets.iter().sum::<u64>(),
        "sum_us": sum_us,
        "buckets_le_us": LATENCY_BOUNDS_US,
        "buckets": buckets,
    })
}

/// An export's counters as `status` (and `ctl top`) read them.
pub fn stats_json(s: &ExportStats) -> Value {
    let errors: serde_json::Map<String, Value> = ReqError::ALL
        .iter()
        .map(|k| (k.label().to_string(), s.errors_of(*k).into()))
        .collect();
    json!({
        "reads": s.reads.load(Relaxed),
        "writes": s.writes.load(Relaxed),
        "flushes": s.flushes.load(Relaxed),
        "others": s.others.load(Relaxed),
        "read_bytes": s.read_bytes.load(Relaxed),
        "write_bytes": s.write_bytes.load(Relaxed),
        "in_flight": s.in_flight.load(Relaxed),
        "errors": errors,
        "latency": {
            "read": latency_json(&s.read_latency),
            "write": latency_json(&s.write_latency),
            "flush": latency_json(&s.flush_latency),
        },
    })
}
