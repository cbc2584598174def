//! Replay refusal for signed DEW requests. A signature stays valid while its `X-Sdk-Date` is
//! within [`MAX_SKEW_SECS`] of the server's clock, so whoever sees one signed request (a proxy
//! log, a plain-HTTP hop) could send it again for up to 15 minutes. Reads (describe, list, get)
//! are harmless to repeat; every other operation (data keys, deletion, …) is accepted once per
//! signature: the signatures seen are kept until their date leaves the window.
//!
//! The cache is bounded. When it is full of signatures still inside the window, a new mutating
//! request is refused (503, retry later) rather than an old signature forgotten: forgetting would
//! reopen the replay it exists to close. Only requests with a valid signature reach it, so only a
//! credential holder can fill it; the default size is far above what the per-credential rate
//! limit lets one credential do in a window on this service (see `Limits::replay_cache_entries`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::sign::MAX_SKEW_SECS;

/// Why a request was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This signature was already used inside the window.
    Replayed,
    /// The cache is full of live signatures.
    Full,
}

/// Operations that only read and may be repeated with the same signature.
pub fn is_read_only(operation: &str) -> bool {
    operation.starts_with("describe-")
        || operation.starts_with("list-")
        || operation.starts_with("get-")
}

/// Signatures seen, each until its date leaves the skew window.
pub struct ReplayCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Signature → expiry (Unix seconds).
    seen: HashMap<[u8; 32], i64>,
    /// (expiry, signature), oldest first, for eviction.
    by_expiry: BTreeSet<(i64, [u8; 32])>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records `signature` (dated `date`, Unix seconds) at server time `now`; refuses it when it
    /// was seen before inside the window or when the cache is full.
    pub fn check(&self, signature: &str, date: i64, now: i64) -> Result<(), Refusal> {
        let id: [u8; 32] = Sha256::digest(signature.as_bytes()).into();
        let expiry = date + MAX_SKEW_SECS;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(exp, old)) = g.by_expiry.first() {
            if exp >= now {
                break;
            }
            g.by_expiry.pop_first();
            g.seen.remove(&old);
        }
        if g.seen.contains_key(&id) {
            return Err(Refusal::Replayed);
        }
        if g.seen.len() >= self.capacity {
            return Err(Refusal::Full);
        }
        g.seen.insert(id, expiry);
        g.by_expiry.insert((expiry, id));
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_accepted_once_inside_the_window() {
        let c = ReplayCache::new(10);
        assert_eq!(c.check("aa", 1000, 1000), Ok(()));
        assert_eq!(c.check("aa", 1000, 1500), Err(Refusal::Replayed));
        assert_eq!(c.check("bb", 1000, 1000), Ok(()));
        // Past the window the signature itself is expired (sign.rs refuses it); the entry goes.
        assert_eq!(c.check("cc", 2000, 1000 + MAX_SKEW_SECS + 1), Ok(()));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn full_refuses_rather_than_forgets() {
        let c = ReplayCache::new(2);
        assert_eq!(c.check("a", 1000, 1000), Ok(()));
        assert_eq!(c.check("b", 1001, 1000), Ok(()));
        assert_eq!(c.check("c", 1000, 1000), Err(Refusal::Full));
        assert_eq!(c.check("a", 1000, 1000), Err(Refusal::Replayed));
        // Once "a" expires there is room again.
        assert_eq!(c.check("c", 1900, 1000 + MAX_SKEW_SECS + 1), Ok(()));
        assert_eq!(
            c.check("b", 1001, 1000 + MAX_SKEW_SECS + 1),
            Err(Refusal::Replayed)
        );
    }

    #[test]
    fn reads_are_told_apart() {
        for op in [
            "describe-key",
            "list-keys",
            "list-aliases",
            "get-key-rotation-status",
        ] {
            assert!(is_read_only(op), "{op}");
        }
        for op in [
            "create-datakey",
            "decrypt-datakey",
            "schedule-key-deletion",
            "re-encrypt",
        ] {
            assert!(!is_read_only(op), "{op}");
        }
    }
}
