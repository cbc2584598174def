//! TLS settings for the data path: the server certificate and key, the client CA (mutual TLS)
//! and its certificate revocation lists, and the names a client certificate proves.
//!
//! rustls with the `ring` provider: kernel TLS is not available on the machines this runs on, and
//! ring builds with a C compiler only (aws-lc-rs needs cmake/clang on a fresh machine), while its
//! AES-GCM uses AES-NI/VAES and carry-less multiply. TLS 1.3 is preferred, AES-256-GCM first (the
//! disks are AES-256; the difference to AES-128-GCM is small next to the record copies), TLS 1.2
//! with ECDHE + AES-GCM remains for older clients (nbd-client builds on old GnuTLS).
//!
//! Reload keeps serving: a reload (`policy`) loads every file into a new [`TlsConfig`] first and
//! swaps it in only when all of it is valid, so a half-copied certificate never takes the server
//! down. Connections already up keep their session unless the new CA or CRLs refuse them.
//!
//! Revocation: the CRLs are checked for the client's own certificate (the leaf), and a leaf whose
//! issuer has no CRL among them is refused (unknown status is not trusted): give the CRL of every
//! CA in `--tls-client-ca` once any is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::access::Principal;

/// Where the TLS files are; read at start and again on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain of the server, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate(s); when given, every client must present a certificate signed by one.
    pub client_ca: Option<PathBuf>,
    /// PEM certificate revocation lists (of the client CA): a client certificate listed in one is
    /// refused. Needs `client_ca`.
    pub crls: Vec<PathBuf>,
}

/// Why TLS settings could not be loaded. Names the file and what was wrong, never key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {what} from {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the client CA file {path} holds a certificate that is not a usable CA")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build a client certificate verifier from {path}")]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the certificate {cert} and key {key} do not make a usable server identity")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot read the certificate revocation list {path}")]
    Crl {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("--tls-crl {path} needs --tls-client-ca: revocation applies to client certificates")]
    CrlWithoutCa { path: PathBuf },
}

/// The server's TLS settings as loaded from the files: the rustls configuration new connections
/// use and the client certificate verifier (kept to check clients already connected again after
/// a reload: a revoked or no longer trusted certificate loses its connection). Immutable: a
/// reload loads a new one and swaps it in (see `policy`).
#[derive(Debug)]
pub struct TlsConfig {
    files: TlsFiles,
    config: Arc<ServerConfig>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl TlsConfig {
    /// Reads and checks every file; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let (config, verifier) = build(&files)?;
        Ok(Self {
            files,
            config: Arc::new(config),
            verifier,
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.verifier.is_some()
    }

    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Checks a client's certificate chain (leaf first) against the CA and CRLs of this
    /// configuration, as of now; `Err` says why it no longer passes.
    pub(crate) fn verify_client(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let Some(v) = &self.verifier else {
            return Ok(());
        };
        let Some((leaf, rest)) = chain.split_first() else {
            return Err("it presents no client certificate, and one is now required".into());
        };
        v.verify_client_cert(leaf, rest, UnixTime::now())
            .map(|_| ())
            .map_err(|e| format!("its certificate no longer verifies: {e}"))
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

type Built = (ServerConfig, Option<Arc<dyn ClientCertVerifier>>);

fn read_crls(files: &TlsFiles) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut out = Vec::new();
    for path in &files.crls {
        if files.client_ca.is_none() {
            return Err(TlsError::CrlWithoutCa { path: path.clone() });
        }
        let crls = CertificateRevocationListDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Crl {
                path: path.clone(),
                source,
            })?;
        if crls.is_empty() {
            return Err(TlsError::Empty {
                what: "certificate revocation list",
                path: path.clone(),
            });
        }
        out.extend(crls);
    }
    Ok(out)
}

fn build(files: &TlsFiles) -> Result<Built, TlsError> {
    let certs = read_certs("certificate", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
        what: "private key",
        path: files.key.clone(),
        source,
    })?;
    let provider = Arc::new(provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Identity {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    let crls = read_crls(files)?;
    let mut client_verifier = None;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("CA certificate", ca)? {
                roots.add(c).map_err(|source| TlsError::BadCa {
                    path: ca.clone(),
                    source,
                })?;
            }
            let mut vb = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !crls.is_empty() {
                // The leaf only: intermediate CAs' own CRLs are rarely at hand.
                vb = vb.with_crls(crls).only_check_end_entity_revocation();
            }
            let verifier = vb.build().map_err(|source| TlsError::Verifier {
                path: ca.clone(),
                source,
            })?;
            client_verifier = Some(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Identity {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    // NBD sessions are long-lived; resumption tickets buy nothing and add state.
    cfg.send_tls13_tickets = 0;
    Ok((cfg, client_verifier))
}

/// The names a client certificate proves, typed: its subject CNs and its SANs (DNS names, IP
/// addresses, e-mail addresses, URIs), as `--allow` matches them.
pub(crate) fn certificate_principals(der: &[u8]) -> Vec<Principal> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<Principal> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(|s| Principal::Cn(s.to_string())))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) => names.push(Principal::Dns(s.to_string())),
                GeneralName::RFC822Name(s) => names.push(Principal::Email(s.to_string())),
                GeneralName::URI(s) => names.push(Principal::Uri(s.to_string())),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(Principal::Ip(
                        std::net::Ipv4Addr::from([b[0], b[1], b[2], b[3]]).into(),
                    )),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        names.push(Principal::Ip(std::net::Ipv6Addr::from(a).into()))
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_name_the_file() {
        let e = TlsConfig::load(TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
            crls: Vec::new(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }
}
