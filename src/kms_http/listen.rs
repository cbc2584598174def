//! The listening side of the KMS HTTP service: binding (TCP or Unix, TLS or — on loopback only —
//! plain HTTP), the accept loop with its connection caps (in all, and per client address, applied
//! before a connection costs a task), the TLS handshake and header deadlines, and the periodic
//! flush of aggregated failure lines (`failures.rs`) while serving and at shutdown.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use tokio::net::{TcpListener, UnixListener};
use tower::ServiceExt;

use super::{
    failures, limits, replay, router, AppState, KmsHttpConfig, KmsHttpError, Listen, Peer,
    RequestObserver, TlsFiles,
};
use crate::kms::KeyStore;

/// Connections open at once (each idle one costs a task and a socket); more wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;

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
    state: Arc<AppState>,
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
            addr_rate: limits::RateLimiter::new(limits.rate_per_address, limits.burst_per_address),
            replay: replay::ReplayCache::new(limits.replay_cache_entries),
            failures: failures::FailureLog::default(),
            permits: tokio::sync::Semaphore::new(limits.max_concurrent.max(1)),
            limits,
        });
        Ok(KmsHttpServer {
            bound,
            tls,
            router: router(st.clone()),
            state: st,
            local,
        })
    }

    /// The bound address (`127.0.0.1:PORT`) or socket path.
    pub fn local_addr(&self) -> &str {
        &self.local
    }

    /// Serves until `shutdown` completes; connections in progress are dropped then, and the
    /// aggregated failure lines counted so far are written.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let st = self.state.clone();
        let flusher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(st.limits.audit_flush_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let st = st.clone();
                let _ = tokio::task::spawn_blocking(move || st.failures.flush(&st.store)).await;
            }
        });
        self.accept_loop(shutdown).await;
        flusher.abort();
        let st = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || st.failures.flush(&st.store)).await;
    }

    async fn accept_loop(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let per_addr = limits::ConnCounter::new(self.state.limits.max_connections_per_address);
        let timeout = self.state.limits.request_timeout;
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => return,
                p = conns.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let accepted = tokio::select! {
                _ = &mut shutdown => return,
                a = accept(&self.bound) => a,
            };
            let (stream, peer) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over its address's cap, a connection is closed at once: no task, no read.
            let slot = match peer {
                Some(ip) => match per_addr.enter(ip) {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::debug!(%ip, "connection refused: too many from this address");
                        continue;
                    }
                },
                None => None,
            };
            let router = self.router.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _slot = slot;
                let peer = Peer(peer);
                match tls {
                    Some(acc) => match tokio::time::timeout(timeout, acc.accept(stream)).await {
                        Ok(Ok(s)) => serve_conn(s, router, peer, timeout).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    },
                    None => serve_conn(stream, router, peer, timeout).await,
                }
            });
        }
    }
}

trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Conn for T {}

async fn accept(bound: &Bound) -> std::io::Result<(Box<dyn Conn>, Option<IpAddr>)> {
    Ok(match bound {
        Bound::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            (Box::new(s), Some(addr.ip().to_canonical()))
        }
        Bound::Unix(l) => (Box::new(l.accept().await?.0), None),
    })
}

async fn serve_conn<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    router: Router,
    peer: Peer,
    header_timeout: std::time::Duration,
) {
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(peer);
        router.clone().oneshot(req)
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
