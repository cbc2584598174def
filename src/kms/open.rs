//! Creating, opening and joining a key store: `init` (a new store in the data directory, or in
//! RADOS with a marker in the directory), `open` (finding the store through the marker, checking
//! the root key against the store's verifier, auditing a wrong root) and `join` (a further host of
//! a RADOS store: same root, marker only).

use std::path::Path;
use std::sync::Arc;

use uuid::Uuid;

use super::objects::{self, Obj, ObjectStore};
use super::root::{self, RootParams};
use super::store::{self, StoreFile, ROOT_KEY_FILE};
use super::{
    audit, blob, clock, location, AuditRecord, Clock, EncryptionContext, InitRoot, KeyStore,
    KmsError, RadosStore, RootSecret, SystemClock,
};
use crate::crypto::{aead, Key256};

/// Where `init_keyed` creates a store.
struct Target<'a> {
    dir: &'a Path,
    objects: Arc<dyn ObjectStore>,
    rados: Option<&'a RadosStore>,
}

/// The constant sealed under the root key to recognise the right root (see `root.rs`).
const VERIFIER_PLAINTEXT: &[u8] = b"cryptnbd key store root verifier v1";

impl KeyStore {
    /// Whether `dir` holds a key store file, or a marker naming a store elsewhere.
    pub fn exists(dir: &Path) -> bool {
        store::store_path(dir).exists() || location::has_marker(dir)
    }

    /// Creates a new store in `dir` (created if missing, mode 0700). Refuses to overwrite an
    /// existing store or root key file.
    pub fn init(dir: &Path, root: InitRoot) -> Result<KeyStore, KmsError> {
        Self::init_with_clock(dir, root, Arc::new(SystemClock))
    }

    pub fn init_with_clock(
        dir: &Path,
        root: InitRoot,
        clock: Arc<dyn Clock>,
    ) -> Result<KeyStore, KmsError> {
        Self::init_at(dir, None, root, None, clock)
    }

    /// Creates a new store whose root key is a copy of an existing 32-byte key file (e.g. one
    /// kept in a secrets manager); `root.key` in `dir` receives the copy.
    pub fn init_with_key_file(dir: &Path, source: &Path) -> Result<KeyStore, KmsError> {
        Self::init_at(
            dir,
            None,
            InitRoot::GenerateKeyFile,
            Some(source),
            Arc::new(SystemClock),
        )
    }

    /// Creates a new store: in `dir`, or (with `rados`) in a RADOS pool with a marker in `dir`.
    /// The root is a copy of `key_source` when given, else as `root` says.
    pub fn init_at(
        dir: &Path,
        rados: Option<&RadosStore>,
        root: InitRoot,
        key_source: Option<&Path>,
        clock: Arc<dyn Clock>,
    ) -> Result<KeyStore, KmsError> {
        let objects: Arc<dyn ObjectStore> = match rados {
            None => Arc::new(objects::FileObjects::new(dir)),
            Some(r) => location::connect(r)?,
        };
        let target = Target {
            dir,
            objects,
            rados,
        };
        if let Some(src) = key_source {
            let key = root::read_key_file(src)?;
            return Self::init_keyed(target, RootParams::KeyFile, key, clock);
        }
        match root {
            InitRoot::GenerateKeyFile => {
                Self::init_keyed(target, RootParams::KeyFile, Key256::generate(), clock)
            }
            InitRoot::Passphrase(p) => {
                if p.chars().count() < root::MIN_PASSPHRASE_LEN {
                    return Err(KmsError::InvalidArgument(format!(
                        "the passphrase must have at least {} characters",
                        root::MIN_PASSPHRASE_LEN
                    )));
                }
                let params = RootParams::new_passphrase();
                let key = root::derive_from_passphrase(&p, &params, &store::store_path(dir))?;
                Self::init_keyed(target, params, key, clock)
            }
        }
    }

    fn init_keyed(
        target: Target<'_>,
        params: RootParams,
        key: Key256,
        clock: Arc<dyn Clock>,
    ) -> Result<KeyStore, KmsError> {
        use std::os::unix::fs::DirBuilderExt;
        let Target {
            dir,
            objects,
            rados,
        } = target;
        let fresh = !dir.exists();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| KmsError::io("creating key store directory", dir, e))?;
        if fresh {
            // A directory we just made exists after a power loss only once its parent is synced.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                store::sync_dir(parent)?;
            }
        }
        let _lock = store::lock_exclusive(dir)?;
        for found in [store::store_path(dir), dir.join(location::MARKER_FILE)] {
            if found.exists() {
                return Err(KmsError::StoreExists {
                    dir: dir.to_path_buf(),
                    found,
                });
            }
        }
        let key_path = dir.join(ROOT_KEY_FILE);
        if params == RootParams::KeyFile {
            if key_path.exists() {
                return Err(KmsError::OrphanRootKey { path: key_path });
            }
            root::write_key_file(&key_path, &key)?;
        }
        let store_id = Uuid::new_v4();
        let file = StoreFile {
            format: store::FORMAT_NAME.into(),
            version: store::BASE_FORMAT_VERSION,
            store_id,
            creation_date: clock.now_unix(),
            root: params.clone(),
            verifier: hex::encode(aead::seal(
                &key,
                &blob::verifier_aad(store_id),
                VERIFIER_PLAINTEXT,
            )),
            keys: Vec::new(),
        };
        // Created only if absent: a store already in the pool/namespace is never overwritten.
        let created = objects
            .replace(Obj::Keystore, None, &store::encode(&file))
            .and_then(|r| match r {
                objects::Replaced::Done => Ok(()),
                objects::Replaced::Conflict => Err(KmsError::StoreExists {
                    dir: dir.to_path_buf(),
                    found: objects.path(Obj::Keystore),
                }),
            })
            .and_then(|()| rados.map_or(Ok(()), |r| location::write_marker(dir, r)));
        if let Err(e) = created {
            // Leave no root key without a store behind: the next `init` would refuse it.
            if params == RootParams::KeyFile {
                let _ = std::fs::remove_file(&key_path);
            }
            return Err(e);
        }
        let ks = KeyStore {
            dir: dir.to_path_buf(),
            objects,
            store_id,
            root: key,
            clock,
            audit_rotation: audit::AuditRotation::default(),
            grants_cache: Default::default(),
        };
        ks.audit("init", None, None, None, &EncryptionContext::new(), None)?;
        Ok(ks)
    }

    /// Opens an existing store, checking the root key against the store's verifier.
    pub fn open(dir: &Path, root: RootSecret) -> Result<KeyStore, KmsError> {
        Self::open_with_clock(dir, root, Arc::new(SystemClock))
    }

    /// [`KeyStore::open`] with an injected clock (tests move time forward with [`ManualClock`]).
    pub fn open_with_clock(
        dir: &Path,
        root: RootSecret,
        clock: Arc<dyn Clock>,
    ) -> Result<KeyStore, KmsError> {
        if !Self::exists(dir) {
            // Checked before locking: locking would create a lock file (or fail on a missing dir).
            return Err(KmsError::StoreMissing {
                dir: dir.to_path_buf(),
            });
        }
        let objects = location::objects_for(dir)?;
        Self::open_objects(dir, objects, root, clock)
    }

    /// Makes `dir` a second (third, …) host of the RADOS store `rados`: checks the root secret
    /// against the store's verifier, then copies a key-file root into `dir/root.key` (unless it
    /// is that file already) and writes the marker. Refuses a `dir` that has a store.
    pub fn join(dir: &Path, rados: &RadosStore, root: RootSecret) -> Result<KeyStore, KmsError> {
        if Self::exists(dir) {
            return Err(KmsError::StoreExists {
                dir: dir.to_path_buf(),
                found: dir.join(location::MARKER_FILE),
            });
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| KmsError::io("creating key store directory", dir, e))?;
        }
        let objects = location::connect(rados)?;
        let key_path = dir.join(ROOT_KEY_FILE);
        let copy = match &root {
            RootSecret::KeyFile(p) if *p != key_path => Some(root::read_key_file(p)?),
            _ => None,
        };
        let ks = Self::open_objects(dir, objects, root, Arc::new(SystemClock))?;
        if let Some(key) = copy {
            root::write_key_file(&key_path, &key)?;
        }
        location::write_marker(dir, rados)?;
        Ok(ks)
    }

    fn open_objects(
        dir: &Path,
        objects: Arc<dyn ObjectStore>,
        root: RootSecret,
        clock: Arc<dyn Clock>,
    ) -> Result<KeyStore, KmsError> {
        let file = {
            let _lock = objects.lock(false)?;
            store::load_from(&*objects)?
        };
        let key = match (&root, &file.root) {
            (RootSecret::KeyFile(path), RootParams::KeyFile) => root::read_key_file(path)?,
            (RootSecret::Passphrase(p), params @ RootParams::Passphrase { .. }) => {
                root::derive_from_passphrase(p, params, &store::store_path(dir))?
            }
            (given, expected) => {
                return Err(KmsError::RootKindMismatch {
                    dir: dir.to_path_buf(),
                    expected: expected.describe(),
                    given: match given {
                        RootSecret::KeyFile(_) => "a key file",
                        RootSecret::Passphrase(_) => "a passphrase",
                    },
                })
            }
        };
        let verifier = hex::decode(&file.verifier).map_err(|e| KmsError::Corrupt {
            path: objects.path(Obj::Keystore),
            reason: format!("the root verifier is not hex: {e}"),
        })?;
        let ok = aead::open(&key, &blob::verifier_aad(file.store_id), &verifier)
            .map(|v| v.dangerous_as_bytes() == VERIFIER_PLAINTEXT)
            .unwrap_or(false);
        if !ok {
            let err = KmsError::WrongRootKey {
                dir: dir.to_path_buf(),
            };
            let _ = audit::append(
                dir,
                &AuditRecord {
                    time: clock::rfc3339(clock.now_unix()),
                    operation: "open-key-store".into(),
                    key: None,
                    key_id: None,
                    key_version: None,
                    encryption_context: EncryptionContext::new(),
                    outcome: "error".into(),
                    error: Some(err.to_string()),
                    credential: None,
                    source: None,
                    count: None,
                    grant: None,
                },
                &audit::AuditRotation::default(),
            );
            return Err(err);
        }
        Ok(KeyStore {
            dir: dir.to_path_buf(),
            objects,
            store_id: file.store_id,
            root: key,
            clock,
            audit_rotation: audit::AuditRotation::default(),
            grants_cache: Default::default(),
        })
    }
}
