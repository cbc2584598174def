//! Errors of the KMS HTTP service: [`KmsHttpError`] for starting it (binding, TLS files), and
//! [`ApiError`], one refused request, rendered in the format of the API that was called — DEW's
//! `{"error":{"error_code":"KMS.xxxx","error_msg":…}}` (flat `APIGW.0301` for authentication, as
//! the API gateway answers) or Vault's `{"errors":[…]}`.

use std::path::PathBuf;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::kms::{KeyState, KmsError};

/// Starting the service failed.
#[derive(Debug, thiserror::Error)]
pub enum KmsHttpError {
    #[error("binding {what}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading TLS file {}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS file {} holds no usable {what}", path.display())]
    TlsContent { path: PathBuf, what: &'static str },
    #[error("setting up TLS with {}", cert.display())]
    Tls {
        cert: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("refusing plain HTTP on {addr}: plain HTTP is only served on loopback or a Unix socket (use TLS)")]
    PlainHttpNotLoopback { addr: std::net::SocketAddr },
}

/// Which API a request came through (decides the error body format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Dew,
    Vault,
}

/// A refused request: HTTP status, the DEW error code, and a message for the caller (never a
/// secret: built from ids, states and field names only).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub api: Api,
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(
        api: Api,
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            api,
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(api: Api, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(api, StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: a bad, missing or expired signature or token.
    pub fn unauthorized(api: Api, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = match api {
            Api::Dew => format!("Incorrect IAM authentication information: {message}"),
            Api::Vault => message,
        };
        Self::new(api, StatusCode::UNAUTHORIZED, "APIGW.0301", message)
    }

    /// 403: a key or an operation outside the credential's scope.
    pub fn forbidden(api: Api, message: impl Into<String>) -> Self {
        Self::new(api, StatusCode::FORBIDDEN, "KMS.0303", message)
    }

    /// Maps a key store error onto the API's status and code.
    pub fn from_kms(api: Api, e: &KmsError, decrypting: bool) -> Self {
        use StatusCode as S;
        let (status, code) = match e {
            KmsError::KeyNotFound { .. }
            | KmsError::KeyDeleted { .. }
            | KmsError::AliasNotFound { .. } => (S::NOT_FOUND, "KMS.0207"),
            KmsError::KeyNotUsable { state, .. } | KmsError::WrongState { state, .. } => {
                (S::BAD_REQUEST, state_code(*state))
            }
            KmsError::CannotDecrypt { .. } if decrypting => (S::BAD_REQUEST, "KMS.2202"),
            KmsError::CannotDecrypt { .. } => (S::BAD_REQUEST, "KMS.0203"),
            KmsError::InvalidArgument(_) => (S::BAD_REQUEST, "KMS.0203"),
            KmsError::AliasExists { .. } => (S::BAD_REQUEST, "KMS.0212"),
            _ => {
                // Paths and I/O causes are for the operator's log, not for a network client.
                tracing::error!(error = %crate::kms_http::chain(e), "key store failure");
                return Self::new(
                    api,
                    S::INTERNAL_SERVER_ERROR,
                    "KMS.0101",
                    "internal error in the key store (see the server log)",
                );
            }
        };
        Self::new(api, status, code, e.to_string())
    }
}

/// The DEW code naming a state that refuses an operation.
fn state_code(state: KeyState) -> &'static str {
    match state {
        KeyState::Disabled => "KMS.0209",
        KeyState::PendingDeletion => "KMS.0210",
        KeyState::PendingActivation => "KMS.0208",
        KeyState::PendingImport => "KMS.0211",
        KeyState::Enabled => "KMS.0206",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match (self.api, self.code) {
            (Api::Dew, c) if c.starts_with("APIGW") => json!({
                "error_code": c,
                "error_msg": self.message,
            }),
            (Api::Dew, c) => json!({"error": {"error_code": c, "error_msg": self.message}}),
            (Api::Vault, _) => json!({"errors": [self.message]}),
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        r.headers_mut().insert(
            "x-request-id",
            HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string())
                .expect("a uuid is a header value"),
        );
        r
    }
}
