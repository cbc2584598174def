//! Who may do what: an authenticated [`Caller`] (from `creds.rs`) and the checks each operation
//! makes before it touches a key. The rules (role, key scopes, grants, encryption-context
//! constraints) are [`crate::kms::rights`]; this file maps them onto the APIs' answers.
//!
//! An unknown key and a key outside the caller's rights get the same answer (404 `KMS.0207`,
//! Vault's 404), so a caller cannot probe for key ids; the real reason goes to the audit line
//! (`grant`: `none: …`), where the operator sees it. Every decision records the key id and the
//! right that allowed it (`admin`, `scope` or the grant id) in the request's [`Outcome`].

use axum::http::StatusCode;
use uuid::Uuid;

use super::errors::{Api, ApiError};
use super::Outcome;
use crate::kms::rights;
use crate::kms::{CredentialRecord, EncryptionContext, KeyStore, KmsError};

/// An authenticated caller (no secret: the name is what the audit log shows).
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub user_id: String,
    pub read_only: bool,
    record: CredentialRecord,
}

/// The one answer for "no such key" and "not yours".
fn not_found(api: Api, caller: &str, key: &str, op: &str) -> ApiError {
    ApiError::new(
        api,
        StatusCode::NOT_FOUND,
        "KMS.0207",
        format!(
            "key {key} was not found, or no role, key scope or grant of credential {caller} allows {op} on it"
        ),
    )
}

fn store_error(api: Api, e: &KmsError) -> ApiError {
    ApiError::from_kms(api, e, false)
}

impl Caller {
    pub fn new(record: CredentialRecord) -> Self {
        Caller {
            name: record.name.clone(),
            user_id: record.user_id.clone(),
            read_only: record.read_only,
            record,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.record.admin
    }

    /// Refuses (403) what only an administrator may do (create keys).
    pub fn require_admin(&self, api: Api, what: &str) -> Result<(), ApiError> {
        if self.is_admin() && !self.read_only {
            return Ok(());
        }
        Err(ApiError::forbidden(
            api,
            format!(
                "credential {} is not an administrator: it cannot {what}",
                self.name
            ),
        ))
    }

    /// Allows `key` (id or alias) for the first of `ops` that a right allows with `context`;
    /// returns its id. Records the key id and the right (or why none applied) in `outcome`.
    /// An administrator naming an unknown key gets `None` (the operation answers for it: a
    /// Vault encrypt creates the key).
    pub fn check(
        &self,
        ks: &KeyStore,
        api: Api,
        key: &str,
        ops: &[&str],
        context: &EncryptionContext,
        outcome: &mut Outcome,
    ) -> Result<Option<Uuid>, ApiError> {
        let op = ops.first().copied().unwrap_or("use");
        let id = match ks.resolve_key_id(key) {
            Ok(id) => id,
            Err(KmsError::KeyNotFound { .. } | KmsError::AliasNotFound { .. })
                if self.is_admin() =>
            {
                outcome.grant = Some("admin".into());
                return Ok(None);
            }
            Err(
                e @ (KmsError::KeyNotFound { .. }
                | KmsError::AliasNotFound { .. }
                | KmsError::KeyDeleted { .. }),
            ) => {
                outcome.grant = Some(format!("none: {e}"));
                return Err(not_found(api, &self.name, key, op));
            }
            Err(e) => return Err(store_error(api, &e)),
        };
        outcome.key_id = Some(id);
        let grants = ks.grant_index().map_err(|e| store_error(api, &e))?;
        let domain = ks.store_id().simple().to_string();
        let mut why = String::new();
        for o in ops {
            match rights::decide(&self.record, &grants, &domain, id, o, context) {
                Ok(allowed) => {
                    outcome.grant = Some(allowed.audit());
                    return Ok(Some(id));
                }
                Err(w) if why.is_empty() => why = w,
                Err(_) => {}
            }
        }
        outcome.grant = Some(format!("none: {why}"));
        Err(not_found(api, &self.name, key, op))
    }

    /// [`Caller::check`] for a key that must exist (its id is returned).
    pub fn check_id(
        &self,
        ks: &KeyStore,
        api: Api,
        key: &str,
        ops: &[&str],
        context: &EncryptionContext,
        outcome: &mut Outcome,
    ) -> Result<Uuid, ApiError> {
        match self.check(ks, api, key, ops, context, outcome)? {
            Some(id) => Ok(id),
            None => Err(not_found(
                api,
                &self.name,
                key,
                ops.first().unwrap_or(&"use"),
            )),
        }
    }

    /// `re-encrypt`: the source key needs `re-encrypt` or `decrypt-datakey`, the destination
    /// `re-encrypt` or `encrypt-datakey`. Checked without a context, so a grant limited to one
    /// does not allow re-wrapping (an administrator's or a scope's task).
    pub fn check_re_encrypt(
        &self,
        ks: &KeyStore,
        api: Api,
        source: &str,
        dest: &str,
        outcome: &mut Outcome,
    ) -> Result<(), ApiError> {
        let none = EncryptionContext::new();
        let from = ["re-encrypt", "decrypt-datakey"];
        self.check_id(ks, api, source, &from, &none, outcome)?;
        let to = ["re-encrypt", "encrypt-datakey"];
        self.check_id(ks, api, dest, &to, &none, outcome)?;
        Ok(())
    }

    /// Whether the caller holds any right on key `id` (to show it in listings).
    pub fn sees(&self, ks: &KeyStore, id: Uuid) -> bool {
        let Ok(grants) = ks.grant_index() else {
            return self.is_admin();
        };
        rights::sees_key(
            &self.record,
            &grants,
            &ks.store_id().simple().to_string(),
            id,
        )
    }

    /// Same as [`Caller::sees`] (the name the listings use).
    pub fn allows_id(&self, ks: &KeyStore, id: Uuid) -> bool {
        self.sees(ks, id)
    }
}

/// The right a DEW operation on a key needs (the key-management ones are all `manage`).
pub fn dew_right(op: &str) -> &'static str {
    match op {
        "describe-key" | "get-key-rotation-status" => "describe-key",
        "create-datakey" => "create-datakey",
        "create-datakey-without-plaintext" => "create-datakey-without-plaintext",
        "encrypt-datakey" => "encrypt-datakey",
        "decrypt-datakey" => "decrypt-datakey",
        "encrypt-data" => "encrypt-data",
        "decrypt-data" => "decrypt-data",
        "create-grant" => "create-grant",
        "retire-grant" => "retire-grant",
        _ => "manage",
    }
}
