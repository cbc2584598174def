//! Who is calling: authenticates a request (DEW: SDK-HMAC-SHA256 signature with an access key;
//! Vault: `X-Vault-Token`) against the credentials in the key store. Refusals are 401
//! (`APIGW.0301`). What the caller may then do is `authz.rs`.

pub use super::authz::Caller;
use super::errors::{Api, ApiError};
use super::sign;
use super::RawRequest;
use crate::kms::{CredentialKind, KeyStore};

/// Verifies a DEW request's signature; `project` is the project id in its path.
pub fn authenticate_dew(
    ks: &KeyStore,
    req: &RawRequest,
    project: &str,
    now: i64,
) -> Result<Caller, (ApiError, Option<String>)> {
    let unauth = |e: sign::SignError| (ApiError::unauthorized(Api::Dew, e.to_string()), None);
    let auth = sign::parse_authorization(req.header("authorization")).map_err(unauth)?;
    let (cred, sk) = match ks.access_key(&auth.access) {
        Ok(Some(found)) => found,
        Ok(None) => return Err(unauth(sign::SignError::UnknownAccessKey)),
        Err(e) => return Err((ApiError::from_kms(Api::Dew, &e, false), None)),
    };
    let name = Some(cred.name.clone());
    let signed = sign::Request {
        method: &req.method,
        path: &req.path,
        query: req.query.as_deref(),
        headers: &req.headers,
        body: &req.body,
    };
    sign::verify(&signed, &auth, sk.dangerous_as_bytes(), now).map_err(|e| {
        (
            ApiError::unauthorized(Api::Dew, e.to_string()),
            name.clone(),
        )
    })?;
    if let Some(p) = &cred.project_id {
        if p != project {
            return Err((
                ApiError::forbidden(
                    Api::Dew,
                    format!("credential {} is for project {p}, not {project}", cred.name),
                ),
                name,
            ));
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
    let Some(token) = values.next() else {
        return Err(ApiError::new(
            Api::Vault,
            axum::http::StatusCode::FORBIDDEN,
            "KMS.0303",
            "permission denied (no X-Vault-Token)",
        ));
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
        Ok(_) => Err(ApiError::new(
            Api::Vault,
            axum::http::StatusCode::FORBIDDEN,
            "KMS.0303",
            "permission denied",
        )),
        Err(e) => Err(ApiError::from_kms(Api::Vault, &e, false)),
    }
}
