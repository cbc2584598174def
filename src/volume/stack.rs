//! The layer stack of an open volume and its online replacement: which storage this (top) layer
//! reads and writes, which layer is below it, and the gate an online snapshot closes to put a
//! new layer on top of a volume that stays attached.
//!
//! An online snapshot ([`Volume::quiesce`], then [`Volume::push_layer`]) closes the gate
//! (writes, trims and write-zeroes in flight finish; new ones wait), flushes, and — once the
//! caller has made the files say so — makes the current top storage a read-only layer below a
//! new, empty top. Reads never wait: one that started on the old stack reads what the new one
//! would (the new top is empty and falls through to the old), and the old storage receives no
//! write after the gate closed. Everything else about the volume (its DEK, size, sector size,
//! identity) stays; the header [`Volume::header`] returns is the one read at attach, so its
//! layer fields (`layer_id`, `parent`) are those of the layer attached then.

use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::{ArcSwap, Guard};
use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

use super::{Volume, VolumeError, VolumeHeader, LOCK_STRIPES};
use crate::backend::Backend;
use crate::crypto::Xts;

/// The storage of the top layer and the layer below it.
pub(super) struct Top {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) parent: Option<Arc<Volume>>,
}

/// The top layer's storage as it was when asked for (kept alive while held).
pub struct BackendRef(pub(super) Guard<Arc<Top>>);

impl Deref for BackendRef {
    type Target = dyn Backend;
    fn deref(&self) -> &(dyn Backend + 'static) {
        &*self.0.backend
    }
}

/// A quiesced volume: no write, trim or write-zeroes runs while this is held, and new ones
/// wait (see [`Volume::quiesce`]).
pub struct Quiesced<'a> {
    vol: &'a Volume,
    _gate: ShardedLockWriteGuard<'a, ()>,
}

impl Volume {
    pub(super) fn from_parts(
        backend: Arc<dyn Backend>,
        parent: Option<Arc<Volume>>,
        xts: Arc<Xts>,
        header: VolumeHeader,
        read_only: bool,
    ) -> Volume {
        let target = backend.describe();
        Volume {
            top: ArcSwap::from_pointee(Top { backend, parent }),
            xts,
            header,
            read_only,
            target,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            writeback_error: OnceLock::new(),
            gate: ShardedLock::new(()),
        }
    }

    /// The current stack (an online snapshot may replace it after this returns; the guard
    /// keeps the one returned alive).
    pub(super) fn top(&self) -> Guard<Arc<Top>> {
        self.top.load()
    }

    /// Sets the layer below (at attach, before the volume is shared).
    pub(super) fn set_parent(&mut self, parent: Arc<Volume>) {
        let backend = self.top().backend.clone();
        self.top = ArcSwap::from_pointee(Top {
            backend,
            parent: Some(parent),
        });
    }

    /// The layer below, if this is a child.
    pub fn parent(&self) -> Option<Arc<Volume>> {
        self.top().parent.clone()
    }

    /// Entered by every write, trim and write-zeroes for its whole duration (once: the lock
    /// is not reentrant while a snapshot waits).
    pub(super) fn enter(&self) -> ShardedLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Drains the writes, trims and write-zeroes in flight and holds new ones until the result
    /// is dropped, then flushes: what the storage holds is then exactly the writes that
    /// completed before this returned. Refused for storage that completes writes
    /// asynchronously (RBD), whose submitted writes the gate does not cover.
    pub fn quiesce(&self) -> Result<Quiesced<'_>, VolumeError> {
        if self.read_only {
            return Err(VolumeError::ReadOnly {
                op: super::Op::Write,
            });
        }
        if self.top().backend.submits_async() {
            return Err(VolumeError::Invalid(
                "an online snapshot needs storage that completes writes synchronously".into(),
            ));
        }
        let gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.flush()?;
        Ok(Quiesced {
            vol: self,
            _gate: gate,
        })
    }
}

impl Quiesced<'_> {
    /// Puts a new top layer over the quiesced volume: `new_top` (an empty child layer whose
    /// header names the current top as its parent) is written from now on, and the current
    /// top becomes a read-only layer below it, read through `below` (the same data: the same
    /// file opened again, or the same storage) with its header `below_header`. The caller has
    /// already made the storage say so (e.g. the files renamed).
    pub fn push_layer(
        &self,
        new_top: Box<dyn Backend>,
        below: Box<dyn Backend>,
        below_header: VolumeHeader,
    ) -> Result<(), VolumeError> {
        let vol = self.vol;
        if below_header.volume_id != vol.header.volume_id
            || below_header.size != vol.header.size
            || below_header.sector_size != vol.header.sector_size
        {
            return Err(VolumeError::ParentMismatch {
                target: vol.target.clone(),
                parent: below.describe(),
                reason: "the layer put below is not this volume's".into(),
            });
        }
        let old = vol.top();
        let mut snapshot = Volume::from_parts(
            Arc::from(below),
            old.parent.clone(),
            vol.xts.clone(),
            below_header,
            true,
        );
        // The snapshot layer keeps describing itself by its own name, not the live volume's.
        snapshot.target = snapshot.top().backend.describe();
        vol.top.store(Arc::new(Top {
            backend: Arc::from(new_top),
            parent: Some(Arc::new(snapshot)),
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::testing::MemBackend;
    use crate::crypto::XtsKey;
    use uuid::Uuid;

    fn header() -> VolumeHeader {
        let mut h = VolumeHeader::new(Uuid::new_v4(), 4 << 20, 4096);
        h.layer_id = Some(Uuid::new_v4());
        h
    }

    #[test]
    fn a_pushed_layer_takes_new_writes_and_the_old_one_keeps_the_snapshot() {
        let h = header();
        let key = XtsKey::generate();
        let live = MemBackend::new();
        let v = Volume::create(live.clone(), &h, &key).unwrap();
        v.write(0, &mut vec![1u8; 8192], false).unwrap();
        {
            let q = v.quiesce().unwrap();
            let mut child = h.clone();
            child.layer_id = Some(Uuid::new_v4());
            let top = MemBackend::new();
            child.write_new(&top).unwrap();
            q.push_layer(Box::new(top), Box::new(live.clone()), h.clone())
                .unwrap();
        }
        v.write(4096, &mut vec![2u8; 4096], false).unwrap();
        let mut b = vec![0u8; 8192];
        v.read(0, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 1));
        assert!(b[4096..].iter().all(|&x| x == 2));
        // The layer below still holds what was written before the snapshot.
        let below = v.parent().unwrap();
        below.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 1));
        assert!(below.is_read_only());
    }

    #[test]
    fn a_write_waits_while_the_volume_is_quiesced() {
        let h = header();
        let v = Arc::new(Volume::create(MemBackend::new(), &h, &XtsKey::generate()).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let q = v.quiesce().unwrap();
        let w = {
            let v = v.clone();
            std::thread::spawn(move || {
                v.write(0, &mut vec![3u8; 4096], false).unwrap();
                tx.send(()).unwrap();
            })
        };
        // Held: the write cannot complete while the gate is closed.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(q);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        w.join().unwrap();
    }

    #[test]
    fn a_foreign_layer_is_refused() {
        let h = header();
        let v = Volume::create(MemBackend::new(), &h, &XtsKey::generate()).unwrap();
        let mut other = header();
        other.volume_id = Uuid::new_v4();
        let q = v.quiesce().unwrap();
        let r = q.push_layer(
            Box::new(MemBackend::new()),
            Box::new(MemBackend::new()),
            other,
        );
        assert!(r.is_err());
    }
}
