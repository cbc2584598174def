//! Volumes on Ceph RBD images. The data directory keeps only a reference, `volumes/NAME.rbd` (JSON:
//! pool, image, and optionally the Ceph config, client id and keyring), beside the file volumes;
//! the image holds exactly what a volume file holds (the 1 MiB double header, then the XTS data
//! area), so every volume operation works the same on both.
//!
//! Locking differs from files: instead of `flock`, RBD's exclusive lock (see
//! [`crate::backend::rbd`]) keeps a second gateway, or a resize/rekey, away from an image a live
//! gateway serves, across hosts.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use super::rbd_intent::{failpoint, Op};
use super::{check_name, io_err, sync_dir, CreateOptions, DataDir, DataDirError, VolumeInfo};
use crate::backend::rbd::{self as rbd, Access, RbdBackend, RbdError, RbdLocation};
use crate::kms::KeyProvider;
use crate::volume::{Volume, VolumeHeader};

/// What a reference file says it is, so a stray JSON file is not mistaken for one.
const REFERENCE_KIND: &str = "cryptnbd-rbd-volume";
/// References are small; anything bigger is not one of ours.
const MAX_REFERENCE_LEN: u64 = 64 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct Reference {
    kind: String,
    version: u32,
    /// The volume is a child layer that cryptnbd itself reads through to its parent (an RBD
    /// snapshot), as a file clone does: a clone under another key (see `rbd_snapshot`).
    /// Absent (false) for every other volume, so older references read the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    layered: bool,
    #[serde(flatten)]
    location: RbdLocation,
}

pub(super) fn rbd_err(name: &str) -> impl FnOnce(RbdError) -> DataDirError + '_ {
    move |source| DataDirError::Rbd {
        name: name.to_string(),
        source,
    }
}

impl DataDir {
    /// `volumes/NAME.rbd`, after checking the name.
    pub fn rbd_reference_path(&self, name: &str) -> Result<PathBuf, DataDirError> {
        check_name(name)?;
        Ok(self.volumes_dir().join(format!("{name}.rbd")))
    }

    /// The image behind volume `name`, or `None` when it is not an RBD volume.
    pub fn rbd_location(&self, name: &str) -> Result<Option<RbdLocation>, DataDirError> {
        Ok(self.rbd_reference(name)?.map(|(l, _)| l))
    }

    /// The image behind volume `name` and whether cryptnbd layers it over a parent snapshot
    /// (see [`Reference::layered`]); `None` when it is not an RBD volume.
    pub(super) fn rbd_reference(
        &self,
        name: &str,
    ) -> Result<Option<(RbdLocation, bool)>, DataDirError> {
        if super::snapshot::split_layer_name(name)?.1.is_some() {
            // Snapshots (`NAME@SNAP`) are layer files, never RBD references.
            return Ok(None);
        }
        let path = self.rbd_reference_path(name)?;
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening the RBD reference", &path)(e)),
        };
        let len = file
            .metadata()
            .map_err(io_err("reading the metadata of", &path))?
            .len();
        let invalid = |reason: String| DataDirError::Invalid {
            name: name.to_string(),
            reason: format!("{}: {reason}", path.display()),
        };
        if len > MAX_REFERENCE_LEN {
            return Err(invalid(format!(
                "{len} bytes is too long for an RBD reference"
            )));
        }
        let r: Reference = serde_json::from_reader(io::BufReader::new(file))
            .map_err(|e| invalid(format!("not a valid RBD reference: {e}")))?;
        if r.kind != REFERENCE_KIND || r.version != 1 {
            return Err(invalid(format!(
                "unknown reference kind {:?} version {}",
                r.kind, r.version
            )));
        }
        rbd::check_rbd_name("pool", &r.location.pool).map_err(&invalid)?;
        rbd::check_rbd_name("image", &r.location.image).map_err(&invalid)?;
        Ok(Some((r.location, r.layered)))
    }

    /// Creates volume `name` on a new RBD image at `loc` (the image must not exist): formats it
    /// like a volume file, then writes the reference. A failure removes the new image; a crash
    /// is resolved later through the intent record (see [`super::rbd_intent`]).
    pub fn create_rbd_volume(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        size: u64,
        key: &str,
        opts: CreateOptions,
        loc: &RbdLocation,
    ) -> Result<VolumeHeader, DataDirError> {
        self.create_rbd_with(keys, name, size, key, opts, loc, |_| Ok(()))
    }

    /// [`DataDir::create_rbd_volume`], running `fill` on the formatted volume before the
    /// reference is written (import copies the data there): until then no server can see the
    /// volume, and a crash leaves only an image the intent record proves is ours.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_rbd_with(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        size: u64,
        key: &str,
        opts: CreateOptions,
        loc: &RbdLocation,
        fill: impl FnOnce(&Volume) -> Result<(), DataDirError>,
    ) -> Result<VolumeHeader, DataDirError> {
        self.check_rbd_target(name, loc)?;
        let (header, xts) = self.new_header(keys, name, size, key, opts)?;
        self.create_rbd_from(name, &header, &xts, loc, false, fill)
    }

    /// Refuses a taken volume name or an invalid pool or image name.
    pub(super) fn check_rbd_target(
        &self,
        name: &str,
        loc: &RbdLocation,
    ) -> Result<(), DataDirError> {
        self.check_free(name)?;
        for (what, s) in [("pool", &loc.pool), ("image", &loc.image)] {
            rbd::check_rbd_name(what, s).map_err(|reason| DataDirError::Invalid {
                name: name.to_string(),
                reason,
            })?;
        }
        Ok(())
    }

    /// Makes the image for a new volume with header `header` (DEK `xts`), formats it, runs
    /// `fill`, then writes the reference (`layered`: see [`Reference::layered`]).
    pub(super) fn create_rbd_from(
        &self,
        name: &str,
        header: &VolumeHeader,
        xts: &crate::crypto::XtsKey,
        loc: &RbdLocation,
        layered: bool,
        fill: impl FnOnce(&Volume) -> Result<(), DataDirError>,
    ) -> Result<VolumeHeader, DataDirError> {
        self.check_rbd_target(name, loc)?;
        let size = header.size;
        self.resolve_stale_intents();
        let intent = self.begin_intent(name, Op::Create, loc, Some(header.volume_id))?;
        failpoint("rbd-create-after-intent");
        if let Err(e) = rbd::create_image(loc, header.data_offset() + size) {
            // Nothing of ours exists (a taken name is someone else's image): drop the record.
            intent.finish(self)?;
            return Err(rbd_err(name)(e));
        }
        failpoint("rbd-create-after-image");
        let formatted = RbdBackend::open(loc, Access::Write)
            .map_err(rbd_err(name))
            .and_then(|b| {
                let v = Volume::create(b, header, xts)
                    .and_then(|v| v.flush().map(|()| v))
                    .map_err(Self::vol_err(name))?;
                failpoint("rbd-create-after-format");
                fill(&v)
            })
            .and_then(|()| self.write_reference_with(name, loc, layered));
        if let Err(e) = formatted {
            match rbd::remove_image(loc) {
                Ok(()) => intent.finish(self)?,
                // The record stays: the next create/delete or `check --repair` removes it.
                Err(re) => {
                    tracing::warn!(image = %loc, "could not remove the half-created image: {re}")
                }
            }
            return Err(e);
        }
        failpoint("rbd-create-after-reference");
        if let Err(e) = intent.finish(self) {
            // The volume is complete; a leftover record is resolved as "completed" later.
            tracing::warn!(volume = name, "{e}");
        }
        tracing::info!(volume = name, image = %loc, volume_id = %header.volume_id,
            key_id = %header.key_id, size, "RBD volume created");
        Ok(header.clone())
    }

    /// Writes `volumes/NAME.rbd` under a temporary name and links it into place, so the name
    /// appears complete or not at all (and never replaces another volume's reference).
    pub(super) fn write_reference(
        &self,
        name: &str,
        loc: &RbdLocation,
    ) -> Result<(), DataDirError> {
        self.write_reference_with(name, loc, false)
    }

    fn write_reference_with(
        &self,
        name: &str,
        loc: &RbdLocation,
        layered: bool,
    ) -> Result<(), DataDirError> {
        let dir = self.volumes_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating the volumes directory", &dir))?;
        let path = self.rbd_reference_path(name)?;
        let tmp = dir.join(format!(".{name}.rbd.{}.tmp", std::process::id()));
        let body = serde_json::to_vec_pretty(&Reference {
            kind: REFERENCE_KIND.into(),
            version: 1,
            layered,
            location: loc.clone(),
        })
        .map_err(|e| DataDirError::Invalid {
            name: name.to_string(),
            reason: format!("cannot encode the RBD reference: {e}"),
        })?;
        let result = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&body)?;
                f.write_all(b"\n")?;
                f.sync_all()
            })
            .map_err(io_err("writing the RBD reference", &tmp))
            .and_then(|()| {
                std::fs::hard_link(&tmp, &path).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        DataDirError::AlreadyExists {
                            name: name.to_string(),
                            path: path.clone(),
                        }
                    } else {
                        io_err("linking the RBD reference to", &path)(e)
                    }
                })
            });
        let _ = std::fs::remove_file(&tmp);
        result?;
        sync_dir(&dir)
    }

    pub(super) fn attach_rbd(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        loc: &RbdLocation,
        read_only: bool,
    ) -> Result<Volume, DataDirError> {
        let access = match (read_only, self.rbd_shared_read_only) {
            (false, _) => Access::Write,
            (true, false) => Access::ReadExclusive,
            (true, true) => Access::ReadShared,
        };
        let backend = RbdBackend::open(loc, access).map_err(rbd_err(name))?;
        let h = VolumeHeader::read_from(&backend).map_err(Self::vol_err(name))?;
        let key = self.unwrap_key(keys, name, &h)?;
        let vol =
            Volume::with_key(Box::new(backend), h, &key, read_only).map_err(Self::vol_err(name))?;
        if matches!(self.rbd_reference(name)?, Some((_, true))) {
            return self.attach_parents(keys, name, vol, 0);
        }
        Ok(vol)
    }

    /// Opens the image holding its exclusive lock, for the operations that change the header
    /// (resize, rekey): refused while a live gateway serves it.
    pub(super) fn open_rbd_exclusive(
        &self,
        name: &str,
        loc: &RbdLocation,
    ) -> Result<RbdBackend, DataDirError> {
        RbdBackend::open(loc, Access::Write).map_err(rbd_err(name))
    }

    pub(super) fn info_rbd(
        &self,
        name: &str,
        loc: &RbdLocation,
    ) -> Result<VolumeInfo, DataDirError> {
        // Reading the header needs no lock: info works while a gateway serves the volume.
        let backend = RbdBackend::open(loc, Access::ReadShared).map_err(rbd_err(name))?;
        let header = VolumeHeader::read_from(&backend).map_err(Self::vol_err(name))?;
        let allocated_bytes = allocated(name, loc, &backend)?;
        Ok(VolumeInfo {
            name: name.to_string(),
            path: self.rbd_reference_path(name)?,
            backend: loc.to_string(),
            header,
            allocated_bytes,
        })
    }

    /// Removes the image (refused while any gateway has it open), then the reference, under an
    /// intent record so a crash between the two is completed later.
    pub(super) fn delete_rbd(&self, name: &str, loc: &RbdLocation) -> Result<(), DataDirError> {
        self.resolve_stale_intents();
        // An interrupted delete of this volume, completed just now, did what was asked.
        let Some(loc) = self.rbd_location(name)? else {
            tracing::info!(volume = name, image = %loc, "RBD volume deleted");
            return Ok(());
        };
        let loc = &loc;
        // RBD keeps an image's snapshots inside it: removing the image would need them gone.
        match rbd::list_snapshots(loc) {
            Ok(snaps) if !snaps.is_empty() => {
                let names: Vec<String> =
                    snaps.iter().map(|s| format!("{name}@{}", s.name)).collect();
                return Err(DataDirError::Invalid {
                    name: name.to_string(),
                    reason: format!(
                        "it has snapshots ({}): delete them first (`cryptnbd volume snapshot delete NAME@SNAP`)",
                        names.join(", ")
                    ),
                });
            }
            Ok(_) => {}
            // Already gone (an earlier delete stopped half-way): the steps below finish it.
            Err(RbdError::Image { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(rbd_err(name)(e)),
        }
        let intent = self.begin_intent(name, Op::Delete, loc, None)?;
        failpoint("rbd-delete-after-intent");
        match rbd::remove_image(loc) {
            Ok(()) => {}
            // Already gone (an earlier delete stopped half-way): drop the reference.
            Err(RbdError::Image { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                intent.finish(self)?;
                return Err(if e.is_busy() {
                    DataDirError::InUse {
                        name: name.to_string(),
                    }
                } else {
                    rbd_err(name)(e)
                });
            }
        }
        failpoint("rbd-delete-after-image");
        self.remove_reference(name)?;
        intent.finish(self)?;
        tracing::info!(volume = name, image = %loc, "RBD volume deleted");
        Ok(())
    }
}

/// Bytes in `backend`'s allocated objects, for `info` and `snapshot list`.
pub(super) fn allocated(
    name: &str,
    loc: &RbdLocation,
    backend: &RbdBackend,
) -> Result<u64, DataDirError> {
    backend
        .allocated_bytes()
        .map_err(|source| DataDirError::Rbd {
            name: name.to_string(),
            source: RbdError::Image {
                location: loc.to_string(),
                action: "measure the allocation of",
                source,
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc() -> RbdLocation {
        RbdLocation {
            pool: "rbd".into(),
            image: "vm1".into(),
            ceph: crate::backend::rbd::CephClient {
                ceph_conf: Some("/etc/ceph/ceph.conf".into()),
                client_id: Some("gw".into()),
                keyring: None,
            },
        }
    }

    #[test]
    fn references_round_trip_and_are_listed_beside_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        assert_eq!(dd.rbd_location("vm1").unwrap(), None);
        dd.write_reference("vm1", &loc()).unwrap();
        assert_eq!(dd.rbd_location("vm1").unwrap(), Some(loc()));
        std::fs::write(dd.volumes_dir().join("disk0.vol"), b"").unwrap();
        assert_eq!(dd.list_volumes().unwrap(), ["disk0", "vm1"]);
        assert!(matches!(
            dd.write_reference("vm1", &loc()),
            Err(DataDirError::AlreadyExists { .. })
        ));
        assert!(matches!(
            dd.check_free("vm1"),
            Err(DataDirError::AlreadyExists { .. })
        ));
        assert!(matches!(
            dd.check_free("disk0"),
            Err(DataDirError::AlreadyExists { .. })
        ));
    }

    /// A clone cryptnbd layers itself is marked; every other reference is written (and read)
    /// exactly as before the mark existed.
    #[test]
    fn layered_references_are_marked_and_plain_ones_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        dd.write_reference("plain", &loc()).unwrap();
        dd.write_reference_with("child", &loc(), true).unwrap();
        let body = |n: &str| std::fs::read_to_string(dd.rbd_reference_path(n).unwrap()).unwrap();
        assert!(!body("plain").contains("layered"), "{}", body("plain"));
        assert!(
            body("child").contains(r#""layered": true"#),
            "{}",
            body("child")
        );
        assert_eq!(dd.rbd_reference("plain").unwrap(), Some((loc(), false)));
        assert_eq!(dd.rbd_reference("child").unwrap(), Some((loc(), true)));
        assert_eq!(dd.rbd_location("child").unwrap(), Some(loc()));
    }

    #[test]
    fn bad_references_are_refused_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        std::fs::create_dir_all(dd.volumes_dir()).unwrap();
        let p = dd.volumes_dir().join("x.rbd");
        for body in [
            "not json".to_string(),
            r#"{"kind":"other","version":1,"pool":"rbd","image":"a"}"#.into(),
            r#"{"kind":"cryptnbd-rbd-volume","version":2,"pool":"rbd","image":"a"}"#.into(),
            r#"{"kind":"cryptnbd-rbd-volume","version":1,"pool":"rbd","image":"a/b"}"#.into(),
            "x".repeat(70_000),
        ] {
            std::fs::write(&p, body).unwrap();
            let e = dd.rbd_location("x").unwrap_err();
            assert!(matches!(e, DataDirError::Invalid { .. }), "{e}");
            assert!(e.to_string().contains("x.rbd"), "{e}");
        }
    }
}
