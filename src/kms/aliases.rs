//! Several aliases per key, as DEW KMS has them: add an alias to a key, list aliases, delete
//! aliases, move an alias to another key. An alias names at most one live key; every operation
//! that accepts a key id also accepts any of the key's aliases (`lifecycle::find_index`).
//!
//! A key's first alias stays in `key_alias` (what describe-key and the CLI show, and what
//! create-key and update-key-alias set); the others are `more_aliases`. When the main alias is
//! deleted or moved away, the oldest other alias takes its place, so a key keeps a main alias as
//! long as it has any.

use uuid::Uuid;

use super::lifecycle::{alias_owner, find_index, normalize_alias};
use super::store::{AliasRecord, KeyRecord};
use super::{EncryptionContext, KeyState, KeyStore, KmsError};

/// At most this many aliases per key (bounds the store file and listings).
pub const MAX_ALIASES_PER_KEY: usize = 100;

/// One alias and the key it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasInfo {
    /// `alias/name`.
    pub alias: String,
    pub key_id: Uuid,
    /// Unix seconds.
    pub creation_date: u64,
    /// Unix seconds: when the alias was last moved to this key (its creation if never moved).
    pub update_date: u64,
}

/// The aliases of one key, main alias first. The main alias carries no dates of its own: it
/// dates from the key's creation.
fn key_aliases(k: &KeyRecord) -> Vec<AliasInfo> {
    let main = k.key_alias.iter().map(|a| AliasInfo {
        alias: a.clone(),
        key_id: k.key_id,
        creation_date: k.creation_date,
        update_date: k.creation_date,
    });
    main.chain(k.more_aliases.iter().map(|a| AliasInfo {
        alias: a.alias.clone(),
        key_id: k.key_id,
        creation_date: a.creation_date,
        update_date: a.update_date,
    }))
    .collect()
}

/// Aliases are changed only on keys that are not pending deletion (as update-key-alias).
fn require_changeable(k: &KeyRecord) -> Result<(), KmsError> {
    if k.state() == KeyState::PendingDeletion {
        return Err(KmsError::KeyNotUsable {
            key_id: k.key_id,
            state: k.state(),
        });
    }
    Ok(())
}

/// Gives `k` the alias (main alias if it has none).
fn attach(k: &mut KeyRecord, alias: String, creation_date: u64, now: u64) -> AliasInfo {
    let info = AliasInfo {
        alias: alias.clone(),
        key_id: k.key_id,
        creation_date,
        update_date: now,
    };
    if k.key_alias.is_none() {
        k.key_alias = Some(alias);
    } else {
        k.more_aliases.push(AliasRecord {
            alias,
            creation_date,
            update_date: now,
        });
    }
    info
}

/// Removes the alias from `k` (promoting the oldest other alias if it was the main one);
/// returns its creation date, or `None` if `k` does not have it.
fn detach(k: &mut KeyRecord, alias: &str) -> Option<u64> {
    if k.key_alias.as_deref() == Some(alias) {
        k.key_alias = None;
        if !k.more_aliases.is_empty() {
            k.key_alias = Some(k.more_aliases.remove(0).alias);
        }
        return Some(k.creation_date);
    }
    let i = k.more_aliases.iter().position(|a| a.alias == alias)?;
    Some(k.more_aliases.remove(i).creation_date)
}

fn check_room(k: &KeyRecord) -> Result<(), KmsError> {
    if k.aliases().count() >= MAX_ALIASES_PER_KEY {
        return Err(KmsError::InvalidArgument(format!(
            "key {} already has {MAX_ALIASES_PER_KEY} aliases (the most a key may have)",
            k.key_id
        )));
    }
    Ok(())
}

impl KeyStore {
    /// Every alias of every live key, keys in creation order, each key's main alias first.
    pub fn list_aliases(&self) -> Result<Vec<AliasInfo>, KmsError> {
        let f = self.snapshot()?;
        Ok(f.keys
            .iter()
            .filter(|k| !k.is_deleted())
            .flat_map(key_aliases)
            .collect())
    }

    /// Adds `alias` to the key named by `key` (id or any alias). Refused if any key has it.
    pub fn create_alias(&self, key: &str, alias: &str) -> Result<AliasInfo, KmsError> {
        let r = normalize_alias(alias).and_then(|alias| {
            self.transact(|f, now| {
                let i = find_index(f, key)?;
                require_changeable(&f.keys[i])?;
                if let Some(o) = alias_owner(f, &alias) {
                    return Err(KmsError::AliasExists {
                        alias: alias.clone(),
                        key_id: f.keys[o].key_id,
                    });
                }
                check_room(&f.keys[i])?;
                Ok(attach(&mut f.keys[i], alias.clone(), now, now))
            })
        });
        self.finish("create-alias", Some(key), &none(), r, |a| {
            (Some(a.key_id), None)
        })
    }

    /// Removes `aliases` from the key named by `key`; all of them must be its aliases (else
    /// nothing is removed). The key stays reachable by its id.
    pub fn delete_aliases(&self, key: &str, aliases: &[String]) -> Result<Uuid, KmsError> {
        let r = self.transact(|f, _| {
            let i = find_index(f, key)?;
            require_changeable(&f.keys[i])?;
            let mut k = f.keys[i].clone();
            for a in aliases {
                let a = normalize_alias(a)?;
                if detach(&mut k, &a).is_none() {
                    return Err(KmsError::AliasNotFound {
                        alias: a,
                        key_id: Some(k.key_id),
                    });
                }
            }
            let id = k.key_id;
            f.keys[i] = k;
            Ok(id)
        });
        self.finish("delete-alias", Some(key), &none(), r, |id| {
            (Some(*id), None)
        })
    }

    /// Moves an existing alias to the key named by `target` (keeping its creation date).
    pub fn associate_alias(&self, alias: &str, target: &str) -> Result<AliasInfo, KmsError> {
        let r = normalize_alias(alias).and_then(|alias| {
            self.transact(|f, now| {
                let t = find_index(f, target)?;
                require_changeable(&f.keys[t])?;
                let Some(o) = alias_owner(f, &alias) else {
                    return Err(KmsError::AliasNotFound {
                        alias: alias.clone(),
                        key_id: None,
                    });
                };
                if o == t {
                    // Already there: nothing moves, the answer says where it is.
                    let found = key_aliases(&f.keys[t])
                        .into_iter()
                        .find(|a| a.alias == alias);
                    return found.ok_or(KmsError::AliasNotFound {
                        alias: alias.clone(),
                        key_id: None,
                    });
                }
                require_changeable(&f.keys[o])?;
                check_room(&f.keys[t])?;
                let created = detach(&mut f.keys[o], &alias).unwrap_or(now);
                Ok(attach(&mut f.keys[t], alias.clone(), created, now))
            })
        });
        self.finish("associate-alias", Some(target), &none(), r, |a| {
            (Some(a.key_id), None)
        })
    }
}

fn none() -> EncryptionContext {
    EncryptionContext::new()
}

/// Whether the store's aliases are unique (used by tests; `store::load` enforces it).
#[cfg(test)]
fn aliases_unique(f: &super::store::StoreFile) -> bool {
    let all: Vec<&str> = f.keys.iter().flat_map(|k| k.aliases()).collect();
    let set: std::collections::HashSet<&&str> = all.iter().collect();
    set.len() == all.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::{store, InitRoot};

    fn store() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
        (dir, ks)
    }

    #[test]
    fn a_key_has_several_aliases_and_each_names_it() {
        let (dir, ks) = store();
        let a = ks.create_key("alias/a", "").unwrap();
        let b = ks.create_key("alias/b", "").unwrap();
        let raw = || std::fs::read_to_string(dir.path().join(store::STORE_FILE)).unwrap();
        // One alias per key: written exactly as before (version 1), so older programs read it.
        assert_eq!(store::load(dir.path()).unwrap().version, 1);
        assert!(!raw().contains("more_aliases"));
        let x = ks.create_alias("alias/a", "alias/x").unwrap();
        // Several: version 2, which older programs refuse rather than drop aliases.
        assert_eq!(store::load(dir.path()).unwrap().version, 2);
        assert!(raw().contains("more_aliases"));
        assert_eq!(x.key_id, a.key_id);
        ks.create_alias(&a.key_id.to_string(), "y").unwrap();
        for name in ["alias/a", "alias/x", "y", "alias/y"] {
            assert_eq!(ks.resolve_key_id(name).unwrap(), a.key_id, "{name}");
        }
        // Data keys work under any alias.
        let ctx = EncryptionContext::new();
        let w = ks
            .create_data_key_without_plaintext("alias/x", &ctx, 256)
            .unwrap();
        ks.decrypt_data_key("alias/y", &w.cipher_text, &ctx)
            .unwrap();
        let all: Vec<(String, Uuid)> = ks
            .list_aliases()
            .unwrap()
            .into_iter()
            .map(|i| (i.alias, i.key_id))
            .collect();
        assert_eq!(
            all,
            [
                ("alias/a".into(), a.key_id),
                ("alias/x".into(), a.key_id),
                ("alias/y".into(), a.key_id),
                ("alias/b".into(), b.key_id)
            ]
        );
        // Unique across keys, whichever way it is asked.
        for dup in ["alias/b", "alias/x", "a"] {
            assert!(
                matches!(
                    ks.create_alias("alias/b", dup),
                    Err(KmsError::AliasExists { .. })
                ),
                "{dup}"
            );
        }
        assert!(matches!(
            ks.create_key("alias/y", ""),
            Err(KmsError::AliasExists { .. })
        ));
        assert!(matches!(
            ks.update_alias("alias/b", "alias/x"),
            Err(KmsError::AliasExists { .. })
        ));
        assert!(matches!(
            ks.create_alias("alias/nope", "alias/z"),
            Err(KmsError::KeyNotFound { .. })
        ));
        assert!(matches!(
            ks.create_alias("alias/b", "bad name"),
            Err(KmsError::InvalidArgument(_))
        ));
        let f = store::load(dir.path()).unwrap();
        assert!(aliases_unique(&f));
        assert_eq!(ks.check_integrity().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn delete_and_associate_move_aliases_and_promote_the_next() {
        let (dir, ks) = store();
        let a = ks.create_key("alias/a", "").unwrap();
        let b = ks.create_key("alias/b", "").unwrap();
        ks.create_alias("alias/a", "alias/a2").unwrap();
        ks.create_alias("alias/a", "alias/a3").unwrap();
        // Deleting the main alias promotes the next one.
        ks.delete_aliases(&a.key_id.to_string(), &["alias/a".into()])
            .unwrap();
        assert_eq!(ks.describe_key("alias/a2").unwrap().key_alias, "alias/a2");
        assert!(matches!(
            ks.resolve_key_id("alias/a"),
            Err(KmsError::KeyNotFound { .. })
        ));
        // All or nothing: one alias that is not the key's removes none.
        assert!(matches!(
            ks.delete_aliases("alias/a2", &["alias/a3".into(), "alias/b".into()]),
            Err(KmsError::AliasNotFound { .. })
        ));
        assert_eq!(ks.resolve_key_id("alias/a3").unwrap(), a.key_id);
        // Move a3 to b, keeping its creation date.
        let before = ks
            .list_aliases()
            .unwrap()
            .into_iter()
            .find(|i| i.alias == "alias/a3")
            .unwrap();
        let moved = ks.associate_alias("alias/a3", "alias/b").unwrap();
        assert_eq!(moved.key_id, b.key_id);
        assert_eq!(moved.creation_date, before.creation_date);
        assert_eq!(ks.resolve_key_id("a3").unwrap(), b.key_id);
        assert!(matches!(
            ks.associate_alias("alias/never", "alias/b"),
            Err(KmsError::AliasNotFound { .. })
        ));
        // Every alias removed: the key is still there by id, the alias free for another key.
        ks.delete_aliases(&a.key_id.to_string(), &["alias/a2".into()])
            .unwrap();
        assert_eq!(
            ks.describe_key(&a.key_id.to_string()).unwrap().key_alias,
            ""
        );
        ks.delete_aliases("alias/b", &["alias/a3".into()]).unwrap();
        // No key with more than one alias left: back to version 1.
        assert_eq!(store::load(dir.path()).unwrap().version, 1);
        ks.create_alias("alias/b", "alias/a2").unwrap();
        assert_eq!(ks.check_integrity().unwrap(), Vec::<String>::new());
        // A key pending deletion keeps its aliases but they cannot change.
        ks.schedule_key_deletion("alias/b", 7).unwrap();
        assert!(matches!(
            ks.create_alias("alias/b", "alias/c"),
            Err(KmsError::KeyNotUsable { .. })
        ));
        assert!(matches!(
            ks.associate_alias("alias/a2", &a.key_id.to_string()),
            Err(KmsError::KeyNotUsable { .. })
        ));
    }

    #[test]
    fn deletion_frees_every_alias() {
        let dir = tempfile::tempdir().unwrap();
        let clock = crate::kms::ManualClock::new(1_000_000);
        let ks = KeyStore::init_with_clock(
            dir.path(),
            InitRoot::GenerateKeyFile,
            std::sync::Arc::new(clock.clone()),
        )
        .unwrap();
        ks.create_key("alias/a", "").unwrap();
        ks.create_alias("alias/a", "alias/a2").unwrap();
        ks.schedule_key_deletion("alias/a", 7).unwrap();
        clock.advance_days(8);
        assert!(ks.list_aliases().unwrap().is_empty());
        assert!(matches!(
            ks.resolve_key_id("alias/a"),
            Err(KmsError::KeyDeleted { .. })
        ));
        ks.create_key("alias/a2", "").unwrap();
    }
}
