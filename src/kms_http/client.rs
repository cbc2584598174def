//! A remote KMS as a [`KeyProvider`]: a blocking DEW KMS API client (ureq + rustls) that signs
//! each request with SDK-HMAC-SHA256 (`sign.rs`), for storage hosts that hold wrapped DEKs and
//! volumes but no CMK and no root key (`serve --kms-url … --kms-credential FILE`).
//!
//! Blocking on purpose: attach already runs on a blocking path, and ureq needs no runtime, so it
//! can be called from anywhere. The client takes one or several URLs (instances sharing one key
//! store); `failover.rs` says which is tried first, what moves a request to the next (no
//! connection, a timeout, a 5xx) and what never does (an answer below 500, and a second send of an
//! operation that changes the store once it may have been handled). An answer from the KMS — a
//! disabled key, an unknown key — is final and carries the KMS's own code and reason. A short
//! connect timeout and a request timeout bound every attempt, so a dead or hung instance delays
//! only the call that asked, never a volume that is already attached.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::failover::{self, Endpoint, Endpoints, Exhausted, Failure};
use super::sign;
use crate::crypto::SecretBytes;
use crate::kms::{
    blob, DataKey, EncryptionContext, KeyProvider, KmsError, RemoteRefusal, UnwrappedDataKey,
    WrappedDataKey,
};

/// Rounds over all URLs per call when none answers (backoff 0.25 s, 0.5 s, 1 s between them):
/// an instance may be restarting.
const ROUNDS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The `--kms-credential` file: `{"access_key", "secret_key", "project_id"}` (mode 0600), as
/// written by `cryptnbd kms credential create NAME --project ID --output FILE`.
#[derive(Deserialize)]
struct CredentialFile {
    access_key: String,
    secret_key: Zeroizing<String>,
    project_id: Option<String>,
}

/// Where and how to reach the KMS.
#[derive(Debug, Clone)]
pub struct RemoteKmsConfig {
    /// One or more instances sharing one key store, in order of preference: `https://host:port`
    /// (or `http://` on loopback only); an entry may hold several separated by commas.
    pub url: Vec<String>,
    pub credential_file: PathBuf,
    /// A PEM CA bundle to trust instead of the system's web roots.
    pub ca_file: Option<PathBuf>,
}

/// How long one attempt at one URL may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// To open the TCP connection: short, so a dead host is passed over quickly.
    pub connect: Duration,
    /// For the whole request, connection and TLS handshake included.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(10),
        }
    }
}

/// A DEW KMS API client implementing [`KeyProvider`].
pub struct RemoteKms {
    endpoints: Endpoints,
    access_key: String,
    secret_key: SecretBytes,
    project: String,
    tls: Arc<rustls::ClientConfig>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for RemoteKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKms")
            .field("urls", &self.endpoints.joined())
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> KmsError {
    KmsError::InvalidArgument(msg)
}

fn agent(tls: &Arc<rustls::ClientConfig>, t: Timeouts) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(t.connect)
        .timeout(t.request)
        .tls_config(tls.clone())
        .build()
}

fn read_credential(path: &Path) -> Result<CredentialFile, KmsError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| KmsError::io("reading KMS credential file", path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KmsError::KeyFilePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > 64 * 1024 {
        return Err(invalid(format!(
            "KMS credential file {} is too large",
            path.display()
        )));
    }
    let bytes = Zeroizing::new(
        std::fs::read(path).map_err(|e| KmsError::io("reading KMS credential file", path, e))?,
    );
    serde_json::from_slice(&bytes).map_err(|e| {
        invalid(format!(
            "KMS credential file {} is not {{\"access_key\", \"secret_key\", \"project_id\"}} JSON: line {} column {}",
            path.display(),
            e.line(),
            e.column()
        ))
    })
}

fn tls_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, KmsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| KmsError::io("reading KMS CA file", p, e))?;
            for c in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
                roots
                    .add(c)
                    .map_err(|e| invalid(format!("CA file {}: {e}", p.display())))?;
            }
            if roots.is_empty() {
                return Err(invalid(format!(
                    "CA file {} holds no certificate",
                    p.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

impl RemoteKms {
    pub fn new(config: &RemoteKmsConfig) -> Result<Self, KmsError> {
        let endpoints = Endpoints::parse(&config.url)?;
        let cred = read_credential(&config.credential_file)?;
        let tls = tls_config(config.ca_file.as_deref())?;
        Ok(RemoteKms {
            endpoints,
            access_key: cred.access_key,
            secret_key: SecretBytes::new(cred.secret_key.as_bytes().to_vec()),
            project: cred.project_id.unwrap_or_else(|| "default".into()),
            agent: agent(&tls, Timeouts::default()),
            tls,
        })
    }

    /// The same client with other timeouts per attempt (the default: 2 s to connect, 10 s in
    /// all).
    pub fn with_timeouts(mut self, t: Timeouts) -> Self {
        self.agent = agent(&self.tls, t);
        self
    }

    /// Calls any DEW KMS operation (`create-key`, `encrypt-data`, …) with a JSON body and returns
    /// the JSON answer: a general signed DEW client for programs (see `examples/`).
    pub fn call_json(&self, operation: &'static str, body: &Value) -> Result<Value, KmsError> {
        self.call(operation, body).map(|(v, _)| v)
    }

    /// Calls one DEW operation, moving on to the next URL (and after a whole round, waiting and
    /// starting over) as `failover.rs` allows; returns the answer and the URL that gave it. Each
    /// attempt carries a fresh `sequence` (the API's request id): the server refuses a mutating
    /// request whose signature it has already seen, and two identical calls in the same second
    /// would otherwise be signed alike.
    fn call(&self, operation: &'static str, body: &Value) -> Result<(Value, &str), KmsError> {
        let path = format!("/v1.0/{}/kms/{operation}", self.project);
        let repeatable = failover::is_repeatable(operation);
        let mut body = body.clone();
        let mut failed = Exhausted::new();
        let mut backoff = FIRST_BACKOFF;
        for round in 1..=ROUNDS {
            for i in self.endpoints.order() {
                let ep = self.endpoints.get(i);
                if let Some(m) = body.as_object_mut() {
                    m.insert("sequence".into(), Value::String(Uuid::new_v4().to_string()));
                }
                let bytes =
                    Zeroizing::new(serde_json::to_vec(&body).expect("a JSON value serializes"));
                let failure = match self.send(ep, &path, &bytes).map_err(|e| *e) {
                    Ok(r) => return self.served(i, operation, &failed, r),
                    Err(ureq::Error::Status(status, r)) if status < 500 => {
                        return self.served(i, operation, &failed, r)
                    }
                    Err(ureq::Error::Status(status, r)) => {
                        let refusal = self.refusal(ep, operation, r);
                        Failure::Status {
                            status,
                            code: refusal.code,
                            message: refusal.message,
                        }
                    }
                    Err(ureq::Error::Transport(t)) => Failure::from_transport(&t),
                };
                tracing::warn!(url = %ep.url, operation, round, error = %failure, "KMS instance did not answer");
                let move_on = failure.may_move_on(repeatable);
                failed.record(&ep.url, failure);
                if !move_on {
                    failed.stopped = Some(operation);
                    return Err(self.unreachable(operation, failed));
                }
            }
            if round < ROUNDS {
                std::thread::sleep(backoff);
                backoff *= 2;
            }
        }
        Err(self.unreachable(operation, failed))
    }

    /// An answer below 500 from instance `i`: the JSON body, or the KMS's refusal.
    fn served(
        &self,
        i: usize,
        operation: &'static str,
        failed: &Exhausted,
        r: ureq::Response,
    ) -> Result<(Value, &str), KmsError> {
        let ep = self.endpoints.get(i);
        if self.endpoints.answered(i) || !failed.tries.is_empty() {
            tracing::info!(url = %ep.url, operation, failed = %failed, "KMS instance serving");
        } else {
            tracing::debug!(url = %ep.url, operation, "KMS answered");
        }
        match self.answer(ep, operation, r) {
            Ok(v) => Ok((v, ep.url.as_str())),
            Err(e) => Err(KmsError::RemoteRefused(Box::new(e))),
        }
    }

    fn unreachable(&self, operation: &'static str, failed: Exhausted) -> KmsError {
        KmsError::Unreachable {
            url: self.endpoints.joined(),
            operation,
            attempts: failed.attempts(),
            source: Box::new(failed),
        }
    }

    fn send(
        &self,
        ep: &Endpoint,
        path: &str,
        body: &[u8],
    ) -> Result<ureq::Response, Box<ureq::Error>> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let date = sign::format_sdk_date(now);
        let headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("host".to_string(), ep.host.clone()),
            ("x-project-id".to_string(), self.project.clone()),
            ("x-sdk-date".to_string(), date.clone()),
        ];
        let signed: Vec<String> = headers.iter().map(|(n, _)| n.clone()).collect();
        let req = sign::Request {
            method: "POST",
            path,
            query: None,
            headers: &headers,
            body,
        };
        let sts = sign::string_to_sign(&req, &signed, &date).expect("every signed header is set");
        let auth = format!(
            "{} Access={}, SignedHeaders={}, Signature={}",
            sign::ALGORITHM,
            self.access_key,
            signed.join(";"),
            sign::signature(self.secret_key.dangerous_as_bytes(), &sts)
        );
        let mut r = self.agent.post(&format!("{}{path}", ep.url));
        for (n, v) in &headers {
            r = r.set(n, v);
        }
        r.set("authorization", &auth)
            .send_bytes(body)
            .map_err(Box::new)
    }

    /// Turns a response into its JSON body, or the KMS's refusal.
    fn answer(
        &self,
        ep: &Endpoint,
        operation: &'static str,
        r: ureq::Response,
    ) -> Result<Value, RemoteRefusal> {
        let status = r.status();
        // The body may hold a plaintext data key (hex): wipe it when done.
        let mut text = Zeroizing::new(String::new());
        use std::io::Read;
        let read = r.into_reader().take(1 << 20).read_to_string(&mut text);
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status < 400 && read.is_ok() {
            return Ok(v);
        }
        let e = v.get("error").unwrap_or(&v);
        let code = e["error_code"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| status.to_string());
        let mut message = e["error_msg"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(300).collect());
        // Say what the operator of this host can check: the KMS answers alike for reasons it
        // does not disclose to a caller.
        match (status, code.as_str()) {
            (401, _) => message.push_str(&format!(
                " (access key {}: deleted or disabled on the KMS host, or a wrong secret key?)",
                self.access_key
            )),
            (404, "KMS.0207") => message.push_str(&format!(
                " (access key {}: if the key exists, this credential has no grant or scope for \
                 {operation} on it, e.g. its grant was revoked or is for another volume_id)",
                self.access_key
            )),
            _ => {}
        }
        Err(RemoteRefusal {
            url: ep.url.clone(),
            operation,
            status,
            code,
            message,
        })
    }

    /// A 5xx answer's code and reason.
    fn refusal(&self, ep: &Endpoint, operation: &'static str, r: ureq::Response) -> RemoteRefusal {
        let status = r.status();
        match self.answer(ep, operation, r) {
            Err(refusal) => refusal,
            Ok(_) => RemoteRefusal {
                url: ep.url.clone(),
                operation,
                status,
                code: status.to_string(),
                message: "the body could not be read".into(),
            },
        }
    }

    fn bad_answer(&self, url: &str, operation: &'static str, what: &str) -> KmsError {
        KmsError::RemoteRefused(Box::new(RemoteRefusal {
            url: url.to_string(),
            operation,
            status: 200,
            code: "bad-response".into(),
            message: format!("the answer has no valid {what}"),
        }))
    }

    fn hex_field(
        &self,
        (v, url): &(Value, &str),
        operation: &'static str,
        f: &str,
    ) -> Result<Vec<u8>, KmsError> {
        v[f].as_str()
            .and_then(|s| hex::decode(s).ok())
            .ok_or_else(|| self.bad_answer(url, operation, f))
    }

    /// A hex field holding a secret (a plaintext data key), decoded straight into locked pages
    /// (the response text it comes from is ordinary memory; no further plain copy is made).
    fn hex_secret(
        &self,
        (v, url): &(Value, &str),
        operation: &'static str,
        f: &str,
    ) -> Result<SecretBytes, KmsError> {
        v[f].as_str()
            .and_then(|s| {
                SecretBytes::try_fill(s.len() / 2, |out| hex::decode_to_slice(s, out)).ok()
            })
            .ok_or_else(|| self.bad_answer(url, operation, f))
    }

    /// A wrapped key as the KMS returned it; its id and version come from the blob's header.
    fn wrapped(
        &self,
        answer: &(Value, &str),
        operation: &'static str,
    ) -> Result<WrappedDataKey, KmsError> {
        let cipher_text = self.hex_field(answer, operation, "cipher_text")?;
        let p = blob::parse(&cipher_text)
            .map_err(|_| self.bad_answer(answer.1, operation, "cipher_text"))?;
        Ok(WrappedDataKey {
            key_id: p.key_id,
            key_version: p.key_version,
            cipher_text,
        })
    }
}

impl KeyProvider for RemoteKms {
    fn describe(&self) -> String {
        match self.endpoints.len() {
            1 => format!("remote KMS {}", self.endpoints.joined()),
            _ => format!(
                "remote KMS {} (failing over in this order)",
                self.endpoints.joined()
            ),
        }
    }

    fn create_data_key(
        &self,
        key: &str,
        context: &EncryptionContext,
        length_bits: u32,
    ) -> Result<DataKey, KmsError> {
        const OP: &str = "create-datakey";
        let v = self.call(
            OP,
            &json!({"key_id": key, "datakey_length": length_bits.to_string(), "encryption_context": context}),
        )?;
        let plain = self.hex_secret(&v, OP, "plain_text")?;
        if plain.len() * 8 != length_bits as usize {
            return Err(self.bad_answer(v.1, OP, "plain_text length"));
        }
        let wrapped = self.wrapped(&v, OP)?;
        Ok(DataKey {
            plain_text: plain,
            wrapped,
        })
    }

    fn decrypt_data_key(
        &self,
        key: &str,
        cipher_text: &[u8],
        context: &EncryptionContext,
    ) -> Result<UnwrappedDataKey, KmsError> {
        const OP: &str = "decrypt-datakey";
        let p = blob::parse(cipher_text).map_err(KmsError::cannot_decrypt)?;
        let (key_id, key_version) = (p.key_id, p.key_version);
        let v = self.call(
            OP,
            &json!({"key_id": key, "cipher_text": hex::encode(cipher_text), "encryption_context": context}),
        )?;
        let plain = self.hex_secret(&v, OP, "data_key")?;
        Ok(UnwrappedDataKey {
            key_id,
            key_version,
            plain_text: plain,
        })
    }

    fn re_encrypt(
        &self,
        cipher_text: &[u8],
        source_context: &EncryptionContext,
        dest_key: Option<&str>,
        dest_context: &EncryptionContext,
    ) -> Result<WrappedDataKey, KmsError> {
        const OP: &str = "re-encrypt";
        let p = blob::parse(cipher_text).map_err(KmsError::cannot_decrypt)?;
        let source = p.key_id.to_string();
        let v = self.call(
            OP,
            &json!({
                "source_key_id": source,
                "destination_key_id": dest_key.unwrap_or(&source),
                "cipher_text": hex::encode(cipher_text),
                "source_encryption_context": source_context,
                "destination_encryption_context": dest_context,
            }),
        )?;
        self.wrapped(&v, OP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred_file(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join(format!("c{mode:o}"));
        std::fs::write(
            &p,
            r#"{"access_key":"AK","secret_key":"SK","project_id":"p"}"#,
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn new(url: &str, cred: &Path) -> Result<RemoteKms, KmsError> {
        RemoteKms::new(&RemoteKmsConfig {
            url: vec![url.into()],
            credential_file: cred.to_path_buf(),
            ca_file: None,
        })
    }

    #[test]
    fn urls_and_credential_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = cred_file(dir.path(), 0o600);
        let kms = new("http://127.0.0.1:8200/", &good).unwrap();
        assert_eq!(kms.describe(), "remote KMS http://127.0.0.1:8200");
        let two = new("http://127.0.0.1:8200,https://kms.example:8443", &good).unwrap();
        assert_eq!(
            two.describe(),
            "remote KMS http://127.0.0.1:8200, https://kms.example:8443 (failing over in this order)"
        );
        assert!(new("https://kms.example:8443", &good).is_ok());
        assert!(new("http://[::1]:8200", &good).is_ok());
        for bad in [
            "http://10.0.0.1:8200",
            "ftp://127.0.0.1",
            "127.0.0.1:8200",
            "https://",
        ] {
            assert!(new(bad, &good).is_err(), "{bad}");
        }
        let open = cred_file(dir.path(), 0o644);
        assert!(matches!(
            new("https://kms.example:8443", &open),
            Err(KmsError::KeyFilePermissions { mode: 0o644, .. })
        ));
        let debug = format!("{kms:?}");
        assert!(!debug.contains("SK\""), "{debug}");
    }
}
