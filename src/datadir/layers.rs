//! Volumes made from snapshots, and copies: attaching a layer with its chain of parents, clones
//! (`volume clone NAME@SNAP NEW [--key CMK]`), flatten (copy the shared data in, end the
//! dependency) and copy (a full re-encryption under a new DEK, EBS CopySnapshot).
//!
//! Keys: every clone has its own DEK (under `--key`, else under the snapshot's CMK), used for
//! what it writes; reading what it still shares needs the parent's DEK too, so attaching a
//! clone unwraps one DEK per layer with a different one (as librbd's layered encryption does).
//! Disabling or deleting the parent's CMK makes the clone unreadable until it is flattened.

use std::sync::Arc;

use uuid::Uuid;

use super::{CreateOptions, DataDir, DataDirError};
use crate::backend::rbd::RbdLocation;
use crate::kms::KeyProvider;
use crate::volume::{ParentRef, Volume, VolumeHeader};

/// Most layers under one volume (a guard against a cycle of hand-edited headers).
pub(super) const MAX_DEPTH: usize = 64;
/// Bytes flattened or copied per step.
const STEP: u64 = 1 << 20;

/// Makes `header` a new layer whose parent is snapshot `source` (header `sh`, layer id
/// `layer_id`): what a clone's header records of the layer it was made on.
pub(super) fn link_to_parent(
    header: &mut VolumeHeader,
    source: &str,
    sh: &VolumeHeader,
    layer_id: Uuid,
) {
    header.layer_id = Some(Uuid::new_v4());
    header.parent = Some(ParentRef {
        name: source.to_string(),
        volume_id: sh.volume_id,
        layer_id,
        size: sh.size,
    });
}

impl DataDir {
    /// Links `vol` (layer `name`, already attached) to its parents, each attached read-only.
    pub(super) fn attach_parents(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        vol: Volume,
        depth: usize,
    ) -> Result<Volume, DataDirError> {
        let Some(p) = vol.header().parent.clone() else {
            return Ok(vol);
        };
        if depth >= MAX_DEPTH {
            return Err(DataDirError::Invalid {
                name: name.to_string(),
                reason: format!("more than {MAX_DEPTH} layers below it"),
            });
        }
        let missing = |e| match e {
            DataDirError::NotFound { path, .. } => DataDirError::MissingParent {
                name: name.to_string(),
                parent: p.name.clone(),
                path,
            },
            e => e,
        };
        // A snapshot of an RBD volume (which attaches its own parents, if any).
        if let Some((loc, snap)) = self.rbd_snapshot_location(&p.name)? {
            let pv = self
                .attach_rbd_snapshot_at(keys, &p.name, &loc, &snap, depth + 1)
                .map_err(missing)?;
            return vol.with_parent(Arc::new(pv)).map_err(Self::vol_err(name));
        }
        let parent = self.open_locked(&p.name, false, false).map_err(missing)?;
        let h = VolumeHeader::read_from(&parent).map_err(Self::vol_err(&p.name))?;
        let key = self.unwrap_key(keys, &p.name, &h)?;
        let pv =
            Volume::with_key(Box::new(parent), h, &key, true).map_err(Self::vol_err(&p.name))?;
        let pv = self.attach_parents(keys, &p.name, pv, depth + 1)?;
        vol.with_parent(Arc::new(pv)).map_err(Self::vol_err(name))
    }

    /// Creates volume `new` from snapshot `source` (`NAME@SNAP`): no data is copied; it reads
    /// the snapshot where it has not written. Its own DEK comes from `key`, else from the
    /// snapshot's CMK.
    pub fn clone_volume(
        &self,
        keys: &dyn KeyProvider,
        source: &str,
        new: &str,
        key: Option<&str>,
    ) -> Result<VolumeHeader, DataDirError> {
        if self.rbd_snapshot_location(source)?.is_some() {
            return self.clone_rbd(keys, source, new, key, None);
        }
        if super::split_layer_name(source)?.1.is_none() {
            return Err(DataDirError::InvalidName {
                name: source.to_string(),
                reason: "clone a snapshot (NAME@SNAP); take one with `volume snapshot` first",
            });
        }
        // Shared lock until the clone is in place: a snapshot delete (exclusive) cannot run
        // between reading its header and the clone appearing as its dependent.
        let snap = self.open_locked(source, false, false)?;
        let sh = VolumeHeader::read_from(&snap).map_err(Self::vol_err(source))?;
        let Some(layer_id) = sh.layer_id else {
            return Err(DataDirError::Invalid {
                name: source.to_string(),
                reason: "its header has no layer id (not a snapshot)".into(),
            });
        };
        let cmk = key.map(str::to_string).unwrap_or(sh.key_id.to_string());
        let opts = CreateOptions {
            sector_size: sh.sector_size,
            discard: sh.discard,
        };
        self.volume_path(new)?;
        self.check_free(new)?;
        let (mut header, xts) = self.new_header(keys, new, sh.size, &cmk, opts)?;
        link_to_parent(&mut header, source, &sh, layer_id);
        let nv = self.build_with(new, &header, &xts)?;
        let header = nv.volume.header().clone();
        nv.publish(self, new)?;
        drop(snap);
        tracing::info!(volume = new, source, key_id = %header.key_id, "volume cloned");
        Ok(header)
    }

    /// Copies into volume `name` all the data it still reads from its parents, then removes its
    /// parent reference: it no longer depends on a snapshot (or on the snapshot's key).
    /// Resumable: an interrupted flatten leaves a consistent volume and simply runs again.
    /// Returns the bytes copied.
    pub fn flatten(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, DataDirError> {
        super::refuse_snapshot(name, "flatten")?;
        // RBD clones are flattened by librbd; those cryptnbd layers itself (under another
        // key) like files, below.
        if let Some((loc, false)) = self.rbd_reference(name)? {
            return self.flatten_rbd(name, &loc, &mut progress);
        }
        let vol = self.attach(keys, name, false)?;
        if vol.parent().is_none() {
            return Ok(0);
        }
        let size = vol.size();
        let mut copied = 0;
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(STEP);
            copied += vol.copy_up(pos, n as usize).map_err(Self::vol_err(name))?;
            pos += n;
            progress(pos, size);
            if pos == size / 2 {
                vol.flush().map_err(Self::vol_err(name))?;
                super::rbd_intent::failpoint("flatten-half");
            }
        }
        vol.flush().map_err(Self::vol_err(name))?;
        let mut h = vol.header().clone();
        h.parent = None;
        h.write_update(&*vol.backend())
            .map_err(Self::vol_err(name))?;
        tracing::info!(volume = name, copied, "volume flattened");
        Ok(copied)
    }

    /// Copies volume or snapshot `source` into a new volume `dest` under a new DEK from `key`
    /// (full re-encryption: plaintext only in memory; holes and all-zero data stay holes), on
    /// a file or, with `loc`, an RBD image. Built under a temporary name (or with an RBD intent
    /// record), so a crash or failure leaves no partial `dest`.
    pub fn copy_volume(
        &self,
        keys: &dyn KeyProvider,
        source: &str,
        dest: &str,
        key: &str,
        loc: Option<&RbdLocation>,
        progress: impl FnMut(u64, u64),
    ) -> Result<VolumeHeader, DataDirError> {
        let src = self.attach(keys, source, true)?;
        let size = src.size();
        let opts = CreateOptions {
            sector_size: src.sector_size(),
            discard: src.header().discard,
        };
        let header = match loc {
            None => {
                let nv = self.build_new(keys, dest, size, key, opts)?;
                self.copy_data(source, &src, dest, &nv.volume, progress)?;
                let header = nv.volume.header().clone();
                nv.publish(self, dest)?;
                header
            }
            Some(loc) => self.create_rbd_with(keys, dest, size, key, opts, loc, |vol| {
                self.copy_data(source, &src, dest, vol, progress)
            })?,
        };
        tracing::info!(source, volume = dest, key_id = %header.key_id, "volume copied");
        Ok(header)
    }

    /// Decrypts `src` and writes its data into `dst` (same size), skipping holes and all-zero
    /// data; flushes `dst`.
    fn copy_data(
        &self,
        src_name: &str,
        src: &Volume,
        dst_name: &str,
        dst: &Volume,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), DataDirError> {
        let half = src.size() / 2;
        self.for_each_data(src_name, src, &mut progress, |pos, data| {
            if pos >= half {
                super::rbd_intent::failpoint("copy-half");
            }
            dst.write(pos, data, false).map_err(Self::vol_err(dst_name))
        })?;
        dst.flush().map_err(Self::vol_err(dst_name))
    }
}
