//! RBD's own snapshots and layered clones for the data directory: an image opened read-only at a
//! snapshot ([`RbdBackend::open_snapshot`]), snapshot create/list/remove, the clones of a
//! snapshot, a clone's parent, clone v2 ([`clone_image`]) and flatten. The cryptnbd header is in
//! the image itself, so a snapshot carries the header as it was, and a clone starts with its
//! parent's header until the data directory writes its own.

use super::backend::{connect, image_err};
use super::ffi::{LinkedImage, ParentSpec};
use super::{Access, RbdBackend, RbdError, RbdLink, RbdLocation, RbdSnapshot};

impl From<LinkedImage> for RbdLink {
    fn from(l: LinkedImage) -> Self {
        RbdLink {
            pool: l.pool,
            image: l.image,
            snapshot: String::new(),
            trash: l.trash,
        }
    }
}

impl From<ParentSpec> for RbdLink {
    fn from(p: ParentSpec) -> Self {
        RbdLink {
            pool: p.pool,
            image: p.image,
            snapshot: p.snapshot,
            trash: p.snapshot_in_trash,
        }
    }
}

/// `rbd:POOL/IMAGE@SNAP`, for messages.
fn at(loc: &RbdLocation, snap: &str) -> RbdLocation {
    let mut l = loc.clone();
    l.image = format!("{}@{snap}", loc.image);
    l
}

impl RbdBackend {
    /// Opens `loc`'s image read-only at snapshot `snap`. No lock: a snapshot never changes, so
    /// any number of gateways may serve it, also while another one writes the image.
    pub fn open_snapshot(loc: &RbdLocation, snap: &str) -> Result<RbdBackend, RbdError> {
        let image = connect(loc)?
            .open_snapshot(&loc.image, snap)
            .map_err(image_err(&at(loc, snap), "open"))?;
        Ok(RbdBackend::from_image(image, loc, Access::ReadShared))
    }

    /// Takes snapshot `snap` of this (writable) image.
    pub fn create_snapshot(&self, snap: &str) -> Result<(), RbdError> {
        self.image()
            .snap_create(snap)
            .map_err(image_err(&at(self.location(), snap), "create the snapshot"))
    }

    /// The snapshot this image (a clone) reads its unwritten data from, if any.
    pub fn parent(&self) -> Result<Option<RbdLink>, RbdError> {
        Ok(self
            .image()
            .parent()
            .map_err(image_err(self.location(), "read the parent of"))?
            .map(RbdLink::from))
    }

    /// The clones of the snapshot this image is open at.
    pub fn children(&self) -> Result<Vec<RbdLink>, RbdError> {
        Ok(self
            .image()
            .children()
            .map_err(image_err(self.location(), "list the clones of"))?
            .into_iter()
            .map(RbdLink::from)
            .collect())
    }

    /// Copies what this clone still reads from its parent into it and ends the link
    /// (`progress(done, total)`); resumable.
    pub fn flatten(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), RbdError> {
        self.image()
            .flatten(progress)
            .map_err(image_err(self.location(), "flatten"))
    }
}

/// The user snapshots of `loc`'s image, oldest first.
pub fn list_snapshots(loc: &RbdLocation) -> Result<Vec<RbdSnapshot>, RbdError> {
    let image = connect(loc)?
        .open(&loc.image, true)
        .map_err(image_err(loc, "open"))?;
    Ok(image
        .snap_list()
        .map_err(image_err(loc, "list the snapshots of"))?
        .into_iter()
        .map(|s| RbdSnapshot {
            name: s.name,
            size: s.size,
        })
        .collect())
}

/// Takes snapshot `snap` of `loc`'s image while a gateway serves it (holds its exclusive lock):
/// librbd forwards the request to the lock's holder, whose librbd blocks new writes, flushes
/// the ones in flight and its cache, snapshots, and resumes — so every write acknowledged
/// before is in the snapshot and none issued after it.
pub fn create_snapshot_online(loc: &RbdLocation, snap: &str) -> Result<(), RbdError> {
    let image = connect(loc)?
        .open(&loc.image, false)
        .map_err(image_err(loc, "open"))?;
    image
        .snap_create(snap)
        .map_err(image_err(&at(loc, snap), "create the snapshot"))
}

/// Removes snapshot `snap` of `loc`'s image. The caller checks for clones first: with clone v2
/// librbd would keep a snapshot that has clones in its trash instead.
pub fn remove_snapshot(loc: &RbdLocation, snap: &str) -> Result<(), RbdError> {
    // A snapshot removal is a maintenance operation: librbd forwards it to the exclusive lock's
    // holder when a gateway serves the image, so no lock is taken here.
    let image = connect(loc)?
        .open(&loc.image, false)
        .map_err(image_err(loc, "open"))?;
    image
        .snap_remove(snap)
        .map_err(image_err(&at(loc, snap), "remove the snapshot"))
}

/// Clones snapshot `snap` of `parent`'s image as the new image `child` (clone format 2, in the
/// child's pool, on the parent's cluster connection).
pub fn clone_image(parent: &RbdLocation, snap: &str, child: &RbdLocation) -> Result<(), RbdError> {
    let pio = connect(parent)?;
    let cio = pio
        .cluster()
        .ioctx(&child.pool)
        .map_err(|source| RbdError::Pool {
            location: child.to_string(),
            pool: child.pool.clone(),
            source,
        })?;
    pio.clone_image(&parent.image, snap, &cio, &child.image)
        .map_err(image_err(child, "clone the snapshot into"))
}
