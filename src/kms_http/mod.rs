//! The key store as a network service (`cryptnbd kms serve`): the DEW KMS API (`dew.rs`, signed
//! with access keys, `sign.rs`) and the Vault Transit API (`vault.rs`, token auth), over HTTPS
//! (rustls) or — only on loopback or a Unix socket — plain HTTP, on axum/hyper + tokio.
//!
//! This module sits over [`crate::kms`] beside `server` (it knows nothing of NBD or volumes).
//! Every key store call does blocking file I/O (the store re-reads its file and fsyncs its audit
//! log), so each request's work runs on tokio's blocking pool; the async side only moves bytes.
//! Every request, refused or not, leaves one audit line naming its credential (`creds.rs`).

pub mod client;
pub mod creds;
pub mod dew;
mod dew_alias;
mod dew_fields;
pub mod errors;
pub mod limits;
pub mod sign;
pub mod vault;

use std::net::SocketAddr;
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
use tokio::net::{TcpListener, UnixListener};
use tower::ServiceExt;

use crate::kms::KeyStore;
pub use errors::{Api, ApiError, KmsHttpError};
pub use limits::Limits;

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
}

/// Told about every finished request (operation name as audited, HTTP status, time taken), e.g.
/// by the metrics endpoint (`crate::metrics::kms`).
pub trait RequestObserver: Send + Sync {
    fn request(&self, operation: &str, status: u16, took: std::time::Duration);
}

struct AppState {
    observer: Option<Arc<dyn RequestObserver>>,
    store: Arc<KeyStore>,
    limits: Limits,
    rate: limits::RateLimiter,
    permits: tokio::sync::Semaphore,
}

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

/// Reads the request (bounded body) and runs `work` on the blocking pool, under the concurrency
/// bound; then writes the audit line.
async fn run_request(
    st: Arc<AppState>,
    api: Api,
    req: Request,
    work: fn(
        &KeyStore,
        &limits::RateLimiter,
        &RawRequest,
        &mut Outcome,
    ) -> Result<Response, ApiError>,
) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, st.limits.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                api,
                StatusCode::PAYLOAD_TOO_LARGE,
                "KMS.0202",
                format!(
                    "the request body is larger than {} bytes",
                    st.limits.max_body_bytes
                ),
            )
            .into_response()
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
        let result = work(&st2.store, &st2.rate, &raw, &mut outcome);
        let (status, err) = match &result {
            Ok(r) => (r.status().as_u16(), None),
            Err(e) => (e.status.as_u16(), Some(e.message.clone())),
        };
        if let Err(e) = st2.store.audit_request(
            outcome.credential.as_deref(),
            &outcome.operation,
            outcome.key.as_deref(),
            status,
            err.as_deref(),
        ) {
            tracing::warn!(error = %chain(&e), "could not write the audit log");
        }
        tracing::info!(credential = ?outcome.credential, operation = %outcome.operation, key = ?outcome.key, status, "kms request");
        if let Some(o) = &st2.observer {
            o.request(&outcome.operation, status, started.elapsed());
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
fn dew_work(
    ks: &KeyStore,
    rate: &limits::RateLimiter,
    raw: &RawRequest,
    outcome: &mut Outcome,
) -> Result<Response, ApiError> {
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
            return Err(ApiError::new(
                Api::Dew,
                StatusCode::NOT_FOUND,
                "KMS.0201",
                "unknown path",
            ));
        }
    };
    outcome.operation = op.chars().take(64).collect();
    let caller = creds::authenticate_dew(ks, raw, project, now_unix()).map_err(|(e, name)| {
        outcome.credential = name;
        e
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

async fn dew_handler(State(st): State<Arc<AppState>>, req: Request) -> Response {
    run_request(st, Api::Dew, req, dew_work).await
}

async fn vault_handler(State(st): State<Arc<AppState>>, req: Request) -> Response {
    run_request(st, Api::Vault, req, vault::work).await
}

/// Any other path: 404, audited like every request.
fn unknown_work(
    _: &KeyStore,
    _: &limits::RateLimiter,
    raw: &RawRequest,
    outcome: &mut Outcome,
) -> Result<Response, ApiError> {
    outcome.operation = "unknown path".into();
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

/// Connections open at once (each idle one costs a task and a socket); more wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;
/// Time a client has to send a request's headers (bounds slow or idle connections).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, KmsHttpError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| KmsHttpError::TlsFile {
            path: p.clone(),
            source,
        })
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(&files.cert_chain)?)
            .filter_map(Result::ok)
            .collect();
    if certs.is_empty() {
        return Err(KmsHttpError::TlsContent {
            path: files.cert_chain.clone(),
            what: "certificate",
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.private_key)?).map_err(|_| {
        KmsHttpError::TlsContent {
            path: files.private_key.clone(),
            what: "private key",
        }
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|source| KmsHttpError::Tls {
        cert: files.cert_chain.clone(),
        source,
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A bound (not yet serving) KMS HTTP service.
pub struct KmsHttpServer {
    bound: Bound,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    local: String,
}

impl KmsHttpServer {
    /// Binds the listener and loads TLS files; refuses plain HTTP on a non-loopback address.
    pub async fn bind(store: Arc<KeyStore>, config: KmsHttpConfig) -> Result<Self, KmsHttpError> {
        Self::bind_observed(store, config, None).await
    }

    /// [`KmsHttpServer::bind`], telling `observer` about every request.
    pub async fn bind_observed(
        store: Arc<KeyStore>,
        config: KmsHttpConfig,
        observer: Option<Arc<dyn RequestObserver>>,
    ) -> Result<Self, KmsHttpError> {
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let (bound, local) = match &config.listen {
            Listen::Tcp(addr) => {
                if tls.is_none() && !addr.ip().is_loopback() {
                    return Err(KmsHttpError::PlainHttpNotLoopback { addr: *addr });
                }
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| KmsHttpError::Bind {
                        what: addr.to_string(),
                        source,
                    })?;
                let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                (Bound::Tcp(l), local)
            }
            Listen::Unix(p) => {
                let l = UnixListener::bind(p).map_err(|source| KmsHttpError::Bind {
                    what: p.display().to_string(),
                    source,
                })?;
                (Bound::Unix(l), p.display().to_string())
            }
        };
        let limits = config.limits.clone();
        let st = Arc::new(AppState {
            observer,
            store,
            rate: limits::RateLimiter::new(limits.rate_per_credential, limits.burst_per_credential),
            permits: tokio::sync::Semaphore::new(limits.max_concurrent.max(1)),
            limits,
        });
        Ok(KmsHttpServer {
            bound,
            tls,
            router: router(st),
            local,
        })
    }

    /// The bound address (`127.0.0.1:PORT`) or socket path.
    pub fn local_addr(&self) -> &str {
        &self.local
    }

    /// Serves until `shutdown` completes; connections in progress are dropped then.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => return,
                p = conns.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let accepted: std::io::Result<Box<dyn Conn>> = tokio::select! {
                _ = &mut shutdown => return,
                a = accept(&self.bound) => a,
            };
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let router = self.router.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tls {
                    Some(acc) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, acc.accept(stream)).await {
                            Ok(Ok(s)) => serve_conn(s, router).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                    None => serve_conn(stream, router).await,
                }
            });
        }
    }
}

trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Conn for T {}

async fn accept(bound: &Bound) -> std::io::Result<Box<dyn Conn>> {
    Ok(match bound {
        Bound::Tcp(l) => {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
        Bound::Unix(l) => Box::new(l.accept().await?.0),
    })
}

async fn serve_conn<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    router: Router,
) {
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
