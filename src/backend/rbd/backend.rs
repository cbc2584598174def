//! [`RbdBackend`]: `impl Backend` over an open librbd image, plus opening with the exclusive-lock
//! policy (refuse while a live gateway holds the lock, take over from a dead one) and the
//! image-level operations the data directory needs (create, remove, allocation).
//!
//! Holes: punching is librbd's write-zeroes, which deallocates whole objects and zeroes partial
//! ones (a plain discard may skip partial objects and leave old bytes). Allocation comes from
//! `rbd_diff_iterate2` at object granularity (4 MiB by default; the object map makes it a lookup in
//! memory); reporting a zeroed part of an object as data is allowed, the volume reads all-zero
//! ciphertext as zeroes anyway.

use std::io;
use std::sync::{Arc, Mutex};

use super::ffi::{Cluster, ConnectOptions, Image, IoCtx};
use super::{Access, RbdError, RbdLocation};
use crate::backend::{Backend, IoDone};

/// Extents asked from librbd per allocation query.
const EXTENTS_PER_QUERY: usize = 1024;

/// An open RBD image.
pub struct RbdBackend {
    image: Image,
    location: RbdLocation,
    /// Serializes growing the image (two writers past the end must not shrink it back).
    grow: Mutex<()>,
    access: Access,
}

impl std::fmt::Debug for RbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdBackend")
            .field("location", &self.location.to_string())
            .field("access", &self.access)
            .finish()
    }
}

pub(super) fn connect(loc: &RbdLocation) -> Result<Arc<IoCtx>, RbdError> {
    let opts = ConnectOptions {
        conf: loc.ceph.ceph_conf.as_deref(),
        client_id: loc.ceph.client_id.as_deref(),
        keyring: loc.ceph.keyring.as_deref(),
    };
    let cluster = Cluster::connect(&opts).map_err(|source| RbdError::Connect {
        location: loc.to_string(),
        conf: loc.ceph.ceph_conf.as_ref().map_or_else(
            || "from $CEPH_CONF or /etc/ceph/ceph.conf".into(),
            |p| p.display().to_string(),
        ),
        id: loc.ceph.client_id.clone().unwrap_or_else(|| "admin".into()),
        source,
    })?;
    cluster.ioctx(&loc.pool).map_err(|source| RbdError::Pool {
        location: loc.to_string(),
        pool: loc.pool.clone(),
        source,
    })
}

pub(super) fn image_err<'a>(
    loc: &'a RbdLocation,
    action: &'static str,
) -> impl FnOnce(io::Error) -> RbdError + 'a {
    move |source| RbdError::Image {
        location: loc.to_string(),
        action,
        source,
    }
}

/// Creates the image (refused with EEXIST if the name is taken).
pub fn create_image(loc: &RbdLocation, size: u64) -> Result<(), RbdError> {
    connect(loc)?
        .create_image(&loc.image, size)
        .map_err(image_err(loc, "create the image"))
}

/// Removes the image; EBUSY (see [`RbdError::is_busy`]) while a gateway has it open.
pub fn remove_image(loc: &RbdLocation) -> Result<(), RbdError> {
    connect(loc)?
        .remove_image(&loc.image)
        .map_err(image_err(loc, "remove the image"))
}

/// Whether lock owner `owner` (librbd names it by messenger address, `IP:PORT/NONCE`, possibly
/// with a `v1:`/`v2:` prefix; older releases by entity, `client.N`) is the watcher at `addr`
/// with global id `id`.
fn is_same_client(owner: &str, addr: &str, id: i64) -> bool {
    fn bare(a: &str) -> &str {
        let a = a.trim();
        a.strip_prefix("v2:")
            .or_else(|| a.strip_prefix("v1:"))
            .or_else(|| a.strip_prefix("any:"))
            .unwrap_or(a)
    }
    (!addr.is_empty() && bare(owner) == bare(addr)) || owner == format!("client.{id}")
}

/// Takes the exclusive lock for `image`, breaking it first if its holder is dead.
fn acquire(image: &Image, me: u64, loc: &RbdLocation) -> Result<(), RbdError> {
    let owners = image
        .lock_owners()
        .map_err(image_err(loc, "read the exclusive lock of"))?;
    if let Some(owner) = owners.first() {
        let watchers = image
            .watchers()
            .map_err(image_err(loc, "list the clients watching"))?;
        // A lock owner that still watches the image is a live client: never break its lock.
        let live = watchers
            .iter()
            .find(|w| w.id as u64 != me && is_same_client(owner, &w.addr, w.id));
        if let Some(w) = live {
            return Err(RbdError::LockHeld {
                location: loc.to_string(),
                owner: format!("client.{}", w.id),
                addr: w.addr.clone(),
            });
        }
        tracing::warn!(image = %loc, owner = %owner,
            "the exclusive lock's holder no longer watches the image: blocklisting it and taking over");
        match image.lock_break(owner) {
            Ok(()) => {}
            // Somebody else broke or released it meanwhile: just try to take it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(image_err(loc, "break the dead holder's lock on")(e)),
        }
    }
    match image.lock_acquire() {
        Ok(()) => Ok(()),
        // The lock moved to a live client between our look and our attempt.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EBUSY)) => {
            let owner = image
                .lock_owners()
                .ok()
                .and_then(|o| o.into_iter().next())
                .unwrap_or_else(|| "another client".into());
            Err(RbdError::LockHeld {
                location: loc.to_string(),
                owner,
                addr: "it refused to hand the lock over".into(),
            })
        }
        Err(e) => Err(image_err(loc, "take the exclusive lock of")(e)),
    }
}

impl RbdBackend {
    /// Connects and opens the image as `access` says (see the module docs).
    pub fn open(loc: &RbdLocation, access: Access) -> Result<RbdBackend, RbdError> {
        let io = connect(loc)?;
        let image = io
            .open(&loc.image, access == Access::ReadShared)
            .map_err(image_err(loc, "open"))?;
        if access != Access::ReadShared {
            let me = io.cluster().instance_id();
            acquire(&image, me, loc)?;
        }
        Ok(RbdBackend::from_image(image, loc, access))
    }

    /// Wraps an image opened elsewhere (at a snapshot, see `snapshots`).
    pub(super) fn from_image(image: Image, loc: &RbdLocation, access: Access) -> RbdBackend {
        RbdBackend {
            image,
            location: loc.clone(),
            grow: Mutex::new(()),
            access,
        }
    }

    pub fn location(&self) -> &RbdLocation {
        &self.location
    }

    pub(super) fn image(&self) -> &Image {
        &self.image
    }

    /// Whether this handle still holds the exclusive lock (false after another gateway took over).
    pub fn holds_lock(&self) -> io::Result<bool> {
        self.image.is_lock_owner()
    }

    /// Bytes in allocated objects (what the image occupies in the cluster, before replication).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        let size = self.image.size()?;
        let mut pos = 0;
        let mut total = 0;
        while pos < size {
            let ext = self
                .image
                .allocated_extents(pos, size - pos, EXTENTS_PER_QUERY)?;
            let Some(&(o, l)) = ext.last() else { break };
            total += ext.iter().map(|e| e.1).sum::<u64>();
            if ext.len() < EXTENTS_PER_QUERY {
                break;
            }
            pos = o + l;
        }
        Ok(total)
    }
}

impl Backend for RbdBackend {
    fn len(&self) -> io::Result<u64> {
        self.image.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.image.size()?;
        // Past the end reads as zeroes, like a short file.
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside > 0 {
            let n = self.image.read(&mut buf[..inside], offset)?;
            if (n as usize) < inside {
                buf[n as usize..inside].fill(0);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past 2^64"))?;
        if end > self.image.size()? {
            let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
            if end > self.image.size()? {
                self.image.resize(end)?;
            }
        }
        self.image.write(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.image.flush()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.image.write_zeroes(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        self.image.resize(len)
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        let size = self.image.size()?;
        if offset >= size {
            return Ok(None);
        }
        let ext = self.image.allocated_extents(offset, size - offset, 1)?;
        Ok(ext.first().map(|&(o, _)| o.max(offset)))
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        let size = self.image.size()?;
        let mut pos = offset;
        while pos < size {
            let mut ext = self
                .image
                .allocated_extents(pos, size - pos, EXTENTS_PER_QUERY)?;
            ext.sort_unstable();
            let full = ext.len() >= EXTENTS_PER_QUERY;
            for (o, l) in ext {
                if o > pos {
                    return Ok(pos);
                }
                pos = pos.max(o + l);
            }
            if !full {
                return Ok(pos.min(size));
            }
        }
        Ok(pos.min(size).max(offset))
    }

    fn submits_async(&self) -> bool {
        true
    }

    fn submit_write(&self, buf: Vec<u8>, offset: u64, done: IoDone) {
        let end = offset.checked_add(buf.len() as u64);
        match (end, self.image.size()) {
            (Some(end), Ok(size)) if end <= size => self.image.submit_write(buf, offset, done),
            // Growing the image (or a failed size query) takes the blocking path.
            _ => {
                let r = self.write_at(&buf, offset);
                done(buf, r);
            }
        }
    }

    fn submit_read(&self, mut buf: Vec<u8>, offset: u64, done: IoDone) {
        let end = offset.checked_add(buf.len() as u64);
        match (end, self.image.size()) {
            (Some(end), Ok(size)) if end <= size => self.image.submit_read(buf, offset, done),
            // Past the end (reads as zeroes) or a failed size query: the blocking path.
            _ => {
                let r = self.read_at(&mut buf, offset);
                done(buf, r);
            }
        }
    }

    fn writes_wait(&self) -> bool {
        // Every write is a round trip to the OSDs.
        true
    }

    fn describe(&self) -> String {
        self.location.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::is_same_client;

    #[test]
    fn lock_owners_match_their_watchers() {
        let a = "127.0.0.1:0/4203530113";
        assert!(is_same_client(a, a, 4176));
        assert!(is_same_client("v2:127.0.0.1:0/4203530113", a, 4176));
        assert!(is_same_client("client.4176", a, 4176));
        assert!(!is_same_client("127.0.0.1:0/4203530114", a, 4176));
        assert!(!is_same_client("client.4177", a, 4176));
        assert!(!is_same_client("", "", 1));
    }
}
