//! What the server counts while it serves, for the control socket (`crate::control`) and the
//! metrics endpoint (`crate::metrics`): per-export request, byte, error and latency counters,
//! per-connection counters, and refusals by reason.
//!
//! The hot path only does relaxed atomic adds on counters it already holds an `Arc` to (the
//! session looks its export's [`ExportStats`] up once, at the start of transmission): no lock, no
//! allocation and no map lookup per request. Readers (a status query, a scrape) see each counter
//! on its own, not a consistent snapshot of all of them, which is what monitoring needs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::nbd::consts::{CMD_FLUSH, CMD_READ, CMD_WRITE};

/// Upper bounds (microseconds) of the latency buckets; the last bucket is unbounded. Powers of
/// four from 16 µs to 1 s: a cached 4 KiB read lands in the first, a device FLUSH in the middle.
pub const LATENCY_BOUNDS_US: [u64; 9] = [16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576];

/// A latency histogram of fixed buckets (cumulative counts are built when read).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_US.partition_point(|b| *b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Counts per bucket (not cumulative; the last one is above every bound) and the sum in µs.
    pub fn read(&self) -> ([u64; LATENCY_BOUNDS_US.len() + 1], u64) {
        let mut b = [0; LATENCY_BOUNDS_US.len() + 1];
        for (o, a) in b.iter_mut().zip(&self.buckets) {
            *o = a.load(Relaxed);
        }
        (b, self.sum_us.load(Relaxed))
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

/// Why a request got an error reply, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Refused before it ran (range, flags, read-only, unknown command).
    Invalid,
    /// No buffer memory in time.
    NoMemory,
    /// The volume failed it (I/O error, no space...).
    Volume,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 3] = [ErrorKind::Invalid, ErrorKind::NoMemory, ErrorKind::Volume];

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NoMemory => "no_memory",
            ErrorKind::Volume => "volume",
        }
    }
}

/// Counters of one export, shared by every connection to it and kept across detach/attach.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    /// TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS.
    pub others: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: [AtomicU64; 3],
    pub in_flight: AtomicU64,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
    pub flush_latency: Histogram,
}

impl ExportStats {
    /// A request that will run: counted with its bytes, and in flight until [`Self::done`].
    pub fn start(&self, command: u16, len: u32, conn: &ConnStats) {
        let (n, bytes) = match command {
            CMD_READ => (&self.reads, Some(&self.read_bytes)),
            CMD_WRITE => (&self.writes, Some(&self.write_bytes)),
            CMD_FLUSH => (&self.flushes, None),
            _ => (&self.others, None),
        };
        n.fetch_add(1, Relaxed);
        conn.requests.fetch_add(1, Relaxed);
        if let Some(b) = bytes {
            b.fetch_add(u64::from(len), Relaxed);
            conn.bytes.fetch_add(u64::from(len), Relaxed);
        }
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// The request started with [`Self::start`] is answered after `took`.
    pub fn done(&self, command: u16, took: Duration) {
        self.in_flight.fetch_sub(1, Relaxed);
        match command {
            CMD_READ => self.read_latency.observe(took),
            CMD_WRITE => self.write_latency.observe(took),
            CMD_FLUSH => self.flush_latency.observe(took),
            _ => {}
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Relaxed)
    }
}

/// Counters of one connection (requests and payload bytes both ways).
#[derive(Debug, Default)]
pub struct ConnStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
}

/// Why a connection was turned away before it served anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// `--max-connections` handshakes or serving connections.
    Limit,
    /// A Unix peer not allowed by the peer policy.
    Peer,
    /// The handshake failed (timeout, TLS, protocol, no such export, attach refused).
    Handshake,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 3] = [
        RefusalReason::Limit,
        RefusalReason::Peer,
        RefusalReason::Handshake,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::Limit => "limit",
            RefusalReason::Peer => "peer",
            RefusalReason::Handshake => "handshake",
        }
    }
}

/// Server-wide counters and the per-export ones, by name.
#[derive(Debug, Default)]
pub struct Stats {
    exports: Mutex<HashMap<String, Arc<ExportStats>>>,
    pub connections_accepted: AtomicU64,
    refusals: [AtomicU64; 3],
}

impl Stats {
    /// The counters of `export` (created on first use; looked up once per connection).
    pub fn export(&self, export: &str) -> Arc<ExportStats> {
        let mut m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(export.to_string()).or_default().clone()
    }

    /// Every export that has counters, sorted by name.
    pub fn exports(&self) -> Vec<(String, Arc<ExportStats>)> {
        let m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn refused(&self, why: RefusalReason) {
        self.refusals[why as usize].fetch_add(1, Relaxed);
    }

    pub fn refusals_of(&self, why: RefusalReason) -> u64 {
        self.refusals[why as usize].load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(16));
        h.observe(Duration::from_micros(17));
        h.observe(Duration::from_secs(5));
        let (b, sum) = h.read();
        assert_eq!(b[0], 2, "10 and 16 µs are <= 16");
        assert_eq!(b[1], 1);
        assert_eq!(b[LATENCY_BOUNDS_US.len()], 1, "5 s is above every bound");
        assert_eq!(sum, 10 + 16 + 17 + 5_000_000);
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn requests_count_per_export_and_connection() {
        let s = Stats::default();
        let e = s.export("a");
        let c = ConnStats::default();
        e.start(CMD_WRITE, 4096, &c);
        e.start(CMD_READ, 512, &c);
        e.start(CMD_FLUSH, 0, &c);
        assert_eq!(e.in_flight.load(Relaxed), 3);
        e.done(CMD_WRITE, Duration::from_micros(5));
        e.done(CMD_READ, Duration::from_micros(5));
        e.done(CMD_FLUSH, Duration::from_micros(5));
        e.error(ErrorKind::Volume);
        assert_eq!(e.in_flight.load(Relaxed), 0);
        assert_eq!(e.write_bytes.load(Relaxed), 4096);
        assert_eq!(e.read_bytes.load(Relaxed), 512);
        assert_eq!(c.requests.load(Relaxed), 3);
        assert_eq!(c.bytes.load(Relaxed), 4608);
        assert_eq!(e.errors_of(ErrorKind::Volume), 1);
        assert!(
            Arc::ptr_eq(&e, &s.export("a")),
            "one set of counters per name"
        );
        assert_eq!(s.exports().len(), 1);
    }
}
