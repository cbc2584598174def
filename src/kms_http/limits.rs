//! Request limits that protect the key store from one noisy or hostile client: the body size cap
//! and the bounded concurrency are applied as layers in `mod.rs`; this file holds the
//! per-credential request rate, a token bucket per credential name (refill `rate` per second up
//! to `burst`), so one credential cannot starve the others.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024,
            max_concurrent: 64,
            rate_per_credential: 1000.0,
            burst_per_credential: 2000.0,
        }
    }
}

/// Token buckets keyed by credential name.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `credential`; false when its bucket is empty.
    pub fn allow(&self, credential: &str) -> bool {
        self.allow_at(credential, Instant::now())
    }

    fn allow_at(&self, credential: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets
            .entry(credential.to_string())
            .or_insert((self.burst, now));
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
}
