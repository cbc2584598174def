//! The durable store: one JSON file, `keystore.json`, replaced atomically, plus a lock file.
//!
//! Why one JSON file and not an embedded database such as redb: the data is tiny (a few hundred
//! bytes per key), the metadata stays human-inspectable (`jq . keystore.json`: ids, aliases,
//! states, dates; the secret parts are AEAD-sealed hex), and a change costs exactly one file write
//! plus two fsyncs. Crash safety comes from the classic sequence: write a temp file in the same
//! directory, fsync it, rename it over `keystore.json`, fsync the directory. A crash at any instant
//! leaves the old or the new file; a leftover temp file is never read (and is removed by the next
//! writer, which holds the lock, so it cannot be another writer's file in progress).
//!
//! Every operation re-reads the file, so a running server sees a key disabled by the CLI at the
//! next attach. Writers take an exclusive `flock` (std `File::lock`) on `keystore.lock` around
//! read-modify-write; readers take a shared one, so two processes changing the store at once are
//! serialized, never interleaved.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::objects::{FileObjects, Obj, ObjectStore};
use super::root::RootParams;
use super::{KeyState, KmsError};

pub const STORE_FILE: &str = "keystore.json";
pub const LOCK_FILE: &str = "keystore.lock";
pub const ROOT_KEY_FILE: &str = "root.key";
pub const AUDIT_FILE: &str = "audit.log";
const TEMP_PREFIX: &str = ".keystore.json.tmp.";
pub const FORMAT_NAME: &str = "cryptnbd-keystore";
/// The newest format version. Version 2 adds `more_aliases` (several aliases per key). A store is
/// written as version 1 while no key has more than one alias, so older programs keep reading it;
/// it becomes version 2 once a key does, so an older program refuses it ("unsupported version")
/// instead of reading it and silently dropping the aliases it does not know on its next write.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version read (and the one written when nothing newer is needed).
pub const BASE_FORMAT_VERSION: u32 = 1;

/// The whole store file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreFile {
    pub format: String,
    pub version: u32,
    pub store_id: Uuid,
    /// Unix seconds.
    pub creation_date: u64,
    pub root: RootParams,
    /// Hex of the sealed verifier (see `root.rs`).
    pub verifier: String,
    pub keys: Vec<KeyRecord>,
}

/// One CMK. After its deletion date it becomes a tombstone: no versions, no alias, `deletion_date` set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: Uuid,
    /// `alias/name`; `None` once deleted (the alias is then free for another key).
    pub key_alias: Option<String>,
    /// The alias the key had when it was deleted, so errors can name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub former_alias: Option<String>,
    pub key_description: String,
    /// KMS state code (2 enabled, 3 disabled, 4 pending deletion).
    pub key_state: u8,
    pub creation_date: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_deletion_date: Option<u64>,
    /// Set when the material was destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_date: Option<u64>,
    /// Automatic rotation interval in days, applied lazily on access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_interval_days: Option<u32>,
    pub versions: Vec<VersionRecord>,
    /// Aliases besides `key_alias` (DEW KMS lets a key have several). Optional and omitted when
    /// empty, so files written before it existed read unchanged and keys with one alias are
    /// written exactly as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_aliases: Vec<AliasRecord>,
}

/// One additional alias of a key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AliasRecord {
    /// `alias/name`.
    pub alias: String,
    /// Unix seconds when it was created.
    pub creation_date: u64,
    /// Unix seconds when it was last moved to its key (`associate-alias`).
    pub update_date: u64,
}

/// One version of a CMK's material.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u32,
    pub creation_date: u64,
    /// Hex of `aead::seal(root, material_aad(..), 32-byte material)`.
    pub material: String,
}

impl KeyRecord {
    pub fn state(&self) -> KeyState {
        KeyState::from_code(self.key_state).unwrap_or(KeyState::Disabled)
    }

    pub fn is_deleted(&self) -> bool {
        self.deletion_date.is_some()
    }

    pub fn current_version(&self) -> Option<&VersionRecord> {
        self.versions.last()
    }

    /// Every alias of the key: `key_alias` first, then the others.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.key_alias
            .as_deref()
            .into_iter()
            .chain(self.more_aliases.iter().map(|a| a.alias.as_str()))
    }

    pub fn has_alias(&self, alias: &str) -> bool {
        self.aliases().any(|a| a == alias)
    }
}

pub fn store_path(dir: &Path) -> PathBuf {
    dir.join(STORE_FILE)
}

/// A held lock on `keystore.lock`; released when dropped (closing the descriptor drops the flock).
pub struct LockGuard {
    _file: File,
}

fn open_lock_file(dir: &Path) -> Result<File, KmsError> {
    let path = dir.join(LOCK_FILE);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| KmsError::io("opening lock file", path, e))
}

/// Takes the exclusive (writer) lock, waiting for other holders.
// `File::lock` is std since Rust 1.89.
pub fn lock_exclusive(dir: &Path) -> Result<LockGuard, KmsError> {
    let file = open_lock_file(dir)?;
    file.lock()
        .map_err(|e| KmsError::io("locking", dir.join(LOCK_FILE), e))?;
    Ok(LockGuard { _file: file })
}

/// Takes a shared (reader) lock, waiting for a writer to finish.
// `File::lock` is std since Rust 1.89.
pub fn lock_shared(dir: &Path) -> Result<LockGuard, KmsError> {
    let file = open_lock_file(dir)?;
    file.lock_shared()
        .map_err(|e| KmsError::io("locking", dir.join(LOCK_FILE), e))?;
    Ok(LockGuard { _file: file })
}

/// Reads and validates the store file. The caller holds a lock.
pub fn load(dir: &Path) -> Result<StoreFile, KmsError> {
    load_from(&FileObjects::new(dir))
}

/// Reads and validates the store object of any backend (the caller holds its read lock).
pub fn load_from(objects: &dyn ObjectStore) -> Result<StoreFile, KmsError> {
    let path = objects.path(Obj::Keystore);
    match objects.read(Obj::Keystore)? {
        Some((bytes, _)) => parse(&bytes, &path),
        None => Err(missing(objects)),
    }
}

/// "No key store" for a backend whose store object is missing.
pub(super) fn missing(objects: &dyn ObjectStore) -> KmsError {
    let path = objects.path(Obj::Keystore);
    KmsError::StoreMissing {
        dir: path.parent().map(Path::to_path_buf).unwrap_or(path),
    }
}

/// Parses and validates store file bytes (separate from I/O so it can be tested on slices).
pub fn parse(bytes: &[u8], path: &Path) -> Result<StoreFile, KmsError> {
    let corrupt = |reason: String| KmsError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    // Look at format and version first, so a newer file gets "unsupported version", not a parse error.
    #[derive(Deserialize)]
    struct Head {
        format: String,
        version: u32,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("{e}")))?;
    if head.format != FORMAT_NAME || !(BASE_FORMAT_VERSION..=FORMAT_VERSION).contains(&head.version)
    {
        return Err(KmsError::UnsupportedFormat {
            path: path.to_path_buf(),
            format: head.format,
            version: head.version,
        });
    }
    let file: StoreFile = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("{e}")))?;
    if file.version < needed_version(&file) {
        return Err(corrupt(format!(
            "it is version {} but a key has several aliases (version {FORMAT_VERSION})",
            file.version
        )));
    }
    let mut ids = std::collections::HashSet::new();
    let mut aliases = std::collections::HashSet::new();
    for k in &file.keys {
        if !ids.insert(k.key_id) {
            return Err(corrupt(format!("key {} appears twice", k.key_id)));
        }
        if KeyState::from_code(k.key_state).is_none() {
            return Err(corrupt(format!(
                "key {} has unknown state {}",
                k.key_id, k.key_state
            )));
        }
        for a in k.aliases() {
            if !aliases.insert(a.to_string()) {
                return Err(corrupt(format!("alias {a} is used twice")));
            }
        }
        if !k.is_deleted() {
            if k.versions.is_empty() {
                return Err(corrupt(format!("key {} has no key material", k.key_id)));
            }
            for (i, v) in k.versions.iter().enumerate() {
                if v.version as usize != i + 1 {
                    return Err(corrupt(format!(
                        "key {} versions are not numbered 1..{}",
                        k.key_id,
                        k.versions.len()
                    )));
                }
            }
        }
        if k.state() == KeyState::PendingDeletion && k.scheduled_deletion_date.is_none() {
            return Err(corrupt(format!(
                "key {} is pending deletion without a date",
                k.key_id
            )));
        }
    }
    Ok(file)
}

/// Atomically replaces the store file (temp + fsync + rename + directory fsync). The caller
/// holds the exclusive lock.
/// The lowest format version that can hold `file` (see [`FORMAT_VERSION`]).
pub fn needed_version(file: &StoreFile) -> u32 {
    if file.keys.iter().any(|k| !k.more_aliases.is_empty()) {
        FORMAT_VERSION
    } else {
        BASE_FORMAT_VERSION
    }
}

/// The bytes of the store file, at the lowest version that can hold it.
pub fn encode(file: &StoreFile) -> Vec<u8> {
    let file = &StoreFile {
        version: needed_version(file),
        ..file.clone()
    };
    let mut bytes = serde_json::to_vec_pretty(file).expect("the store file serializes");
    bytes.push(b'\n');
    bytes
}

/// Replaces the store file in `dir` unconditionally (tests and tools; the key store itself
/// writes through [`super::objects::update`]).
pub fn save(dir: &Path, file: &StoreFile) -> Result<(), KmsError> {
    remove_stale_temps(dir);
    let path = store_path(dir);
    let bytes = encode(file);
    replace_file(
        dir,
        &path,
        TEMP_PREFIX,
        &bytes,
        ReplaceSteps {
            create: "creating temporary key store file",
            write: "writing temporary key store file",
            rename: "replacing key store",
        },
    )
}

/// How [`replace_file`]'s errors name its three steps.
pub(super) struct ReplaceSteps {
    pub create: &'static str,
    pub write: &'static str,
    pub rename: &'static str,
}

/// Replaces `path` (a file in `dir`) by `bytes`, atomically and durably: a new mode-0600 file
/// `dir/{temp_prefix}{pid}.{random}` is written and synced, renamed over `path`, and the
/// directory synced. On failure the temporary file is removed and `path` is left as it was.
pub(super) fn replace_file(
    dir: &Path,
    path: &Path,
    temp_prefix: &str,
    bytes: &[u8],
    steps: ReplaceSteps,
) -> Result<(), KmsError> {
    let mut rnd = [0u8; 8];
    getrandom::getrandom(&mut rnd).expect("the OS random number generator failed");
    let tmp = dir.join(format!(
        "{temp_prefix}{}.{}",
        std::process::id(),
        hex::encode(rnd)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| KmsError::io(steps.create, &tmp, e))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| KmsError::io(steps.write, &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| KmsError::io(steps.rename, path, e))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes a rename or a file creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), KmsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| KmsError::io("syncing directory", dir, e))
}

/// Removes temp files left by a writer that crashed. Only called under the exclusive lock.
pub(super) fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoreFile {
        StoreFile {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            store_id: Uuid::new_v4(),
            creation_date: 1,
            root: RootParams::KeyFile,
            verifier: "00".into(),
            keys: vec![],
        }
    }

    #[test]
    fn leftover_temp_file_is_ignored_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let file = sample();
        save(dir.path(), &file).unwrap();
        // A crashed writer left half a file behind.
        let tmp = dir.path().join(format!("{TEMP_PREFIX}999.deadbeef"));
        fs::write(&tmp, b"{\"format\": \"cryptnbd-keys").unwrap();
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded.store_id, file.store_id);
        save(dir.path(), &loaded).unwrap();
        assert!(!tmp.exists(), "the next writer removes stale temp files");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![STORE_FILE.to_string()]);
    }

    #[test]
    fn store_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &sample()).unwrap();
        let mode = fs::metadata(store_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn truncated_store_file_is_corrupt() {
        let bytes = serde_json::to_vec(&sample()).unwrap();
        for n in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                matches!(
                    parse(&bytes[..n], Path::new("k")),
                    Err(KmsError::Corrupt { .. })
                ),
                "{n}"
            );
        }
    }

    #[test]
    fn unknown_version_is_unsupported() {
        let mut f = sample();
        f.version = 3;
        let bytes = serde_json::to_vec(&f).unwrap();
        assert!(matches!(
            parse(&bytes, Path::new("k")),
            Err(KmsError::UnsupportedFormat { version: 3, .. })
        ));
    }

    #[test]
    fn missing_store_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(KmsError::StoreMissing { .. })
        ));
    }
}
