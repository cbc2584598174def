//! The DEW grant operations (`/v1.0/{project_id}/kms/…`): `create-grant`, `list-grants`,
//! `list-retirable-grants`, `revoke-grant`, `retire-grant`, with the field names, formats and
//! pagination (`limit`, `marker` → `next_marker`, `truncated`, `total`) of huaweicloudsdkkms.
//!
//! Beyond DEW (as AWS KMS's grant constraints): `create-grant` takes an optional
//! `encryption_context_subset` object; the grant then allows its operations only when the request's
//! encryption context contains those pairs (`additional_authenticated_data` counts as the pair
//! `additional_authenticated_data=<value>`). Listings show it in each grant when set.
//!
//! Who may: `create-grant` needs the `create-grant` right on the key, and a caller who is not an
//! administrator can only grant operations it holds itself with the new grant's context; listing
//! and revoking need `manage`; `retire-grant` is for the grant's retiring principal, its grantee
//! if the grant allows `retire-grant`, or an administrator.

use serde_json::{json, Value};

use super::authz::Caller;
use super::dew_fields::bad_param;
use super::dew_fields::{page_range, Body, API};
use super::errors::ApiError;
use super::Outcome;
use crate::kms::{EncryptionContext, Grant, KeyStore, KmsError, NewGrant, PrincipalType};

/// The operations served here (`dew.rs` hands them over).
pub(super) const OPERATIONS: &[&str] = &[
    "create-grant",
    "list-grants",
    "list-retirable-grants",
    "revoke-grant",
    "retire-grant",
];

fn kms(e: KmsError) -> ApiError {
    ApiError::from_kms(API, &e, false)
}

fn grant_json(g: &Grant) -> Value {
    let mut v = json!({
        "key_id": g.key_id.to_string(),
        "grant_id": g.grant_id,
        "grantee_principal": g.grantee_principal,
        "grantee_principal_type": g.grantee_principal_type.as_str(),
        "operations": g.operations,
        "issuing_principal": g.issuing_principal,
        "creation_date": (g.creation_date * 1000).to_string(),
        "name": g.name.clone().unwrap_or_default(),
        "retiring_principal": g.retiring_principal.clone().unwrap_or_default(),
    });
    if !g.encryption_context_subset.is_empty() {
        v["encryption_context_subset"] = json!(g.encryption_context_subset);
    }
    v
}

/// One page of `all` in DEW's list shape.
fn page(body: &Body<'_>, all: Vec<&Grant>) -> Result<Value, ApiError> {
    let (start, end) = page_range(body, 100, all.len())?;
    let items = all.get(start..end).unwrap_or_default();
    let truncated = end < all.len();
    Ok(json!({
        "grants": items.iter().map(|g| grant_json(g)).collect::<Vec<_>>(),
        "next_marker": if truncated { end.to_string() } else { String::new() },
        "truncated": truncated.to_string(),
        "total": all.len(),
    }))
}

fn operations(body: &Body<'_>) -> Result<Vec<String>, ApiError> {
    match body.0.get("operations") {
        None | Some(Value::Null) => Err(ApiError::bad_request(
            API,
            "KMS.0204",
            "the parameter operations is missing",
        )),
        Some(Value::Array(l)) if l.len() <= 16 => l
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad_param("operations", "must be a list of strings"))
            })
            .collect(),
        Some(_) => Err(bad_param("operations", "must be a list of operation names")),
    }
}

fn constraint(body: &Body<'_>) -> Result<EncryptionContext, ApiError> {
    let mut c = EncryptionContext::new();
    match body.0.get("encryption_context_subset") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let v = v.as_str().ok_or_else(|| {
                    bad_param("encryption_context_subset", "must map names to strings")
                })?;
                c.insert(k.clone(), v.into());
            }
        }
        Some(_) => return Err(bad_param("encryption_context_subset", "must be an object")),
    }
    Ok(c)
}

/// Runs one grant operation for an authenticated caller.
pub(super) fn dispatch(
    ks: &KeyStore,
    caller: &Caller,
    op: &str,
    body: &Body<'_>,
    outcome: &mut Outcome,
) -> Result<Value, ApiError> {
    let none = EncryptionContext::new();
    if op == "list-retirable-grants" {
        let ix = ks.grant_index().map_err(kms)?;
        return page(body, ix.retirable_by(&caller.user_id).collect());
    }
    let key = body.str_req("key_id")?;
    outcome.key = Some(key.to_string());
    match op {
        "create-grant" => {
            let principal_type = match body.str_opt("grantee_principal_type")? {
                None | Some("user") => PrincipalType::User,
                Some("domain") => PrincipalType::Domain,
                Some(_) => {
                    return Err(bad_param(
                        "grantee_principal_type",
                        "must be user or domain",
                    ))
                }
            };
            let g = NewGrant {
                key: key.to_string(),
                grantee_principal: body.str_req("grantee_principal")?.to_string(),
                grantee_principal_type: principal_type,
                operations: operations(body)?,
                name: body.str_opt("name")?.map(str::to_string),
                retiring_principal: body.str_opt("retiring_principal")?.map(str::to_string),
                encryption_context_subset: constraint(body)?,
                issuing_principal: caller.user_id.clone(),
            };
            caller.check_id(ks, API, key, &["create-grant"], &none, outcome)?;
            if !caller.is_admin() {
                // Only what the caller holds itself, under the new grant's context (so a
                // constrained grantee can pass on no more than its own constraint allows).
                let mut probe = Outcome::default();
                for o in &g.operations {
                    caller
                        .check_id(ks, API, key, &[o], &g.encryption_context_subset, &mut probe)
                        .map_err(|_| {
                            ApiError::forbidden(
                                API,
                                format!(
                                    "credential {} cannot grant {o}: it does not hold it on key {key} with that context",
                                    caller.name
                                ),
                            )
                        })?;
                }
            }
            let grant = ks.create_grant(g).map_err(kms)?;
            Ok(json!({"grant_id": grant.grant_id}))
        }
        "list-grants" => {
            let id = caller.check_id(ks, API, key, &["manage"], &none, outcome)?;
            let ix = ks.grant_index().map_err(kms)?;
            page(body, ix.on_key(id).collect())
        }
        "revoke-grant" => {
            let grant_id = body.str_req("grant_id")?;
            let id = caller.check_id(ks, API, key, &["manage"], &none, outcome)?;
            ks.remove_grant("revoke-grant", &id.to_string(), grant_id)
                .map_err(kms)?;
            Ok(json!({}))
        }
        // The last of OPERATIONS: retire-grant.
        _ => {
            let grant_id = body.str_req("grant_id")?;
            let refused = || {
                ApiError::new(
                    API,
                    axum::http::StatusCode::NOT_FOUND,
                    "KMS.0207",
                    format!(
                        "grant {grant_id} on key {key} was not found, or credential {} may not retire it",
                        caller.name
                    ),
                )
            };
            let id = ks.resolve_key_id(key).map_err(|_| refused())?;
            outcome.key_id = Some(id);
            let ix = ks.grant_index().map_err(kms)?;
            let g = ix
                .on_key(id)
                .find(|g| g.grant_id == grant_id)
                .ok_or_else(refused)?;
            let may = caller.is_admin()
                || g.retiring_principal.as_deref() == Some(caller.user_id.as_str())
                || (g.grantee_principal == caller.user_id && g.allows("retire-grant"));
            if !may {
                outcome.grant = Some(format!(
                    "none: user {} is neither the retiring principal nor a grantee allowed to retire",
                    caller.user_id
                ));
                return Err(refused());
            }
            outcome.grant = Some(g.grant_id.clone());
            ks.remove_grant("retire-grant", &id.to_string(), grant_id)
                .map_err(kms)?;
            Ok(json!({}))
        }
    }
}
