//! Where a data directory's key store lives. By default in the directory itself
//! (`keystore.json`, `grants.json`, `credentials.json`); or, for a key service run by several
//! `kms serve` hosts, in a Ceph RADOS pool (and namespace), named by a small local marker file,
//! `store.json`, that every later command reads to find the store. The marker holds only where
//! the store is and how to reach the cluster (as for RBD volumes: config file, client id,
//! keyring) — never a secret; the root of trust (`root.key` or the passphrase) stays on each host.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::objects::{FileObjects, ObjectStore};
use super::KmsError;
use crate::backend::rbd::CephClient;

pub const MARKER_FILE: &str = "store.json";
const MARKER_FORMAT: &str = "cryptnbd-store-location";
const MARKER_VERSION: u32 = 1;
/// A marker larger than this is not ours.
const MAX_MARKER_BYTES: u64 = 64 << 10;

/// A key store in a RADOS pool: the three documents are objects of these names in `namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RadosStore {
    pub pool: String,
    /// The RADOS namespace (empty: the default one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// How to reach the cluster, as for RBD volumes (flattened: the marker's format is unchanged).
    #[serde(flatten)]
    pub ceph: CephClient,
}

impl std::fmt::Display for RadosStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "rados:{}", self.pool)
        } else {
            write!(f, "rados:{}/{}", self.pool, self.namespace)
        }
    }
}

impl RadosStore {
    /// Parses `rados:POOL[/NAMESPACE]` (the Ceph options are set by the caller).
    pub fn parse(spec: &str) -> Result<RadosStore, String> {
        let Some(rest) = spec.strip_prefix("rados:") else {
            return Err(format!(
                "{spec:?}: a store is `dir` (the data directory) or rados:POOL[/NAMESPACE]"
            ));
        };
        let (pool, namespace) = rest.split_once('/').unwrap_or((rest, ""));
        crate::backend::rbd::check_rbd_name("pool", pool)?;
        if !namespace.is_empty() {
            crate::backend::rbd::check_rbd_name("namespace", namespace)?;
        }
        Ok(RadosStore {
            pool: pool.into(),
            namespace: namespace.into(),
            ceph: CephClient::default(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u32,
    rados: RadosStore,
}

/// Whether `dir` has a marker naming a store elsewhere.
pub fn has_marker(dir: &Path) -> bool {
    dir.join(MARKER_FILE).exists()
}

/// The store the marker in `dir` names (`None`: no marker, the store is the directory).
pub fn read_marker(dir: &Path) -> Result<Option<RadosStore>, KmsError> {
    let path = dir.join(MARKER_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KmsError::io("reading the store marker", path, e)),
    };
    let corrupt = |reason: String| KmsError::Corrupt {
        path: path.clone(),
        reason,
    };
    if bytes.len() as u64 > MAX_MARKER_BYTES {
        return Err(corrupt(format!(
            "it is larger than {MAX_MARKER_BYTES} bytes"
        )));
    }
    let m: Marker = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if m.format != MARKER_FORMAT || m.version != MARKER_VERSION {
        return Err(corrupt(format!(
            "format {:?} version {} (this program reads {MARKER_FORMAT} version {MARKER_VERSION})",
            m.format, m.version
        )));
    }
    Ok(Some(m.rados))
}

/// Writes the marker (mode 0600, atomically and durably).
pub fn write_marker(dir: &Path, rados: &RadosStore) -> Result<(), KmsError> {
    let m = Marker {
        format: MARKER_FORMAT.into(),
        version: MARKER_VERSION,
        rados: rados.clone(),
    };
    let mut bytes = serde_json::to_vec_pretty(&m).expect("the marker serializes");
    bytes.push(b'\n');
    super::store::replace_file(
        dir,
        &dir.join(MARKER_FILE),
        ".store.json.tmp.",
        &bytes,
        super::store::ReplaceSteps {
            create: "creating temporary store marker",
            write: "writing temporary store marker",
            rename: "writing the store marker",
        },
    )
}

/// The object store for `dir`: its files, or the RADOS store its marker names.
pub fn objects_for(dir: &Path) -> Result<Arc<dyn ObjectStore>, KmsError> {
    match read_marker(dir)? {
        None => Ok(Arc::new(FileObjects::new(dir))),
        Some(r) => connect(&r),
    }
}

/// Connects to a RADOS store (only in builds with the `rbd` feature).
pub fn connect(rados: &RadosStore) -> Result<Arc<dyn ObjectStore>, KmsError> {
    #[cfg(feature = "rbd")]
    {
        Ok(Arc::new(super::rados::RadosObjects::connect(rados)?))
    }
    #[cfg(not(feature = "rbd"))]
    {
        Err(KmsError::NoCephSupport {
            location: rados.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_markers() {
        let r = RadosStore::parse("rados:kms/prod").unwrap();
        assert_eq!((r.pool.as_str(), r.namespace.as_str()), ("kms", "prod"));
        assert_eq!(r.to_string(), "rados:kms/prod");
        assert_eq!(
            RadosStore::parse("rados:kms").unwrap().to_string(),
            "rados:kms"
        );
        for bad in ["kms", "rados:", "rados:a/b/c", "file:/x"] {
            assert!(RadosStore::parse(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), None);
        write_marker(dir.path(), &r).unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), Some(r));
    }

    /// Without the `rbd` feature a RADOS store is refused with a clear reason, creating nothing.
    #[cfg(not(feature = "rbd"))]
    #[test]
    fn rados_store_needs_the_rbd_feature() {
        let dir = tempfile::tempdir().unwrap();
        let r = RadosStore::parse("rados:kms/prod").unwrap();
        let e = crate::kms::KeyStore::init_at(
            &dir.path().join("d"),
            Some(&r),
            crate::kms::InitRoot::GenerateKeyFile,
            None,
            std::sync::Arc::new(crate::kms::SystemClock),
        )
        .unwrap_err();
        assert!(e.to_string().contains("built without Ceph support"), "{e}");
        assert!(!dir.path().join("d").exists());
        write_marker(dir.path(), &r).unwrap();
        assert!(matches!(
            objects_for(dir.path()),
            Err(KmsError::NoCephSupport { .. })
        ));
    }

    /// The marker format of version 1 keeps reading (and is written the same way).
    #[test]
    fn golden_marker_v1() {
        let golden = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/store-marker/store-v1.json"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(golden, dir.path().join(MARKER_FILE)).unwrap();
        let r = read_marker(dir.path()).unwrap().unwrap();
        assert_eq!(r.to_string(), "rados:kms/prod");
        assert_eq!(r.ceph.client_id.as_deref(), Some("kms"));
        assert_eq!(
            r.ceph.keyring,
            Some("/etc/ceph/ceph.client.kms.keyring".into())
        );
        let again = tempfile::tempdir().unwrap();
        write_marker(again.path(), &r).unwrap();
        assert_eq!(
            std::fs::read_to_string(again.path().join(MARKER_FILE)).unwrap(),
            std::fs::read_to_string(golden).unwrap()
        );
    }
}
