//! Snapshots, clones and flatten of RBD volumes, on RBD's own machinery: a snapshot `NAME@SNAP`
//! is the image's RBD snapshot `SNAP` (`rbd_snap_create`, no data copied, the cryptnbd header
//! frozen with it), a clone is an RBD clone v2 of it (`rbd_clone3`, no protection needed) with
//! its own cryptnbd header, and flatten is `rbd_flatten`.
//!
//! Keys: librbd reads a clone's unwritten data from the parent's objects itself, and those are
//! encrypted with the parent's DEK; librbd's copy-up also copies parent ciphertext into the
//! clone's objects on a partial write. So a clone reads and writes with the parent's DEK — its
//! header wraps that same DEK under the clone's own encryption context (a new volume id, the
//! snapshot's CMK, re-wrapped by the key provider's `re-encrypt`, never in plaintext here).
//! `--key` (a new DEK under another CMK) would need a per-sector record of which key wrote
//! what, kept crash-safe beside librbd's copy-ups; it is refused with a pointer to `volume copy`
//! (new DEK) and `volume rekey` (same DEK under another CMK).
//!
//! Online: a snapshot of a volume a gateway serves goes through that gateway's librbd (RBD
//! forwards it to the exclusive lock's holder, which quiesces and flushes), so it is
//! crash-consistent like one taken offline.
//!
//! Identity: before each offline snapshot the head gets a fresh layer id (a crash-safe header
//! update), so its frozen header has its own (an online one shares the head's); a clone's header names its parent as the
//! file layout does (`NAME@SNAP`, volume id, layer id, size), which `check` compares with the
//! parent librbd reports. A TRIM or WRITE_ZEROES in a clone is librbd's write-zeroes, which
//! keeps a zeroed (or truncated) object in the clone over the parent's: the parent's data does
//! not show through again (tests/it/rbd_snapshots.rs checks it).
//!
//! Crashes: a snapshot is one RBD operation after a crash-safe header update; a clone is made
//! under an intent record (`Op::Clone`, see [`super::rbd_intent`]) that removes a half-made
//! clone; flatten resumes (librbd's flatten is restartable, the header's parent reference is
//! dropped last, and `check` reports a header still naming a parent librbd no longer has).

use std::io;

use uuid::Uuid;

use super::rbd::allocated;
use super::rbd_intent::{failpoint, Op};
use super::snapshot::{split_layer_name, SnapshotInfo};
use super::{volume_context, DataDir, DataDirError, VolumeInfo};
use crate::backend::rbd::{self as rbd, RbdBackend, RbdError, RbdLocation};
use crate::kms::KeyProvider;
use crate::volume::{ParentRef, Volume, VolumeHeader};

fn rbd_err(name: &str) -> impl FnOnce(RbdError) -> DataDirError + '_ {
    move |source| DataDirError::Rbd {
        name: name.to_string(),
        source,
    }
}

fn invalid(name: &str, reason: impl Into<String>) -> DataDirError {
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

    /// `volume clone NAME@SNAP NEW` of an RBD snapshot: an RBD clone v2 at `dest` (default: the
    /// parent's pool and cluster, image NEW) with its own header (see the module doc for keys).
    pub fn clone_rbd(
        &self,
        keys: &dyn KeyProvider,
        source: &str,
        new: &str,
        key: Option<&str>,
        dest: Option<&RbdLocation>,
    ) -> Result<VolumeHeader, DataDirError> {
        let Some((ploc, snap)) = self.rbd_snapshot_location(source)? else {
            return Err(invalid(source, "only a snapshot (NAME@SNAP) of an RBD volume can be cloned onto RBD; a file snapshot is cloned as a file, or copied onto RBD with `volume copy`"));
        };
        let dloc = match dest {
            Some(d) => d.clone(),
            None => RbdLocation {
                image: new.to_string(),
                ..ploc.clone()
            },
        };
        self.check_rbd_target(new, &dloc)?;
        let sh = {
            let b = RbdBackend::open_snapshot(&ploc, &snap).map_err(rbd_err(source))?;
            VolumeHeader::read_from(&b).map_err(Self::vol_err(source))?
        };
        if let Some(key) = key {
            return self.clone_rbd_layered(keys, source, &sh, new, key, &dloc);
        }
        // An online snapshot of a volume never snapshotted offline has no layer id: librbd's
        // link to the parent is exact anyway, the nil id only stands for "none" in the record.
        let layer_id = sh.layer_id.unwrap_or_default();
        let mut header = sh.clone();
        header.generation = 0;
        header.volume_id = Uuid::new_v4();
        header.created = VolumeHeader::new(header.volume_id, sh.size, sh.sector_size).created;
        header.layer_id = Some(Uuid::new_v4());
        header.parent = Some(ParentRef {
            name: source.to_string(),
            volume_id: sh.volume_id,
            layer_id,
            size: sh.size,
        });
        // The snapshot's DEK, re-wrapped for the clone's own context (same CMK, newest version).
        let ctx = volume_context(header.volume_id);
        let w = keys
            .re_encrypt(&sh.wrapped_dek, &sh.encryption_context, None, &ctx)
            .map_err(|source| DataDirError::Kms {
                name: new.to_string(),
                action: "clone",
                source,
            })?;
        header.key_id = w.key_id;
        header.key_version = w.key_version;
        header.wrapped_dek = w.cipher_text;
        header.encryption_context = ctx;
        header.validate().map_err(Self::vol_err(new))?;

        self.resolve_stale_intents();
        let intent = self.begin_intent_with(
            new,
            Op::Clone,
            &dloc,
            Some(header.volume_id),
            Some(sh.volume_id),
        )?;
        if let Err(e) = rbd::clone_image(&ploc, &snap, &dloc) {
            // Nothing of ours exists (a taken name is someone else's image): drop the record.
            intent.finish(self)?;
            return Err(rbd_err(new)(e));
        }
        failpoint("rbd-clone-after-image");
        let written = self
            .open_rbd_exclusive(new, &dloc)
            .and_then(|b| {
                header.write_new(&b).map_err(Self::vol_err(new))?;
                failpoint("rbd-clone-after-header");
                Ok(())
            })
            .and_then(|()| self.write_reference(new, &dloc));
        if let Err(e) = written {
            match rbd::remove_image(&dloc) {
                Ok(()) => intent.finish(self)?,
                Err(re) => {
                    tracing::warn!(image = %dloc, "could not remove the half-made clone: {re}")
                }
            }
            return Err(e);
        }
        if let Err(e) = intent.finish(self) {
            tracing::warn!(volume = new, "{e}");
        }
        tracing::info!(volume = new, source, image = %dloc, key_id = %header.key_id,
            "RBD volume cloned");
        Ok(header)
    }

    /// `volume clone NAME@SNAP NEW --key CMK` of an RBD snapshot: a new, empty RBD image with
    /// its own DEK from `key`, which cryptnbd layers over the snapshot itself exactly as a file
    /// clone (`crate::volume::layer`: never-written sectors read from the parent with the
    /// parent's DEK, zeroes stored encrypted). Its reference is marked `layered`.
    fn clone_rbd_layered(
        &self,
        keys: &dyn KeyProvider,
        source: &str,
        sh: &VolumeHeader,
        new: &str,
        key: &str,
        dloc: &RbdLocation,
    ) -> Result<VolumeHeader, DataDirError> {
        if sh.layer_id.is_none() {
            return Err(invalid(source, "this snapshot was taken while the volume was served and before any offline snapshot, so its header has no layer id to name it by; a clone under another key needs one: take a snapshot offline (or clone without --key)"));
        }
        let opts = super::CreateOptions {
            sector_size: sh.sector_size,
            discard: sh.discard,
        };
        let (mut header, xts) = self.new_header(keys, new, sh.size, key, opts)?;
        header.layer_id = Some(Uuid::new_v4());
        header.parent = Some(ParentRef {
            name: source.to_string(),
            volume_id: sh.volume_id,
            layer_id: sh.layer_id.unwrap_or_default(),
            size: sh.size,
        });
        let header = self.create_rbd_from(new, &header, &xts, dloc, true, |_| Ok(()))?;
        tracing::info!(volume = new, source, image = %dloc, key_id = %header.key_id,
            "RBD volume cloned under another key (layered by cryptnbd)");
        Ok(header)
    }

    /// `volume flatten NAME` of an RBD clone: `rbd_flatten`, then the header's parent reference
    /// is dropped. Returns the bytes the clone's allocation grew by.
    pub(super) fn flatten_rbd(
        &self,
        name: &str,
        loc: &RbdLocation,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, DataDirError> {
        let b = self.open_rbd_exclusive(name, loc)?;
        let h = VolumeHeader::read_from(&b).map_err(Self::vol_err(name))?;
        let before = allocated(name, loc, &b)?;
        if b.parent().map_err(rbd_err(name))?.is_some() {
            // librbd counts objects; callers count bytes of the volume.
            let size = h.size;
            let mut bytes = |done: u64, total: u64| {
                let d = u128::from(done) * u128::from(size) / u128::from(total.max(1));
                progress(u64::try_from(d).unwrap_or(size).min(size), size);
            };
            b.flatten(&mut bytes).map_err(rbd_err(name))?;
        }
        failpoint("rbd-flatten-after-flatten");
        if h.parent.is_some() {
            let mut next = h.clone();
            next.parent = None;
            next.write_update(&b).map_err(Self::vol_err(name))?;
        }
        let after = allocated(name, loc, &b)?;
        tracing::info!(volume = name, image = %loc, "RBD volume flattened");
        Ok(after.saturating_sub(before))
    }

    /// What `check` finds wrong with RBD volume `name`'s parent (`None` when `name` is not an
    /// RBD volume): the header's parent against the one librbd reads through to.
    pub(super) fn rbd_layer_problems(
        &self,
        name: &str,
        h: &VolumeHeader,
    ) -> Option<Vec<(bool, String)>> {
        if matches!(self.rbd_snapshot_location(name), Ok(Some(_))) {
            // A snapshot's parent is its volume's, checked there.
            return Some(Vec::new());
        }
        let (loc, layered) = self.rbd_reference(name).ok()??;
        if layered {
            return Some(self.layered_problems(h));
        }
        let mut out = Vec::new();
        let linked = RbdBackend::open(&loc, rbd::Access::ReadShared).and_then(|b| b.parent());
        let linked = match linked {
            Ok(l) => l,
            Err(e) => return Some(vec![(true, format!("cannot read its RBD parent: {e}"))]),
        };
        match (&h.parent, linked) {
            (None, None) => {}
            (None, Some(l)) => out.push((false, format!(
                "it is an RBD clone of rbd:{}/{}@{}, but its header names no parent (made outside cryptnbd?)",
                l.pool, l.image, l.snapshot
            ))),
            (Some(p), None) => out.push((false, format!(
                "its header names parent {} but the image no longer has one (a flatten interrupted before its last step); `cryptnbd volume flatten {name}` finishes it",
                p.name
            ))),
            (Some(p), Some(l)) => {
                let want = self.rbd_snapshot_location(&p.name).ok().flatten();
                let same = want.as_ref().is_some_and(|(wl, ws)| {
                    wl.pool == l.pool && wl.image == l.image && *ws == l.snapshot
                });
                if l.trash {
                    out.push((true, format!(
                        "its parent snapshot {} was removed outside cryptnbd while this clone needs it (librbd keeps it in its trash); flatten this volume to end the dependency",
                        p.name
                    )));
                } else if want.is_none() {
                    out.push((true, format!(
                        "its parent layer {} is missing from the data directory (librbd still reads its unwritten data from rbd:{}/{}@{})",
                        p.name, l.pool, l.image, l.snapshot
                    )));
                } else if !same {
                    out.push((true, format!(
                        "its header names parent {}, but librbd reads its unwritten data from rbd:{}/{}@{}",
                        p.name, l.pool, l.image, l.snapshot
                    )));
                } else {
                    let ph = RbdBackend::open_snapshot(&loc_of(&l, &loc), &l.snapshot)
                        .map_err(|e| e.to_string())
                        .and_then(|b| VolumeHeader::read_from(&b).map_err(|e| e.to_string()));
                    match ph {
                        Err(e) => out.push((true, format!("its parent {} is unreadable: {e}", p.name))),
                        Ok(ph) if ph.volume_id != p.volume_id
                            || ph.layer_id.unwrap_or_default() != p.layer_id
                            || ph.size != p.size
                            || ph.sector_size != h.sector_size =>
                        {
                            out.push((true, format!(
                                "its parent {} is not the layer it was made on (expected volume {} layer {} of {} bytes, found volume {} layer {:?} of {} bytes)",
                                p.name, p.volume_id, p.layer_id, p.size, ph.volume_id, ph.layer_id, ph.size
                            )))
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
        Some(out)
    }
}

impl DataDir {
    /// What `check` finds wrong with the parent of a volume cryptnbd layers itself (a clone
    /// under another key): missing, or not the snapshot it was made on.
    fn layered_problems(&self, h: &VolumeHeader) -> Vec<(bool, String)> {
        let Some(p) = &h.parent else {
            return Vec::new();
        };
        let parent = match self.rbd_snapshot_location(&p.name) {
            Ok(Some((loc, snap))) => RbdBackend::open_snapshot(&loc, &snap)
                .map_err(|e| e.to_string())
                .and_then(|b| VolumeHeader::read_from(&b).map_err(|e| e.to_string())),
            Ok(None) => Err("not in the data directory".into()),
            Err(e) => Err(e.to_string()),
        };
        match parent {
            Err(e) => vec![(true, format!(
                "its parent layer {} is missing or unreadable ({e}): the data it shares cannot be read",
                p.name
            ))],
            Ok(ph) if ph.volume_id != p.volume_id
                || ph.layer_id != Some(p.layer_id)
                || ph.size != p.size
                || ph.sector_size != h.sector_size =>
            {
                vec![(true, format!(
                    "its parent layer {} is not the layer it was made on (expected volume {} layer {} of {} bytes, found volume {} layer {:?} of {} bytes)",
                    p.name, p.volume_id, p.layer_id, p.size, ph.volume_id, ph.layer_id, ph.size
                ))]
            }
            Ok(_) => Vec::new(),
        }
    }
}

/// The location of a parent image librbd names, on the child's cluster connection.
fn loc_of(l: &rbd::RbdLink, child: &RbdLocation) -> RbdLocation {
    RbdLocation {
        pool: l.pool.clone(),
        image: l.image.clone(),
        ..child.clone()
    }
}
