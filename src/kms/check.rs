//! Read-only integrity checks of the key store, for `cryptnbd check`: every version of every key
//! opens under the root key, states and versions are consistent, aliases are unique; and what the
//! store says about one key version a volume refers to. Nothing here writes: no maintenance (due
//! rotations or deletions are left for the next real operation) and no audit record.

use std::collections::HashSet;

use uuid::Uuid;

use super::objects::Obj;
use super::{credentials, grants, store, KeyState, KeyStore, KmsError};

/// What the key store says about one (CMK, version) a volume's header names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyReference {
    /// No key with this id in the store (another store's key, or a lost store file).
    Missing,
    /// The key was deleted (crypto-shredded) on this date (Unix seconds).
    Deleted { date: u64 },
    /// The key exists but has no such version (it has `versions`).
    VersionMissing { versions: u32 },
    /// The version exists; whether it can be used depends on `state`.
    Present {
        alias: Option<String>,
        state: KeyState,
        /// Unix seconds, while pending deletion.
        scheduled_deletion_date: Option<u64>,
    },
}

impl KeyStore {
    /// Checks the store's integrity; returns the problems found, in plain words (empty: healthy).
    /// An unreadable store file is an `Err`.
    pub fn check_integrity(&self) -> Result<Vec<String>, KmsError> {
        let file = {
            let _lock = self.objects.lock(false)?;
            store::load_from(&*self.objects)?
        };
        let mut problems = Vec::new();
        if file.store_id != self.store_id {
            problems.push(format!(
                "the key store file now holds store {}, not {} that was opened",
                file.store_id, self.store_id
            ));
        }
        let mut ids = HashSet::new();
        let mut aliases = HashSet::new();
        for k in &file.keys {
            let name = match &k.key_alias {
                Some(a) => format!("key {} ({a})", k.key_id),
                None => format!("key {}", k.key_id),
            };
            if !ids.insert(k.key_id) {
                problems.push(format!("{name} appears more than once"));
            }
            for a in k.aliases() {
                if !aliases.insert(a.to_string()) {
                    problems.push(format!("alias {a} names more than one key"));
                }
            }
            if KeyState::from_code(k.key_state).is_none() {
                problems.push(format!("{name} has an unknown state code {}", k.key_state));
            }
            if k.is_deleted() {
                if !k.versions.is_empty() {
                    problems.push(format!(
                        "{name} is marked deleted but still holds key material"
                    ));
                }
                continue;
            }
            if k.versions.is_empty() {
                problems.push(format!("{name} has no key material (no versions)"));
            }
            for (i, v) in k.versions.iter().enumerate() {
                if v.version != i as u32 + 1 {
                    problems.push(format!(
                        "{name}: version {} is out of order (expected {})",
                        v.version,
                        i + 1
                    ));
                }
                // Unsealing checks the AEAD tag; the material is dropped (zeroized) at once.
                if let Err(e) = self.material(&file, k, v.version) {
                    problems.push(format!("{name} version {}: {e}", v.version));
                }
            }
        }
        self.check_side_documents(&ids, &mut problems);
        Ok(problems)
    }

    /// The grants and credentials documents parse, and grants name keys of this store.
    fn check_side_documents(&self, ids: &HashSet<Uuid>, problems: &mut Vec<String>) {
        for obj in [Obj::Grants, Obj::Credentials] {
            let path = self.objects.path(obj);
            let bytes = match self.objects.read(obj) {
                Ok(Some((b, _))) => b,
                Ok(None) => continue,
                Err(e) => {
                    problems.push(format!("cannot read {}: {e}", path.display()));
                    continue;
                }
            };
            let r = match obj {
                Obj::Grants => grants::parse(&bytes, &path).map(|all| {
                    for g in all.iter().filter(|g| !ids.contains(&g.key_id)) {
                        problems.push(format!(
                            "grant {} is on key {}, which is not in the store",
                            g.grant_id, g.key_id
                        ));
                    }
                }),
                _ => credentials::check_bytes(&bytes, &path).map(|_| ()),
            };
            if let Err(e) = r {
                problems.push(e.to_string());
            }
        }
    }

    /// What the store says about version `version` of key `key_id` (no maintenance, no audit).
    pub fn key_reference(&self, key_id: Uuid, version: u32) -> Result<KeyReference, KmsError> {
        let file = {
            let _lock = self.objects.lock(false)?;
            store::load_from(&*self.objects)?
        };
        let Some(k) = file.keys.iter().find(|k| k.key_id == key_id) else {
            return Ok(KeyReference::Missing);
        };
        if let Some(date) = k.deletion_date {
            return Ok(KeyReference::Deleted { date });
        }
        if !k.versions.iter().any(|v| v.version == version) {
            return Ok(KeyReference::VersionMissing {
                versions: k.versions.len() as u32,
            });
        }
        Ok(KeyReference::Present {
            alias: k.key_alias.clone(),
            state: k.state(),
            scheduled_deletion_date: k.scheduled_deletion_date,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::InitRoot;

    #[test]
    fn a_healthy_store_has_no_problems_and_references_are_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        let k = ks.create_key("alias/a", "").unwrap();
        ks.rotate_key("alias/a").unwrap();
        assert_eq!(ks.check_integrity().unwrap(), Vec::<String>::new());
        assert!(matches!(
            ks.key_reference(k.key_id, 2).unwrap(),
            KeyReference::Present {
                state: KeyState::Enabled,
                ..
            }
        ));
        assert_eq!(
            ks.key_reference(k.key_id, 3).unwrap(),
            KeyReference::VersionMissing { versions: 2 }
        );
        assert_eq!(
            ks.key_reference(Uuid::new_v4(), 1).unwrap(),
            KeyReference::Missing
        );
        ks.disable_key("alias/a").unwrap();
        assert!(matches!(
            ks.key_reference(k.key_id, 1).unwrap(),
            KeyReference::Present {
                state: KeyState::Disabled,
                ..
            }
        ));
    }

    #[test]
    fn tampered_material_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        ks.create_key("alias/a", "").unwrap();
        let path = store::store_path(dir.path());
        let mut file = store::load(dir.path()).unwrap();
        let m = &mut file.keys[0].versions[0].material;
        // Flip one hex digit of the sealed material.
        let last = if m.ends_with('0') { "1" } else { "0" };
        m.replace_range(m.len() - 1.., last);
        store::save(dir.path(), &file).unwrap();
        let problems = ks.check_integrity().unwrap();
        assert_eq!(problems.len(), 1, "{problems:?} ({})", path.display());
        assert!(problems[0].contains("does not open under the root key"));
    }
}

#[cfg(test)]
mod root_memory_tests {
    use crate::kms::{InitRoot, KeyStore};

    /// The root key is held on locked, non-dumpable pages for the store's lifetime (issue #10).
    #[test]
    fn the_root_key_is_on_non_dumpable_pages() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        let addr = ks.root.dangerous_as_bytes().as_ptr() as usize;
        let flags = crate::crypto::locked::vm_flags_of(addr).expect("mapping");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }
}
