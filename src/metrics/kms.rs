//! The KMS HTTP service's metrics: requests by operation and HTTP status, latency by operation,
//! rate-limit refusals (HTTP 429), and authorization decisions by what allowed them (an
//! administrator, a key scope, a grant) or `none`. Fed by the service through
//! [`crate::kms_http::RequestObserver`], one call per finished request (a map lookup under a
//! read lock: the key store's own work, an fsynced audit line, costs far more).
//!
//! Operation names come from the request path for unknown paths, so a client could mint new
//! ones: only the first [`MAX_OPERATIONS`] distinct names get their own series, later ones count
//! as `other`, so the scrape stays bounded.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::kms_http::RequestObserver;

/// Distinct operation labels kept; beyond, `other`.
pub const MAX_OPERATIONS: usize = 64;

type OpStatus = [(&'static str, String); 2];
type Op = [(&'static str, String); 1];

/// The KMS service's metrics; register with [`KmsMetrics::registry`].
pub struct KmsMetrics {
    requests: Family<OpStatus, Counter>,
    latency: Family<Op, Histogram, fn() -> Histogram>,
    rate_limited: Counter,
    grant_checks: Family<Result_, Counter>,
    seen: Mutex<HashSet<String>>,
}

type Result_ = [(&'static str, &'static str); 1];

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~2 s: an unwrap is sub-millisecond, an fsynced audit line milliseconds.
    Histogram::new(exponential_buckets(0.0005, 4.0, 7))
}

impl Default for KmsMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            rate_limited: Counter::default(),
            grant_checks: Family::default(),
            seen: Mutex::new(HashSet::new()),
        }
    }
}

impl KmsMetrics {
    /// A registry exposing these metrics (they stay shared with `self`).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "cryptnbd_kms_requests",
            "KMS HTTP requests by operation and HTTP status",
            self.requests.clone(),
        );
        r.register(
            "cryptnbd_kms_request_duration_seconds",
            "KMS HTTP request time (authentication, key store, audit line) by operation",
            self.latency.clone(),
        );
        r.register(
            "cryptnbd_kms_rate_limited",
            "KMS HTTP requests refused by a rate limit, per credential or per address (HTTP 429)",
            self.rate_limited.clone(),
        );
        r.register(
            "cryptnbd_kms_grant_checks",
            "Authorization decisions by what allowed the request: admin, scope, grant, or none",
            self.grant_checks.clone(),
        );
        r
    }

    fn label(&self, operation: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(operation) {
            return operation.to_string();
        }
        if seen.len() < MAX_OPERATIONS {
            seen.insert(operation.to_string());
            return operation.to_string();
        }
        "other".into()
    }
}

impl RequestObserver for KmsMetrics {
    fn request(&self, operation: &str, status: u16, took: Duration) {
        let op = self.label(operation);
        self.requests
            .get_or_create(&[("operation", op.clone()), ("status", status.to_string())])
            .inc();
        self.latency
            .get_or_create(&[("operation", op)])
            .observe(took.as_secs_f64());
        if status == 429 {
            self.rate_limited.inc();
        }
    }

    fn authorized(&self, right: &str) {
        // Grant ids are not labels (unbounded); the kind of right is.
        let result = match right {
            "admin" => "admin",
            "scope" => "scope",
            r if r.starts_with("none") => "none",
            _ => "grant",
        };
        self.grant_checks.get_or_create(&[("result", result)]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_and_operations_bounded() {
        let m = KmsMetrics::default();
        let r = m.registry();
        m.request("create-datakey", 200, Duration::from_millis(2));
        m.request("create-datakey", 200, Duration::from_millis(3));
        m.request("decrypt-datakey", 429, Duration::from_micros(50));
        m.authorized("admin");
        m.authorized("0ffd4ce80696cce3");
        m.authorized("0ffd4ce80696cce4");
        m.authorized("none: no grant for decrypt-datakey");
        for i in 0..(MAX_OPERATIONS + 10) {
            m.request(&format!("junk{i}"), 404, Duration::ZERO);
        }
        let text = crate::metrics::render(&r);
        assert!(
            text.contains(
                "cryptnbd_kms_requests_total{operation=\"create-datakey\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("cryptnbd_kms_rate_limited_total 1"), "{text}");
        for (result, n) in [("admin", 1), ("grant", 2), ("none", 1)] {
            let line = format!("cryptnbd_kms_grant_checks_total{{result=\"{result}\"}} {n}");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            text.contains(
                "cryptnbd_kms_request_duration_seconds_count{operation=\"create-datakey\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("operation=\"other\",status=\"404\"} 12"),
            "{text}"
        );
    }
}
