//! CMK lifecycle: create, describe, list, enable, disable, schedule/cancel deletion, rotate,
//! rotation intervals and aliases; plus the read/transaction plumbing every operation goes through.
//!
//! States follow KMS: create → 2 Enabled; disable → 3; enable → 2; schedule deletion (7–1096
//! days) → 4 with a date; cancel → 3 Disabled (as in KMS: a key comes back disabled, so a user
//! re-enables it on purpose). Time-based changes are applied lazily, on the next access by any
//! operation, and persisted: past its deletion date a key's material is destroyed, leaving a
//! tombstone (so errors can say "key X was deleted on DATE") and freeing its alias; a key with a
//! rotation interval gets a new version once the interval since its newest version has passed.

use uuid::Uuid;

use super::objects::{self, Obj};
use super::store::{self, KeyRecord, StoreFile, VersionRecord};
use super::{blob, clock, EncryptionContext, KeyMetadata, KeyState, KeyStore, KmsError};
use crate::crypto::{aead, Key256};

pub(super) const MIN_PENDING_DAYS: u32 = 7;
pub(super) const MAX_PENDING_DAYS: u32 = 1096;
pub(super) const MIN_ROTATION_DAYS: u32 = 30;
pub(super) const MAX_ROTATION_DAYS: u32 = 365;
const MAX_ALIAS_LEN: usize = 255;
const MAX_DESCRIPTION_LEN: usize = 8192;
const DAY: u64 = 86_400;

/// Something the lazy maintenance did, to be audited after it is saved.
enum Maintenance {
    Deleted(Uuid),
    Rotated(Uuid, u32),
}

/// `name` or `alias/name` → `alias/name`, checking the charset `[A-Za-z0-9/_-]`.
pub fn normalize_alias(alias: &str) -> Result<String, KmsError> {
    let name = alias.strip_prefix("alias/").unwrap_or(alias);
    let bad = |why: &str| KmsError::InvalidArgument(format!("alias {alias:?} {why}"));
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.len() > MAX_ALIAS_LEN {
        return Err(bad(&format!("is longer than {MAX_ALIAS_LEN} characters")));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-'))
    {
        return Err(bad("may only contain letters, digits, '/', '_' and '-'"));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(bad("looks like a key id; pick a name that does not"));
    }
    Ok(format!("alias/{name}"))
}

fn metadata(k: &KeyRecord) -> KeyMetadata {
    KeyMetadata {
        key_id: k.key_id,
        key_alias: k.key_alias.clone().unwrap_or_default(),
        key_description: k.key_description.clone(),
        key_state: k.state(),
        creation_date: k.creation_date,
        scheduled_deletion_date: k.scheduled_deletion_date,
        current_version: k.versions.last().map(|v| v.version).unwrap_or(0),
        version_count: k.versions.len() as u32,
        rotation_interval_days: k.rotation_interval_days,
    }
}

/// Finds a key by id or alias. A tombstone gives `KeyDeleted`.
pub(super) fn find_index(file: &StoreFile, key: &str) -> Result<usize, KmsError> {
    let deleted = |k: &KeyRecord| KmsError::KeyDeleted {
        key_id: k.key_id,
        date: clock::date(k.deletion_date.unwrap_or(0)),
    };
    if let Ok(id) = Uuid::parse_str(key) {
        return match file.keys.iter().position(|k| k.key_id == id) {
            Some(i) if file.keys[i].is_deleted() => Err(deleted(&file.keys[i])),
            Some(i) => Ok(i),
            None => Err(KmsError::KeyNotFound { key: key.into() }),
        };
    }
    let alias = if key.starts_with("alias/") {
        key.to_string()
    } else {
        format!("alias/{key}")
    };
    if let Some(i) = alias_owner(file, &alias) {
        return Ok(i);
    }
    match file
        .keys
        .iter()
        .rfind(|k| k.former_alias.as_deref() == Some(alias.as_str()))
    {
        Some(k) => Err(deleted(k)),
        None => Err(KmsError::KeyNotFound { key: key.into() }),
    }
}

/// The index of the key that has `alias` (normalized) among its aliases.
pub(super) fn alias_owner(file: &StoreFile, alias: &str) -> Option<usize> {
    file.keys.iter().position(|k| k.has_alias(alias))
}

/// Refuses unless the key is enabled.
pub(super) fn require_enabled(k: &KeyRecord) -> Result<(), KmsError> {
    match k.state() {
        KeyState::Enabled => Ok(()),
        state => Err(KmsError::KeyNotUsable {
            key_id: k.key_id,
            state,
        }),
    }
}

impl KeyStore {
    /// Reads the store under a shared lock; if time-based maintenance is due, applies it in a
    /// write transaction first.
    pub(super) fn snapshot(&self) -> Result<StoreFile, KmsError> {
        let file = {
            let _lock = self.objects.lock(false)?;
            let file = store::load_from(&*self.objects)?;
            self.same_store(file)?
        };
        if self.maintenance_due(&file) {
            return self.transact(|f, _| Ok(f.clone()));
        }
        Ok(file)
    }

    /// Read-modify-write as one compare-and-swap of the store object (retried if another writer
    /// got in between, so `f` may run more than once). `f` sees the store after maintenance; the
    /// store is written only if `f` succeeds (or maintenance changed something).
    pub(super) fn transact<T>(
        &self,
        mut f: impl FnMut(&mut StoreFile, u64) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let mut events = Vec::new();
        let path = self.objects.path(Obj::Keystore);
        let result = objects::update(&*self.objects, Obj::Keystore, |bytes| {
            let bytes = bytes.ok_or_else(|| store::missing(&*self.objects))?;
            let mut file = self.same_store(store::parse(bytes, &path)?)?;
            let now = self.clock.now_unix();
            events = self.maintain(&mut file, now);
            let unchanged = file.clone();
            Ok(match f(&mut file, now) {
                Ok(v) => (Some(store::encode(&file)), Ok(v)),
                // `f` may have changed `file` before failing: persist only the maintenance.
                Err(e) => (
                    (!events.is_empty()).then(|| store::encode(&unchanged)),
                    Err(e),
                ),
            })
        })?;
        let none = EncryptionContext::new();
        for ev in events {
            match ev {
                Maintenance::Deleted(id) => {
                    self.audit("delete-key", None, Some(id), None, &none, None)?
                }
                Maintenance::Rotated(id, v) => {
                    self.audit("rotate-key-automatic", None, Some(id), Some(v), &none, None)?
                }
            }
        }
        result
    }

    /// Refuses a store object that is not the store this handle opened.
    fn same_store(&self, file: StoreFile) -> Result<StoreFile, KmsError> {
        if file.store_id != self.store_id {
            return Err(KmsError::Corrupt {
                path: self.objects.path(Obj::Keystore),
                reason: format!(
                    "it is now key store {}, not the store {} that was opened (was it replaced?)",
                    file.store_id, self.store_id
                ),
            });
        }
        Ok(file)
    }

    fn maintenance_due(&self, file: &StoreFile) -> bool {
        let now = self.clock.now_unix();
        file.keys
            .iter()
            .any(|k| deletion_due(k, now) || rotation_due(k, now))
    }

    fn maintain(&self, file: &mut StoreFile, now: u64) -> Vec<Maintenance> {
        let mut events = Vec::new();
        for i in 0..file.keys.len() {
            if deletion_due(&file.keys[i], now) {
                let k = &mut file.keys[i];
                // Crypto-shredding: with the sealed material gone, nothing it wrapped opens again.
                k.versions.clear();
                k.former_alias = k.key_alias.take();
                k.more_aliases.clear();
                k.deletion_date = k.scheduled_deletion_date.or(Some(now));
                k.rotation_interval_days = None;
                events.push(Maintenance::Deleted(k.key_id));
            } else if rotation_due(&file.keys[i], now) {
                let v = self.add_version(file.store_id, &mut file.keys[i], now);
                events.push(Maintenance::Rotated(file.keys[i].key_id, v));
            }
        }
        events
    }

    /// Adds a fresh version of key material, sealed under the root key; returns its number.
    fn add_version(&self, store_id: Uuid, k: &mut KeyRecord, now: u64) -> u32 {
        let version = k.versions.len() as u32 + 1;
        let material = Key256::generate();
        let sealed = aead::seal(
            &self.root,
            &blob::material_aad(store_id, k.key_id, version),
            material.dangerous_as_bytes(),
        );
        k.versions.push(VersionRecord {
            version,
            creation_date: now,
            material: hex::encode(sealed),
        });
        version
    }

    /// Unseals one version of a key's material.
    pub(super) fn material(
        &self,
        file: &StoreFile,
        k: &KeyRecord,
        version: u32,
    ) -> Result<Key256, KmsError> {
        let corrupt = |reason: String| KmsError::Corrupt {
            path: self.objects.path(Obj::Keystore),
            reason,
        };
        let v = k
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| {
                KmsError::cannot_decrypt(format!("key {} has no version {version}", k.key_id))
            })?;
        let sealed = hex::decode(&v.material)
            .map_err(|e| corrupt(format!("key {} version {version}: {e}", k.key_id)))?;
        // Unsealed straight into the key's locked pages (no intermediate copy of the material).
        let aad = blob::material_aad(file.store_id, k.key_id, version);
        if sealed.len() != aead::OVERHEAD + 32 {
            return Err(corrupt(format!(
                "key {} version {version}: sealed material is {} bytes, expected {}",
                k.key_id,
                sealed.len(),
                aead::OVERHEAD + 32
            )));
        }
        Key256::try_fill(|out| aead::open_into(&self.root, &aad, &sealed, out)).map_err(|_| {
            corrupt(format!(
                "the material of key {} version {version} does not open under the root key",
                k.key_id
            ))
        })
    }

    /// `key` is a key id (UUID) or an alias (`alias/name`, or `name`).
    pub fn describe_key(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        let r = self
            .snapshot()
            .and_then(|f| find_index(&f, key).map(|i| metadata(&f.keys[i])));
        self.finish(
            "describe-key",
            Some(key),
            &EncryptionContext::new(),
            r,
            |m| (Some(m.key_id), None),
        )
    }

    /// The id of the key named by `key` (id or alias), without an audit line: for checking a
    /// credential's key scope before the operation (which is audited) runs.
    pub fn resolve_key_id(&self, key: &str) -> Result<Uuid, KmsError> {
        let f = self.snapshot()?;
        find_index(&f, key).map(|i| f.keys[i].key_id)
    }

    /// All keys that are not deleted, in creation order.
    pub fn list_keys(&self) -> Result<Vec<KeyMetadata>, KmsError> {
        let f = self.snapshot()?;
        Ok(f.keys
            .iter()
            .filter(|k| !k.is_deleted())
            .map(metadata)
            .collect())
    }

    pub fn create_key(&self, alias: &str, description: &str) -> Result<KeyMetadata, KmsError> {
        let r = normalize_alias(alias).and_then(|alias| {
            if description.len() > MAX_DESCRIPTION_LEN {
                return Err(KmsError::InvalidArgument(format!(
                    "the description is longer than {MAX_DESCRIPTION_LEN} bytes"
                )));
            }
            self.transact(|f, now| {
                if let Some(i) = alias_owner(f, &alias) {
                    return Err(KmsError::AliasExists {
                        alias: alias.clone(),
                        key_id: f.keys[i].key_id,
                    });
                }
                let mut k = KeyRecord {
                    key_id: Uuid::new_v4(),
                    key_alias: Some(alias.clone()),
                    former_alias: None,
                    key_description: description.to_string(),
                    key_state: KeyState::Enabled.code(),
                    creation_date: now,
                    scheduled_deletion_date: None,
                    deletion_date: None,
                    rotation_interval_days: None,
                    versions: Vec::new(),
                    more_aliases: Vec::new(),
                };
                self.add_version(f.store_id, &mut k, now);
                let m = metadata(&k);
                f.keys.push(k);
                Ok(m)
            })
        });
        self.finish(
            "create-key",
            Some(alias),
            &EncryptionContext::new(),
            r,
            |m| (Some(m.key_id), Some(m.current_version)),
        )
    }

    /// Applies `change` to one key in a transaction, audits it, returns the new metadata.
    fn change_key(
        &self,
        operation: &'static str,
        key: &str,
        change: impl Fn(&mut KeyRecord, &mut StoreFile, u64) -> Result<(), KmsError>,
    ) -> Result<KeyMetadata, KmsError> {
        let r = self.transact(|f, now| {
            let i = find_index(f, key)?;
            let mut k = f.keys[i].clone();
            change(&mut k, f, now)?;
            let m = metadata(&k);
            f.keys[i] = k;
            Ok(m)
        });
        self.finish(operation, Some(key), &EncryptionContext::new(), r, |m| {
            (Some(m.key_id), Some(m.current_version))
        })
    }

    pub fn enable_key(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        self.change_key("enable-key", key, |k, _, _| match k.state() {
            KeyState::Enabled | KeyState::Disabled => {
                k.key_state = KeyState::Enabled.code();
                Ok(())
            }
            state => Err(KmsError::WrongState {
                key_id: k.key_id,
                state,
                operation: "enable (cancel its deletion first)",
            }),
        })
    }

    pub fn disable_key(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        self.change_key("disable-key", key, |k, _, _| match k.state() {
            KeyState::Enabled | KeyState::Disabled => {
                k.key_state = KeyState::Disabled.code();
                Ok(())
            }
            state => Err(KmsError::WrongState {
                key_id: k.key_id,
                state,
                operation: "disable",
            }),
        })
    }

    pub fn schedule_key_deletion(
        &self,
        key: &str,
        pending_days: u32,
    ) -> Result<KeyMetadata, KmsError> {
        self.change_key("schedule-key-deletion", key, |k, _, now| {
            if !(MIN_PENDING_DAYS..=MAX_PENDING_DAYS).contains(&pending_days) {
                return Err(KmsError::InvalidArgument(format!(
                    "the waiting period must be {MIN_PENDING_DAYS} to {MAX_PENDING_DAYS} days, not {pending_days}"
                )));
            }
            match k.state() {
                KeyState::Enabled | KeyState::Disabled => {
                    k.key_state = KeyState::PendingDeletion.code();
                    k.scheduled_deletion_date = Some(now + u64::from(pending_days) * DAY);
                    Ok(())
                }
                state => Err(KmsError::WrongState {
                    key_id: k.key_id,
                    state,
                    operation: "schedule the deletion of",
                }),
            }
        })
    }

    pub fn cancel_key_deletion(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        self.change_key("cancel-key-deletion", key, |k, _, _| match k.state() {
            KeyState::PendingDeletion => {
                k.key_state = KeyState::Disabled.code();
                k.scheduled_deletion_date = None;
                Ok(())
            }
            state => Err(KmsError::WrongState {
                key_id: k.key_id,
                state,
                operation: "cancel the deletion of (none is scheduled)",
            }),
        })
    }

    /// Adds a new version: new data keys are wrapped under it, old versions keep unwrapping.
    pub fn rotate_key(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        self.change_key("rotate-key", key, |k, f, now| {
            require_enabled(k)?;
            self.add_version(f.store_id, k, now);
            Ok(())
        })
    }

    /// Rotates the key automatically every `interval_days` (30–365, as in DEW KMS), lazily: the
    /// first access after the interval since the newest version adds a version.
    pub fn enable_key_rotation(
        &self,
        key: &str,
        interval_days: u32,
    ) -> Result<KeyMetadata, KmsError> {
        self.change_key("enable-key-rotation", key, |k, _, _| {
            if !(MIN_ROTATION_DAYS..=MAX_ROTATION_DAYS).contains(&interval_days) {
                return Err(KmsError::InvalidArgument(format!(
                    "the rotation interval must be {MIN_ROTATION_DAYS} to {MAX_ROTATION_DAYS} days, not {interval_days}"
                )));
            }
            require_enabled(k)?;
            k.rotation_interval_days = Some(interval_days);
            Ok(())
        })
    }

    pub fn disable_key_rotation(&self, key: &str) -> Result<KeyMetadata, KmsError> {
        self.change_key("disable-key-rotation", key, |k, _, _| {
            require_enabled(k)?;
            k.rotation_interval_days = None;
            Ok(())
        })
    }

    /// Replaces the key's description. Refused while pending deletion (as DEW KMS does).
    pub fn update_description(
        &self,
        key: &str,
        description: &str,
    ) -> Result<KeyMetadata, KmsError> {
        self.change_key("update-key-description", key, |k, _, _| {
            if description.len() > MAX_DESCRIPTION_LEN {
                return Err(KmsError::InvalidArgument(format!(
                    "the description is longer than {MAX_DESCRIPTION_LEN} bytes"
                )));
            }
            if k.state() == KeyState::PendingDeletion {
                return Err(KmsError::KeyNotUsable {
                    key_id: k.key_id,
                    state: k.state(),
                });
            }
            k.key_description = description.to_string();
            Ok(())
        })
    }

    /// Replaces the key's main alias (the old one is freed; other aliases stay). Refused while pending deletion.
    pub fn update_alias(&self, key: &str, new_alias: &str) -> Result<KeyMetadata, KmsError> {
        self.change_key("update-alias", key, |k, f, _| {
            let alias = normalize_alias(new_alias)?;
            if k.state() == KeyState::PendingDeletion {
                return Err(KmsError::KeyNotUsable {
                    key_id: k.key_id,
                    state: k.state(),
                });
            }
            if let Some(other) = f
                .keys
                .iter()
                .find(|o| o.has_alias(&alias) && o.key_id != k.key_id)
            {
                return Err(KmsError::AliasExists {
                    alias,
                    key_id: other.key_id,
                });
            }
            // One of its other aliases may become the main one: it must not stay listed twice.
            k.more_aliases.retain(|a| a.alias != alias);
            k.key_alias = Some(alias);
            Ok(())
        })
    }
}

fn deletion_due(k: &KeyRecord, now: u64) -> bool {
    !k.is_deleted()
        && k.state() == KeyState::PendingDeletion
        && k.scheduled_deletion_date.is_some_and(|d| now >= d)
}

fn rotation_due(k: &KeyRecord, now: u64) -> bool {
    !k.is_deleted()
        && k.state() == KeyState::Enabled
        && match (k.rotation_interval_days, k.versions.last()) {
            (Some(days), Some(v)) => now >= v.creation_date + u64::from(days) * DAY,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_normalized_and_checked() {
        assert_eq!(normalize_alias("vol").unwrap(), "alias/vol");
        assert_eq!(normalize_alias("alias/a/b_c-1").unwrap(), "alias/a/b_c-1");
        for bad in [
            "",
            "alias/",
            "has space",
            "é",
            "a.b",
            "3f2a6c1e-8d0b-4a8e-9a63-0b7e6d1c2f10",
        ] {
            assert!(
                matches!(normalize_alias(bad), Err(KmsError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert!(normalize_alias(&"x".repeat(256)).is_err());
    }
}
