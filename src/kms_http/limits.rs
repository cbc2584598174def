//! Request limits that protect the key store from one noisy or hostile client. Before anything
//! is authenticated (no credential file read, no audit line written): a deadline on reading a
//! request (headers, then body), a cap on connections from one address and a request rate per
//! address. After authentication: a request rate per credential. The body size cap and the
//! bounded concurrency are applied in `mod.rs`. Rates are token buckets (refill `rate` per
//! second up to `burst`), so one client cannot starve the others.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The service's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted (413 beyond it).
    pub max_body_bytes: usize,
    /// Requests handled at once; more wait in the accept queue.
    pub max_concurrent: usize,
    /// Sustained requests per second allowed to one credential (429 beyond it).
    pub rate_per_credential: f64,
    /// Requests one credential may make in a burst.
    pub burst_per_credential: f64,
    /// Time a client has to send a request's headers, and then again its body (408 and the
    /// connection closed beyond it).
    pub request_timeout: Duration,
    /// Connections open at once from one IP address (more are closed at once).
    pub max_connections_per_address: usize,
    /// Sustained requests per second from one IP address, before authentication (429 beyond).
    pub rate_per_address: f64,
    /// Requests one address may make in a burst.
    pub burst_per_address: f64,
    /// Signatures of mutating DEW requests remembered to refuse replays (`replay.rs`).
    pub replay_cache_entries: usize,
    /// How often the aggregated lines of failed authentications are written to the audit log.
    pub audit_flush_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024,
            max_concurrent: 64,
            rate_per_credential: 1000.0,
            burst_per_credential: 2000.0,
            request_timeout: Duration::from_secs(10),
            max_connections_per_address: 128,
            rate_per_address: 1000.0,
            burst_per_address: 2000.0,
            replay_cache_entries: 1 << 20,
            audit_flush_interval: Duration::from_secs(10),
        }
    }
}

/// Buckets kept before idle (full) ones are dropped: bounds the memory many addresses can take.
const MAX_TRACKED: usize = 65_536;

/// Token buckets keyed by credential name or by address.
pub struct RateLimiter<K = String> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `who`; false when its bucket is empty.
    pub fn allow<Q>(&self, who: &Q) -> bool
    where
        Q: ?Sized + ToOwned<Owned = K>,
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash,
    {
        self.allow_at(who, Instant::now())
    }

    fn allow_at<Q>(&self, who: &Q, now: Instant) -> bool
    where
        Q: ?Sized + ToOwned<Owned = K>,
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash,
    {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(who) {
            // A bucket refilled to the brim says nothing a fresh one would not.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (t, last)| {
                *t + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
            });
        }
        let (tokens, last) = match buckets.get_mut(who) {
            Some(b) => b,
            None => buckets.entry(who.to_owned()).or_insert((self.burst, now)),
        };
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Open connections per address, with a cap.
pub struct ConnCounter {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; uncounted when dropped.
pub struct ConnSlot {
    counter: Arc<ConnCounter>,
    addr: IpAddr,
}

impl ConnCounter {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(ConnCounter {
            cap: cap.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a connection from `addr`; `None` when that address is at its cap.
    pub fn enter(self: &Arc<Self>, addr: IpAddr) -> Option<ConnSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(addr).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            counter: self.clone(),
            addr,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.counter.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_empties_and_refills_per_credential() {
        let r = RateLimiter::new(2.0, 3.0);
        let t = Instant::now();
        assert!((0..3).all(|_| r.allow_at("a", t)));
        assert!(!r.allow_at("a", t));
        assert!(r.allow_at("b", t), "another credential has its own bucket");
        assert!(r.allow_at("a", t + Duration::from_millis(600)));
        assert!(!r.allow_at("a", t + Duration::from_millis(600)));
    }

    #[test]
    fn addresses_have_their_own_buckets_and_connection_caps() {
        let r = RateLimiter::<IpAddr>::new(1.0, 2.0);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let t = Instant::now();
        assert!(r.allow_at(&a, t) && r.allow_at(&a, t) && !r.allow_at(&a, t));
        assert!(r.allow_at(&b, t));
        let c = ConnCounter::new(2);
        let s1 = c.enter(a).unwrap();
        let _s2 = c.enter(a).unwrap();
        assert!(
            c.enter(a).is_none(),
            "the third connection from one address is refused"
        );
        assert!(c.enter(b).is_some(), "another address is not affected");
        drop(s1);
        assert!(c.enter(a).is_some(), "a closed connection frees its slot");
    }
}
