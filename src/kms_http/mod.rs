//! The key store as a network service (`cryptnbd kms serve`): the DEW KMS API (`dew.rs`, signed
//! with access keys, `sign.rs`) and the Vault Transit API (`vault.rs`, token auth), over HTTPS
//! (rustls) or — only on loopback or a Unix socket — plain HTTP, on axum/hyper + tokio.
//!
//! This module sits over [`crate::kms`] beside `server` (it knows nothing of NBD or volumes).
//! Every key store call does blocking file I/O (the store re-reads its file and fsyncs its audit
//! log), so each request's work runs on tokio's blocking pool; the async side only moves bytes.
//! Every authenticated request, refused or not, leaves one audit line naming its credential
//! (`creds.rs`); requests refused before anyone is authenticated (bad signatures, unknown keys,
//! the per-address limits of `limits.rs`) are counted into aggregated lines (`failures.rs`).
//!
//! Order of the checks, cheapest and least revealing first: per-address connection cap (at
//! accept), header deadline (hyper), per-address rate, body deadline and size, then the
//! signature (the credential file is read only now), the per-credential rate, the replay cache
//! (`replay.rs`) for mutating DEW operations, and the operation itself.

pub mod authz;
pub mod client;
pub mod creds;
pub mod dew;
mod dew_alias;
mod dew_fields;
mod dew_grants;
pub mod errors;
pub mod failover;
mod failures;
pub mod limits;
mod listen;
pub mod replay;
pub mod sign;
pub mod vault;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde_json::{Map, Value};

use crate::kms::KeyStore;
pub use errors::{Api, ApiError, KmsHttpError};
pub use limits::Limits;
pub use listen::KmsHttpServer;

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Certificate chain and private key (PEM) for HTTPS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_chain: PathBuf,
    pub private_key: PathBuf,
}

/// The service's configuration. Without `tls`, TCP listeners must be on loopback.
#[derive(Debug, Clone)]
pub struct KmsHttpConfig {
    pub listen: Listen,
    pub tls: Option<TlsFiles>,
    pub limits: Limits,
}

/// A request as received, for signature checks and dispatch.
#[derive(Debug)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lower-case names; repeated headers stay repeated.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the audit line of a request records besides its status.
#[derive(Debug, Default)]
pub struct Outcome {
    pub credential: Option<String>,
    pub operation: String,
    pub key: Option<String>,
    /// Set when the request failed authentication (the real reason; the client got a uniform
    /// answer): such requests are counted into aggregated audit lines, not audited one by one.
    pub auth_failure: Option<String>,
    /// The id of the key the request was authorized for.
    pub key_id: Option<uuid::Uuid>,
    /// The right that allowed it (`admin`, `scope`, a grant id) or why none did (`none: …`).
    pub grant: Option<String>,
}

/// Told about every finished request (operation name as audited, HTTP status, time taken), e.g.
/// by the metrics endpoint (`crate::metrics::kms`).
pub trait RequestObserver: Send + Sync {
    fn request(&self, operation: &str, status: u16, took: std::time::Duration);
    /// An authorization decision: what allowed the request (`admin`, `scope`, a grant id) or
    /// why nothing did (`none: …`).
    fn authorized(&self, right: &str) {
        let _ = right;
    }
}

struct AppState {
    observer: Option<Arc<dyn RequestObserver>>,
    store: Arc<KeyStore>,
    limits: Limits,
    rate: limits::RateLimiter,
    addr_rate: limits::RateLimiter<IpAddr>,
    replay: replay::ReplayCache,
    failures: failures::FailureLog,
    permits: tokio::sync::Semaphore,
}

/// The client's IP address, put on each request by the connection that carries it (none on a
/// Unix socket, whose clients the socket's permissions already vouch for).
#[derive(Debug, Clone, Copy)]
struct Peer(Option<IpAddr>);

type Work = fn(&AppState, &RawRequest, &mut Outcome) -> Result<Response, ApiError>;

/// `e` and its sources, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parses a JSON object body (an empty body is an empty object); names the position on failure.
fn json_object(api: Api, body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            api,
            "KMS.0202",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            api,
            "KMS.0202",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// Checks the per-address rate, reads the request (bounded in size and time) and runs `work`
/// on the blocking pool, under the concurrency bound; then writes the audit line (or counts the
/// failure into an aggregated one).
async fn run_request(st: Arc<AppState>, api: Api, req: Request, work: Work) -> Response {
    let peer = req.extensions().get::<Peer>().and_then(|p| p.0);
    let (parts, body) = req.into_parts();
    let refuse = |status: StatusCode, reason: &str| {
        st.failures.record(
            &st.store,
            peer,
            None,
            "(before authentication)",
            status.as_u16(),
            reason,
        );
        if let Some(o) = &st.observer {
            o.request(
                "(before authentication)",
                status.as_u16(),
                std::time::Duration::ZERO,
            );
        }
        let mut r = ApiError::new(api, status, "APIGW.0308", reason).into_response();
        if status != StatusCode::TOO_MANY_REQUESTS {
            // The rest of the body may still be trickling in: do not wait for it.
            r.headers_mut()
                .insert("connection", axum::http::HeaderValue::from_static("close"));
        }
        r
    };
    if let Some(ip) = peer {
        if !st.addr_rate.allow(&ip) {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests from this address",
            );
        }
    }
    let limit = st.limits.max_body_bytes;
    let body =
        match tokio::time::timeout(st.limits.request_timeout, axum::body::to_bytes(body, limit))
            .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => {
                return ApiError::new(
                    api,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "KMS.0202",
                    format!("the request body is larger than {limit} bytes"),
                )
                .into_response()
            }
            Err(_) => {
                return refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time",
                )
            }
        };
    let raw = RawRequest {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    let Ok(_permit) = st.permits.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let st2 = st.clone();
    let started = std::time::Instant::now();
    let joined = tokio::task::spawn_blocking(move || {
        let mut outcome = Outcome::default();
        let result = work(&st2, &raw, &mut outcome);
        let (status, err) = match &result {
            Ok(r) => (r.status().as_u16(), None),
            Err(e) => (e.status.as_u16(), Some(e.message.clone())),
        };
        if let Some(reason) = &outcome.auth_failure {
            st2.failures.record(
                &st2.store,
                peer,
                outcome.credential.as_deref(),
                &outcome.operation,
                status,
                reason,
            );
        } else if let Err(e) = st2.store.audit_request(
            outcome.credential.as_deref(),
            &outcome.operation,
            outcome.key.as_deref(),
            outcome.key_id,
            outcome.grant.as_deref(),
            status,
            err.as_deref(),
        ) {
            tracing::warn!(error = %chain(&e), "could not write the audit log");
        }
        tracing::info!(credential = ?outcome.credential, operation = %outcome.operation, key = ?outcome.key, status, "kms request");
        if let Some(o) = &st2.observer {
            o.request(&outcome.operation, status, started.elapsed());
            if let Some(right) = outcome.grant.as_deref() {
                o.authorized(right);
            }
        }
        result
    })
    .await;
    match joined {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::new(
            api,
            StatusCode::INTERNAL_SERVER_ERROR,
            "KMS.0101",
            "internal error",
        )
        .into_response(),
    }
}

/// The DEW request path: authenticate, rate-limit, parse, dispatch.
fn dew_work(st: &AppState, raw: &RawRequest, outcome: &mut Outcome) -> Result<Response, ApiError> {
    let (ks, rate) = (&*st.store, &st.rate);
    // /v1.0/{project_id}/kms/{operation}, and the alias resources whose method is the operation:
    // kms/aliases (POST create, GET list, DELETE delete) and kms/alias/associate (POST).
    let segs: Vec<&str> = raw.path.split('/').collect();
    let (project, op, method) = match (segs.as_slice(), raw.method.as_str()) {
        (["", "v1.0", p, "kms", "aliases"], "POST") => (*p, "create-alias", "POST"),
        (["", "v1.0", p, "kms", "aliases"], "GET") => (*p, "list-aliases", "GET"),
        (["", "v1.0", p, "kms", "aliases"], "DELETE") => (*p, "delete-alias", "DELETE"),
        (["", "v1.0", p, "kms", "aliases"], _) => (*p, "aliases", "GET, POST or DELETE"),
        (["", "v1.0", p, "kms", "alias", "associate"], _) => (*p, "associate-alias", "POST"),
        (["", "v1.0", p, "kms", op], _) => (*p, *op, "POST"),
        _ => {
            outcome.operation = "dew (unknown path)".into();
            outcome.auth_failure = Some("unknown path".into());
            return Err(ApiError::new(
                Api::Dew,
                StatusCode::NOT_FOUND,
                "KMS.0201",
                "unknown path",
            ));
        }
    };
    outcome.operation = op.chars().take(64).collect();
    let caller = creds::authenticate_dew(ks, raw, project, now_unix()).map_err(|f| {
        outcome.credential = f.credential;
        outcome.auth_failure = Some(f.reason);
        f.error
    })?;
    outcome.credential = Some(caller.name.clone());
    if !rate.allow(&caller.name) {
        return Err(ApiError::new(
            Api::Dew,
            StatusCode::TOO_MANY_REQUESTS,
            "APIGW.0308",
            format!("credential {} is over its request rate", caller.name),
        ));
    }
    if raw.method != method {
        return Err(ApiError::new(
            Api::Dew,
            StatusCode::METHOD_NOT_ALLOWED,
            "KMS.0201",
            format!("use {method}"),
        ));
    }
    if !replay::is_read_only(op) {
        refuse_replay(st, raw)?;
    }
    let alias_path = segs.len() != 5 || segs[4] == "aliases";
    if alias_path {
        // list-aliases takes its parameters in the query; the others in a JSON body.
        let body = if op == "list-aliases" {
            dew_alias::query_object(raw.query.as_deref())
        } else {
            json_object(Api::Dew, &raw.body)?
        };
        let v = dew_alias::dispatch(ks, &caller, op, &dew::Body(&body), outcome)?;
        return Ok(axum::Json(v).into_response());
    }
    let body = json_object(Api::Dew, &raw.body)?;
    let v = dew::dispatch(ks, &caller, op, &dew::Body(&body), outcome)?;
    Ok(axum::Json(v).into_response())
}

/// Accepts a mutating request's signature once (see `replay.rs`). Runs after authentication, so
/// the header and date are known to be well formed.
fn refuse_replay(st: &AppState, raw: &RawRequest) -> Result<(), ApiError> {
    let signature = sign::parse_authorization(raw.header("authorization"))
        .map(|a| a.signature)
        .unwrap_or_default();
    let date = raw
        .header("x-sdk-date")
        .and_then(sign::parse_sdk_date)
        .unwrap_or_default();
    match st.replay.check(&signature, date, now_unix()) {
        Ok(()) => Ok(()),
        Err(replay::Refusal::Replayed) => Err(ApiError::unauthorized(
            Api::Dew,
            "replayed request: this signature was already used (identical requests in the same \
             second need a distinct `sequence` field)",
        )),
        Err(replay::Refusal::Full) => Err(ApiError::new(
            Api::Dew,
            StatusCode::SERVICE_UNAVAILABLE,
            "APIGW.0308",
            "too many recent requests to check them for replay: retry later",
        )),
    }
}

fn vault_work(
    st: &AppState,
    raw: &RawRequest,
    outcome: &mut Outcome,
) -> Result<Response, ApiError> {
    vault::work(&st.store, &st.rate, raw, outcome)
}

async fn dew_handler(State(st): State<Arc<AppState>>, req: Request) -> Response {
    run_request(st, Api::Dew, req, dew_work).await
}

async fn vault_handler(State(st): State<Arc<AppState>>, req: Request) -> Response {
    run_request(st, Api::Vault, req, vault_work).await
}

/// Any other path: 404, audited like every request.
fn unknown_work(
    _: &AppState,
    raw: &RawRequest,
    outcome: &mut Outcome,
) -> Result<Response, ApiError> {
    outcome.operation = "unknown path".into();
    // Nobody is authenticated on an unknown path: counted like a failed authentication.
    outcome.auth_failure = Some("unknown path".into());
    let api = if raw.path.starts_with("/v1/") {
        Api::Vault
    } else {
        Api::Dew
    };
    Err(ApiError::new(
        api,
        StatusCode::NOT_FOUND,
        "KMS.0201",
        "unknown path",
    ))
}

async fn fallback_handler(State(st): State<Arc<AppState>>, req: Request) -> Response {
    run_request(st, Api::Dew, req, unknown_work).await
}

fn router(st: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1.0/{project}/kms/{*op}", any(dew_handler))
        .route("/v1/transit/{*rest}", any(vault_handler))
        .fallback(fallback_handler)
        .with_state(st)
}
