//! TLS settings for the data path: the server certificate and key, the optional client CA
//! (mutual TLS), the `--allow CLIENT=EXPORT[,EXPORT]` list, and reloading all of it (SIGHUP).
//!
//! rustls with the `ring` provider: kernel TLS is not available on the machines this runs on, and
//! ring builds with a C compiler only (aws-lc-rs needs cmake/clang on a fresh machine), while its
//! AES-GCM uses AES-NI/VAES and carry-less multiply. TLS 1.3 is preferred, AES-256-GCM first (the
//! disks are AES-256; the difference to AES-128-GCM is small next to the record copies), TLS 1.2
//! with ECDHE + AES-GCM remains for older clients (nbd-client builds on old GnuTLS).
//!
//! Reload keeps serving: [`TlsConfig::reload`] reads and checks every file first and swaps the
//! rustls configuration only when all of it is valid, so a half-copied certificate never takes the
//! server down. Connections already up keep their session; new ones use the new files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Where the TLS files are; read at start and again on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain of the server, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate(s); when given, every client must present a certificate signed by one.
    pub client_ca: Option<PathBuf>,
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
    #[error("--allow {0:?}: expected CLIENT=EXPORT[,EXPORT...]")]
    BadAllow(String),
}

/// `--allow` entries: which exports each client identity (a certificate CN or SAN) may list and
/// open. Empty means every client may use every export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowEntry>,
}

/// One `CLIENT=EXPORT[,EXPORT]`; the export `*` stands for every export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub client: String,
    pub exports: Vec<String>,
}

impl FromStr for AllowEntry {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        let bad = || TlsError::BadAllow(s.to_string());
        let (client, exports) = s.split_once('=').ok_or_else(bad)?;
        let exports: Vec<String> = exports
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect();
        if client.trim().is_empty() || exports.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            client: client.trim().to_string(),
            exports,
        })
    }
}

/// Which exports one connection may list and open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportAccess {
    All,
    Only(BTreeSet<String>),
}

impl ExportAccess {
    pub fn permits(&self, export: &str) -> bool {
        match self {
            ExportAccess::All => true,
            ExportAccess::Only(s) => s.contains(export),
        }
    }
}

impl AllowList {
    pub fn new(entries: Vec<AllowEntry>) -> Self {
        Self { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What a client known by `names` (its certificate's CN and SANs) may use. With entries
    /// present, a client that matches none of them gets nothing.
    pub fn access_for(&self, names: &[String]) -> ExportAccess {
        if self.entries.is_empty() {
            return ExportAccess::All;
        }
        let mut set = BTreeSet::new();
        for e in self.entries.iter().filter(|e| names.contains(&e.client)) {
            if e.exports.iter().any(|x| x == "*") {
                return ExportAccess::All;
            }
            set.extend(e.exports.iter().cloned());
        }
        ExportAccess::Only(set)
    }
}

/// The server's TLS configuration: reloadable rustls settings plus the allow list.
#[derive(Debug)]
pub struct TlsConfig {
    files: TlsFiles,
    allow: AllowList,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsConfig {
    /// Reads and checks the files.
    pub fn load(files: TlsFiles, allow: AllowList) -> Result<Self, TlsError> {
        let cfg = build(&files)?;
        Ok(Self {
            files,
            allow,
            current: RwLock::new(Arc::new(cfg)),
        })
    }

    /// Reads the files again; on success new connections use them, on error the old settings
    /// stay in force and the error says which file is wrong.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = Arc::new(build(&self.files)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }

    pub fn allow(&self) -> &AllowList {
        &self.allow
    }

    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
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
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("CA certificate", ca)? {
                roots.add(c).map_err(|source| TlsError::BadCa {
                    path: ca.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: ca.clone(),
                    source,
                })?;
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
    Ok(cfg)
}

/// The names a client certificate vouches for: its subject CNs and its SANs (DNS names, IP
/// addresses, e-mail addresses, URIs), as `--allow` matches them.
pub(crate) fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(String::from))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    names.push(s.to_string())
                }
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(std::net::Ipv4Addr::from([b[0], b[1], b[2], b[3]]).to_string()),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        names.push(std::net::Ipv6Addr::from(a).to_string())
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
    fn allow_entries_parse_and_refuse_nonsense() {
        let e: AllowEntry = "host1=disk0, disk1".parse().unwrap();
        assert_eq!(e.client, "host1");
        assert_eq!(e.exports, ["disk0", "disk1"]);
        for bad in ["host1", "=disk0", "host1=", "host1=,"] {
            assert!(bad.parse::<AllowEntry>().is_err(), "{bad}");
        }
    }

    #[test]
    fn access_is_the_union_of_matching_entries() {
        let l = AllowList::new(vec![
            "a=d0".parse().unwrap(),
            "b.example=d1,d2".parse().unwrap(),
            "root=*".parse().unwrap(),
        ]);
        let acc = l.access_for(&["x".into(), "a".into(), "b.example".into()]);
        assert!(acc.permits("d0") && acc.permits("d2") && !acc.permits("d3"));
        assert!(!l.access_for(&["nobody".into()]).permits("d0"));
        assert_eq!(l.access_for(&["root".into()]), ExportAccess::All);
        assert_eq!(AllowList::default().access_for(&[]), ExportAccess::All);
    }

    #[test]
    fn missing_files_name_the_file() {
        let e = TlsConfig::load(
            TlsFiles {
                cert: "/nonexistent/cert.pem".into(),
                key: "/nonexistent/key.pem".into(),
                client_ca: None,
            },
            AllowList::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }
}
