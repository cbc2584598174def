//! Snapshots of a volume a server has attached (online), and the file steps every file-volume
//! snapshot shares with the offline one (`snapshot`): build the new head layer, link the old
//! head as the snapshot, rename the new head over the volume.
//!
//! Online, the steps run while the open volume is quiesced ([`Volume::quiesce`]: the writes in
//! flight drained, new ones held, the head flushed), and the open volume is switched to the new
//! layer stack ([`crate::volume::Quiesced::push_layer`]) before the writes are let go: the
//! snapshot holds every write that completed before the quiesce and none that started after
//! it. The files go through exactly the states of an offline snapshot, so a crash at any point
//! recovers the same way (the interrupted link removed at the next attach). The snapshot file
//! was the head, locked exclusively by the server: once no reader holds the old stack any
//! more, it is locked shared again like any snapshot layer, so it can be served, cloned,
//! exported or copied while the volume stays attached.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::create::remove_stale_temporaries;
use super::layers::MAX_DEPTH;
use super::rbd_intent::failpoint;
use super::{io_err, split_layer_name, sync_dir, try_lock, DataDir, DataDirError};
use crate::backend::{Backend, FileBackend};
use crate::volume::{ParentRef, Volume, VolumeHeader};

/// How long the old head may stay referenced by reads in flight before its lock is made shared.
const RELOCK_WAIT: Duration = Duration::from_secs(10);

/// What the file steps left: the new head (open, locked exclusively) and both headers.
pub(super) struct NewHead {
    pub file: File,
    /// The snapshot's header (the old head's, with a layer id).
    pub snapshot: VolumeHeader,
}

/// What an online snapshot did.
#[derive(Debug, Clone)]
pub struct OnlineSnapshot {
    pub header: VolumeHeader,
    /// How long writes were held (quiesce, flush, file steps, switch).
    pub writes_held: Duration,
}

impl DataDir {
    /// The file steps of snapshot `target` of volume `name` whose head is `head` (at
    /// `head_path`, held by the caller's lock): upgrades a v1 header, builds the child under a
    /// temporary name, links the head as the snapshot, renames the child over the head. The
    /// directory is synced before the rename, not after (the caller does, once it has switched
    /// what must follow). On an error nothing is left behind.
    pub(super) fn new_head_layer(
        &self,
        name: &str,
        target: &str,
        head: &dyn Backend,
        head_path: &Path,
    ) -> Result<NewHead, DataDirError> {
        let snap_path = self.layer_path(target)?;
        if snap_path.exists() {
            return Err(DataDirError::AlreadyExists {
                name: target.to_string(),
                path: snap_path,
            });
        }
        let mut h = VolumeHeader::read_from(head).map_err(Self::vol_err(name))?;
        self.check_depth(target, &h)?;
        if h.layer_id.is_none() {
            // A v1 volume gets a layer id (and so format v2) before anything can name it.
            h.layer_id = Some(Uuid::new_v4());
            h = h.write_update(head).map_err(Self::vol_err(name))?;
        }
        let mut child = h.clone();
        child.generation = 0;
        child.layer_id = Some(Uuid::new_v4());
        child.parent = Some(ParentRef {
            name: target.to_string(),
            volume_id: h.volume_id,
            layer_id: h.layer_id.unwrap_or_default(),
            size: h.size,
        });
        let dir = self.volumes_dir();
        remove_stale_temporaries(&dir, name);
        let tmp = dir.join(format!(".{name}.vol.{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating the new head layer", &tmp))?;
        let mut linked = false;
        let result = (|| {
            try_lock(&file, true, name, &tmp)?;
            let b = FileBackend::new(file.try_clone().map_err(io_err("opening", &tmp))?, &tmp);
            b.set_len(child.data_offset() + child.size)
                .map_err(io_err("sizing the new head layer", &tmp))?;
            child.write_new(&b).map_err(Self::vol_err(name))?;
            std::fs::hard_link(head_path, &snap_path)
                .map_err(io_err("linking the snapshot", &snap_path))?;
            linked = true;
            sync_dir(&dir)?;
            failpoint("snapshot-linked");
            std::fs::rename(&tmp, head_path).map_err(io_err("renaming the new head to", head_path))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            if linked {
                let _ = std::fs::remove_file(&snap_path);
            }
            let _ = sync_dir(&dir);
            return Err(e);
        }
        Ok(NewHead { file, snapshot: h })
    }

    /// Refuses a snapshot that would put the head more than [`MAX_DEPTH`] layers above its
    /// base: attach would refuse the volume afterwards, and every read falls through the chain.
    fn check_depth(&self, target: &str, head: &VolumeHeader) -> Result<(), DataDirError> {
        let mut parent = head.parent.clone();
        let mut depth = 1;
        while let Some(p) = parent {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(DataDirError::Invalid {
                    name: target.to_string(),
                    reason: format!(
                        "the volume would have more than {MAX_DEPTH} layers: delete older snapshots first"
                    ),
                });
            }
            let path = self.layer_path(&p.name)?;
            parent = FileBackend::open(&path, true)
                .ok()
                .and_then(|b| VolumeHeader::read_from(&b).ok())
                .and_then(|h| h.parent);
        }
        Ok(())
    }

    /// Takes snapshot `target` (`NAME@SNAP`) of volume NAME while `vol` (NAME, attached
    /// read-write by this process) stays in use: see the module doc.
    pub fn snapshot_online(
        &self,
        target: &str,
        vol: &Volume,
    ) -> Result<OnlineSnapshot, DataDirError> {
        let (name, snap) = split_layer_name(target)?;
        let refuse = |reason: &str| DataDirError::Invalid {
            name: target.to_string(),
            reason: reason.into(),
        };
        if snap.is_none() {
            return Err(refuse("name the snapshot as NAME@SNAP"));
        }
        if self.rbd_location(name)?.is_some() {
            return Err(refuse(
                "online snapshots of RBD volumes are not supported yet",
            ));
        }
        let head_path = self.existing(name)?;
        // Opened before anything changes: after the rename there must be nothing left to fail
        // before the open volume follows the files.
        let below = File::open(&head_path).map_err(io_err("opening", &head_path))?;
        let relock = below.try_clone().map_err(io_err("opening", &head_path))?;
        let snap_path = self.layer_path(target)?;
        let started = Instant::now();
        let quiesced = vol.quiesce().map_err(Self::vol_err(name))?;
        let made = self.new_head_layer(name, target, &*vol.backend(), &head_path)?;
        failpoint("snapshot-online-renamed");
        let pushed = quiesced.push_layer(
            Box::new(FileBackend::new(made.file, &head_path)),
            Box::new(FileBackend::new(below, &snap_path)),
            made.snapshot.clone(),
        );
        drop(quiesced);
        let writes_held = started.elapsed();
        if let Err(e) = pushed {
            // Cannot happen (both headers come from the file the volume writes); if it did, the
            // files say the snapshot was taken but the volume still writes the old head.
            tracing::error!(
                volume = name,
                snapshot = target,
                "the open volume could not follow its online snapshot: detach it now"
            );
            return Err(Self::vol_err(name)(e));
        }
        sync_dir(&self.volumes_dir())?;
        self.relock_shared(target, &relock);
        tracing::info!(volume = name, snapshot = target, layer_id = ?made.snapshot.layer_id,
            writes_held_ms = writes_held.as_millis() as u64, "online snapshot taken");
        Ok(OnlineSnapshot {
            header: made.snapshot,
            writes_held,
        })
    }

    /// Locks the new snapshot file shared once the old stack (whose handle on it holds the
    /// head's exclusive lock) is gone: reads in flight on it finish soon.
    fn relock_shared(&self, target: &str, file: &File) {
        let deadline = Instant::now() + RELOCK_WAIT;
        loop {
            match file.try_lock_shared() {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => {
                    tracing::warn!(snapshot = target, error = %e,
                        "the snapshot stays locked exclusively until the volume is detached");
                    return;
                }
            }
        }
    }
}
