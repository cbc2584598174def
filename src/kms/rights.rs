//! What a network credential may do with keys: its role (`admin`: everything), its key scopes
//! (named operations on keys held by id) and the grants made to its user id (`grants.rs`), and
//! the one decision that combines them for (credential, key id, operation, encryption context).
//! The HTTP layer (`kms_http::authz`) maps a request onto an operation name and a refusal onto
//! the API's answer; the rules themselves are here, beside the records they read.
//!
//! Operation names are DEW's (the grant operations), plus `re-encrypt` and `manage` (enable,
//! disable, rotation, aliases, description, deletion, listing and revoking grants). Vault Transit
//! rights are named after its endpoints and map onto these (`transit_operations`).
//!
//! Credentials files of format 1 had no roles: `keys` absent meant every key and every operation.
//! They are read as such: such a credential becomes `admin`, one with keys gets every operation on
//! those keys (aliases resolved to ids when read), and the next write stores format 2.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::credentials::CredentialRecord;
use super::grants::{GrantIndex, PrincipalType, GRANT_OPERATIONS};
use super::store::StoreFile;
use super::{lifecycle, EncryptionContext, KmsError};

/// Operations a key scope can name besides the grant operations ([`GRANT_OPERATIONS`]).
pub const MORE_SCOPE_OPERATIONS: &[&str] = &["re-encrypt", "manage"];

/// Every operation a key scope can name: the grant operations, `re-encrypt` and `manage`.
pub fn scope_operation_names() -> impl Iterator<Item = &'static str> {
    GRANT_OPERATIONS
        .iter()
        .chain(MORE_SCOPE_OPERATIONS)
        .copied()
}

/// Vault Transit right names and the operations each one allows.
pub const TRANSIT_OPERATIONS: &[(&str, &[&str])] = &[
    ("encrypt", &["encrypt-data"]),
    ("decrypt", &["decrypt-data"]),
    (
        "datakey",
        &["create-datakey", "create-datakey-without-plaintext"],
    ),
    ("rewrap", &["re-encrypt"]),
    ("read", &["describe-key"]),
    ("manage", &["describe-key", "manage"]),
];

/// Named operations on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyScope {
    pub key_id: Uuid,
    pub operations: Vec<String>,
}

/// Why a request was allowed: which right applied (for the audit line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Admin,
    Scope,
    Grant(String),
}

impl Allowed {
    /// The audit form: `admin`, `scope`, or the grant id.
    pub fn audit(&self) -> String {
        match self {
            Allowed::Admin => "admin".into(),
            Allowed::Scope => "scope".into(),
            Allowed::Grant(id) => id.clone(),
        }
    }
}

/// Checks scope operation names (DEW names; `all` expands to every one), sorted, no repeats.
pub fn scope_operations(ops: &[String]) -> Result<Vec<String>, KmsError> {
    let mut out = Vec::new();
    for o in ops {
        if o == "all" {
            out.extend(scope_operation_names().map(str::to_string));
        } else if scope_operation_names().any(|n| n == o) {
            out.push(o.clone());
        } else {
            return Err(KmsError::InvalidArgument(format!(
                "operation {o:?} is not one of: all, {}",
                scope_operation_names().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(KmsError::InvalidArgument(
            "a key scope needs at least one operation".into(),
        ));
    }
    Ok(out)
}

/// Maps Vault Transit right names (`encrypt`, `decrypt`, `datakey`, `rewrap`, `read`, `manage`,
/// `all`) onto operation names.
pub fn transit_operations(names: &[String]) -> Result<Vec<String>, KmsError> {
    let mut out = Vec::new();
    for n in names {
        let found: Vec<&str> = if n == "all" {
            TRANSIT_OPERATIONS
                .iter()
                .flat_map(|(_, o)| o.iter().copied())
                .collect()
        } else {
            TRANSIT_OPERATIONS
                .iter()
                .find(|(t, _)| t == n)
                .map(|(_, o)| o.to_vec())
                .ok_or_else(|| {
                    let names: Vec<&str> = TRANSIT_OPERATIONS.iter().map(|(t, _)| *t).collect();
                    KmsError::InvalidArgument(format!(
                        "transit right {n:?} is not one of: all, {}",
                        names.join(", ")
                    ))
                })?
        };
        out.extend(found.into_iter().map(str::to_string));
    }
    scope_operations(&out)
}

/// Whether `op` is refused to a read-only credential.
pub fn changes_keys(op: &str) -> bool {
    matches!(op, "manage" | "create-grant" | "retire-grant")
}

/// Decides whether `c` may run `op` on key `key_id` with `context`; `domain` is this store's
/// domain id (grants of type `domain` to it apply to every credential). On refusal, says why.
pub fn decide(
    c: &CredentialRecord,
    grants: &GrantIndex,
    domain: &str,
    key_id: Uuid,
    op: &str,
    context: &EncryptionContext,
) -> Result<Allowed, String> {
    if c.read_only && changes_keys(op) {
        return Err(format!("credential {} is read-only", c.name));
    }
    if c.admin {
        return Ok(Allowed::Admin);
    }
    if c.scopes
        .iter()
        .any(|s| s.key_id == key_id && s.operations.iter().any(|o| o == op))
    {
        return Ok(Allowed::Scope);
    }
    let mut constrained = false;
    let users = grants
        .to_grantee(key_id, &c.user_id)
        .filter(|g| g.grantee_principal_type == PrincipalType::User);
    let domains = grants
        .to_grantee(key_id, domain)
        .filter(|g| g.grantee_principal_type == PrincipalType::Domain);
    for g in users.chain(domains).filter(|g| g.allows(op)) {
        if g.context_matches(context) {
            return Ok(Allowed::Grant(g.grant_id.clone()));
        }
        constrained = true;
    }
    Err(if constrained {
        format!(
            "the grants to user {} allowing {op} on key {key_id} require another encryption context",
            c.user_id
        )
    } else {
        format!(
            "no role, key scope or grant of credential {} (user {}) allows {op} on key {key_id}",
            c.name, c.user_id
        )
    })
}

/// Whether `c` holds any right on `key_id` (to show the key in listings).
pub fn sees_key(c: &CredentialRecord, grants: &GrantIndex, domain: &str, key_id: Uuid) -> bool {
    c.admin
        || c.scopes.iter().any(|s| s.key_id == key_id)
        || grants.to_grantee(key_id, &c.user_id).next().is_some()
        || grants
            .to_grantee(key_id, domain)
            .any(|g| g.grantee_principal_type == PrincipalType::Domain)
}

/// A stable user id for a format-1 credential (which had none): derived from what names it, so
/// it is the same at every read until the migrated file is written.
pub fn legacy_user_id(c: &CredentialRecord) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("cryptnbd user id\0{:?}\0{}", c.kind, c.id).as_bytes());
    hex::encode(&h[..16])
}

/// Gives format-1 records their format-2 meaning (see the module comment); returns one note per
/// credential saying what it became.
pub fn migrate_v1(records: &mut [CredentialRecord], store: &StoreFile) -> Vec<String> {
    let mut notes = Vec::new();
    for c in records {
        if c.user_id.is_empty() {
            c.user_id = legacy_user_id(c);
        }
        match c.legacy_keys.take() {
            None => {
                c.admin = true;
                notes.push(format!(
                    "credential {} (format 1, every key) is now admin",
                    c.name
                ));
            }
            Some(keys) => {
                let mut ids = Vec::new();
                for k in &keys {
                    match lifecycle::find_index(store, k) {
                        Ok(i) => ids.push(store.keys[i].key_id),
                        Err(_) => notes.push(format!(
                            "credential {}: key {k} no longer exists and is dropped from its scope",
                            c.name
                        )),
                    }
                }
                ids.sort();
                ids.dedup();
                c.scopes = ids
                    .iter()
                    .map(|&key_id| KeyScope {
                        key_id,
                        operations: scope_operation_names().map(str::to_string).collect(),
                    })
                    .collect();
                notes.push(format!(
                    "credential {} (format 1, keys {}) now has every operation on key(s) {}",
                    c.name,
                    keys.join(","),
                    ids.iter()
                        .map(Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_and_scope_names_agree() {
        assert_eq!(
            transit_operations(&["datakey".into(), "decrypt".into()]).unwrap(),
            [
                "create-datakey",
                "create-datakey-without-plaintext",
                "decrypt-data"
            ]
        );
        assert!(transit_operations(&["delete".into()]).is_err());
        assert!(scope_operations(&[]).is_err());
        assert_eq!(
            scope_operations(&["all".into()]).unwrap().len(),
            scope_operation_names().count()
        );
    }

    #[test]
    fn decisions_by_role_scope_user_and_domain_grants() {
        use crate::kms::grants::Grant;
        use crate::kms::CredentialKind;
        let key = Uuid::from_u128(7);
        let mut c = CredentialRecord {
            name: "gw".into(),
            kind: CredentialKind::AccessKey,
            id: "AK".into(),
            user_id: "u1".into(),
            project_id: None,
            admin: false,
            scopes: Vec::new(),
            legacy_keys: None,
            read_only: false,
            disabled: false,
            creation_date: 0,
            sealed_secret: None,
            token_sha256: None,
        };
        let grant = |grantee: &str, t: PrincipalType, op: &str| Grant {
            grant_id: format!("{grantee}-{op}"),
            key_id: key,
            grantee_principal: grantee.into(),
            grantee_principal_type: t,
            operations: vec![op.into()],
            issuing_principal: "o".into(),
            creation_date: 0,
            name: None,
            retiring_principal: None,
            encryption_context_subset: EncryptionContext::new(),
        };
        let ix = GrantIndex::from_grants(vec![
            grant("u1", PrincipalType::User, "decrypt-datakey"),
            grant("dom", PrincipalType::Domain, "describe-key"),
            // A user grant whose principal is the domain id does not apply to everyone.
            grant("dom", PrincipalType::User, "encrypt-datakey"),
        ]);
        let none = EncryptionContext::new();
        let d = |c: &CredentialRecord, op: &str| decide(c, &ix, "dom", key, op, &none);
        assert_eq!(
            d(&c, "decrypt-datakey"),
            Ok(Allowed::Grant("u1-decrypt-datakey".into()))
        );
        assert_eq!(
            d(&c, "describe-key"),
            Ok(Allowed::Grant("dom-describe-key".into()))
        );
        assert!(d(&c, "encrypt-datakey").is_err());
        assert!(d(&c, "manage").is_err());
        assert!(decide(&c, &ix, "dom", Uuid::from_u128(8), "decrypt-datakey", &none).is_err());
        c.scopes.push(KeyScope {
            key_id: key,
            operations: vec!["manage".into()],
        });
        assert_eq!(d(&c, "manage"), Ok(Allowed::Scope));
        c.read_only = true;
        assert!(d(&c, "manage").unwrap_err().contains("read-only"));
        c.read_only = false;
        c.admin = true;
        assert_eq!(d(&c, "create-grant"), Ok(Allowed::Admin));
        assert!(sees_key(&c, &ix, "dom", Uuid::from_u128(8)));
        c.admin = false;
        c.scopes.clear();
        assert!(sees_key(&c, &ix, "dom", key) && !sees_key(&c, &ix, "dom", Uuid::from_u128(8)));
    }
}
