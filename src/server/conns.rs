//! The registry of live connections and the connection limits, made fair.
//!
//! `--max-connections` bounds the connections *serving an export*. Connections still in the
//! handshake have their own allowance of the same size, and one source (a TCP address, a Unix
//! uid) may hold at most `--max-handshakes-per-source` of them, so clients that connect and never
//! authenticate (or never finish STARTTLS) use up only their own share, for at most the handshake
//! timeout, and cannot keep an authenticated client out. One client identity may hold at most
//! `--max-connections-per-client` serving connections (the server's own user is exempt: it is
//! the operator).
//!
//! When a limit is reached and a client that *proved* who it is (a certificate, a Unix uid) asks
//! for an export, its own oldest serving connection is closed to make room: after a network drop
//! the old connection is dead but looks alive until TCP keepalive notices (minutes), and the
//! reconnecting client must get in now. A client can only ever displace itself; one known only
//! by its address gets a refusal instead (hosts behind one NAT share an address and must not
//! evict each other).
//!
//! On a reload of the access settings every serving connection is checked again
//! ([`Registry::recheck`]); one the new settings refuse is shut for reading, so requests in flight
//! finish and reply before it ends.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tracing::warn;

use super::policy::{Peer, Rules};
use super::stats::ConnStats;
use super::stream::Stream;

/// Where a connection comes from, for the per-source handshake limit (`Unknown`: no share,
/// only the server-wide allowance).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Ip(std::net::IpAddr),
    Uid(u32),
    Unknown,
}

/// How many connections the registry lets in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub serving: usize,
    pub handshakes_per_source: usize,
    pub per_client: usize,
}

struct Serving {
    /// Who the client is, for the per-client limit and for replacing its own connections.
    identity: Option<String>,
    peer: Arc<Peer>,
    export: String,
}

struct Entry {
    /// A handle to shut the connection down from any thread.
    stream: Stream,
    source: Source,
    /// Past the handshake: counts against the serving limits.
    serving: Option<Serving>,
    /// Shut down by the registry (replaced, or refused by a reload): counts against no limit
    /// while its thread ends.
    closing: bool,
    /// Where it came from (address, or socket and uid/pid), for status.
    peer: String,
    /// The export it is served, once in transmission, and its counters.
    stats: Option<(String, Arc<ConnStats>)>,
    since: (Instant, SystemTime),
}

/// A live connection as `status` shows it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: u64,
    pub peer: String,
    /// `uid:N`, `cert:NAME` or `ip:ADDR` (what the connection limits group by).
    pub identity: Option<String>,
    /// `None` while still in the handshake.
    pub export: Option<String>,
    pub requests: u64,
    pub bytes: u64,
    pub connected_at: SystemTime,
    pub uptime: std::time::Duration,
}

impl Entry {
    fn handshaking(&self) -> bool {
        self.serving.is_none() && !self.closing
    }
}

/// What [`Registry::admit`] needs to know about a client asking for an export.
pub(crate) struct Candidate<'a> {
    pub identity: Option<&'a str>,
    /// Proved by a certificate or a uid: may replace its own oldest connection.
    pub authenticated: bool,
    pub exempt: bool,
    pub peer: Peer,
    pub export: &'a str,
}

pub(crate) struct Registry {
    limits: Limits,
    conns: Mutex<HashMap<u64, Entry>>,
}

impl Registry {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            conns: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection in the handshake; `Err(why)` at the server-wide or this
    /// source's handshake limit. `peer` is how status names it.
    pub(crate) fn register(
        &self,
        id: u64,
        stream: Stream,
        source: Source,
        peer: &str,
    ) -> Result<(), String> {
        let mut c = self.lock();
        let handshaking = c.values().filter(|e| e.handshaking()).count();
        if handshaking >= self.limits.serving {
            return Err(format!(
                "{handshaking} connections are already in the handshake (--max-connections {})",
                self.limits.serving
            ));
        }
        if source != Source::Unknown {
            let mine = c
                .values()
                .filter(|e| e.handshaking() && e.source == source)
                .count();
            if mine >= self.limits.handshakes_per_source {
                return Err(format!(
                    "this source already has {mine} connections in the handshake \
                     (--max-handshakes-per-source {})",
                    self.limits.handshakes_per_source
                ));
            }
        }
        c.insert(
            id,
            Entry {
                stream,
                source,
                serving: None,
                closing: false,
                peer: peer.to_string(),
                stats: None,
                since: (Instant::now(), SystemTime::now()),
            },
        );
        Ok(())
    }

    /// The oldest serving connection of `who`, if any.
    fn oldest_of(c: &HashMap<u64, Entry>, who: &str) -> Option<u64> {
        c.iter()
            .filter(|(_, e)| {
                e.serving
                    .as_ref()
                    .is_some_and(|s| s.identity.as_deref() == Some(who))
            })
            .map(|(k, _)| *k)
            .min()
    }

    /// Moves connection `id` to the serving set, replacing the same client's oldest serving
    /// connection when a limit is reached and the client proved who it is; `Err(reason)` if
    /// there is no room.
    pub(crate) fn admit(&self, id: u64, cand: Candidate<'_>) -> Result<(), String> {
        let mut c = self.lock();
        let serving = c.values().filter(|e| e.serving.is_some()).count();
        let mine = cand.identity.map_or(0, |who| {
            c.values()
                .filter(|e| {
                    e.serving
                        .as_ref()
                        .is_some_and(|s| s.identity.as_deref() == Some(who))
                })
                .count()
        });
        let full = if serving >= self.limits.serving {
            Some(format!(
                "the server is serving its maximum of {} connections",
                self.limits.serving
            ))
        } else if !cand.exempt && mine >= self.limits.per_client {
            Some(format!(
                "this client already has {mine} connections (--max-connections-per-client {})",
                self.limits.per_client
            ))
        } else {
            None
        };
        if let Some(why) = full {
            let oldest = cand
                .identity
                .filter(|_| cand.authenticated)
                .and_then(|who| Self::oldest_of(&c, who));
            let Some(old) = oldest else {
                return Err(why);
            };
            if let Some(e) = c.get_mut(&old) {
                warn!(
                    conn = old,
                    replaced_by = id,
                    client = cand.identity.unwrap_or("-"),
                    "{why}: closing this client's oldest connection for its new one"
                );
                let _ = e.stream.shutdown(Shutdown::Both);
                // It no longer counts; its thread ends on its own.
                e.serving = None;
                e.closing = true;
            }
        }
        if let Some(e) = c.get_mut(&id) {
            e.serving = Some(Serving {
                identity: cand.identity.map(String::from),
                peer: Arc::new(cand.peer),
                export: cand.export.to_string(),
            });
        }
        Ok(())
    }

    /// Checks every serving connection against `rules`; one they refuse is shut for reading
    /// (requests in flight finish) and logged with the reason. Returns how many were closed.
    pub(crate) fn recheck(&self, rules: &Rules) -> usize {
        let mut closed = 0;
        for (id, e) in self.lock().iter_mut() {
            let Some(s) = &e.serving else { continue };
            if let Err(why) = rules.recheck(&s.peer, &s.export) {
                warn!(
                    conn = *id,
                    client = %s.peer.label(),
                    export = %s.export,
                    "closing the connection after its requests in flight: the reloaded settings refuse it: {why}"
                );
                let _ = e.stream.shutdown(Shutdown::Read);
                e.serving = None;
                e.closing = true;
                closed += 1;
            }
        }
        closed
    }

    /// Connection `id` is now served `export`, counting into `stats`.
    pub(crate) fn set_export(&self, id: u64, export: &str, stats: Arc<ConnStats>) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.stats = Some((export.to_string(), stats));
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
                identity: e.serving.as_ref().and_then(|s| s.identity.clone()),
                export: e.stats.as_ref().map(|(n, _)| n.clone()),
                requests: e
                    .stats
                    .as_ref()
                    .map_or(0, |(_, s)| s.requests.load(Relaxed)),
                bytes: e.stats.as_ref().map_or(0, |(_, s)| s.bytes.load(Relaxed)),
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
            let serves = e.stats.as_ref().is_some_and(|(x, _)| x == export)
                || e.serving.as_ref().is_some_and(|s| s.export == export);
            if serves {
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
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn stream() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), b)
    }

    fn cand<'a>(who: Option<&'a str>, authenticated: bool) -> Candidate<'a> {
        Candidate {
            identity: who,
            authenticated,
            exempt: false,
            peer: Peer::default(),
            export: "d",
        }
    }

    const LIMITS: Limits = Limits {
        serving: 2,
        handshakes_per_source: 8,
        per_client: 8,
    };

    #[test]
    fn handshakes_and_serving_connections_have_separate_limits() {
        let r = Registry::new(LIMITS);
        let mut peers = Vec::new();
        for id in 1..=2 {
            let (s, p) = stream();
            peers.push(p);
            r.register(id, s, Source::Unknown, "p").unwrap();
            r.admit(id, cand(Some("a"), true)).unwrap();
        }
        // Serving is full, yet new handshakes may start.
        let (s, _p3) = stream();
        r.register(3, s, Source::Unknown, "p").unwrap();
        let (s, _p4) = stream();
        r.register(4, s, Source::Unknown, "p").unwrap();
        let (s, _p5) = stream();
        let e = r.register(5, s, Source::Unknown, "p").unwrap_err();
        assert!(e.contains("--max-connections"), "{e}");
        // A stranger is refused; client "a" replaces its own oldest connection (1).
        assert!(r.admit(3, cand(Some("b"), true)).is_err());
        assert!(r.admit(3, cand(None, false)).is_err());
        r.admit(4, cand(Some("a"), true)).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            peers[0].read(&mut buf).unwrap(),
            0,
            "connection 1 was closed"
        );
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn one_source_holds_only_its_share_of_handshakes() {
        let r = Registry::new(Limits {
            serving: 64,
            handshakes_per_source: 3,
            per_client: 8,
        });
        let attacker = Source::Ip("127.0.0.2".parse().unwrap());
        let mut keep = Vec::new();
        for id in 1..=3 {
            let (s, p) = stream();
            keep.push(p);
            r.register(id, s, attacker.clone(), "p").unwrap();
        }
        let (s, _p) = stream();
        let e = r.register(4, s, attacker, "p").unwrap_err();
        assert!(e.contains("--max-handshakes-per-source 3"), "{e}");
        let (s, _p) = stream();
        r.register(5, s, Source::Ip("127.0.0.1".parse().unwrap()), "p")
            .expect("another address still gets in");
    }

    #[test]
    fn a_client_holds_at_most_its_share_of_serving_slots() {
        let r = Registry::new(Limits {
            serving: 64,
            handshakes_per_source: 8,
            per_client: 2,
        });
        let mut peers = Vec::new();
        for id in 1..=4 {
            let (s, p) = stream();
            peers.push(p);
            r.register(id, s, Source::Unknown, "p").unwrap();
        }
        for id in 1..=2 {
            r.admit(id, cand(Some("ip:10.0.0.1"), false)).unwrap();
        }
        // Known only by its address: refused, nobody is evicted.
        let e = r.admit(3, cand(Some("ip:10.0.0.1"), false)).unwrap_err();
        assert!(e.contains("--max-connections-per-client 2"), "{e}");
        // The operator's own user is exempt.
        let own = Candidate {
            exempt: true,
            ..cand(Some("ip:10.0.0.1"), false)
        };
        r.admit(4, own).unwrap();
        peers[0].set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        assert!(
            peers[0].read(&mut buf).is_err(),
            "connection 1 is still open"
        );
    }

    #[test]
    fn connections_of_one_export_are_listed_and_closed_together() {
        let r = Registry::new(Limits {
            serving: 4,
            handshakes_per_source: 8,
            per_client: 8,
        });
        let mut peers = Vec::new();
        for (id, export) in [(1, "a"), (2, "b"), (3, "a")] {
            let (s, p) = stream();
            peers.push(p);
            r.register(id, s, Source::Unknown, &format!("peer{id}"))
                .unwrap();
            r.admit(
                id,
                Candidate {
                    export,
                    ..cand(Some("u"), true)
                },
            )
            .unwrap();
            let st = Arc::new(ConnStats::default());
            st.requests.store(id, std::sync::atomic::Ordering::Relaxed);
            r.set_export(id, export, st);
        }
        let (s, _p) = stream();
        r.register(4, s, Source::Unknown, "peer4").unwrap();
        let snap = r.snapshot();
        assert_eq!(snap.len(), 4);
        assert_eq!(snap[0].peer, "peer1");
        assert_eq!(snap[0].identity.as_deref(), Some("u"));
        assert_eq!(snap[2].export.as_deref(), Some("a"));
        assert_eq!(snap[2].requests, 3);
        assert_eq!(snap[3].export, None, "still in the handshake");
        assert_eq!(r.shutdown_export("a", Shutdown::Both), 2);
        let mut buf = [0u8; 1];
        assert_eq!(peers[0].read(&mut buf).unwrap(), 0);
        assert_eq!(peers[2].read(&mut buf).unwrap(), 0);
        peers[1].set_nonblocking(true).unwrap();
        assert!(peers[1].read(&mut buf).is_err(), "export b stays open");
    }
}
