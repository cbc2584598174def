//! A FUSE file system that forgets everything not yet fsynced when told to: the power-loss model
//! for `tests/durability_powerloss.rs` (LazyFS, the FUSE file system Jepsen uses, was the model;
//! nothing of it is copied).
//!
//! Everything lives in memory. Each file has two versions of its contents — what programs see now,
//! and what is durable — and each directory two versions of its entries. `fsync`/`fdatasync` of a
//! file makes its contents and size durable; `fsync` of a directory makes its entries durable
//! (creates, renames, unlinks in it). So a new file, or a rename over an old one, survives a
//! "power loss" only once its directory was fsynced: the strictest POSIX reading, harsher than
//! ext4. [`LazyFs::power_loss`] puts every file and directory back to its durable version and
//! forgets files no durable entry names. Metadata other than size (mode, owner, times) is kept
//! as is: the code under test never relies on it surviving a crash.
//!
//! The kernel must not cache what the file system may forget: files are opened with direct I/O
//! (no page cache) and attributes and entries have a zero time to live. Test-only; it is mounted
//! inside the test process with `fuser` (pure-Rust mount through `fusermount3`).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{FileAttr, FileType, MountOption, Request};

mod ops;

const BLOCK: u64 = 4096;
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;
/// FOPEN_DIRECT_IO: bypass the kernel's page cache, so nothing forgotten is still served from it.
const FOPEN_DIRECT_IO: u32 = 1;

type Block = Arc<[u8; BLOCK as usize]>;

/// File contents: sparse 4 KiB blocks (absent = zeroes) and a size. Cloning shares the blocks,
/// so making a version durable costs one map copy, not a data copy.
#[derive(Clone, Default)]
struct Data {
    blocks: BTreeMap<u64, Block>,
    size: u64,
}

impl Data {
    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = (off + len).min(self.size);
        let mut out = vec![0u8; end.saturating_sub(off) as usize];
        let mut pos = off;
        while pos < end {
            let (b, o) = (pos / BLOCK, pos % BLOCK);
            let n = (BLOCK - o).min(end - pos);
            if let Some(blk) = self.blocks.get(&b) {
                let dst = (pos - off) as usize;
                out[dst..dst + n as usize].copy_from_slice(&blk[o as usize..(o + n) as usize]);
            }
            pos += n;
        }
        out
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let mut pos = off;
        let mut src = data;
        while !src.is_empty() {
            let (b, o) = (pos / BLOCK, pos % BLOCK);
            let n = ((BLOCK - o) as usize).min(src.len());
            let blk = self
                .blocks
                .entry(b)
                .or_insert_with(|| Arc::new([0; BLOCK as usize]));
            Arc::make_mut(blk)[o as usize..o as usize + n].copy_from_slice(&src[..n]);
            pos += n as u64;
            src = &src[n..];
        }
        self.size = self.size.max(off + data.len() as u64);
    }

    /// Zeroes `[off, off+len)`, dropping whole blocks (a hole), without changing the size.
    fn zero(&mut self, off: u64, len: u64) {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let (b, o) = (pos / BLOCK, pos % BLOCK);
            let n = (BLOCK - o).min(end - pos);
            if o == 0 && n == BLOCK {
                self.blocks.remove(&b);
            } else if let Some(blk) = self.blocks.get_mut(&b) {
                Arc::make_mut(blk)[o as usize..(o + n) as usize].fill(0);
            }
            pos += n;
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.size {
            // Zero the tail of the last kept block so a later extension reads zeroes.
            let keep = len.div_ceil(BLOCK);
            self.blocks.split_off(&keep);
            if !len.is_multiple_of(BLOCK) {
                self.zero(len, BLOCK - len % BLOCK);
            }
        }
        self.size = len;
    }

    /// Some of `now`'s unsynced blocks on top of `durable` (see [`LazyFs::power_loss_torn`]).
    fn torn(now: &Data, durable: &Data, rng: &mut dyn rand::RngCore) -> Data {
        let mut out = durable.clone();
        let keys: std::collections::BTreeSet<u64> = now
            .blocks
            .keys()
            .chain(durable.blocks.keys())
            .copied()
            .collect();
        for b in keys {
            let (n, d) = (now.blocks.get(&b), durable.blocks.get(&b));
            if n != d && coin(rng) {
                match n {
                    Some(blk) => out.blocks.insert(b, blk.clone()),
                    None => out.blocks.remove(&b),
                };
            }
        }
        let size = if coin(rng) { now.size } else { durable.size };
        out.size = now.size.max(durable.size);
        out.set_len(size);
        out
    }

    fn allocated(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK
    }
}

/// A fair coin for the torn power loss.
fn coin(rng: &mut dyn rand::RngCore) -> bool {
    rng.next_u32() & 1 == 1
}

enum Kind {
    File {
        now: Data,
        durable: Data,
    },
    Dir {
        now: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

struct Node {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

/// Counters a test reports: how much was forgotten over all power losses.
#[derive(Default, Clone, Copy, Debug)]
pub struct Stats {
    pub power_losses: u64,
    pub files_forgotten: u64,
    pub files_rolled_back: u64,
    pub dirs_rolled_back: u64,
    pub fsyncs: u64,
}

struct Inner {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    stats: Stats,
    /// Byte ranges `[start, end)` whose reads fail with EIO, in every file (a failing disk).
    bad_reads: Vec<(u64, u64)>,
    /// Reads refused because of `bad_reads`.
    eio_reads: u64,
}

/// The file system's state, shared between the FUSE session thread and the test.
#[derive(Clone)]
pub struct LazyFs(Arc<Mutex<Inner>>);

/// A mounted [`LazyFs`]; unmounts on drop.
pub struct Mounted {
    pub fs: LazyFs,
    session: Option<fuser::BackgroundSession>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.session.take());
    }
}

impl LazyFs {
    pub fn new() -> LazyFs {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir {
                    now: BTreeMap::new(),
                    durable: BTreeMap::new(),
                },
                perm: 0o700,
                // Replaced by the mount point's owner in `mount`.
                uid: 0,
                gid: 0,
                mtime: SystemTime::now(),
            },
        );
        LazyFs(Arc::new(Mutex::new(Inner {
            nodes,
            next_ino: ROOT + 1,
            bad_reads: Vec::new(),
            eio_reads: 0,
            stats: Stats::default(),
        })))
    }

    /// Mounts a new, empty file system on `dir` (served by a background thread).
    pub fn mount(dir: &Path) -> std::io::Result<Mounted> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir)?;
        let fs = LazyFs::new();
        if let Some(root) = fs.lock().nodes.get_mut(&ROOT) {
            root.uid = meta.uid();
            root.gid = meta.gid();
        }
        let opts = [
            MountOption::FSName("cryptnbd-lazyfs".into()),
            MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount2(ops::Handler(fs.clone()), dir, &opts)?;
        Ok(Mounted {
            fs,
            session: Some(session),
        })
    }

    /// From now on, a read of any file that touches `[start, end)` fails with EIO (a medium
    /// error below the file system); other reads and every write still work.
    pub fn fail_reads(&self, start: u64, end: u64) {
        self.lock().bad_reads.push((start, end));
    }

    /// Reads work everywhere again.
    pub fn heal_reads(&self) {
        self.lock().bad_reads.clear();
    }

    /// How many reads failed with EIO because of [`LazyFs::fail_reads`].
    pub fn eio_reads(&self) -> u64 {
        self.lock().eio_reads
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pulls the plug: every file and directory goes back to what was last fsynced, and files
    /// that no durable directory entry names are gone. Call it with no process using the mount.
    pub fn power_loss(&self) {
        self.pull_plug(None)
    }

    /// A harsher power loss: of the 4 KiB blocks written since a file's last fsync, each one
    /// independently reached the disk or not (a torn, reordered write-back), and each file's size
    /// and each directory's entries are the new or the durable ones. Only fsynced state is sure.
    pub fn power_loss_torn(&self, rng: &mut impl rand::Rng) {
        self.pull_plug(Some(rng))
    }

    fn pull_plug(&self, mut torn: Option<&mut dyn rand::RngCore>) {
        let mut g = self.lock();
        let mut st = g.stats;
        st.power_losses += 1;
        for node in g.nodes.values_mut() {
            match &mut node.kind {
                Kind::File { now, durable } => {
                    if now.size != durable.size || now.blocks != durable.blocks {
                        st.files_rolled_back += 1;
                    }
                    *now = match torn.as_deref_mut() {
                        Some(rng) => Data::torn(now, durable, rng),
                        None => durable.clone(),
                    };
                    // What is on the disk now is all there is.
                    *durable = now.clone();
                }
                Kind::Dir { now, durable } => {
                    if now != durable {
                        st.dirs_rolled_back += 1;
                    }
                    // Torn: the directory's new entries reached the disk, or none did.
                    if !torn.as_deref_mut().is_some_and(|r| coin(&mut *r)) {
                        *now = durable.clone();
                    }
                    *durable = now.clone();
                }
            }
        }
        // Keep only what the durable tree reaches from the root.
        let mut reach = vec![ROOT];
        let mut keep = std::collections::HashSet::new();
        while let Some(ino) = reach.pop() {
            if !keep.insert(ino) {
                continue;
            }
            if let Some(Node {
                kind: Kind::Dir { now, .. },
                ..
            }) = g.nodes.get(&ino)
            {
                reach.extend(now.values().copied());
            }
        }
        let before = g.nodes.len();
        g.nodes.retain(|ino, _| keep.contains(ino));
        st.files_forgotten += (before - g.nodes.len()) as u64;
        g.stats = st;
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats
    }
}

impl Default for LazyFs {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(&ino)?;
        let (kind, size, alloc, nlink) = match &n.kind {
            Kind::File { now, .. } => {
                // Hard links (volume create links its temporary file into place): count names.
                let links = self
                    .nodes
                    .values()
                    .filter_map(|n| match &n.kind {
                        Kind::Dir { now, .. } => Some(now.values().filter(|&&i| i == ino).count()),
                        Kind::File { .. } => None,
                    })
                    .sum::<usize>() as u32;
                (FileType::RegularFile, now.size, now.allocated(), links)
            }
            Kind::Dir { now, .. } => (FileType::Directory, 4096, 4096, 2 + now.len() as u32),
        };
        Some(FileAttr {
            ino,
            size,
            blocks: alloc / 512,
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind,
            perm: n.perm,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    fn dir(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, i32> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::Dir { now, .. }) => Ok(now),
            Some(_) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut Data, i32> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File { now, .. }) => Ok(now),
            Some(_) => Err(libc::EISDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn add(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        req: &Request<'_>,
        mode: u32,
    ) -> Result<u64, i32> {
        let dir = self.dir(parent)?;
        if dir.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.dir(parent)?.insert(name.to_owned(), ino);
        self.nodes.insert(
            ino,
            Node {
                kind,
                perm: (mode & 0o7777) as u16,
                uid: req.uid(),
                gid: req.gid(),
                mtime: SystemTime::now(),
            },
        );
        Ok(ino)
    }

    fn is_empty_dir(&self, ino: u64) -> bool {
        matches!(self.nodes.get(&ino).map(|n| &n.kind), Some(Kind::Dir { now, .. }) if now.is_empty())
    }
}
