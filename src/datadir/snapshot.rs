//! Snapshots of file volumes: taking one (offline), listing, deleting, and the recovery of a
//! snapshot interrupted by a crash. The layout (see `crate::volume::layer` for the read rules):
//!
//! - `volumes/NAME.vol` is always the live, writable layer (the head).
//! - A snapshot `NAME@SNAP` is the head file as it was, frozen under the name
//!   `volumes/NAME@SNAP.vol` — no data is copied. The head continues in a new, empty child file
//!   whose header names the frozen layer as its parent (volume id, layer id, size); its
//!   never-written sectors fall through to it. Snapshots of one volume form a chain
//!   (head → newest snapshot → … → oldest), all under the volume's one DEK.
//! - Taking one: (1) the new child is built under `.NAME.vol.PID.tmp` and synced; (2) the head
//!   file is hard-linked as `NAME@SNAP.vol`; (3) the child is renamed over `NAME.vol`, and the
//!   directory synced after each step. A crash after (2) and before (3) leaves `NAME@SNAP.vol`
//!   and `NAME.vol` naming one file: the next attach or snapshot of NAME (holding its lock)
//!   removes that link — the snapshot did not happen — and the temporary child is cleaned up
//!   like an interrupted create.
//! - Deleting a snapshot merges its sectors into its child in the chain (by ciphertext, no key
//!   needed; safe to interrupt and re-run), points the child at the snapshot's parent (a
//!   crash-safe header update), then removes the file. It is refused while clones (other
//!   volumes made from it) depend on it; `volume flatten` ends that dependency.
//! - A file volume attached by a running server is snapshotted by that server (`snapshot_online`,
//!   reached through the control socket), with the same file steps; here it is refused with a
//!   clear error. RBD volumes use RBD's own snapshots and clones instead (`rbd_snapshot`,
//!   `rbd_clone`), also while served.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use uuid::Uuid;

use super::rbd_intent::failpoint;
use super::{check_name, io_err, sync_dir, DataDir, DataDirError};
use crate::backend::FileBackend;
use crate::volume::{merge_into_child, VolumeHeader};

/// Splits `NAME` or `NAME@SNAP` into its parts, checking both.
pub fn split_layer_name(name: &str) -> Result<(&str, Option<&str>), DataDirError> {
    match name.split_once('@') {
        None => {
            check_name(name)?;
            Ok((name, None))
        }
        Some((base, snap)) => {
            check_name(base)?;
            check_name(snap).map_err(|_| DataDirError::InvalidName {
                name: name.to_string(),
                reason: "a snapshot is NAME@SNAP, both parts of letters, digits, '.', '_' and '-'",
            })?;
            Ok((base, Some(snap)))
        }
    }
}

/// One snapshot, as `volume snapshot list` shows it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// `NAME@SNAP`.
    pub name: String,
    pub header: VolumeHeader,
    /// Bytes its file occupies (the data written between it and the snapshot before it).
    pub allocated_bytes: u64,
    /// Other volumes made from it (clones), which keep it from being deleted.
    pub clones: Vec<String>,
}

impl DataDir {
    /// Takes snapshot `target` (`NAME@SNAP`) of the file volume NAME, offline: no data is
    /// copied (the time does not grow with the volume's size). Refused while NAME is attached.
    pub fn snapshot(&self, target: &str) -> Result<VolumeHeader, DataDirError> {
        let (name, snap) = split_layer_name(target)?;
        let Some(snap) = snap else {
            return Err(DataDirError::InvalidName {
                name: target.to_string(),
                reason: "name the snapshot as NAME@SNAP",
            });
        };
        if let Some(loc) = self.rbd_location(name)? {
            return self.snapshot_rbd(target, name, snap, &loc);
        }
        let head_path = self.existing(name)?;
        let head = match self.open_locked(name, true, true) {
            Err(DataDirError::InUse { .. }) => {
                return Err(DataDirError::SnapshotAttached {
                    name: name.to_string(),
                })
            }
            r => r?,
        };
        self.recover_snapshots(name, &head);
        let h = self
            .new_head_layer(name, target, &head, &head_path)?
            .snapshot;
        sync_dir(&self.volumes_dir())?;
        tracing::info!(volume = name, snapshot = target, layer_id = ?h.layer_id, "snapshot taken");
        Ok(h)
    }

    /// Removes `NAME@*.vol` links to the head file itself: a snapshot interrupted between its
    /// link and its rename (see the module doc). Only called with the head's lock held, so no
    /// snapshot is in progress.
    pub(super) fn recover_snapshots(&self, name: &str, head: &FileBackend) {
        let Ok(ino) = std::fs::metadata(head.path()).map(|m| (m.dev(), m.ino())) else {
            return;
        };
        for (snap, path) in self.snapshot_files(name) {
            if std::fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == ino) {
                tracing::warn!(volume = name, snapshot = %snap,
                    "removing a snapshot interrupted before it completed (it named the live volume)");
                let _ = std::fs::remove_file(&path);
                let _ = sync_dir(&self.volumes_dir());
            }
        }
    }

    /// `(NAME@SNAP, path)` of the snapshot files of `name`, sorted.
    fn snapshot_files(&self, name: &str) -> Vec<(String, std::path::PathBuf)> {
        let prefix = format!("{name}@");
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.volumes_dir()) {
            for e in entries.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if let Some(layer) = f.strip_suffix(".vol").filter(|l| l.starts_with(&prefix)) {
                    if split_layer_name(layer).is_ok() {
                        out.push((layer.to_string(), e.path()));
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// What `check` finds wrong with layer `name`'s place in its chain: a missing or mismatched
    /// parent, a snapshot interrupted half-way (reported, then undone by the next attach).
    /// Each finding comes with whether it is a problem (else a warning).
    pub(super) fn layer_problems(&self, name: &str, h: &VolumeHeader) -> Vec<(bool, String)> {
        if let Some(found) = self.rbd_layer_problems(name, h) {
            return found;
        }
        let mut out = Vec::new();
        if let Some(p) = &h.parent {
            let parent = self
                .layer_path(&p.name)
                .ok()
                .and_then(|path| FileBackend::open(&path, true).ok());
            match parent.map(|b| VolumeHeader::read_from(&b)) {
                None => out.push((
                    true,
                    format!(
                        "its parent layer {} is missing: the data it shares cannot be read",
                        p.name
                    ),
                )),
                Some(Err(e)) => out.push((
                    true,
                    format!("its parent layer {} is unreadable: {e}", p.name),
                )),
                Some(Ok(ph)) => {
                    if ph.volume_id != p.volume_id
                        || ph.layer_id != Some(p.layer_id)
                        || ph.size != p.size
                        || ph.sector_size != h.sector_size
                    {
                        out.push((true, format!(
                            "its parent layer {} is not the layer it was made on (expected volume {} layer {} of {} bytes, found volume {} layer {:?} of {} bytes)",
                            p.name, p.volume_id, p.layer_id, p.size, ph.volume_id, ph.layer_id, ph.size
                        )));
                    }
                }
            }
        }
        if let Ok(path) = self.layer_path(name) {
            let head = std::fs::metadata(&path).map(|m| (m.dev(), m.ino()));
            for (snap, sp) in self.snapshot_files(name) {
                if std::fs::metadata(&sp).map(|m| (m.dev(), m.ino())).ok()
                    == head.as_ref().ok().copied()
                {
                    out.push((false, format!("{snap} is a snapshot interrupted before it completed (it names the live volume); the next attach or snapshot of {name} removes it")));
                }
            }
        }
        out
    }

    /// Every snapshot in the data directory (`NAME@SNAP`), sorted.
    pub fn all_snapshots(&self) -> Vec<String> {
        let mut out = Vec::new();
        for name in self.list_volumes().unwrap_or_default() {
            out.extend(self.list_snapshots(&name).into_iter().map(|s| s.0));
            out.extend(self.rbd_snapshot_names(&name));
        }
        out
    }

    /// Snapshot names of `name` and their files, without those an interrupted snapshot left.
    fn list_snapshots(&self, name: &str) -> Vec<(String, std::path::PathBuf)> {
        let head = self
            .layer_path(name)
            .ok()
            .and_then(|p| std::fs::metadata(p).ok());
        let same = |p: &Path| {
            head.as_ref().is_some_and(|h| {
                std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == (h.dev(), h.ino()))
            })
        };
        self.snapshot_files(name)
            .into_iter()
            .filter(|(_, p)| !same(p))
            .collect()
    }

    /// The snapshots of volume `name` with their headers and clones.
    pub fn snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, DataDirError> {
        if let Some(loc) = self.rbd_location(name)? {
            return self.snapshots_rbd(name, &loc);
        }
        self.existing(name)?;
        let mut out = Vec::new();
        for (snap, path) in self.list_snapshots(name) {
            let b = FileBackend::open(&path, true).map_err(io_err("opening", &path))?;
            let header = VolumeHeader::read_from(&b).map_err(Self::vol_err(&snap))?;
            let allocated_bytes = std::fs::metadata(&path)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            let clones = self
                .dependents(header.layer_id)?
                .into_iter()
                .filter(|(_, h)| h.volume_id != header.volume_id)
                .map(|(n, _)| n)
                .collect();
            out.push(SnapshotInfo {
                name: snap,
                header,
                allocated_bytes,
                clones,
            });
        }
        Ok(out)
    }

    /// The layers (volumes and snapshots) whose parent is layer `id`, with their headers.
    pub(super) fn dependents(
        &self,
        id: Option<Uuid>,
    ) -> Result<Vec<(String, VolumeHeader)>, DataDirError> {
        let Some(id) = id else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for name in self.list_volumes()? {
            let mut layers = vec![name.clone()];
            layers.extend(self.list_snapshots(&name).into_iter().map(|s| s.0));
            for layer in layers {
                let Ok(path) = self.layer_path(&layer) else {
                    continue;
                };
                let Ok(b) = FileBackend::open(&path, true) else {
                    continue;
                };
                if let Ok(h) = VolumeHeader::read_from(&b) {
                    if h.parent.as_ref().is_some_and(|p| p.layer_id == id) {
                        out.push((layer, h));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Deletes snapshot `target`: merges it into its child in the volume's chain (`progress`
    /// over the merge), re-points the child, removes the file. Refused while it is attached or
    /// clones depend on it, and while its child is attached.
    pub fn delete_snapshot(
        &self,
        target: &str,
        progress: impl FnMut(u64, u64),
    ) -> Result<(), DataDirError> {
        if let Some((loc, snap)) = self.rbd_snapshot_location(target)? {
            return self.delete_snapshot_rbd(target, &loc, &snap);
        }
        let snap = self.open_locked(target, false, true)?;
        let sh = VolumeHeader::read_from(&snap).map_err(Self::vol_err(target))?;
        let deps = self.dependents(sh.layer_id)?;
        let clones: Vec<String> = deps
            .iter()
            .filter(|(_, h)| h.volume_id != sh.volume_id)
            .map(|(n, _)| n.clone())
            .collect();
        if !clones.is_empty() {
            return Err(DataDirError::HasClones {
                name: target.to_string(),
                clones,
            });
        }
        let mut progress = progress;
        for (child_name, _) in deps {
            let child = self.open_locked(&child_name, true, true)?;
            merge_into_child(&snap, &child, &sh, &mut progress).map_err(Self::vol_err(target))?;
            failpoint("snapshot-delete-merged");
            let mut ch = VolumeHeader::read_from(&child).map_err(Self::vol_err(&child_name))?;
            ch.parent = sh.parent.clone();
            ch.write_update(&child)
                .map_err(Self::vol_err(&child_name))?;
        }
        std::fs::remove_file(snap.path()).map_err(io_err("deleting snapshot", snap.path()))?;
        sync_dir(&self.volumes_dir())?;
        tracing::info!(snapshot = target, "snapshot deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_are_checked_in_both_parts() {
        assert_eq!(split_layer_name("vm1").unwrap(), ("vm1", None));
        assert_eq!(split_layer_name("vm1@mon").unwrap(), ("vm1", Some("mon")));
        for bad in ["vm1@", "@mon", "vm1@mon@tue", "vm1@../x", "a b@c", "vm1@.x"] {
            assert!(split_layer_name(bad).is_err(), "{bad:?}");
        }
        let d = DataDir::new("/tmp/x");
        assert!(d
            .layer_path("vm1@mon")
            .unwrap()
            .ends_with("volumes/vm1@mon.vol"));
        // Plain volume names stay strict: no volume can be created as NAME@SNAP.
        assert!(d.volume_path("vm1@mon").is_err());
    }
}
