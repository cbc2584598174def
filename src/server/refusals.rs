//! A short-lived memory of refused attaches, so repeated requests for an export that cannot be
//! attached (disabled or deleted CMK, corrupt header, volume in use) are cheap for the server.
//!
//! Every attach attempt costs the server work a client gets for free: it opens and locks the
//! volume file (keeping `volume resize/rekey/delete` from their lock meanwhile), asks the key
//! store to unwrap (which appends and fsyncs an audit record), and logs a warning. A refusal is
//! therefore remembered for a short time ([`RefusalCache::ttl`]) and answered from memory; its
//! log line is repeated at most once per [`RefusalCache::log_interval`], with a count of the
//! refusals in between. The key store's audit log then records at most one attempt per `ttl`.
//! Re-enabling a key takes effect for the next client after at most `ttl`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to tell about a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why the attach was refused (as first found), for the log.
    pub reason: String,
    /// What the client may be told (no path, URL or key id).
    pub public: String,
    /// `Some(n)`: log this refusal now, `n` earlier ones went unlogged since the last log line.
    /// `None`: a repeat inside the log interval; log it at debug level only.
    pub log: Option<u64>,
}

struct Entry {
    reason: String,
    public: String,
    /// The refusal is answered from memory until then.
    until: Instant,
    /// When a refusal of this name was last logged, and how many were not since.
    logged: Instant,
    unlogged: u64,
}

/// The cause of a refusal answered from memory: the reason first found (the typed error it came
/// from was reported when it happened).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct RememberedRefusal {
    pub reason: String,
    /// What the client may be told.
    pub public: String,
}

/// Refused attaches by export name.
pub struct RefusalCache {
    ttl: Duration,
    log_interval: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

/// Names remembered at most (a client asking for ever new names cannot grow it without bound;
/// the oldest entries go first).
const MAX_ENTRIES: usize = 4096;

impl RefusalCache {
    pub fn new(ttl: Duration, log_interval: Duration) -> Self {
        Self {
            ttl,
            log_interval,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn log_interval(&self) -> Duration {
        self.log_interval
    }

    /// A fresh refusal of `name` remembered now, if any: answer it without trying to attach.
    pub fn cached(&self, name: &str) -> Option<Refusal> {
        self.cached_at(name, Instant::now())
    }

    /// Records that attaching `name` was refused for `reason`; says whether to log it.
    pub fn refused(&self, name: &str, reason: &str, public: &str) -> Refusal {
        self.refused_at(name, reason, public, Instant::now())
    }

    /// Forgets `name` (it attached).
    pub fn clear(&self, name: &str) {
        self.lock().remove(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached_at(&self, name: &str, now: Instant) -> Option<Refusal> {
        let mut m = self.lock();
        let e = m.get_mut(name)?;
        if now >= e.until {
            return None;
        }
        let (reason, public) = (e.reason.clone(), e.public.clone());
        Some(Refusal {
            reason,
            public,
            log: Self::note(e, now, self.log_interval),
        })
    }

    fn refused_at(&self, name: &str, reason: &str, public: &str, now: Instant) -> Refusal {
        let mut m = self.lock();
        if m.len() >= MAX_ENTRIES && !m.contains_key(name) {
            m.retain(|_, e| now < e.until);
            if m.len() >= MAX_ENTRIES {
                if let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, e)| e.until)
                    .map(|(k, _)| k.clone())
                {
                    m.remove(&oldest);
                }
            }
        }
        let until = now + self.ttl;
        match m.get_mut(name) {
            // The same refusal again after the cache time: log it only if the interval passed.
            Some(e) if e.reason == reason => {
                e.until = until;
                Refusal {
                    reason: reason.to_string(),
                    public: public.to_string(),
                    log: Self::note(e, now, self.log_interval),
                }
            }
            // A new or different refusal is always worth a line.
            _ => {
                m.insert(
                    name.to_string(),
                    Entry {
                        reason: reason.to_string(),
                        public: public.to_string(),
                        until,
                        logged: now,
                        unlogged: 0,
                    },
                );
                Refusal {
                    reason: reason.to_string(),
                    public: public.to_string(),
                    log: Some(0),
                }
            }
        }
    }

    /// Counts one more refusal of `e`; `Some(unlogged)` when it is time to log again.
    fn note(e: &mut Entry, now: Instant, interval: Duration) -> Option<u64> {
        if now.duration_since(e.logged) >= interval {
            let n = e.unlogged;
            e.logged = now;
            e.unlogged = 0;
            Some(n)
        } else {
            e.unlogged += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_refusal_is_answered_from_memory_until_it_expires() {
        let c = RefusalCache::new(2 * S, 60 * S);
        let t0 = Instant::now();
        assert_eq!(c.cached_at("v", t0), None);
        let r = c.refused_at("v", "key disabled", "p", t0);
        assert_eq!(r.log, Some(0), "the first refusal is logged");
        let hit = c.cached_at("v", t0 + S).expect("cached");
        assert_eq!(hit.reason, "key disabled");
        assert_eq!(hit.log, None, "a repeat within the interval is not");
        assert_eq!(c.cached_at("v", t0 + 2 * S), None, "expired");
        assert_eq!(c.cached_at("other", t0), None);
    }

    #[test]
    fn repeats_are_logged_once_per_interval_with_a_count() {
        let c = RefusalCache::new(S, 10 * S);
        let t0 = Instant::now();
        c.refused_at("v", "r", "p", t0);
        for i in 1..=5 {
            assert_eq!(c.cached_at("v", t0 + S / 10 * i).unwrap().log, None);
        }
        // Expired and refused again by the key store, same reason: still quiet.
        assert_eq!(c.refused_at("v", "r", "p", t0 + 3 * S).log, None);
        // After the interval: one line, counting the 6 unlogged refusals.
        assert_eq!(c.refused_at("v", "r", "p", t0 + 11 * S).log, Some(6));
        assert_eq!(c.cached_at("v", t0 + 11 * S).unwrap().log, None);
    }

    #[test]
    fn a_different_reason_is_logged_at_once_and_success_clears() {
        let c = RefusalCache::new(S, 60 * S);
        let t0 = Instant::now();
        c.refused_at("v", "disabled", "p", t0);
        assert_eq!(c.refused_at("v", "deleted", "p", t0 + 2 * S).log, Some(0));
        assert_eq!(c.cached_at("v", t0 + 2 * S).unwrap().reason, "deleted");
        c.clear("v");
        assert_eq!(c.cached_at("v", t0 + 2 * S), None);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let c = RefusalCache::new(60 * S, 60 * S);
        let t0 = Instant::now();
        for i in 0..MAX_ENTRIES + 10 {
            c.refused_at(
                &format!("n{i}"),
                "r",
                "p",
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert!(c.lock().len() <= MAX_ENTRIES);
        assert!(c.cached_at(&format!("n{}", MAX_ENTRIES + 9), t0).is_some());
    }
}
