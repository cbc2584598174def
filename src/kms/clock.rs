//! Where the key store gets the time from. Deletion dates and rotation intervals are measured in
//! days, so tests need to move time forward: they open the store with a [`ManualClock`] through
//! `KeyStore::open_with_clock` instead of waiting. Production code uses [`SystemClock`]; there is
//! deliberately no environment variable that changes the time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of the current time, in Unix seconds.
pub trait Clock: Send + Sync {
    fn now_unix(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to (for tests). Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(unix_seconds: u64) -> Self {
        Self(Arc::new(AtomicU64::new(unix_seconds)))
    }

    /// Starts at the current system time.
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now_unix())
    }

    pub fn set(&self, unix_seconds: u64) {
        self.0.store(unix_seconds, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs(), Ordering::SeqCst);
    }

    pub fn advance_days(&self, days: u64) {
        self.advance(Duration::from_secs(days * 86_400));
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// RFC 3339 (UTC, seconds) for a Unix time, as used in the audit log and messages.
pub fn rfc3339(unix_seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_seconds)).to_string()
}

/// The calendar date (YYYY-MM-DD, UTC) of a Unix time.
pub fn date(unix_seconds: u64) -> String {
    rfc3339(unix_seconds)[..10].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now_unix(), 1_000);
        c.advance_days(7);
        assert_eq!(c.now_unix(), 1_000 + 7 * 86_400);
        let shared = c.clone();
        shared.set(5);
        assert_eq!(c.now_unix(), 5);
    }

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(date(86_400 * 365), "1971-01-01");
    }
}
