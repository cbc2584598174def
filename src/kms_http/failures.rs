//! Aggregated audit lines for requests refused before anyone was authenticated: bad or unknown
//! signatures and tokens, and requests refused by the per-address limits. Writing and fsyncing
//! one audit line each would let an unauthenticated client turn its requests into disk writes;
//! instead they are counted per (source address, credential named, reason) and written as one
//! line per key with a `count` every flush interval and at shutdown.
//!
//! The table is bounded: past [`MAX_KEYS`] distinct keys, further failures are counted in one
//! overflow line, so varied garbage cannot grow memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::kms::{AuditRecord, EncryptionContext, KeyStore};

/// Distinct (address, credential, reason) keys kept between flushes.
pub const MAX_KEYS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    source: Option<IpAddr>,
    credential: Option<String>,
    operation: String,
    reason: String,
}

#[derive(Debug)]
struct Count {
    n: u64,
    status: u16,
    first: String,
}

/// Failures counted since the last flush.
#[derive(Default)]
pub struct FailureLog {
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    counts: HashMap<Key, Count>,
    overflow: u64,
}

impl FailureLog {
    /// Counts one refused request. `reason` should not vary per request (no times or sizes in
    /// it), or it will take a key of its own each time (until the overflow line takes over).
    pub fn record(
        &self,
        ks: &KeyStore,
        source: Option<IpAddr>,
        credential: Option<&str>,
        operation: &str,
        status: u16,
        reason: &str,
    ) {
        let key = Key {
            source,
            credential: credential.map(str::to_string),
            operation: operation.chars().take(64).collect(),
            reason: reason.chars().take(200).collect(),
        };
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = t.counts.get_mut(&key) {
            c.n += 1;
        } else if t.counts.len() < MAX_KEYS {
            let first = ks.audit_time();
            t.counts.insert(
                key,
                Count {
                    n: 1,
                    status,
                    first,
                },
            );
        } else {
            t.overflow += 1;
        }
    }

    /// Writes one audit line per key counted since the last flush (one fsync each) and empties
    /// the table. Returns the number of lines written.
    pub fn flush(&self, ks: &KeyStore) -> usize {
        let table = std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()));
        let now = ks.audit_time();
        let mut lines: Vec<AuditRecord> = table
            .counts
            .into_iter()
            .map(|(k, c)| AuditRecord {
                time: now.clone(),
                operation: format!("http {}", k.operation),
                key: None,
                key_id: None,
                key_version: None,
                encryption_context: EncryptionContext::new(),
                outcome: "error".into(),
                error: Some(format!("{}: {} (since {})", c.status, k.reason, c.first)),
                credential: Some(k.credential.unwrap_or_else(|| "(none)".into())),
                source: Some(k.source.map_or_else(|| "unix".into(), |a| a.to_string())),
                count: Some(c.n),
                grant: None,
            })
            .collect();
        if table.overflow > 0 {
            lines.push(AuditRecord {
                time: now.clone(),
                operation: "http (refused requests)".into(),
                key: None,
                key_id: None,
                key_version: None,
                encryption_context: EncryptionContext::new(),
                outcome: "error".into(),
                error: Some(format!(
                    "more than {MAX_KEYS} distinct refused sources or reasons in one interval"
                )),
                credential: Some("(none)".into()),
                source: Some("(many)".into()),
                count: Some(table.overflow),
                grant: None,
            });
        }
        lines.sort_by(|a, b| a.source.cmp(&b.source));
        let mut written = 0;
        for l in &lines {
            match ks.append_audit(l) {
                Ok(()) => written += 1,
                Err(e) => {
                    tracing::warn!(error = %super::chain(&e), "could not write the audit log")
                }
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::InitRoot;

    #[test]
    fn failures_become_one_line_per_source_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        let before = ks.audit_tail(None).unwrap().len();
        let log = FailureLog::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..1000 {
            log.record(&ks, Some(a), None, "list-keys", 401, "unknown access key");
        }
        for _ in 0..3 {
            log.record(&ks, Some(b), Some("app"), "list-keys", 401, "bad signature");
        }
        assert_eq!(
            ks.audit_tail(None).unwrap().len(),
            before,
            "nothing written yet"
        );
        assert_eq!(log.flush(&ks), 2);
        let lines = ks.audit_tail(Some(2)).unwrap();
        assert_eq!(lines[0].source.as_deref(), Some("127.0.0.1"));
        assert_eq!(lines[0].count, Some(1000));
        assert_eq!(lines[0].credential.as_deref(), Some("(none)"));
        assert!(lines[0]
            .error
            .as_deref()
            .unwrap()
            .contains("unknown access key"));
        assert_eq!(lines[1].count, Some(3));
        assert_eq!(lines[1].credential.as_deref(), Some("app"));
        assert_eq!(log.flush(&ks), 0, "the table is emptied by a flush");
    }

    #[test]
    fn distinct_keys_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        let log = FailureLog::default();
        for i in 0..(MAX_KEYS + 10) {
            log.record(&ks, None, None, "op", 401, &format!("reason {i}"));
        }
        let t = log.inner.lock().unwrap();
        assert_eq!(t.counts.len(), MAX_KEYS);
        assert_eq!(t.overflow, 10);
    }
}
