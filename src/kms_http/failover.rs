//! Several KMS URLs behind one remote-KMS client (`--kms-url A --kms-url B`, or `A,B`): which
//! URL is tried first, what moves a request on to the next one, and the error that lists every
//! URL tried when none answered. The client (`client.rs`) does the HTTP; this module decides.
//!
//! Order: the URL that answered last is tried first (so a dead first URL costs one connect
//! timeout once, not on every attach), then the others in the order given, wrapping around;
//! when a whole round fails the client waits (backoff) and starts another, a few times.
//!
//! What moves a request on:
//! - no connection (refused, connect timeout, TLS handshake, DNS): the request was never sent;
//! - an HTTP 5xx: that instance cannot answer now (overloaded, failing);
//! - a timeout or a broken connection after the request was sent.
//!
//! What does not: any answer below 500. A 4xx (refused, key not found, disabled, bad signature,
//! rate-limited) is the service's decision, and the instances share one store, so another
//! instance would say the same: asking it is pointless, and retrying refusals around a cluster is
//! a way to hammer it (a 429 would multiply instead of slowing the caller down).
//!
//! Repeating without doubling an effect: a request that may have reached an instance is sent
//! again (elsewhere, or after backoff) only when doing it twice has no lasting effect beyond an
//! audit line. That holds for the reads (`describe-*`, `list-*`, `get-*`) and for the envelope
//! operations, which compute an answer from the store without changing it: create-datakey (a
//! second call returns another fresh key; the first, never received, is referenced by nothing),
//! create-datakey-without-plaintext, encrypt/decrypt-datakey, re-encrypt, encrypt/decrypt-data
//! and gen-random. Every other operation changes the store (create-key twice makes two keys,
//! rotate twice two versions, create-grant twice two grants), so it moves on only when it was
//! provably not handled: no connection, or a 503 (this service's "not done, retry later"). A
//! timeout, a dropped connection or another 5xx after sending stops it with an error saying the
//! outcome is unknown and should be checked, rather than risk doing it twice.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::kms::KmsError;

/// Whether `operation` may be sent again after it possibly reached an instance (see the module
/// documentation).
pub fn is_repeatable(operation: &str) -> bool {
    operation.starts_with("describe-")
        || operation.starts_with("list-")
        || operation.starts_with("get-")
        || matches!(
            operation,
            "create-datakey"
                | "create-datakey-without-plaintext"
                | "encrypt-datakey"
                | "decrypt-datakey"
                | "re-encrypt"
                | "encrypt-data"
                | "decrypt-data"
                | "gen-random"
        )
}

/// One KMS instance: its base URL (no trailing slash) and the `host[:port]` it signs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub host: String,
}

impl Endpoint {
    /// Checks one URL: `https://HOST[:PORT]`, or `http://` to a loopback address only.
    pub fn parse(url: &str) -> Result<Self, KmsError> {
        let invalid = |m: String| Err(KmsError::InvalidArgument(m));
        let url = url.trim().trim_end_matches('/').to_string();
        let Some((scheme, rest)) = url.split_once("://") else {
            return invalid(format!(
                "KMS URL {url:?} has no scheme (use https://HOST:PORT)"
            ));
        };
        let host = rest.split('/').next().unwrap_or_default().to_string();
        let hostname = host
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&host)
            .trim_matches(['[', ']']);
        let loopback = hostname == "localhost"
            || hostname
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match scheme {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return invalid(format!(
                    "KMS URL {url}: plain http is only allowed to a loopback address (use https)"
                ))
            }
            s => return invalid(format!("KMS URL {url}: unknown scheme {s:?}")),
        }
        if host.is_empty() {
            return invalid(format!("KMS URL {url:?} has no host"));
        }
        Ok(Endpoint { url, host })
    }
}

/// No instance has answered yet.
const NONE: usize = usize::MAX;

/// The URLs of one client, in the order given, and which one answered last.
#[derive(Debug)]
pub struct Endpoints {
    list: Vec<Endpoint>,
    preferred: AtomicUsize,
}

impl Endpoints {
    /// Parses each URL (an entry may hold several separated by commas); duplicates are dropped.
    pub fn parse<S: AsRef<str>>(urls: &[S]) -> Result<Self, KmsError> {
        let mut list: Vec<Endpoint> = Vec::new();
        for u in urls.iter().flat_map(|u| u.as_ref().split(',')) {
            let e = Endpoint::parse(u)?;
            if !list.contains(&e) {
                list.push(e);
            }
        }
        if list.is_empty() {
            return Err(KmsError::InvalidArgument("no KMS URL given".into()));
        }
        Ok(Endpoints {
            list,
            preferred: AtomicUsize::new(NONE),
        })
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn get(&self, i: usize) -> &Endpoint {
        &self.list[i]
    }

    /// Indexes in the order to try them: the last one that answered, then the rest in order.
    pub fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let first = match self.preferred.load(Ordering::Relaxed) {
            NONE => 0,
            p => p % self.list.len(),
        };
        (0..self.list.len()).map(move |k| (first + k) % self.list.len())
    }

    /// Records that `i` answered; returns whether it is the first to, or another than last time.
    pub fn answered(&self, i: usize) -> bool {
        self.preferred.swap(i, Ordering::Relaxed) != i
    }

    /// Every URL, comma-separated, in the order given.
    pub fn joined(&self) -> String {
        let urls: Vec<&str> = self.list.iter().map(|e| e.url.as_str()).collect();
        urls.join(", ")
    }
}

/// Why one attempt at one URL gave no usable answer. Holds only URLs, error kinds and the KMS's
/// own code and message: never a request body, header or key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection was made (refused, connect timeout, TLS handshake, DNS): nothing was sent.
    NotSent(String),
    /// The request may have been sent, but no answer came (timeout, connection dropped).
    NoAnswer(String),
    /// The instance answered 5xx.
    Status {
        status: u16,
        code: String,
        message: String,
    },
}

impl Failure {
    /// Classifies a transport error of ureq.
    pub fn from_transport(t: &ureq::Transport) -> Self {
        use std::error::Error as _;
        let mut why = t.kind().to_string();
        if let Some(m) = t.message() {
            why.push_str(&format!(": {m}"));
        }
        if let Some(s) = t.source() {
            why.push_str(&format!(": {s}"));
        }
        match t.kind() {
            ureq::ErrorKind::ConnectionFailed
            | ureq::ErrorKind::Dns
            | ureq::ErrorKind::InvalidUrl
            | ureq::ErrorKind::UnknownScheme
            | ureq::ErrorKind::ProxyConnect => Failure::NotSent(why),
            _ => Failure::NoAnswer(why),
        }
    }

    /// Whether the request may go on to another URL (or another round) after this failure.
    pub fn may_move_on(&self, repeatable: bool) -> bool {
        match self {
            Failure::NotSent(_) => true,
            Failure::Status { status: 503, .. } => true,
            Failure::NoAnswer(_) | Failure::Status { .. } => repeatable,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotSent(why) => write!(f, "no connection ({why})"),
            Failure::NoAnswer(why) => write!(f, "no answer ({why})"),
            Failure::Status {
                status,
                code,
                message,
            } => write!(f, "HTTP {status} {code}: {message}"),
        }
    }
}

/// Every URL tried for one request and why each failed: the source of
/// [`KmsError::Unreachable`], whose `url` lists them all.
#[derive(Debug)]
pub struct Exhausted {
    /// (URL, last failure there, attempts there), in the order first tried.
    pub tries: Vec<(String, Failure, u32)>,
    /// Set when a request that is not repeatable stopped after it may have been handled.
    pub stopped: Option<&'static str>,
}

impl Exhausted {
    pub fn new() -> Self {
        Exhausted {
            tries: Vec::new(),
            stopped: None,
        }
    }

    pub fn record(&mut self, url: &str, failure: Failure) {
        match self.tries.iter_mut().find(|(u, ..)| u == url) {
            Some(t) => {
                t.1 = failure;
                t.2 += 1;
            }
            None => self.tries.push((url.to_string(), failure, 1)),
        }
    }

    pub fn attempts(&self) -> u32 {
        self.tries.iter().map(|t| t.2).sum()
    }
}

impl Default for Exhausted {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (url, failure, n)) in self.tries.iter().enumerate() {
            let sep = if i == 0 { "" } else { "; " };
            if *n == 1 {
                write!(f, "{sep}{url}: {failure} (tried once)")?;
            } else {
                write!(f, "{sep}{url}: {failure} (tried {n} times)")?;
            }
        }
        if let Some(op) = self.stopped {
            write!(
                f,
                "; {op} changes the key store and may have been done there, so it was not sent \
                 again: check on the KMS whether it took effect"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Exhausted {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_split_and_deduplicated() {
        let e = Endpoints::parse(&["http://127.0.0.1:1/,http://[::1]:2", "https://kms.example"])
            .unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e.get(0).host, "127.0.0.1:1");
        assert_eq!(e.get(1).host, "[::1]:2");
        assert_eq!(
            e.joined(),
            "http://127.0.0.1:1, http://[::1]:2, https://kms.example"
        );
        let e = Endpoints::parse(&["http://127.0.0.1:1", "http://127.0.0.1:1/"]).unwrap();
        assert_eq!(e.len(), 1);
        for bad in [
            "http://10.0.0.1:8200",
            "ftp://127.0.0.1",
            "127.0.0.1:8200",
            "https://",
            "",
        ] {
            assert!(Endpoints::parse(&[bad]).is_err(), "{bad:?}");
        }
        assert!(Endpoints::parse::<&str>(&[]).is_err());
    }

    #[test]
    fn the_last_url_that_answered_goes_first() {
        let e = Endpoints::parse(&["https://a", "https://b", "https://c"]).unwrap();
        assert_eq!(e.order().collect::<Vec<_>>(), [0, 1, 2]);
        assert!(e.answered(0));
        assert!(!e.answered(0));
        assert!(e.answered(1));
        assert!(!e.answered(1));
        assert_eq!(e.order().collect::<Vec<_>>(), [1, 2, 0]);
    }

    #[test]
    fn only_unsent_or_503_requests_move_on_unless_repeatable() {
        let sent = Failure::NoAnswer("timed out".into());
        let s500 = Failure::Status {
            status: 500,
            code: "KMS.0101".into(),
            message: "internal error".into(),
        };
        let s503 = Failure::Status {
            status: 503,
            code: "APIGW.0308".into(),
            message: "retry later".into(),
        };
        let unsent = Failure::NotSent("refused".into());
        for f in [&sent, &s500, &s503, &unsent] {
            assert!(f.may_move_on(true), "{f}");
        }
        assert!(unsent.may_move_on(false) && s503.may_move_on(false));
        assert!(!sent.may_move_on(false) && !s500.may_move_on(false));
        assert!(is_repeatable("decrypt-datakey") && is_repeatable("create-datakey"));
        assert!(is_repeatable("describe-key") && is_repeatable("list-grants"));
        for op in [
            "create-key",
            "rotate-on-demand",
            "create-grant",
            "disable-key",
        ] {
            assert!(!is_repeatable(op), "{op}");
        }
    }

    #[test]
    fn the_error_lists_every_url_and_why() {
        let mut x = Exhausted::new();
        x.record("http://127.0.0.1:1", Failure::NotSent("refused".into()));
        x.record(
            "http://127.0.0.1:2",
            Failure::Status {
                status: 503,
                code: "503".into(),
                message: "busy".into(),
            },
        );
        x.record(
            "http://127.0.0.1:1",
            Failure::NotSent("refused again".into()),
        );
        assert_eq!(x.attempts(), 3);
        assert_eq!(
            x.to_string(),
            "http://127.0.0.1:1: no connection (refused again) (tried 2 times); \
             http://127.0.0.1:2: HTTP 503 503: busy (tried once)"
        );
        x.stopped = Some("create-key");
        assert!(x.to_string().contains("create-key changes the key store"));
    }
}
