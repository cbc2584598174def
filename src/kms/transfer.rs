//! Moving a key store between backends (`kms export-store`, `kms import-store`): the three
//! documents are copied byte for byte — sealed material and metadata only, never a plaintext key,
//! and no root key (the store id inside `keystore.json` travels along, so the same root key opens
//! the copy). Every document is parsed before anything is written, so a damaged source is refused
//! whole; the destination is never overwritten unless the caller says `force`.

use std::path::Path;

use super::objects::{FileObjects, Obj, ObjectStore, Replaced};
use super::{credentials, grants, store, KmsError};

/// What was copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transferred {
    pub store_id: uuid::Uuid,
    pub keys: usize,
    /// The documents copied (missing ones in the source are written empty).
    pub objects: Vec<&'static str>,
}

/// Every document of a store, in [`Obj::ALL`] order.
type Documents = Vec<(Obj, Vec<u8>)>;

/// Reads and checks every document of `from` (a consistent read of each; documents are
/// independent, as they are for the running service).
fn read_all(from: &dyn ObjectStore) -> Result<(Documents, Transferred), KmsError> {
    let _lock = from.lock(false)?;
    let mut docs = Vec::new();
    let mut summary = None;
    for obj in Obj::ALL {
        let path = from.path(obj);
        let bytes = match (obj, from.read(obj)?) {
            (_, Some((b, _))) => b,
            (Obj::Keystore, None) => return Err(store::missing(from)),
            (Obj::Grants, None) => grants::encode(Vec::new()),
            (Obj::Credentials, None) => credentials::empty_bytes(),
        };
        match obj {
            Obj::Keystore => {
                let f = store::parse(&bytes, &path)?;
                summary = Some(Transferred {
                    store_id: f.store_id,
                    keys: f.keys.len(),
                    objects: Vec::new(),
                });
            }
            Obj::Grants => {
                grants::parse(&bytes, &path)?;
            }
            Obj::Credentials => {
                credentials::check_bytes(&bytes, &path)?;
            }
        }
        docs.push((obj, bytes));
    }
    let mut summary = summary.expect("the key store document was read");
    summary.objects = docs.iter().map(|(o, _)| o.name()).collect();
    Ok((docs, summary))
}

/// Copies every document of `from` into `to`. Refuses if `to` holds a key store already, unless
/// `force`.
pub fn copy_store(
    from: &dyn ObjectStore,
    to: &dyn ObjectStore,
    force: bool,
) -> Result<Transferred, KmsError> {
    let (docs, summary) = read_all(from)?;
    let _lock = to.lock(true)?;
    if !force && to.version(Obj::Keystore)?.is_some() {
        return Err(KmsError::StoreExists {
            dir: to.location().into(),
            found: to.path(Obj::Keystore),
        });
    }
    for (obj, bytes) in &docs {
        let current = to.version(*obj)?;
        if to.replace(*obj, current, bytes)? == Replaced::Conflict {
            return Err(KmsError::Contended {
                object: to.path(*obj),
                attempts: 1,
            });
        }
        to.changed(*obj);
    }
    Ok(summary)
}

/// `kms export-store DIR`: the store's documents as a file store in `dir` (created, mode 0700).
pub fn export_to_dir(
    from: &dyn ObjectStore,
    dir: &Path,
    force: bool,
) -> Result<Transferred, KmsError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| KmsError::io("creating export directory", dir, e))?;
    copy_store(from, &FileObjects::new(dir), force)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::{InitRoot, KeyStore, RootSecret};

    #[test]
    fn export_then_import_round_trip_and_no_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let ks = KeyStore::init(&a, InitRoot::GenerateKeyFile).unwrap();
        ks.create_key("alias/k", "").unwrap();
        let out = tmp.path().join("out");
        let t = export_to_dir(&**ks.objects(), &out, false).unwrap();
        assert_eq!((t.store_id, t.keys), (ks.store_id(), 1));
        // The export is a file store that the same root key opens.
        std::fs::copy(a.join("root.key"), out.join("root.key")).unwrap();
        let copy = KeyStore::open(&out, RootSecret::KeyFile(out.join("root.key"))).unwrap();
        assert_eq!(copy.list_keys().unwrap().len(), 1);
        assert_eq!(copy.check_integrity().unwrap(), Vec::<String>::new());
        // Never over an existing store without force.
        assert!(matches!(
            export_to_dir(&**ks.objects(), &out, false),
            Err(KmsError::StoreExists { .. })
        ));
        export_to_dir(&**ks.objects(), &out, true).unwrap();
        // A damaged source is refused before anything is written.
        std::fs::write(a.join("grants.json"), b"{not json").unwrap();
        let fresh = tmp.path().join("fresh");
        assert!(export_to_dir(&**ks.objects(), &fresh, false).is_err());
        assert!(!fresh.join("keystore.json").exists());
    }
}
