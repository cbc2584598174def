//! Who is calling: authenticates a request (DEW: SDK-HMAC-SHA256 signature with an access key;
//! Vault: `X-Vault-Token`) against the credentials in the key store. Refusals are 401
//! (`APIGW.0301`); what the caller may then do is `authz.rs`. An unknown access key and a wrong
//! signature get one answer (and a missing and an unknown Vault token another), so the answers do
//! not tell which credentials exist; the real reason goes to the audit log.

pub use super::authz::Caller;
use super::errors::{Api, ApiError};
use super::sign;
use super::RawRequest;
use crate::kms::{CredentialKind, KeyStore};

/// A refused authentication: what the client is told, the credential when the access key was
/// known, and the real reason (for the audit log only: the client's answer does not say whether
/// the access key exists).
#[derive(Debug)]
pub struct AuthFailure {
    pub error: ApiError,
    pub credential: Option<String>,
    pub reason: String,
}

/// Verifies a DEW request's signature; `project` is the project id in its path. The checks that
/// need no secret (date, content hash) run before the credential file is read.
pub fn authenticate_dew(
    ks: &KeyStore,
    req: &RawRequest,
    project: &str,
    now: i64,
) -> Result<Caller, AuthFailure> {
    let refuse = |e: sign::SignError, credential: Option<String>| AuthFailure {
        error: ApiError::unauthorized(Api::Dew, e.client_message()),
        credential,
        reason: e.audit_reason(),
    };
    let auth =
        sign::parse_authorization(req.header("authorization")).map_err(|e| refuse(e, None))?;
    let signed = sign::Request {
        method: &req.method,
        path: &req.path,
        query: req.query.as_deref(),
        headers: &req.headers,
        body: &req.body,
    };
    sign::check_request(&signed, &auth, now).map_err(|e| refuse(e, None))?;
    let (cred, sk) = match ks.access_key(&auth.access) {
        Ok(Some(found)) => found,
        Ok(None) => return Err(refuse(sign::SignError::UnknownAccessKey, None)),
        Err(e) => {
            return Err(AuthFailure {
                error: ApiError::from_kms(Api::Dew, &e, false),
                credential: None,
                reason: "the credential file could not be read".into(),
            })
        }
    };
    let name = Some(cred.name.clone());
    sign::verify(&signed, &auth, sk.dangerous_as_bytes(), now)
        .map_err(|e| refuse(e, name.clone()))?;
    if let Some(p) = &cred.project_id {
        if p != project {
            let message = format!("credential {} is for project {p}, not {project}", cred.name);
            return Err(AuthFailure {
                error: ApiError::forbidden(Api::Dew, message.clone()),
                credential: name,
                reason: message,
            });
        }
    }
    Ok(Caller::new(cred))
}

/// Looks up a Vault token. RGW sends `X-Vault-Token` twice: every non-empty value must be the
/// same token.
pub fn authenticate_vault(ks: &KeyStore, req: &RawRequest) -> Result<Caller, ApiError> {
    let mut values = req
        .headers
        .iter()
        .filter(|(n, _)| n == "x-vault-token")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty());
    // One answer for a missing and an unknown token, as Vault gives.
    let denied = || {
        ApiError::new(
            Api::Vault,
            axum::http::StatusCode::FORBIDDEN,
            "KMS.0303",
            "permission denied",
        )
    };
    let Some(token) = values.next() else {
        return Err(denied());
    };
    if values.any(|v| v != token) {
        return Err(ApiError::bad_request(
            Api::Vault,
            "KMS.0203",
            "X-Vault-Token is given twice with different values",
        ));
    }
    match ks.token(token) {
        Ok(Some(c)) if c.kind == CredentialKind::Token => Ok(Caller::new(c)),
        // Vault answers 403 "permission denied" for a bad token.
        Ok(_) => Err(denied()),
        Err(e) => Err(ApiError::from_kms(Api::Vault, &e, false)),
    }
}
