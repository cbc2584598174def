//! Snapshots of RBD volumes, on RBD's own machinery: a snapshot `NAME@SNAP` is the image's RBD
//! snapshot `SNAP` (`rbd_snap_create`, no data copied, the cryptnbd header frozen with it),
//! listed and removed with `rbd_snap_list`/`rbd_snap_remove` (refused while clones need it),
//! served read-only by opening the image at the snapshot (no lock). Clones and flatten are in
//! `rbd_clone`.
//!
//! Online: a snapshot of a volume a gateway serves goes through that gateway's librbd (RBD
//! forwards it to the exclusive lock's holder, which blocks new writes, flushes and snapshots),
//! so it is crash-consistent like one taken offline.
//!
//! Identity: before each offline snapshot the head gets a fresh layer id (a crash-safe header
//! update), so its frozen header has its own (an online one shares the head's); a clone's
//! header names its parent as the file layout does (`NAME@SNAP`, volume id, layer id, size).
//!
//! Crashes: a snapshot is one RBD operation after a crash-safe header update, so a crash leaves
//! the snapshot taken or not, and the volume intact either way.

use std::io;

use uuid::Uuid;

use super::rbd::{allocated, rbd_err};
use super::rbd_intent::failpoint;
use super::snapshot::{split_layer_name, SnapshotInfo};
use super::{DataDir, DataDirError, VolumeInfo};
use crate::backend::rbd::{self as rbd, RbdBackend, RbdError, RbdLocation};
use crate::kms::KeyProvider;
use crate::volume::{Volume, VolumeHeader};

pub(super) fn invalid(name: &str, reason: impl Into<String>) -> DataDirError {
    DataDirError::Invalid {
        name: name.to_string(),
        reason: reason.into(),
    }
}

impl DataDir {
    /// `(image, SNAP)` when `name` is `NAME@SNAP` and NAME is an RBD volume.
    pub fn rbd_snapshot_location(
        &self,
        name: &str,
    ) -> Result<Option<(RbdLocation, String)>, DataDirError> {
        let (base, snap) = split_layer_name(name)?;
        let Some(snap) = snap else { return Ok(None) };
        Ok(self.rbd_location(base)?.map(|l| (l, snap.to_string())))
    }

    /// `NAME@SNAP` of RBD volume `name`'s snapshots (none when it is not an RBD volume or the
    /// cluster cannot be reached: `check` reports that on the volume itself).
    pub(super) fn rbd_snapshot_names(&self, name: &str) -> Vec<String> {
        let Ok(Some(loc)) = self.rbd_location(name) else {
            return Vec::new();
        };
        rbd::list_snapshots(&loc)
            .unwrap_or_default()
            .into_iter()
            .map(|s| format!("{name}@{}", s.name))
            .filter(|t| split_layer_name(t).is_ok())
            .collect()
    }

    /// The data-directory name of the RBD volume on image `pool/image`, if any.
    fn rbd_volume_named(&self, pool: &str, image: &str) -> Option<String> {
        self.list_volumes().ok()?.into_iter().find(
            |n| matches!(self.rbd_location(n), Ok(Some(l)) if l.pool == pool && l.image == image),
        )
    }

    /// `volume snapshot NAME@SNAP` on an RBD volume. Offline: a fresh layer id in the head's
    /// header, then RBD's snapshot. While a gateway serves NAME: RBD's snapshot through the
    /// gateway's librbd (see [`rbd::create_snapshot_online`]); the header cannot change then, so
    /// the snapshot shares the head's layer id (the clone's link to its parent is librbd's,
    /// exact by snapshot id; the layer id only cross-checks it).
    pub(super) fn snapshot_rbd(
        &self,
        target: &str,
        name: &str,
        snap: &str,
        loc: &RbdLocation,
    ) -> Result<VolumeHeader, DataDirError> {
        let exists = || -> Result<(), DataDirError> {
            let snaps = rbd::list_snapshots(loc).map_err(rbd_err(name))?;
            if snaps.iter().any(|s| s.name == snap) {
                return Err(invalid(target, "this snapshot already exists"));
            }
            Ok(())
        };
        let head = match self.open_rbd_exclusive(name, loc) {
            Err(DataDirError::Rbd { source, .. }) if source.is_busy() => {
                exists()?;
                rbd::create_snapshot_online(loc, snap).map_err(rbd_err(target))?;
                let b = RbdBackend::open_snapshot(loc, snap).map_err(rbd_err(target))?;
                let h = VolumeHeader::read_from(&b).map_err(Self::vol_err(target))?;
                tracing::info!(volume = name, snapshot = target, image = %loc,
                    "RBD snapshot taken while served");
                return Ok(h);
            }
            r => r?,
        };
        exists()?;
        let mut h = VolumeHeader::read_from(&head).map_err(Self::vol_err(name))?;
        h.layer_id = Some(Uuid::new_v4());
        let h = h.write_update(&head).map_err(Self::vol_err(name))?;
        failpoint("rbd-snapshot-after-header");
        head.create_snapshot(snap).map_err(rbd_err(target))?;
        tracing::info!(volume = name, snapshot = target, image = %loc, layer_id = ?h.layer_id,
            "RBD snapshot taken");
        Ok(h)
    }

    /// The snapshots of RBD volume `name`, with their frozen headers and clones.
    pub(super) fn snapshots_rbd(
        &self,
        name: &str,
        loc: &RbdLocation,
    ) -> Result<Vec<SnapshotInfo>, DataDirError> {
        let mut out = Vec::new();
        for s in rbd::list_snapshots(loc).map_err(rbd_err(name))? {
            let target = format!("{name}@{}", s.name);
            if split_layer_name(&target).is_err() {
                // Made outside cryptnbd under a name the data directory cannot address.
                continue;
            }
            let b = RbdBackend::open_snapshot(loc, &s.name).map_err(rbd_err(&target))?;
            let header = VolumeHeader::read_from(&b).map_err(Self::vol_err(&target))?;
            let allocated_bytes = allocated(&target, loc, &b)?;
            let clones = self.clone_names(&b, &target)?;
            out.push(SnapshotInfo {
                name: target,
                header,
                allocated_bytes,
                clones,
            });
        }
        Ok(out)
    }

    /// The clones of the snapshot `b` is open at (data-directory names where known, else
    /// `rbd:POOL/IMAGE`), without those in RBD's trash.
    fn clone_names(&self, b: &RbdBackend, target: &str) -> Result<Vec<String>, DataDirError> {
        let mut out: Vec<String> = b
            .children()
            .map_err(rbd_err(target))?
            .into_iter()
            .filter(|c| !c.trash)
            .map(|c| {
                self.rbd_volume_named(&c.pool, &c.image)
                    .unwrap_or_else(|| format!("rbd:{}/{}", c.pool, c.image))
            })
            .collect();
        out.extend(self.layered_dependents(target));
        Ok(out)
    }

    /// The volumes cryptnbd layers over snapshot `target` (clones under another key), and
    /// their snapshots, which read from it too.
    fn layered_dependents(&self, target: &str) -> Vec<String> {
        let names_parent = |b: &RbdBackend| {
            VolumeHeader::read_from(b).is_ok_and(|h| h.parent.is_some_and(|p| p.name == target))
        };
        let mut out = Vec::new();
        for name in self.list_volumes().unwrap_or_default() {
            let Ok(Some((loc, true))) = self.rbd_reference(&name) else {
                continue;
            };
            if RbdBackend::open(&loc, rbd::Access::ReadShared).is_ok_and(|b| names_parent(&b)) {
                out.push(name.clone());
            }
            for s in rbd::list_snapshots(&loc).unwrap_or_default() {
                if RbdBackend::open_snapshot(&loc, &s.name).is_ok_and(|b| names_parent(&b)) {
                    out.push(format!("{name}@{}", s.name));
                }
            }
        }
        out
    }

    /// Deletes RBD snapshot `target`; refused while clones depend on it (librbd would move it
    /// to its trash and keep it: the data would stay, unseen).
    pub(super) fn delete_snapshot_rbd(
        &self,
        target: &str,
        loc: &RbdLocation,
        snap: &str,
    ) -> Result<(), DataDirError> {
        let clones = {
            let b = RbdBackend::open_snapshot(loc, snap).map_err(rbd_err(target))?;
            self.clone_names(&b, target)?
        };
        if !clones.is_empty() {
            return Err(DataDirError::HasClones {
                name: target.to_string(),
                clones,
            });
        }
        rbd::remove_snapshot(loc, snap).map_err(rbd_err(target))?;
        tracing::info!(snapshot = target, image = %loc, "RBD snapshot deleted");
        Ok(())
    }

    /// Attaches RBD snapshot `name` read-only (no lock: any number of gateways may serve it).
    pub(super) fn attach_rbd_snapshot(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        loc: &RbdLocation,
        snap: &str,
    ) -> Result<Volume, DataDirError> {
        self.attach_rbd_snapshot_at(keys, name, loc, snap, 0)
    }

    /// [`DataDir::attach_rbd_snapshot`] as layer `depth` of a chain; the snapshot of a volume
    /// cryptnbd layers itself gets its parents attached too.
    pub(super) fn attach_rbd_snapshot_at(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        loc: &RbdLocation,
        snap: &str,
        depth: usize,
    ) -> Result<Volume, DataDirError> {
        let backend = match RbdBackend::open_snapshot(loc, snap) {
            Err(RbdError::Image { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let base = split_layer_name(name)?.0;
                return Err(DataDirError::NotFound {
                    name: name.to_string(),
                    path: self.rbd_reference_path(base)?,
                });
            }
            r => r.map_err(rbd_err(name))?,
        };
        let h = VolumeHeader::read_from(&backend).map_err(Self::vol_err(name))?;
        let key = self.unwrap_key(keys, name, &h)?;
        let vol =
            Volume::with_key(Box::new(backend), h, &key, true).map_err(Self::vol_err(name))?;
        if matches!(
            self.rbd_reference(split_layer_name(name)?.0)?,
            Some((_, true))
        ) {
            return self.attach_parents(keys, name, vol, depth);
        }
        Ok(vol)
    }

    /// `volume info NAME@SNAP` of an RBD snapshot.
    pub(super) fn info_rbd_snapshot(
        &self,
        name: &str,
        loc: &RbdLocation,
        snap: &str,
    ) -> Result<VolumeInfo, DataDirError> {
        let b = RbdBackend::open_snapshot(loc, snap).map_err(rbd_err(name))?;
        let header = VolumeHeader::read_from(&b).map_err(Self::vol_err(name))?;
        let allocated_bytes = allocated(name, loc, &b)?;
        Ok(VolumeInfo {
            name: name.to_string(),
            path: self.rbd_reference_path(split_layer_name(name)?.0)?,
            backend: format!("{loc}@{snap}"),
            header,
            allocated_bytes,
        })
    }
}
