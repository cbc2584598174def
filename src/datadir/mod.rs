//! The data directory: the glue between a key provider and the volumes. It owns the layout
//! (`volumes/NAME.vol` beside the key store files), volume names, and the operations that need
//! both a volume file and data keys, which it asks of a [`KeyProvider`] (the key seam: the
//! embedded key store or a remote KMS; this module does not care which): create (a fresh DEK from `create-datakey`), attach
//! (`decrypt-datakey` on the header's wrapped DEK), rekey (`re-encrypt`, header only), plus the
//! header-only ones (info, resize, delete) and raw image import/export.
//!
//! Snapshots (`volumes/NAME@SNAP.vol`), clones, flatten and copies are in `snapshot` and
//! `layers`; those of RBD volumes (RBD's own snapshots and clones) in `rbd_snapshot` and
//! `rbd_clone`.
//!
//! A volume lives in a file, or on a Ceph RBD image named by a small reference file
//! (`volumes/NAME.rbd`, see [`rbd`]); both hold the same header and data area.
//!
//! A volume file is locked while in use: a read-write attach holds an exclusive `flock` (one
//! writer per volume, across processes: their read-modify-write locks would not see each other),
//! a read-only attach a shared one, and the operations that change or remove the file (resize,
//! rekey, delete) take it exclusively, so they refuse to run on a volume a server has attached.
//! New volumes (create, import) are built under a temporary name and appear complete. RBD volumes
//! use RBD's exclusive lock instead (see [`rbd`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::backend::rbd::RbdError;
use crate::backend::FileBackend;
use crate::crypto::{KeyError, XtsKey};
use crate::kms::{EncryptionContext, KeyProvider, KmsError};
use crate::volume::{Volume, VolumeError, VolumeHeader};

mod check;
mod create;
mod header_ops;
mod layers;
mod rbd;
mod rbd_clone;
mod rbd_intent;
mod rbd_snapshot;
mod snapshot;
mod snapshot_online;
mod transfer;

pub use check::{CheckReport, Finding, Severity};
pub use rbd_intent::{IntentFinding, FAILPOINT_ENV};
pub use snapshot::{split_layer_name, SnapshotInfo};
pub use snapshot_online::OnlineSnapshot;

const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("volume {name:?} does not exist (no {})", path.display())]
    NotFound { name: String, path: PathBuf },

    #[error("volume {name:?} already exists ({})", path.display())]
    AlreadyExists { name: String, path: PathBuf },

    #[error("volume {name:?} is in use (attached read-write by a running server or another command, which excludes every other attach and change); detach it first")]
    InUse { name: String },

    #[error("volume {name:?}")]
    Volume {
        name: String,
        #[source]
        source: VolumeError,
    },

    /// The key store refused (disabled, pending deletion or deleted key, wrong context…).
    #[error("cannot {action} volume {name:?}: the key provider refused")]
    Kms {
        name: String,
        action: &'static str,
        #[source]
        source: KmsError,
    },

    /// The header's encryption context does not name this volume: its wrapped DEK belongs to
    /// another volume (a header copied or tampered with).
    #[error("volume {name:?}: its header's encryption context names volume id {found:?}, but the header says {expected}; refusing a data key that belongs to another volume")]
    ContextMismatch {
        name: String,
        expected: Uuid,
        found: Option<String>,
    },

    #[error("volume {name:?}: the key provider returned an unusable data key")]
    BadDataKey {
        name: String,
        #[source]
        source: KeyError,
    },

    #[error("cannot shrink volume {name:?} from {current} to {requested} bytes: only growing is supported (shrinking would destroy data)")]
    Shrink {
        name: String,
        current: u64,
        requested: u64,
    },

    /// The Ceph side of an RBD volume failed (cluster unreachable, image locked by a live
    /// gateway, build without RBD support…).
    #[error("volume {name:?}: {source}")]
    Rbd {
        name: String,
        #[source]
        source: RbdError,
    },

    /// An offline snapshot was asked of a volume a server (or another command) has attached.
    #[error("cannot snapshot volume {name:?}: it is attached read-write (by a running `cryptnbd serve` or another command); a server that has it attached takes the snapshot online through its control socket (`cryptnbd volume snapshot` does so when it finds the server's socket in the data directory; else `cryptnbd ctl --ctl PATH snapshot NAME@SNAP`)")]
    SnapshotAttached { name: String },

    /// A layer's parent (a snapshot it was made from) is not in the data directory.
    #[error("volume {name:?}: its parent layer {parent:?} is missing ({}): the data it shares cannot be read", path.display())]
    MissingParent {
        name: String,
        parent: String,
        path: PathBuf,
    },

    /// A snapshot that clones still depend on cannot be deleted.
    #[error("cannot delete snapshot {name:?}: the volumes {clones:?} are clones of it and read their unwritten data from it; `cryptnbd volume flatten` them (or delete them) first")]
    HasClones { name: String, clones: Vec<String> },

    #[error("invalid request for volume {name:?}: {reason}")]
    Invalid { name: String, reason: String },

    #[error("{what} {}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(
    what: impl Into<String>,
    path: &Path,
) -> impl FnOnce(io::Error) -> DataDirError + '_ {
    let what = what.into();
    move |source| DataDirError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Options of a new volume.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// 512 or 4096.
    pub sector_size: u32,
    /// Whether trim/write-zeroes may punch holes (reveals which sectors are unused).
    pub discard: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            sector_size: 4096,
            discard: true,
        }
    }
}

/// What `volume info` shows: the header plus file facts. No key store access needed.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: String,
    pub path: PathBuf,
    /// Where the data is: `file`, or `rbd:POOL/IMAGE`.
    pub backend: String,
    pub header: VolumeHeader,
    /// Bytes the file occupies on disk (sparse files occupy less than their size).
    pub allocated_bytes: u64,
}

/// A data directory (key store + `volumes/`).
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    /// Open RBD volumes read-only without their exclusive lock, so several gateways can export
    /// them at once (only when the user asks for it).
    rbd_shared_read_only: bool,
}

/// The encryption context bound to a volume's DEK.
pub fn volume_context(volume_id: Uuid) -> EncryptionContext {
    let mut ctx = EncryptionContext::new();
    ctx.insert("volume_id".into(), volume_id.to_string());
    ctx
}

fn check_name(name: &str) -> Result<(), DataDirError> {
    let bad = |reason| {
        Err(DataDirError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad("it must have 1 to 64 characters");
    }
    if name.starts_with(['.', '-']) {
        return bad("it must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
    {
        return bad("use only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn try_lock(file: &File, exclusive: bool, name: &str, path: &Path) -> Result<(), DataDirError> {
    // flock(2) semantics: released when the file is closed, shared by every attach in a process.
    let r = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match r {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(DataDirError::InUse {
            name: name.to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("locking volume file", path)(e)),
    }
}

pub(crate) fn round_up(n: u64, to: u64) -> Option<u64> {
    n.checked_add(to - 1).map(|x| x / to * to)
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir {
            root: root.into(),
            rbd_shared_read_only: false,
        }
    }

    /// Read-only attaches of RBD volumes skip the exclusive lock (see [`crate::backend::rbd`]).
    pub fn with_rbd_shared_read_only(mut self, shared: bool) -> DataDir {
        self.rbd_shared_read_only = shared;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// `volumes/NAME.vol`, after checking the name.
    pub fn volume_path(&self, name: &str) -> Result<PathBuf, DataDirError> {
        check_name(name)?;
        Ok(self.volumes_dir().join(format!("{name}.vol")))
    }

    /// Names of the volumes, sorted.
    pub fn list_volumes(&self) -> Result<Vec<String>, DataDirError> {
        let dir = self.volumes_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let file_name = entry.file_name();
            let Some(s) = file_name.to_str() else {
                continue;
            };
            if let Some(name) = s.strip_suffix(".vol").or_else(|| s.strip_suffix(".rbd")) {
                if check_name(name).is_ok() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// `volumes/NAME.vol`, or `volumes/NAME@SNAP.vol` for a snapshot, after checking the name.
    pub fn layer_path(&self, name: &str) -> Result<PathBuf, DataDirError> {
        split_layer_name(name)?;
        Ok(self.volumes_dir().join(format!("{name}.vol")))
    }

    fn existing(&self, name: &str) -> Result<PathBuf, DataDirError> {
        let path = self.layer_path(name)?;
        if !path.exists() {
            return Err(DataDirError::NotFound {
                name: name.to_string(),
                path,
            });
        }
        Ok(path)
    }

    /// Opens a volume file with a lock: shared for readers/attach, exclusive for changes.
    fn open_locked(
        &self,
        name: &str,
        writable: bool,
        exclusive: bool,
    ) -> Result<FileBackend, DataDirError> {
        let path = self.existing(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(io_err("opening volume file", &path))?;
        try_lock(&file, exclusive, name, &path)?;
        Ok(FileBackend::new(file, path))
    }

    pub(crate) fn vol_err(name: &str) -> impl FnOnce(VolumeError) -> DataDirError + '_ {
        move |source| DataDirError::Volume {
            name: name.to_string(),
            source,
        }
    }

    /// Creates a volume of `size` bytes (a multiple of the sector size) whose DEK is a fresh data
    /// key from `key` (a CMK id or alias). The file appears complete or not at all.
    pub fn create_volume(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        size: u64,
        key: &str,
        opts: CreateOptions,
    ) -> Result<VolumeHeader, DataDirError> {
        let new = self.build_new(keys, name, size, key, opts)?;
        let header = new.volume.header().clone();
        new.publish(self, name)?;
        tracing::info!(volume = name, volume_id = %header.volume_id, key_id = %header.key_id,
            key_version = header.key_version, size, "volume created");
        Ok(header)
    }

    /// Refuses a name already used by a file volume or an RBD reference.
    fn check_free(&self, name: &str) -> Result<(), DataDirError> {
        for path in [self.volume_path(name)?, self.rbd_reference_path(name)?] {
            if path.exists() {
                return Err(DataDirError::AlreadyExists {
                    name: name.to_string(),
                    path,
                });
            }
        }
        Ok(())
    }

    /// A new volume's header with a fresh DEK from `key` (wrapped in the header, plaintext
    /// returned for formatting the volume).
    fn new_header(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        size: u64,
        key: &str,
        opts: CreateOptions,
    ) -> Result<(VolumeHeader, XtsKey), DataDirError> {
        let mut header = VolumeHeader::new(Uuid::new_v4(), size, opts.sector_size);
        header.discard = opts.discard;
        header.validate().map_err(Self::vol_err(name))?;
        let ctx = volume_context(header.volume_id);
        let dk = keys
            .create_data_key(key, &ctx, 512)
            .map_err(|source| DataDirError::Kms {
                name: name.to_string(),
                action: "create",
                source,
            })?;
        let xts = XtsKey::from_slice(dk.plain_text.dangerous_as_bytes()).map_err(|e| {
            DataDirError::BadDataKey {
                name: name.to_string(),
                source: e,
            }
        })?;
        header.key_id = dk.wrapped.key_id;
        header.key_version = dk.wrapped.key_version;
        header.wrapped_dek = dk.wrapped.cipher_text;
        header.encryption_context = ctx;
        Ok((header, xts))
    }

    /// Asks the key store to unwrap the DEK of header `h`, after checking that the header's
    /// encryption context names this volume.
    fn unwrap_key(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        h: &VolumeHeader,
    ) -> Result<XtsKey, DataDirError> {
        let found = h.encryption_context.get("volume_id");
        if found != Some(&h.volume_id.to_string()) {
            return Err(DataDirError::ContextMismatch {
                name: name.to_string(),
                expected: h.volume_id,
                found: found.cloned(),
            });
        }
        let uk = keys
            .decrypt_data_key(&h.key_id.to_string(), &h.wrapped_dek, &h.encryption_context)
            .map_err(|source| DataDirError::Kms {
                name: name.to_string(),
                action: "attach",
                source,
            })?;
        XtsKey::from_slice(uk.plain_text.dangerous_as_bytes()).map_err(|e| {
            DataDirError::BadDataKey {
                name: name.to_string(),
                source: e,
            }
        })
    }

    /// Attaches a volume: reads its header and asks the key store to unwrap its DEK. A refusal
    /// (disabled, pending deletion or deleted key, wrong context) names the volume and the reason.
    pub fn attach(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        read_only: bool,
    ) -> Result<Volume, DataDirError> {
        if let Some(loc) = self.rbd_location(name)? {
            return self.attach_rbd(keys, name, &loc, read_only);
        }
        if let Some((loc, snap)) = self.rbd_snapshot_location(name)? {
            return self.attach_rbd_snapshot(keys, name, &loc, &snap);
        }
        // Snapshots are always read-only.
        let read_only = read_only || split_layer_name(name)?.1.is_some();
        // Read-write attaches are exclusive (two writers' read-modify-write locks would not see
        // each other); read-only attaches share.
        let backend = self.open_locked(name, !read_only, !read_only)?;
        self.recover_snapshots(name, &backend);
        let h = VolumeHeader::read_from(&backend).map_err(Self::vol_err(name))?;
        let key = self.unwrap_key(keys, name, &h)?;
        let vol =
            Volume::with_key(Box::new(backend), h, &key, read_only).map_err(Self::vol_err(name))?;
        self.attach_parents(keys, name, vol, 0)
    }

    /// The header and allocation of a volume (no key store access).
    pub fn info(&self, name: &str) -> Result<VolumeInfo, DataDirError> {
        if let Some(loc) = self.rbd_location(name)? {
            return self.info_rbd(name, &loc);
        }
        if let Some((loc, snap)) = self.rbd_snapshot_location(name)? {
            return self.info_rbd_snapshot(name, &loc, &snap);
        }
        let path = self.existing(name)?;
        let file = File::open(&path).map_err(io_err("opening volume file", &path))?;
        let meta = file
            .metadata()
            .map_err(io_err("reading the metadata of", &path))?;
        let backend = FileBackend::new(file, &path);
        let header = VolumeHeader::read_from(&backend).map_err(Self::vol_err(name))?;
        Ok(VolumeInfo {
            name: name.to_string(),
            path,
            backend: "file".into(),
            header,
            allocated_bytes: meta.blocks() * 512,
        })
    }

    /// Deletes a volume file (refused while it is attached).
    pub fn delete(&self, name: &str) -> Result<(), DataDirError> {
        if split_layer_name(name)?.1.is_some() {
            return self.delete_snapshot(name, |_, _| {});
        }
        if let Some(loc) = self.rbd_location(name)? {
            return self.delete_rbd(name, &loc);
        }
        let backend = self.open_locked(name, false, true)?;
        let path = backend.path().to_path_buf();
        std::fs::remove_file(&path).map_err(io_err("deleting volume file", &path))?;
        sync_dir(&self.volumes_dir())?;
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }
}

/// Refuses an operation that changes a volume on a snapshot (`NAME@SNAP`, read-only).
fn refuse_snapshot(name: &str, action: &str) -> Result<(), DataDirError> {
    if split_layer_name(name)?.1.is_some() {
        return Err(DataDirError::Invalid {
            name: name.to_string(),
            reason: format!("a snapshot is read-only: cannot {action} it"),
        });
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), DataDirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        let d = DataDir::new("/tmp/x");
        assert!(d
            .volume_path("disk0")
            .unwrap()
            .ends_with("volumes/disk0.vol"));
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "sp ace",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(d.volume_path(bad), Err(DataDirError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(1, 512), Some(512));
        assert_eq!(round_up(4096, 4096), Some(4096));
        assert_eq!(round_up(u64::MAX, 4096), None);
    }
}
