//! The registry of live connections and the connection limit, made fair.
//!
//! `--max-connections` bounds the connections *serving an export*. Connections still in the
//! handshake have their own allowance of the same size, so clients that connect and never
//! authenticate (or never finish STARTTLS) use up only that, for at most the handshake timeout,
//! and cannot keep an authenticated client out.
//!
//! When every serving slot is taken and a client that has just authenticated asks for an export,
//! its own oldest serving connection (same certificate name, same Unix uid, or same TCP address
//! without TLS) is closed to make room: after a network drop the old connection is dead but
//! looks alive until TCP keepalive notices (minutes), and the reconnecting client must get in
//! now. A client can only ever displace itself; anyone else gets a clear refusal.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tracing::warn;

use super::stats::ConnStats;
use super::stream::Stream;

struct Entry {
    /// A handle to shut the connection down from any thread.
    stream: Stream,
    /// Past the handshake: counts against the serving limit.
    serving: bool,
    /// Who the client is, for replacing its own stale connections.
    identity: Option<String>,
    /// Where it came from (address, or socket and uid/pid), for status.
    peer: String,
    /// The export it is served, once in transmission, and its counters.
    export: Option<(String, Arc<ConnStats>)>,
    since: (Instant, SystemTime),
}

/// A live connection as `status` shows it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: u64,
    pub peer: String,
    /// `uid:N`, `cert:NAME` or `ip:ADDR` (what the connection limit groups by).
    pub identity: Option<String>,
    /// `None` while still in the handshake.
    pub export: Option<String>,
    pub requests: u64,
    pub bytes: u64,
    pub connected_at: SystemTime,
    pub uptime: std::time::Duration,
}

pub(crate) struct Registry {
    max: usize,
    conns: Mutex<HashMap<u64, Entry>>,
}

impl Registry {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            conns: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection in the handshake; `Err(n)` when `n` handshakes are already
    /// running (the limit).
    pub(crate) fn register(&self, id: u64, stream: Stream, peer: &str) -> Result<(), usize> {
        let mut c = self.lock();
        let handshaking = c.values().filter(|e| !e.serving).count();
        if handshaking >= self.max {
            return Err(handshaking);
        }
        c.insert(
            id,
            Entry {
                stream,
                serving: false,
                identity: None,
                peer: peer.to_string(),
                export: None,
                since: (Instant::now(), SystemTime::now()),
            },
        );
        Ok(())
    }

    /// Moves connection `id` to the serving set, replacing the same client's oldest serving
    /// connection when the limit is reached; `Err(reason)` if there is no room.
    pub(crate) fn admit(&self, id: u64, identity: Option<&str>) -> Result<(), String> {
        let mut c = self.lock();
        let serving = c.values().filter(|e| e.serving).count();
        if serving >= self.max {
            let oldest = identity.and_then(|who| {
                c.iter()
                    .filter(|(_, e)| e.serving && e.identity.as_deref() == Some(who))
                    .map(|(k, _)| *k)
                    .min()
            });
            let Some(old) = oldest else {
                return Err(format!(
                    "the server is serving its maximum of {} connections",
                    self.max
                ));
            };
            if let Some(e) = c.get_mut(&old) {
                warn!(
                    conn = old,
                    replaced_by = id,
                    client = identity.unwrap_or("-"),
                    "connection limit reached: closing this client's oldest connection for its new one"
                );
                let _ = e.stream.shutdown(Shutdown::Both);
                // It no longer counts; its thread ends on its own.
                e.serving = false;
                e.identity = None;
            }
        }
        if let Some(e) = c.get_mut(&id) {
            e.serving = true;
            e.identity = identity.map(String::from);
        }
        Ok(())
    }

    /// Connection `id` is now served `export`, counting into `stats`.
    pub(crate) fn set_export(&self, id: u64, export: &str, stats: Arc<ConnStats>) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.export = Some((export.to_string(), stats));
        }
    }

    /// Every live connection, by id.
    pub(crate) fn snapshot(&self) -> Vec<ConnInfo> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut v: Vec<ConnInfo> = self
            .lock()
            .iter()
            .map(|(id, e)| ConnInfo {
                id: *id,
                peer: e.peer.clone(),
                identity: e.identity.clone(),
                export: e.export.as_ref().map(|(n, _)| n.clone()),
                requests: e
                    .export
                    .as_ref()
                    .map_or(0, |(_, s)| s.requests.load(Relaxed)),
                bytes: e.export.as_ref().map_or(0, |(_, s)| s.bytes.load(Relaxed)),
                connected_at: e.since.1,
                uptime: e.since.0.elapsed(),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Shuts down the connections serving `export`; returns how many there are.
    pub(crate) fn shutdown_export(&self, export: &str, how: Shutdown) -> usize {
        let c = self.lock();
        let mut n = 0;
        for e in c.values() {
            if e.export.as_ref().is_some_and(|(x, _)| x == export) {
                let _ = e.stream.shutdown(how);
                n += 1;
            }
        }
        n
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Shuts every connection down (`Read`: let requests in flight finish; `Both`: cut).
    pub(crate) fn shutdown_all(&self, how: Shutdown) {
        for e in self.lock().values() {
            let _ = e.stream.shutdown(how);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn stream() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), b)
    }

    #[test]
    fn handshakes_and_serving_connections_have_separate_limits() {
        let r = Registry::new(2);
        let mut peers = Vec::new();
        for id in 1..=2 {
            let (s, p) = stream();
            peers.push(p);
            r.register(id, s, "p").unwrap();
            r.admit(id, Some("a")).unwrap();
        }
        // Serving is full, yet new handshakes may start.
        let (s, _p3) = stream();
        r.register(3, s, "p").unwrap();
        let (s, _p4) = stream();
        r.register(4, s, "p").unwrap();
        let (s, _p5) = stream();
        assert_eq!(
            r.register(5, s, "p"),
            Err(2),
            "two handshakes running: the limit"
        );
        // A stranger is refused; client "a" replaces its own oldest connection (1).
        assert!(r.admit(3, Some("b")).is_err());
        assert!(r.admit(3, None).is_err());
        r.admit(4, Some("a")).unwrap();
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!(
            peers[0].read(&mut buf).unwrap(),
            0,
            "connection 1 was closed"
        );
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn connections_of_one_export_are_listed_and_closed_together() {
        let r = Registry::new(4);
        let mut peers = Vec::new();
        for (id, export) in [(1, "a"), (2, "b"), (3, "a")] {
            let (s, p) = stream();
            peers.push(p);
            r.register(id, s, &format!("peer{id}")).unwrap();
            r.admit(id, Some("u")).unwrap();
            let st = Arc::new(ConnStats::default());
            st.requests.store(id, std::sync::atomic::Ordering::Relaxed);
            r.set_export(id, export, st);
        }
        let (s, _p) = stream();
        r.register(4, s, "peer4").unwrap();
        let snap = r.snapshot();
        assert_eq!(snap.len(), 4);
        assert_eq!(snap[0].peer, "peer1");
        assert_eq!(snap[2].export.as_deref(), Some("a"));
        assert_eq!(snap[2].requests, 3);
        assert_eq!(snap[3].export, None, "still in the handshake");
        assert_eq!(r.shutdown_export("a", Shutdown::Both), 2);
        use std::io::Read;
        let mut buf = [0u8; 1];
        assert_eq!(peers[0].read(&mut buf).unwrap(), 0);
        assert_eq!(peers[2].read(&mut buf).unwrap(), 0);
        peers[1].set_nonblocking(true).unwrap();
        assert!(peers[1].read(&mut buf).is_err(), "export b stays open");
    }
}
