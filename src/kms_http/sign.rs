//! SDK-HMAC-SHA256 request signing, as the Huawei Cloud SDKs do it (the DEW KMS API's access-key
//! authentication): a canonical request (method, canonical URI, canonical query, the signed
//! headers, the hex SHA-256 of the body) is hashed into a string to sign, and the signature is
//! HMAC-SHA256 keyed with the secret key. The server recomputes it from what it received and
//! compares in constant time; `X-Sdk-Date` must be within 15 minutes of the server's clock.
//!
//! The body hash in the canonical request is always computed from the body received, never taken
//! from the request: an `X-Sdk-Content-Sha256` header (which the SDK sends for non-JSON bodies) is
//! accepted only when it is signed and equals that hash, and `UNSIGNED-PAYLOAD` is refused, so a
//! signature always covers the body that is executed.
//!
//! The same code signs (for the remote-KMS client) and verifies (for the server), so both ends
//! agree by construction; the integration tests check the server against the official SDK.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// Largest clock difference accepted between client and server.
pub const MAX_SKEW_SECS: i64 = 15 * 60;
const EMPTY_BODY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Why a request's signature was refused (said to the client; never contains a secret).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("the Authorization header is missing")]
    Missing,
    #[error("the Authorization header is malformed: {0}")]
    Malformed(&'static str),
    #[error("the signing algorithm {0:?} is not supported (use SDK-HMAC-SHA256)")]
    Algorithm(String),
    #[error("the X-Sdk-Date header is missing, unsigned or not in the form 20060102T150405Z")]
    Date,
    #[error("signature expired: X-Sdk-Date is {0} s away from the server's time (at most 900 s)")]
    Expired(i64),
    #[error("the signed header {0:?} is not in the request")]
    MissingHeader(String),
    #[error("the access key is unknown")]
    UnknownAccessKey,
    #[error("the signature does not match")]
    Mismatch,
    #[error("X-Sdk-Content-Sha256 must be signed and equal the SHA-256 of the body (no UNSIGNED-PAYLOAD)")]
    ContentHash,
}

impl SignError {
    /// What the client is told. An unknown access key and a wrong signature get the same answer,
    /// so a caller cannot probe which access keys exist; the audit log keeps the real reason.
    pub fn client_message(&self) -> String {
        match self {
            SignError::UnknownAccessKey | SignError::Mismatch => {
                "verify aksk signature fail (unknown access key or wrong signature)".into()
            }
            other => other.to_string(),
        }
    }

    /// The reason for the audit log, without the parts that vary per request (so that failures
    /// aggregate into one line per reason).
    pub fn audit_reason(&self) -> String {
        match self {
            SignError::Expired(_) => "signature expired (X-Sdk-Date more than 900 s away)".into(),
            SignError::Algorithm(_) => "unsupported signing algorithm".into(),
            SignError::MissingHeader(_) => "a signed header is missing".into(),
            other => other.to_string(),
        }
    }
}

/// The parsed `Authorization: SDK-HMAC-SHA256 Access=…, SignedHeaders=…, Signature=…` header.
#[derive(Debug, PartialEq, Eq)]
pub struct Authorization {
    pub access: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

pub fn parse_authorization(value: Option<&str>) -> Result<Authorization, SignError> {
    let value = value.ok_or(SignError::Missing)?.trim();
    let (alg, rest) = value
        .split_once(' ')
        .ok_or(SignError::Malformed("no algorithm"))?;
    if alg != ALGORITHM {
        return Err(SignError::Algorithm(alg.chars().take(40).collect()));
    }
    let (mut access, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignError::Malformed("a part is not name=value"))?;
        match k {
            "Access" => access = Some(v.to_string()),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v.to_string()),
            _ => {}
        }
    }
    let signed_headers: Vec<String> = signed
        .ok_or(SignError::Malformed("no SignedHeaders"))?
        .split(';')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    Ok(Authorization {
        access: access.ok_or(SignError::Malformed("no Access"))?,
        signed_headers,
        signature: signature.ok_or(SignError::Malformed("no Signature"))?,
    })
}

/// What a signature covers.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent (percent-encoded).
    pub path: &'a str,
    /// The raw query string (without `?`), if any.
    pub query: Option<&'a str>,
    /// (lower-case name, value) of every header in the request.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// RFC 3986 quoting: unreserved characters stay, everything else becomes `%XX`.
fn quote(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &c in bytes {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

fn canonical_uri(path: &str) -> String {
    let decoded = percent_decode(path);
    let mut uri = decoded
        .split(|&c| c == b'/')
        .map(quote)
        .collect::<Vec<_>>()
        .join("/");
    if !uri.ends_with('/') {
        uri.push('/');
    }
    uri
}

fn canonical_query(query: Option<&str>) -> String {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The string to sign for `req`, signing `signed_headers` (lower-case) with date `date`.
pub fn string_to_sign(
    req: &Request<'_>,
    signed_headers: &[String],
    date: &str,
) -> Result<String, SignError> {
    let mut names: Vec<&String> = signed_headers.iter().collect();
    names.sort();
    let mut headers = String::new();
    for n in &names {
        let v = req
            .header(n)
            .ok_or_else(|| SignError::MissingHeader(n.chars().take(64).collect()))?;
        headers.push_str(&format!("{n}:{}\n", v.trim()));
    }
    // Always the hash of the body at hand (see the module doc and `check_request`).
    let body_hash = if req.body.is_empty() {
        EMPTY_BODY_SHA256.to_string()
    } else {
        hex::encode(Sha256::digest(req.body))
    };
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        canonical_uri(req.path),
        canonical_query(req.query),
        headers,
        names
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(";"),
        body_hash
    );
    Ok(format!(
        "{ALGORITHM}\n{date}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    ))
}

/// hex(HMAC-SHA256(secret key, string to sign)).
pub fn signature(secret_key: &[u8], string_to_sign: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret_key).expect("HMAC takes any key length");
    mac.update(string_to_sign.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Parses `YYYYMMDDTHHMMSSZ` into Unix seconds.
pub fn parse_sdk_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// Formats Unix seconds as `YYYYMMDDTHHMMSSZ`.
pub fn format_sdk_date(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The checks that need no secret (run before the access key is looked up, so they answer the
/// same whether or not it exists): a signed `X-Sdk-Date` within [`MAX_SKEW_SECS`] of `now`, and
/// an `X-Sdk-Content-Sha256`, if any, signed and equal to the body's hash. Returns the date in
/// Unix seconds.
pub fn check_request(req: &Request<'_>, auth: &Authorization, now: i64) -> Result<i64, SignError> {
    if !auth.signed_headers.iter().any(|h| h == "x-sdk-date") {
        return Err(SignError::Date);
    }
    let date = req.header("x-sdk-date").ok_or(SignError::Date)?;
    let when = parse_sdk_date(date).ok_or(SignError::Date)?;
    let skew = when - now;
    if skew.abs() > MAX_SKEW_SECS {
        return Err(SignError::Expired(skew));
    }
    let mut content = req
        .headers
        .iter()
        .filter(|(n, _)| n == "x-sdk-content-sha256");
    if let Some((_, v)) = content.next() {
        let signed = auth
            .signed_headers
            .iter()
            .any(|h| h == "x-sdk-content-sha256");
        let actual = hex::encode(Sha256::digest(req.body));
        if !signed || content.next().is_some() || !v.trim().eq_ignore_ascii_case(&actual) {
            return Err(SignError::ContentHash);
        }
    }
    Ok(when)
}

/// Verifies `req` against `auth` with `secret_key`, at server time `now` (Unix seconds):
/// [`check_request`], then the signature.
pub fn verify(
    req: &Request<'_>,
    auth: &Authorization,
    secret_key: &[u8],
    now: i64,
) -> Result<(), SignError> {
    check_request(req, auth, now)?;
    let date = req.header("x-sdk-date").ok_or(SignError::Date)?;
    let sts = string_to_sign(req, &auth.signed_headers, date)?;
    let expected = signature(secret_key, &sts);
    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(())
    } else {
        Err(SignError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(parse_sdk_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_sdk_date("20261201T120000Z"), Some(1_796_126_400));
        assert_eq!(format_sdk_date(1_796_126_400), "20261201T120000Z");
        for bad in [
            "2026-12-01T12:00:00Z",
            "20261301T120000Z",
            "2026120xT120000Z",
            "",
        ] {
            assert_eq!(parse_sdk_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(
            canonical_uri("/v1.0/p/kms/create-key"),
            "/v1.0/p/kms/create-key/"
        );
        assert_eq!(canonical_uri("/a%20b/c"), "/a%20b/c/");
        assert_eq!(canonical_query(Some("marker=&b=2&a=1")), "a=1&b=2&marker=");
        assert_eq!(canonical_query(None), "");
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let headers = vec![
            ("host".to_string(), "127.0.0.1:1".to_string()),
            ("x-sdk-date".to_string(), format_sdk_date(1000)),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        let req = Request {
            method: "POST",
            path: "/v1.0/p/kms/describe-key",
            query: None,
            headers: &headers,
            body: b"{\"key_id\":\"x\"}",
        };
        let signed: Vec<String> = ["content-type", "host", "x-sdk-date"]
            .map(String::from)
            .to_vec();
        let sts = string_to_sign(&req, &signed, &format_sdk_date(1000)).unwrap();
        let auth = Authorization {
            access: "AK".into(),
            signed_headers: signed,
            signature: signature(b"sk", &sts),
        };
        assert_eq!(verify(&req, &auth, b"sk", 1000), Ok(()));
        assert_eq!(verify(&req, &auth, b"sk2", 1000), Err(SignError::Mismatch));
        assert!(matches!(
            verify(&req, &auth, b"sk", 1000 + 901),
            Err(SignError::Expired(-901))
        ));
        let tampered = Request {
            body: b"{\"key_id\":\"y\"}",
            ..req
        };
        assert_eq!(
            verify(&tampered, &auth, b"sk", 1000),
            Err(SignError::Mismatch)
        );
        let header = format!(
            "SDK-HMAC-SHA256 Access=AK, SignedHeaders=content-type;host;x-sdk-date, Signature={}",
            auth.signature
        );
        assert_eq!(parse_authorization(Some(&header)).unwrap(), auth);
        assert!(matches!(
            parse_authorization(Some("V11-HMAC-SHA256 Access=a")),
            Err(SignError::Algorithm(_))
        ));
    }

    /// The attack of issue 20: a signature made for one body, resent with another body and an
    /// `X-Sdk-Content-Sha256` naming the first body's hash.
    #[test]
    fn content_hash_header_cannot_substitute_the_body() {
        let date = format_sdk_date(1000);
        let base = vec![
            ("host".to_string(), "127.0.0.1:1".to_string()),
            ("x-sdk-date".to_string(), date.clone()),
        ];
        let first: &[u8] = br#"{"key_id":"alias/a"}"#;
        let other: &[u8] = br#"{"key_id":"alias/victim"}"#;
        let names: Vec<String> = ["host", "x-sdk-date"].map(String::from).to_vec();
        let req = |headers: &'static [(String, String)], body: &'static [u8]| Request {
            method: "POST",
            path: "/v1.0/p/kms/describe-key",
            query: None,
            headers,
            body,
        };
        let leak = |v: Vec<(String, String)>| -> &'static [(String, String)] { v.leak() };
        let plain = leak(base.clone());
        let sts = string_to_sign(&req(plain, first), &names, &date).unwrap();
        let auth = Authorization {
            access: "AK".into(),
            signed_headers: names.clone(),
            signature: signature(b"sk", &sts),
        };
        assert_eq!(verify(&req(plain, first), &auth, b"sk", 1000), Ok(()));
        let mut with_hash = base.clone();
        with_hash.push((
            "x-sdk-content-sha256".into(),
            hex::encode(Sha256::digest(first)),
        ));
        let with_hash = leak(with_hash);
        assert_eq!(
            verify(&req(with_hash, other), &auth, b"sk", 1000),
            Err(SignError::ContentHash),
            "an unsigned content hash is refused"
        );
        // Signed, but naming another body than the one sent.
        let mut signed_names = names.clone();
        signed_names.push("x-sdk-content-sha256".into());
        let sts = string_to_sign(&req(with_hash, first), &signed_names, &date).unwrap();
        let auth2 = Authorization {
            access: "AK".into(),
            signed_headers: signed_names.clone(),
            signature: signature(b"sk", &sts),
        };
        assert_eq!(verify(&req(with_hash, first), &auth2, b"sk", 1000), Ok(()));
        assert_eq!(
            verify(&req(with_hash, other), &auth2, b"sk", 1000),
            Err(SignError::ContentHash)
        );
        let mut unsigned_payload = base;
        unsigned_payload.push(("x-sdk-content-sha256".into(), "UNSIGNED-PAYLOAD".into()));
        let unsigned_payload = leak(unsigned_payload);
        assert_eq!(
            verify(&req(unsigned_payload, first), &auth2, b"sk", 1000),
            Err(SignError::ContentHash)
        );
    }
}
