//! Where the key store's three documents live: `keystore.json`, `grants.json` and
//! `credentials.json` are *objects* of an [`ObjectStore`] — files in the data directory (the
//! default, [`FileObjects`]) or objects in a Ceph RADOS pool (`rados.rs`, feature `rbd`). The
//! store, grants and credentials code reads and changes them only through this seam:
//!
//! - [`ObjectStore::read`]: the bytes of an object and its [`Version`];
//! - [`ObjectStore::replace`]: write new bytes *only if* the object is still at the version read
//!   (or, for `None`, does not exist yet) — a compare-and-swap; [`Replaced::Conflict`] otherwise;
//! - [`update`]: the read-modify-write loop on top of both, retried on a conflict, so a change
//!   made by another process between our read and our write is never overwritten (no lost
//!   update); the change function must therefore be repeatable (it is called again on a retry).
//!
//! The file backend keeps its historical behaviour and formats exactly: writers hold the
//! exclusive `flock` on `keystore.lock` around the loop (so a conflict never happens there),
//! readers a shared one, and a write is temp file + fsync + rename + directory fsync. Its version
//! is the file's identity (device, inode, size, mtime): a write replaces the inode.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{store, KmsError};

/// The documents of a key store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Obj {
    Keystore,
    Grants,
    Credentials,
}

impl Obj {
    pub const ALL: [Obj; 3] = [Obj::Keystore, Obj::Grants, Obj::Credentials];

    /// The file name (and RADOS object name).
    pub fn name(self) -> &'static str {
        match self {
            Obj::Keystore => store::STORE_FILE,
            Obj::Grants => super::grants::GRANTS_FILE,
            Obj::Credentials => super::credentials::CREDENTIALS_FILE,
        }
    }

    /// The largest object of this kind we read (a larger one is not ours).
    pub fn max_bytes(self) -> u64 {
        match self {
            Obj::Keystore | Obj::Grants => 64 << 20,
            Obj::Credentials => 16 << 20,
        }
    }

    /// How I/O errors name the steps on this file (as they always have).
    fn steps(self) -> [&'static str; 5] {
        match self {
            Obj::Keystore => [
                "opening key store",
                "reading key store",
                "creating temporary key store file",
                "writing temporary key store file",
                "replacing key store",
            ],
            Obj::Grants => [
                "opening grants file",
                "reading grants file",
                "creating temporary grants file",
                "writing temporary grants file",
                "replacing grants file",
            ],
            Obj::Credentials => [
                "opening credentials file",
                "reading credentials file",
                "creating temporary credentials file",
                "writing temporary credentials file",
                "replacing credentials file",
            ],
        }
    }
}

/// One version of an object: equal versions mean equal contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// A file's identity; a write replaces the file by rename, so a new inode and mtime.
    File {
        dev: u64,
        ino: u64,
        len: u64,
        mtime_ns: i128,
    },
    /// A RADOS object version (incremented by every write to the object).
    Rados(u64),
}

/// The result of a compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaced {
    Done,
    /// The object changed (or appeared) since it was read: read again and retry.
    Conflict,
}

/// A held lock (file backend) or nothing (RADOS: every write is a compare-and-swap).
pub struct Guard(#[allow(dead_code)] pub(super) Option<store::LockGuard>);

/// A place holding the key store's objects. See the module comment.
pub trait ObjectStore: Send + Sync {
    /// The object's bytes and version; `None` when it does not exist.
    fn read(&self, obj: Obj) -> Result<Option<(Vec<u8>, Version)>, KmsError>;
    /// The object's current version (`None`: missing), cheaper than a read where possible.
    fn version(&self, obj: Obj) -> Result<Option<Version>, KmsError>;
    /// Writes `bytes` if the object is still at `expected` (`None`: only if it does not exist).
    fn replace(
        &self,
        obj: Obj,
        expected: Option<Version>,
        bytes: &[u8],
    ) -> Result<Replaced, KmsError>;
    /// Serializes writers where the backend needs it (`exclusive`) or readers against them.
    fn lock(&self, exclusive: bool) -> Result<Guard, KmsError>;
    /// How errors name an object: a path, or `rados:POOL/NS/OBJECT`.
    fn path(&self, obj: Obj) -> PathBuf;
    /// `file:DIR` or `rados:POOL[/NS]`, for messages.
    fn location(&self) -> String;
    /// Tells other processes watching the store that `obj` changed (RADOS notify); a no-op for
    /// files, whose readers check the version themselves.
    fn changed(&self, _obj: Obj) {}
}

/// Bounds the retries of [`update`]: a conflict means another writer *succeeded*, so this many in
/// a row means a writer storm, reported instead of spinning forever.
const MAX_ATTEMPTS: u32 = 200;

/// Read-modify-write of `obj` with compare-and-swap: `f` gets the current bytes (`None`: missing)
/// and returns the new bytes (`None`: write nothing) and its result. On a conflict `f` runs again
/// on the newer bytes. An `Err` from `f` aborts without writing.
pub fn update<R>(
    objects: &dyn ObjectStore,
    obj: Obj,
    mut f: impl FnMut(Option<&[u8]>) -> Result<(Option<Vec<u8>>, R), KmsError>,
) -> Result<R, KmsError> {
    let _guard = objects.lock(true)?;
    for attempt in 0..MAX_ATTEMPTS {
        let current = objects.read(obj)?;
        let (new, result) = f(current.as_ref().map(|(b, _)| b.as_slice()))?;
        let Some(new) = new else {
            return Ok(result);
        };
        match objects.replace(obj, current.map(|(_, v)| v), &new)? {
            Replaced::Done => {
                objects.changed(obj);
                return Ok(result);
            }
            Replaced::Conflict => {
                // Back off a little (growing, jittered) so racing writers spread out.
                let mut r = [0u8; 1];
                getrandom::getrandom(&mut r).expect("the OS random number generator failed");
                let micros = (100u64 << attempt.min(6)) + u64::from(r[0]) * 4;
                std::thread::sleep(std::time::Duration::from_micros(micros));
            }
        }
    }
    Err(KmsError::Contended {
        object: objects.path(obj),
        attempts: MAX_ATTEMPTS,
    })
}

/// The data directory as an object store (the historical layout).
#[derive(Debug)]
pub struct FileObjects {
    dir: PathBuf,
}

impl FileObjects {
    pub fn new(dir: &Path) -> Self {
        FileObjects {
            dir: dir.to_path_buf(),
        }
    }

    fn temp_prefix(obj: Obj) -> String {
        format!(".{}.tmp.", obj.name())
    }
}

fn stamp(m: &fs::Metadata) -> Version {
    Version::File {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    }
}

impl ObjectStore for FileObjects {
    fn read(&self, obj: Obj) -> Result<Option<(Vec<u8>, Version)>, KmsError> {
        let p = self.path(obj);
        let [open, read, ..] = obj.steps();
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(KmsError::io(open, p, e)),
        };
        let m = f.metadata().map_err(|e| KmsError::io(read, &p, e))?;
        let max = obj.max_bytes();
        if m.len() > max {
            return Err(too_large(p, m.len(), max));
        }
        let mut buf = Vec::with_capacity(m.len() as usize);
        Read::by_ref(&mut f)
            .take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|e| KmsError::io(read, &p, e))?;
        if buf.len() as u64 > max {
            return Err(too_large(p, buf.len() as u64, max));
        }
        Ok(Some((buf, stamp(&m))))
    }

    fn version(&self, obj: Obj) -> Result<Option<Version>, KmsError> {
        let p = self.path(obj);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(stamp(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(KmsError::io(obj.steps()[1], p, e)),
        }
    }

    fn replace(
        &self,
        obj: Obj,
        expected: Option<Version>,
        bytes: &[u8],
    ) -> Result<Replaced, KmsError> {
        // Writers hold the exclusive lock (see `update`), so this check only guards callers
        // that did not take it.
        if self.version(obj)? != expected {
            return Ok(Replaced::Conflict);
        }
        let prefix = Self::temp_prefix(obj);
        if obj == Obj::Keystore {
            store::remove_stale_temps(&self.dir);
        }
        let [_, _, create, write, rename] = obj.steps();
        store::replace_file(
            &self.dir,
            &self.path(obj),
            &prefix,
            bytes,
            store::ReplaceSteps {
                create,
                write,
                rename,
            },
        )?;
        Ok(Replaced::Done)
    }

    fn lock(&self, exclusive: bool) -> Result<Guard, KmsError> {
        Ok(Guard(Some(if exclusive {
            store::lock_exclusive(&self.dir)?
        } else {
            store::lock_shared(&self.dir)?
        })))
    }

    fn path(&self, obj: Obj) -> PathBuf {
        self.dir.join(obj.name())
    }

    fn location(&self) -> String {
        format!("file:{}", self.dir.display())
    }
}

fn too_large(path: PathBuf, len: u64, max: u64) -> KmsError {
    KmsError::Corrupt {
        path,
        reason: format!("it is {len} bytes, more than the {max} it can be"),
    }
}

/// An object store in memory with a version counter, for testing the compare-and-swap loop.
#[cfg(test)]
pub(crate) mod memory {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct MemObjects {
        pub objects: Mutex<HashMap<Obj, (Vec<u8>, u64)>>,
        pub conflicts: std::sync::atomic::AtomicU32,
    }

    impl ObjectStore for MemObjects {
        fn read(&self, obj: Obj) -> Result<Option<(Vec<u8>, Version)>, KmsError> {
            let m = self.objects.lock().unwrap();
            Ok(m.get(&obj).map(|(b, v)| (b.clone(), Version::Rados(*v))))
        }
        fn version(&self, obj: Obj) -> Result<Option<Version>, KmsError> {
            Ok(self.read(obj)?.map(|(_, v)| v))
        }
        fn replace(
            &self,
            obj: Obj,
            expected: Option<Version>,
            bytes: &[u8],
        ) -> Result<Replaced, KmsError> {
            let mut m = self.objects.lock().unwrap();
            let cur = m.get(&obj).map(|(_, v)| Version::Rados(*v));
            if cur != expected {
                self.conflicts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Replaced::Conflict);
            }
            let next = m.get(&obj).map_or(1, |(_, v)| v + 1);
            m.insert(obj, (bytes.to_vec(), next));
            Ok(Replaced::Done)
        }
        fn lock(&self, _exclusive: bool) -> Result<Guard, KmsError> {
            Ok(Guard(None))
        }
        fn path(&self, obj: Obj) -> PathBuf {
            PathBuf::from(format!("mem:{}", obj.name()))
        }
        fn location(&self) -> String {
            "mem:".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemObjects;
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// Two writers racing on one object, each appending its own items: the compare-and-swap
    /// makes the loser re-read and retry, so every item of both is present at the end.
    #[test]
    fn racing_writers_lose_no_update() {
        let mem = Arc::new(MemObjects::default());
        // Both writers' first change reads the same (missing) object before either writes.
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2u8)
            .map(|t| {
                let (mem, barrier) = (mem.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut first = true;
                    for i in 0..200u8 {
                        update(&*mem, Obj::Grants, |cur| {
                            let mut v = cur.map(<[u8]>::to_vec).unwrap_or_default();
                            if std::mem::take(&mut first) {
                                barrier.wait();
                            }
                            v.extend_from_slice(&[t, i]);
                            Ok((Some(v), ()))
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (bytes, _) = mem.read(Obj::Grants).unwrap().unwrap();
        let mut pairs: Vec<_> = bytes.chunks(2).map(|c| (c[0], c[1])).collect();
        assert_eq!(pairs.len(), 400);
        pairs.sort();
        pairs.dedup();
        assert_eq!(pairs.len(), 400, "every change of both writers is present");
        assert!(
            mem.conflicts.load(Ordering::Relaxed) > 0,
            "the race happened"
        );
    }

    #[test]
    fn file_replace_is_a_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileObjects::new(dir.path());
        assert_eq!(f.read(Obj::Grants).unwrap(), None);
        assert_eq!(f.replace(Obj::Grants, None, b"a").unwrap(), Replaced::Done);
        assert_eq!(
            f.replace(Obj::Grants, None, b"b").unwrap(),
            Replaced::Conflict
        );
        let (b, v) = f.read(Obj::Grants).unwrap().unwrap();
        assert_eq!(b, b"a");
        assert_eq!(
            f.replace(Obj::Grants, Some(v), b"c").unwrap(),
            Replaced::Done
        );
        assert_eq!(
            f.replace(Obj::Grants, Some(v), b"d").unwrap(),
            Replaced::Conflict
        );
        assert_eq!(f.read(Obj::Grants).unwrap().unwrap().0, b"c");
    }
}
