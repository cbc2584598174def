//! The key store's objects in a Ceph RADOS pool (and namespace), so that several `kms serve`
//! hosts share one store: `keystore.json`, `grants.json` and `credentials.json` are RADOS
//! objects with the same bytes the files would hold (sealed material and metadata only; the
//! root key never leaves the hosts).
//!
//! **No lost update, no torn state.** Every change is one compare-and-swap on one object: a
//! single write op of `assert_version(v)` + `write_full(new bytes)` (or `create(exclusive)` +
//! `write_full` for an object that does not exist yet), which the OSD applies atomically — the
//! object is the old or the new version, never a mix, whoever dies when. If another writer got
//! in between our read and our write the OSD refuses with `-ERANGE`/`-EOVERFLOW` and
//! `objects::update` reads again and re-applies the change. Chosen over a lock object (RADOS
//! `lock` class) because a dead lock holder would stall every instance until its lock expires,
//! and over omap rows (one per key) because each document is small (a few KiB for hundreds of
//! keys) and one object per document keeps the file format, `check` and export/import
//! identical for both backends. The price: writers of the same document serialize on the OSD
//! and conflicting ones retry; readers never wait. Measured (2026-12-07, release build, the shared
//! single-OSD test cluster, 2 busy cores; `KeyStore::create_key` in a loop, 100 keys in all, the
//! document growing with them): one writer 269 creates/s; two writers on two hosts racing on the
//! same object 176 creates/s together (conflicts, backed-off retries) — against 77 creates/s for
//! one writer on the file store, which fsyncs a file and its directory per change.
//!
//! **Caches and their bound.** Reads are served from a per-process cache of each object's bytes
//! and version while (a) this process has a healthy watch on `keystore.json`, (b) no notify has
//! arrived since the copy was fetched, and (c) the copy is younger than [`CACHE_BOUND`]. Every
//! change is followed by a notify on `keystore.json` (sent by a background thread so a writer
//! never waits on a dead watcher), on which every instance drops its cache. So a change made by
//! another instance is seen within the notify's delivery time (milliseconds) and, if a notify is
//! lost (the writer died between its write and its notify, a watch broke), at most
//! `CACHE_BOUND` later; a change made by this process is seen at once, and a compare-and-swap
//! never trusts the cache (a conflict drops it). A process waits for its queued notifies when it
//! closes the store, so a CLI change reaches the servers before the command returns; while a
//! killed instance's watch lingers (until the OSD expires it, about 30 s) that wait is up to
//! [`NOTIFY_TIMEOUT_MS`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::location::RadosStore;
use super::objects::{Guard, Obj, ObjectStore, Replaced, Version};
use super::KmsError;
use crate::backend::rbd::{RadosPool, Watch};

/// How long a cached object is used without asking the cluster, if no notify says otherwise.
pub const CACHE_BOUND: Duration = Duration::from_secs(1);
/// How long a notify waits for the watchers' acknowledgements (a dead instance's watch lingers
/// until the OSD expires it, about 30 s; the notifier thread just moves on).
const NOTIFY_TIMEOUT_MS: u64 = 1000;

struct Cached {
    bytes: Option<Vec<u8>>,
    version: Option<Version>,
    at: Instant,
    generation: u64,
}

/// A key store in RADOS. See the module comment.
pub struct RadosObjects {
    pool: Arc<RadosPool>,
    store: RadosStore,
    cache: Mutex<HashMap<Obj, Cached>>,
    /// Bumped by every notify received.
    generation: Arc<AtomicU64>,
    watch: Mutex<Option<Watch>>,
    notify: Mutex<Option<mpsc::Sender<Obj>>>,
    notifier: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RadosObjects {
    pub fn connect(store: &RadosStore) -> Result<RadosObjects, KmsError> {
        let pool = RadosPool::connect(
            store.ceph.ceph_conf.as_deref(),
            store.ceph.client_id.as_deref(),
            store.ceph.keyring.as_deref(),
            &store.pool,
            &store.namespace,
        )
        .map_err(|e| {
            KmsError::io(
                "connecting to the Ceph cluster for key store",
                store.to_string(),
                e,
            )
        })?;
        let pool = Arc::new(pool);
        let (tx, rx) = mpsc::channel::<Obj>();
        let p = pool.clone();
        let notifier = std::thread::Builder::new()
            .name("kms-rados-notify".into())
            .spawn(move || {
                while let Ok(obj) = rx.recv() {
                    // Coalesce a burst of changes into one notify per object.
                    let mut objs = vec![obj];
                    objs.extend(rx.try_iter());
                    objs.sort_by_key(|o| o.name());
                    objs.dedup();
                    for o in objs {
                        if let Err(e) =
                            p.notify(Obj::Keystore.name(), o.name().as_bytes(), NOTIFY_TIMEOUT_MS)
                        {
                            tracing::debug!(error = %e, "key store notify not acknowledged by every watcher");
                        }
                    }
                }
            })
            .map_err(|e| KmsError::io("starting the notify thread for", store.to_string(), e))?;
        let r = RadosObjects {
            pool,
            store: store.clone(),
            cache: Mutex::new(HashMap::new()),
            generation: Arc::new(AtomicU64::new(0)),
            watch: Mutex::new(None),
            notify: Mutex::new(Some(tx)),
            notifier: Mutex::new(Some(notifier)),
        };
        r.ensure_watch();
        Ok(r)
    }

    /// Whether the watch is up (registering it if the store object exists by now).
    fn ensure_watch(&self) -> bool {
        let mut w = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(watch) = w.as_ref() {
            if watch.healthy() {
                return true;
            }
            // Broken: register again below (notifies may have been missed, so the cache goes).
            *w = None;
        }
        let generation = self.generation.clone();
        let bump = Box::new(move |_: &[u8]| {
            generation.fetch_add(1, Ordering::SeqCst);
        });
        match self.pool.watch(Obj::Keystore.name(), bump) {
            Ok(watch) => {
                *w = Some(watch);
                // Anything cached before the watch existed may have missed a notify.
                self.generation.fetch_add(1, Ordering::SeqCst);
                true
            }
            Err(_) => false,
        }
    }

    /// The cached copy of `obj`, if it may still be used (see the module comment).
    fn cached(&self, obj: Obj) -> Option<(Option<Vec<u8>>, Option<Version>)> {
        if !self.ensure_watch() {
            return None;
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let c = cache.get(&obj)?;
        (c.generation == generation && c.at.elapsed() < CACHE_BOUND)
            .then(|| (c.bytes.clone(), c.version))
    }

    fn remember(
        &self,
        obj: Obj,
        bytes: Option<Vec<u8>>,
        version: Option<Version>,
        generation: u64,
    ) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(
            obj,
            Cached {
                bytes,
                version,
                at: Instant::now(),
                generation,
            },
        );
    }

    fn forget(&self, obj: Obj) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&obj);
    }

    fn err(&self, what: &'static str, obj: Obj, e: std::io::Error) -> KmsError {
        KmsError::io(what, self.path(obj), e)
    }
}

impl ObjectStore for RadosObjects {
    fn read(&self, obj: Obj) -> Result<Option<(Vec<u8>, Version)>, KmsError> {
        if let Some((bytes, version)) = self.cached(obj) {
            return Ok(bytes.zip(version));
        }
        // Taken before the read: a notify racing with it makes the copy stale at once.
        let generation = self.generation.load(Ordering::SeqCst);
        let r = self
            .pool
            .read(obj.name(), obj.max_bytes())
            .map_err(|e| self.err("reading", obj, e))?;
        let r = r.map(|(b, v)| (b, Version::Rados(v)));
        self.remember(
            obj,
            r.as_ref().map(|(b, _)| b.clone()),
            r.as_ref().map(|(_, v)| *v),
            generation,
        );
        Ok(r)
    }

    fn version(&self, obj: Obj) -> Result<Option<Version>, KmsError> {
        if let Some((_, version)) = self.cached(obj) {
            return Ok(version);
        }
        // No bytes to remember here: read the object (one round trip either way) and cache it.
        Ok(self.read(obj)?.map(|(_, v)| v))
    }

    fn replace(
        &self,
        obj: Obj,
        expected: Option<Version>,
        bytes: &[u8],
    ) -> Result<Replaced, KmsError> {
        let expected = match expected {
            None => None,
            Some(Version::Rados(v)) => Some(v),
            Some(other) => {
                return Err(KmsError::InvalidArgument(format!(
                    "{other:?} is not a RADOS object version"
                )))
            }
        };
        let generation = self.generation.load(Ordering::SeqCst);
        match self
            .pool
            .replace(obj.name(), expected, bytes)
            .map_err(|e| self.err("writing", obj, e))?
        {
            Some(v) => {
                self.remember(
                    obj,
                    Some(bytes.to_vec()),
                    Some(Version::Rados(v)),
                    generation,
                );
                Ok(Replaced::Done)
            }
            None => {
                self.forget(obj);
                Ok(Replaced::Conflict)
            }
        }
    }

    fn lock(&self, _exclusive: bool) -> Result<Guard, KmsError> {
        Ok(Guard(None))
    }

    fn path(&self, obj: Obj) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.store, obj.name()))
    }

    fn location(&self) -> String {
        self.store.to_string()
    }

    fn changed(&self, obj: Obj) {
        if let Some(tx) = self
            .notify
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(obj);
        }
    }
}

impl Drop for RadosObjects {
    fn drop(&mut self) {
        // Let queued notifies go out (a short-lived CLI command's change reaches the servers at
        // once), then stop the watch before the connection goes.
        self.notify.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
        self.watch.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
