//! Clones and flatten of RBD snapshots, and what `check` says about an RBD volume's parent (see
//! `rbd_snapshot` for the model). Two kinds of clone:
//!
//! - without `--key`: an RBD clone v2 (`rbd_clone3`). librbd reads the unwritten data from the
//!   snapshot and copies parent ciphertext up into the clone on partial writes, so the clone
//!   uses the snapshot's DEK, re-wrapped for the clone's own context (`re-encrypt`, same CMK).
//!   Made under an `Op::Clone` intent record; flattened by `rbd_flatten`.
//! - with `--key CMK`: a new, empty image with its own DEK under CMK, which cryptnbd layers over
//!   the snapshot itself exactly as a file clone (`crate::volume::layer`); its reference is
//!   marked `layered`, attach links the snapshot (unwrapping its DEK too) below it, and flatten
//!   is the file layout's copy-up.
//!
//! A TRIM or WRITE_ZEROES never lets the snapshot's data show through again: in an RBD clone
//! they are librbd write-zeroes, which keep a zeroed (or truncated) object in the clone over the
//! parent's; in a layered clone the file layout's rules apply (zeroes stored encrypted, TRIM
//! advisory where the snapshot has data). Both are tested in tests/it/rbd_snapshots.rs.
//!
//! Crashes: an RBD clone is made under an intent record (`Op::Clone`, see
//! [`super::rbd_intent`]) that removes a half-made clone, a layered one like a create; flatten
//! resumes (librbd's flatten is restartable, the header's parent reference is dropped last, and
//! `check` reports a header still naming a parent librbd no longer has).

use uuid::Uuid;

use super::layers::link_to_parent;
use super::rbd::{allocated, rbd_err};
use super::rbd_intent::{failpoint, Op};
use super::rbd_snapshot::invalid;
use super::{volume_context, DataDir, DataDirError};
use crate::backend::rbd::{self as rbd, RbdBackend, RbdLocation};
use crate::kms::KeyProvider;
use crate::volume::VolumeHeader;

impl DataDir {
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
        // A snapshot of a volume cryptnbd layers itself reads its unwritten sectors from its
        // own parent, which librbd knows nothing of: its clones are layered by cryptnbd too
        // (their own DEK under the snapshot's CMK, as file clones).
        let base = super::split_layer_name(source)?.0;
        if sh.parent.is_some() && matches!(self.rbd_reference(base)?, Some((_, true))) {
            let key = sh.key_id.to_string();
            return self.clone_rbd_layered(keys, source, &sh, new, &key, &dloc);
        }
        // An online snapshot of a volume never snapshotted offline has no layer id: librbd's
        // link to the parent is exact anyway, the nil id only stands for "none" in the record.
        let layer_id = sh.layer_id.unwrap_or_default();
        let mut header = sh.clone();
        header.generation = 0;
        header.volume_id = Uuid::new_v4();
        header.created = VolumeHeader::new(header.volume_id, sh.size, sh.sector_size).created;
        link_to_parent(&mut header, source, &sh, layer_id);
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
        link_to_parent(&mut header, source, sh, sh.layer_id.unwrap_or_default());
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
