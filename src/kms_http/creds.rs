//! Who is calling: authenticates a request (DEW: SDK-HMAC-SHA256 signature with an access key;
//! Vault: `X-Vault-Token`) against the credentials in the key store, and checks that a key is in
//! the caller's scope. Refusals are 401 (`APIGW.0301`) for authentication, 403 for scope.

use uuid::Uuid;

use super::errors::{Api, ApiError};
use super::sign;
use super::RawRequest;
use crate::kms::{CredentialKind, KeyStore};

/// An authenticated caller (no secret: the name is what the audit log shows).
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub keys: Option<Vec<String>>,
    pub read_only: bool,
}

impl Caller {
    /// Refuses (403) a key outside the caller's scope. An unknown key passes here, so the
    /// operation itself answers 404 for it.
    pub fn check_key(&self, ks: &KeyStore, api: Api, key: &str) -> Result<(), ApiError> {
        let Some(scope) = &self.keys else {
            return Ok(());
        };
        let Ok(id) = ks.resolve_key_id(key) else {
            return Ok(());
        };
        if self.scope_ids(ks, scope).contains(&id) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                api,
                format!("credential {} may not use key {key}", self.name),
            ))
        }
    }

    /// Whether the caller may see the key `id` (in listings).
    pub fn allows_id(&self, ks: &KeyStore, id: Uuid) -> bool {
        match &self.keys {
            None => true,
            Some(scope) => self.scope_ids(ks, scope).contains(&id),
        }
    }

    fn scope_ids(&self, ks: &KeyStore, scope: &[String]) -> Vec<Uuid> {
        scope
            .iter()
            .filter_map(|k| ks.resolve_key_id(k).ok())
            .collect()
    }
}

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
    Ok(Caller {
        name: cred.name,
        keys: cred.keys,
        read_only: cred.read_only,
    })
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
        Ok(Some(c)) if c.kind == CredentialKind::Token => Ok(Caller {
            name: c.name,
            keys: c.keys,
            read_only: c.read_only,
        }),
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
