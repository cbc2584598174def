//! Grants (as DEW KMS and AWS KMS define them): a key's owner lets a principal (a credential's
//! user id) run named operations on one key, optionally only with an encryption context that
//! contains given pairs (AWS's `EncryptionContextSubset`; here used to limit a storage gateway to
//! the `volume_id` of its volumes). Grants hold key ids, never aliases, so moving an alias does not
//! move rights.
//!
//! They live in the `grants.json` object beside `keystore.json` (see `objects.rs`: a file in the
//! data directory, written like the store, or a RADOS object), changed by compare-and-swap.
//! Every authorization reads them, so the parsed object is cached with an index by (key id,
//! grantee) and reused while the object is at the same version (for files: inode, size and mtime,
//! one `fstat` per request with 10 000 grants; for RADOS: the backend's own version cache, see `rados.rs`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::objects::{self, Obj, Version};
use super::{EncryptionContext, KeyStore, KmsError};
use crate::crypto::SecretBytes;

pub const GRANTS_FILE: &str = "grants.json";
const FORMAT_NAME: &str = "cryptnbd-grants";
const FORMAT_VERSION: u32 = 1;
/// Pairs in an encryption-context constraint, and bytes per name or value.
const MAX_CONSTRAINT_PAIRS: usize = 8;
const MAX_CONSTRAINT_BYTES: usize = 256;

/// The operations a grant can allow (DEW's list).
pub const GRANT_OPERATIONS: &[&str] = &[
    "create-datakey",
    "create-datakey-without-plaintext",
    "encrypt-datakey",
    "decrypt-datakey",
    "describe-key",
    "create-grant",
    "retire-grant",
    "encrypt-data",
    "decrypt-data",
];

/// Who a grant is for: one user (a credential's user id) or a whole domain (account).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalType {
    User,
    Domain,
}

impl PrincipalType {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalType::User => "user",
            PrincipalType::Domain => "domain",
        }
    }
}

/// One grant as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// 64 hex digits.
    pub grant_id: String,
    pub key_id: Uuid,
    pub grantee_principal: String,
    pub grantee_principal_type: PrincipalType,
    pub operations: Vec<String>,
    /// The user id of the credential that created it (the store's domain id for the CLI).
    pub issuing_principal: String,
    /// Unix seconds.
    pub creation_date: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_principal: Option<String>,
    /// Pairs the request's encryption context must contain (beyond DEW, as AWS's constraints).
    #[serde(default, skip_serializing_if = "EncryptionContext::is_empty")]
    pub encryption_context_subset: EncryptionContext,
}

impl Grant {
    pub fn allows(&self, operation: &str) -> bool {
        self.operations.iter().any(|o| o == operation)
    }

    /// Whether `context` contains every pair of the grant's constraint.
    pub fn context_matches(&self, context: &EncryptionContext) -> bool {
        self.encryption_context_subset
            .iter()
            .all(|(k, v)| context.get(k) == Some(v))
    }
}

/// What `create_grant` is asked for; the key may be named by alias (it is stored as its id).
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub key: String,
    pub grantee_principal: String,
    pub grantee_principal_type: PrincipalType,
    pub operations: Vec<String>,
    pub name: Option<String>,
    pub retiring_principal: Option<String>,
    pub encryption_context_subset: EncryptionContext,
    pub issuing_principal: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct GrantsFile {
    format: String,
    version: u32,
    grants: Vec<Grant>,
}

/// Every grant, indexed by key and by (key, grantee) and by retiring principal.
#[derive(Debug, Default)]
pub struct GrantIndex {
    grants: Vec<Grant>,
    by_key: HashMap<Uuid, Vec<usize>>,
    by_key_grantee: HashMap<(Uuid, String), Vec<usize>>,
    by_retiring: HashMap<String, Vec<usize>>,
}

impl GrantIndex {
    /// Indexes `grants` (kept in their order).
    pub fn from_grants(grants: Vec<Grant>) -> Self {
        let mut ix = GrantIndex::default();
        for (i, g) in grants.iter().enumerate() {
            ix.by_key.entry(g.key_id).or_default().push(i);
            ix.by_key_grantee
                .entry((g.key_id, g.grantee_principal.clone()))
                .or_default()
                .push(i);
            if let Some(r) = &g.retiring_principal {
                ix.by_retiring.entry(r.clone()).or_default().push(i);
            }
        }
        ix.grants = grants;
        ix
    }

    fn pick<'a>(&'a self, idx: Option<&'a Vec<usize>>) -> impl Iterator<Item = &'a Grant> + 'a {
        idx.into_iter().flatten().map(|&i| &self.grants[i])
    }

    /// The grants on `key_id` to `grantee` (user grants) — no scan of other keys' grants.
    pub fn to_grantee(&self, key_id: Uuid, grantee: &str) -> impl Iterator<Item = &Grant> + '_ {
        self.pick(self.by_key_grantee.get(&(key_id, grantee.to_string())))
    }

    /// Every grant on `key_id`, oldest first.
    pub fn on_key(&self, key_id: Uuid) -> impl Iterator<Item = &Grant> + '_ {
        self.pick(self.by_key.get(&key_id))
    }

    /// The grants whose retiring principal is `principal`, oldest first.
    pub fn retirable_by(&self, principal: &str) -> impl Iterator<Item = &Grant> + '_ {
        self.pick(self.by_retiring.get(principal))
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

/// The last parsed grants object and its version (`None`: not read yet; inner `None`: missing).
#[derive(Debug, Default)]
pub struct GrantCache(Mutex<Option<(Option<Version>, Arc<GrantIndex>)>>);

/// Parses and checks a grants file's bytes (the golden-file test reads through this).
pub fn parse(bytes: &[u8], p: &Path) -> Result<Vec<Grant>, KmsError> {
    let corrupt = |reason: String| KmsError::Corrupt {
        path: p.to_path_buf(),
        reason,
    };
    let file: GrantsFile = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if file.format != FORMAT_NAME || file.version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format {:?} version {} (this program reads {FORMAT_NAME} version {FORMAT_VERSION})",
            file.format, file.version
        )));
    }
    Ok(file.grants)
}

pub(super) fn encode(grants: Vec<Grant>) -> Vec<u8> {
    let file = GrantsFile {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        grants,
    };
    let mut bytes = serde_json::to_vec_pretty(&file).expect("the grants file serializes");
    bytes.push(b'\n');
    bytes
}

/// `^[a-zA-Z0-9]{1,64}$`: a user or domain id (DEW's rule for grantee and retiring principals).
pub fn valid_principal(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `^[a-zA-Z0-9:/_-]{1,255}$`: a grant name.
pub fn valid_grant_name(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'/' | b'_' | b'-'))
}

/// Checks a new grant's fields; returns the operations sorted and without repeats.
fn validate(g: &NewGrant) -> Result<Vec<String>, KmsError> {
    let bad = |m: String| Err(KmsError::InvalidArgument(m));
    if !valid_principal(&g.grantee_principal) {
        return bad("grantee_principal must be 1 to 64 letters or digits (a user id)".into());
    }
    if let Some(r) = &g.retiring_principal {
        if !valid_principal(r) {
            return bad("retiring_principal must be 1 to 64 letters or digits (a user id)".into());
        }
    }
    if let Some(n) = &g.name {
        if !valid_grant_name(n) {
            return bad("name must be 1 to 255 letters, digits, ':', '/', '_' or '-'".into());
        }
    }
    let mut ops = g.operations.clone();
    ops.sort();
    ops.dedup();
    if let Some(o) = ops.iter().find(|o| !GRANT_OPERATIONS.contains(&o.as_str())) {
        return bad(format!(
            "operation {o:?} cannot be granted (one of: {})",
            GRANT_OPERATIONS.join(", ")
        ));
    }
    if ops.is_empty() || ops == ["create-grant"] {
        return bad("operations must name at least one operation besides create-grant".into());
    }
    let c = &g.encryption_context_subset;
    if c.len() > MAX_CONSTRAINT_PAIRS
        || c.iter().any(|(k, v)| {
            k.is_empty() || k.len() > MAX_CONSTRAINT_BYTES || v.len() > MAX_CONSTRAINT_BYTES
        })
    {
        return bad(format!(
            "an encryption-context constraint has at most {MAX_CONSTRAINT_PAIRS} pairs of non-empty names and values of at most {MAX_CONSTRAINT_BYTES} bytes"
        ));
    }
    Ok(ops)
}

impl KeyStore {
    /// Creates a grant on an existing (not deleted) key; returns it with its new id.
    pub fn create_grant(&self, g: NewGrant) -> Result<Grant, KmsError> {
        let r = self.create_grant_inner(&g);
        let none = EncryptionContext::new();
        let (id, err) = match &r {
            Ok(grant) => (Some(grant.key_id), None),
            Err(e) => (None, Some(e)),
        };
        self.audit_grant("create-grant", &g.key, id, r.as_ref().ok(), &none, err)?;
        r
    }

    fn create_grant_inner(&self, g: &NewGrant) -> Result<Grant, KmsError> {
        let grant = self.new_grant(g)?;
        self.append_grants(vec![grant.clone()])?;
        Ok(grant)
    }

    /// Creates many grants with one write of the file (one audit line each); all or none.
    pub fn create_grants(&self, new: &[NewGrant]) -> Result<Vec<Grant>, KmsError> {
        let grants = new
            .iter()
            .map(|g| self.new_grant(g))
            .collect::<Result<Vec<_>, _>>()?;
        self.append_grants(grants.clone())?;
        let none = EncryptionContext::new();
        for (g, n) in grants.iter().zip(new) {
            self.audit_grant("create-grant", &n.key, Some(g.key_id), Some(g), &none, None)?;
        }
        Ok(grants)
    }

    /// A checked grant with a fresh id (not stored yet).
    fn new_grant(&self, g: &NewGrant) -> Result<Grant, KmsError> {
        let operations = validate(g)?;
        let key_id = self.resolve_key_id(&g.key)?;
        Ok(Grant {
            grant_id: hex::encode(SecretBytes::random(32).dangerous_as_bytes()),
            key_id,
            grantee_principal: g.grantee_principal.clone(),
            grantee_principal_type: g.grantee_principal_type,
            operations,
            issuing_principal: g.issuing_principal.clone(),
            creation_date: self.clock.now_unix(),
            name: g.name.clone(),
            retiring_principal: g.retiring_principal.clone(),
            encryption_context_subset: g.encryption_context_subset.clone(),
        })
    }

    /// Read-modify-write of the grants object (compare-and-swap, retried: `f` may run again).
    fn change_grants<R>(
        &self,
        mut f: impl FnMut(&mut Vec<Grant>) -> Result<R, KmsError>,
    ) -> Result<R, KmsError> {
        let path = self.objects.path(Obj::Grants);
        objects::update(&*self.objects, Obj::Grants, |bytes| {
            let mut all = match bytes {
                None => Vec::new(),
                Some(b) => parse(b, &path)?,
            };
            let r = f(&mut all)?;
            Ok((Some(encode(all)), r))
        })
    }

    fn append_grants(&self, grants: Vec<Grant>) -> Result<(), KmsError> {
        self.change_grants(|all| {
            all.extend(grants.iter().cloned());
            Ok(())
        })
    }

    /// Removes grant `grant_id` from key `key` (`operation` is `revoke-grant` or `retire-grant`,
    /// for the audit line; who may do it is the caller's decision). Returns the removed grant.
    pub fn remove_grant(
        &self,
        operation: &str,
        key: &str,
        grant_id: &str,
    ) -> Result<Grant, KmsError> {
        let r = self.remove_grant_inner(key, grant_id);
        let none = EncryptionContext::new();
        let id = r.as_ref().ok().map(|g| g.key_id);
        self.audit_grant(operation, key, id, r.as_ref().ok(), &none, r.as_ref().err())?;
        r
    }

    fn remove_grant_inner(&self, key: &str, grant_id: &str) -> Result<Grant, KmsError> {
        let key_id = self.resolve_key_id(key)?;
        self.change_grants(|all| {
            let Some(i) = all
                .iter()
                .position(|g| g.key_id == key_id && g.grant_id == grant_id)
            else {
                return Err(KmsError::InvalidArgument(format!(
                    "key {key} has no grant {grant_id}"
                )));
            };
            Ok(all.remove(i))
        })
    }

    /// Every grant, parsed once per version of the object and indexed (see the module comment).
    pub fn grant_index(&self) -> Result<Arc<GrantIndex>, KmsError> {
        let mut cache = self
            .grants_cache
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let current = self.objects.version(Obj::Grants)?;
        if let Some((v, ix)) = cache.as_ref() {
            if *v == current {
                return Ok(ix.clone());
            }
        }
        let (version, grants) = match self.objects.read(Obj::Grants)? {
            None => (None, Vec::new()),
            Some((bytes, v)) => (Some(v), parse(&bytes, &self.objects.path(Obj::Grants))?),
        };
        let ix = Arc::new(GrantIndex::from_grants(grants));
        *cache = Some((version, ix.clone()));
        Ok(ix)
    }

    fn audit_grant(
        &self,
        operation: &str,
        key: &str,
        key_id: Option<Uuid>,
        grant: Option<&Grant>,
        context: &EncryptionContext,
        error: Option<&KmsError>,
    ) -> Result<(), KmsError> {
        self.append_audit(&super::AuditRecord {
            time: super::clock::rfc3339(self.clock.now_unix()),
            operation: operation.into(),
            key: Some(key.to_string()),
            key_id,
            key_version: None,
            encryption_context: context.clone(),
            outcome: if error.is_some() { "error" } else { "success" }.into(),
            error: error.map(|e| e.to_string()),
            credential: None,
            source: None,
            count: None,
            grant: grant.map(|g| g.grant_id.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::InitRoot;

    fn new_grant(key: &str, grantee: &str, ops: &[&str]) -> NewGrant {
        NewGrant {
            key: key.into(),
            grantee_principal: grantee.into(),
            grantee_principal_type: PrincipalType::User,
            operations: ops.iter().map(|s| s.to_string()).collect(),
            name: None,
            retiring_principal: Some("retirer".into()),
            encryption_context_subset: EncryptionContext::new(),
            issuing_principal: "owner".into(),
        }
    }

    #[test]
    fn grants_are_stored_by_key_id_indexed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        let k = ks.create_key("alias/vols", "").unwrap();
        assert!(ks.grant_index().unwrap().is_empty());
        let g = ks
            .create_grant(new_grant(
                "alias/vols",
                "gw1",
                &["decrypt-datakey", "create-datakey", "decrypt-datakey"],
            ))
            .unwrap();
        assert_eq!(g.key_id, k.key_id);
        assert_eq!(g.grant_id.len(), 64);
        assert_eq!(g.operations, ["create-datakey", "decrypt-datakey"]);
        let ix = ks.grant_index().unwrap();
        assert_eq!(ix.to_grantee(k.key_id, "gw1").count(), 1);
        assert_eq!(ix.to_grantee(k.key_id, "gw2").count(), 0);
        assert_eq!(ix.retirable_by("retirer").count(), 1);
        // The cache is reused while the file is unchanged, and replaced after a write.
        assert!(Arc::ptr_eq(&ix, &ks.grant_index().unwrap()));
        // Moving the alias does not move the grant.
        ks.update_alias("alias/vols", "alias/other").unwrap();
        let k2 = ks.create_key("alias/vols", "").unwrap();
        assert_eq!(
            ks.grant_index()
                .unwrap()
                .to_grantee(k2.key_id, "gw1")
                .count(),
            0
        );
        ks.remove_grant("revoke-grant", &k.key_id.to_string(), &g.grant_id)
            .unwrap();
        let ix2 = ks.grant_index().unwrap();
        assert!(!Arc::ptr_eq(&ix, &ix2));
        assert!(ix2.is_empty());
        assert!(ks
            .remove_grant("revoke-grant", &k.key_id.to_string(), &g.grant_id)
            .is_err());
        let audit = ks.audit_tail(Some(2)).unwrap();
        assert_eq!(audit[0].grant.as_deref(), Some(g.grant_id.as_str()));
    }

    #[test]
    fn invalid_grants_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        ks.create_key("alias/k", "").unwrap();
        for g in [
            new_grant("alias/k", "bad-principal", &["decrypt-datakey"]),
            new_grant("alias/k", "gw", &["create-grant"]),
            new_grant("alias/k", "gw", &[]),
            new_grant("alias/k", "gw", &["schedule-key-deletion"]),
            new_grant("alias/missing", "gw", &["decrypt-datakey"]),
        ] {
            assert!(ks.create_grant(g).is_err());
        }
        let mut g = new_grant("alias/k", "gw", &["decrypt-datakey"]);
        g.name = Some("has space".into());
        assert!(ks.create_grant(g).is_err());
        assert!(ks.grant_index().unwrap().is_empty());
    }

    #[test]
    fn context_constraint_is_a_subset_match() {
        let mut ctx = EncryptionContext::new();
        ctx.insert("volume_id".into(), "v1".into());
        let g = Grant {
            grant_id: "0".repeat(64),
            key_id: Uuid::nil(),
            grantee_principal: "gw".into(),
            grantee_principal_type: PrincipalType::User,
            operations: vec!["decrypt-datakey".into()],
            issuing_principal: "o".into(),
            creation_date: 0,
            name: None,
            retiring_principal: None,
            encryption_context_subset: ctx.clone(),
        };
        let mut req = ctx.clone();
        req.insert("store".into(), "x".into());
        assert!(g.context_matches(&req));
        req.insert("volume_id".into(), "v2".into());
        assert!(!g.context_matches(&req));
        assert!(!g.context_matches(&EncryptionContext::new()));
        assert!(g.allows("decrypt-datakey") && !g.allows("create-datakey"));
    }
}
