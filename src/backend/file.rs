//! The backend on a regular (sparse) file: `pread`/`pwrite`, `fallocate(PUNCH_HOLE)`,
//! `lseek(SEEK_DATA/SEEK_HOLE)`, `fdatasync`, and, on local file systems, reads lent from a
//! read-only mapping of the file and writes lent a writable one (`lend` decides when, `mapped`
//! owns the mappings and their SIGBUS guard). Which file system the file is on decides what is
//! safe and cheap: memory file systems never wait for a device, disk ones only map resident pages
//! for writes, network and FUSE ones are never mapped.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use super::{lend, Backend};

/// Reads shorter than this are read with `pread`, not lent from the mapping: the copy a mapped
/// read saves is a few KiB, while a random page of a large mapping costs a TLB miss, at its
/// first touch a page fault, and a residency check. Measured with `tools/bench-peers` (4 KiB
/// random reads, one connection, 3 rounds): one run gave 9.2 µs of server CPU per request mapped
/// against 7.1 µs with `pread`; a direct A/B of this threshold against none gave 6.9 against
/// 6.5 µs (108 k against 112 k IOPS), a tie. Small reads keep the simpler path; 1 MiB sequential
/// reads gain the most (≈ 420–520 against 970 ms/GiB).
pub const MAPPED_MIN: usize = 64 << 10;

/// Writes shorter than this are encrypted in place and `pwrite`-n rather than encrypted straight
/// into the writable mapping (see [`Backend::with_mapped_write`]). Measured with
/// `tools/bench-peers` (tmpfs, 1 GiB, 2026-12-02, 2-core AMD EPYC, loaded): 1 MiB sequential
/// writes cost 302 against 428 ms of server CPU per GiB over a Unix socket (2109 against 1658
/// MiB/s) and 420 against 509 ms/GiB over TCP; 4 KiB random writes through the mapping cost
/// 7.6 against 7.1 µs per request (5 rounds, a tie within the noise, or a small loss): a random
/// 4 KiB write mostly lands on a page the mapping has not touched yet, and that page fault costs
/// what the saved copy gains. So small writes keep `pwrite`.
pub const MAPPED_WRITE_MIN: usize = 64 << 10;

/// A backend on a regular (sparse) file.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    nowait: AtomicU8,
    lender: lend::Lender,
    /// Reads shorter than this are not lent (see [`MAPPED_MIN`]).
    mapped_min: usize,
    /// The writable mapping's owner (see [`Backend::with_mapped_write`]).
    writer: lend::Lender,
    /// Writes shorter than this are not lent (see [`MAPPED_WRITE_MIN`]).
    mapped_write_min: usize,
    /// On a local file system (whose files may be mapped at all).
    mappable: bool,
}

/// How [`FileBackend::try_read_at_nowait`] finds out whether a read would wait.
const NOWAIT_RWF: u8 = 0;
/// The file lives in memory (tmpfs, ramfs): a read never waits for a device.
const NOWAIT_MEMORY: u8 = 1;
/// Neither: every read is treated as one that may wait.
const NOWAIT_NEVER: u8 = 2;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
/// Local file systems whose files are mapped for reads (ext2/3/4, xfs, btrfs, f2fs, and the
/// memory ones). Not network or FUSE file systems, whose cached pages another host or process
/// can invalidate (a fault then costs a round trip, or a SIGBUS); they read with `pread`.
const MAPPED_FS: [i64; 6] = [
    TMPFS_MAGIC,
    RAMFS_MAGIC,
    0xEF53,
    0x5846_5342,
    0x9123_683E,
    0xF2F5_2010,
];

/// The file system type of `file` (`statfs.f_type`), if it can be found out.
// fstatfs(2) through libc.
#[allow(unsafe_code)]
fn fs_type(file: &File) -> Option<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs fills the struct we pass, for a descriptor we own.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded, so it initialised the struct.
    // f_type's integer type differs between targets.
    #[allow(clippy::unnecessary_cast)]
    let f_type = unsafe { st.assume_init() }.f_type as i64;
    Some(f_type)
}

impl FileBackend {
    /// Wraps an already opened file; `path` is only used in error messages.
    /// Reads are lent from a mapping of the file (see [`Backend::with_mapped`]) when it is on a
    /// local file system; [`FileBackend::with_mapping`] turns that off.
    pub fn new(file: File, path: impl Into<PathBuf>) -> Self {
        let f_type = fs_type(&file);
        // tmpfs does not implement `RWF_NOWAIT`, so a memory file system has to be recognised.
        let memory = matches!(f_type, Some(TMPFS_MAGIC | RAMFS_MAGIC));
        let nowait = if memory { NOWAIT_MEMORY } else { NOWAIT_RWF };
        let mappable = f_type.is_some_and(|t| MAPPED_FS.contains(&t));
        Self {
            file,
            path: path.into(),
            nowait: AtomicU8::new(nowait),
            lender: lend::Lender::new(mappable, false),
            mapped_min: MAPPED_MIN,
            // Writes only on memory file systems unless asked (see `with_write_mapping`).
            writer: lend::Lender::new(memory, true),
            mapped_write_min: MAPPED_WRITE_MIN,
            mappable,
        }
    }

    /// Lends reads of at least `min` bytes (default [`MAPPED_MIN`]; 0 lends every read, as the
    /// tests comparing both paths do).
    pub fn with_mapped_min(mut self, min: usize) -> Self {
        self.mapped_min = min;
        self
    }

    /// Lends writes of at least `min` bytes (default [`MAPPED_WRITE_MIN`]; 0 lends every one).
    pub fn with_mapped_write_min(mut self, min: usize) -> Self {
        self.mapped_write_min = min;
        self
    }

    /// `false`: never lend from a mapping; every read is a `pread`, every write a `pwrite`.
    pub fn with_mapping(mut self, on: bool) -> Self {
        if !on {
            self.lender.disable();
            self.writer.disable();
        }
        self
    }

    /// Whether writes may go through a writable mapping. By default they do on memory file
    /// systems only: on disk ones (ext4, measured with `tools/bench-peers --tmpdir /tmp`,
    /// 2026-12-02) 1 MiB sequential writes into a fresh sparse file cost 0.8–3.6 s of server
    /// CPU per GiB mapped against 0.55–0.67 with `pwrite` (the pages cycle through write-back,
    /// and each first store after it is a `page_mkwrite` fault), and on a prefilled file they
    /// were a tie (309–393 against 371–402 ms/GiB). `true` turns it on for any local file system
    /// (only for pages already in memory there), `false` off everywhere.
    pub fn with_write_mapping(mut self, on: bool) -> Self {
        self.writer = lend::Lender::new(on && self.mappable, true);
        self
    }

    /// Whether reads may be lent from a mapping of the file.
    pub fn maps_reads(&self) -> bool {
        self.lender.enabled()
    }

    /// Whether writes may be lent a writable mapping of the file.
    pub fn maps_writes(&self) -> bool {
        self.writer.enabled()
    }

    /// Opens an existing file for reading (and writing unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        Ok(Self::new(file, path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

fn to_off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset does not fit in off_t"))
}

// The positional syscalls std has no wrapper for (preadv2, fallocate, lseek SEEK_DATA/HOLE,
// posix_fadvise), through libc.
#[allow(unsafe_code)]
impl Backend for FileBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // Past the end of a short file: the rest reads as zeroes, like a hole.
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        match self.nowait.load(Ordering::Relaxed) {
            NOWAIT_MEMORY => return self.read_at(buf, offset).map(|()| true),
            NOWAIT_NEVER => return Ok(false),
            _ => {}
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, valid for writes of its length for the whole call; the
        // descriptor is our open file.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                to_off(offset)?,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Not cached: take the slow path.
                Some(libc::EAGAIN | libc::EINTR) => Ok(false),
                // A kernel or filesystem without RWF_NOWAIT: stop asking.
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                    self.nowait.store(NOWAIT_NEVER, Ordering::Relaxed);
                    Ok(false)
                }
                _ => Err(e),
            };
        }
        // A short read is partly cached data or the end of a short file: the slow path handles
        // both (it also zero-fills past the end).
        Ok(n as usize == buf.len())
    }

    fn with_mapped(
        &self,
        offset: u64,
        len: usize,
        nowait: bool,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<bool> {
        // A page fault on a disk file system can wait for the device even when `mincore` just
        // said the page was cached (it may be evicted in between): only memory file systems
        // lend to a reader that must not wait.
        if nowait && self.nowait.load(Ordering::Relaxed) != NOWAIT_MEMORY {
            return Ok(false);
        }
        if len < self.mapped_min {
            return Ok(false);
        }
        self.lender.lend(&self.file, offset, len, f)
    }

    fn with_mapped_write(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[AtomicU8]),
    ) -> io::Result<bool> {
        if len < self.mapped_write_min {
            return Ok(false);
        }
        // On a disk file system (when enabled there), a store to a page not in memory makes the
        // kernel read it from the device first (pwrite of whole pages does not): only resident
        // pages there. On a memory file system a store into a hole allocates the page, as pwrite
        // does.
        let resident = self.nowait.load(Ordering::Relaxed) != NOWAIT_MEMORY;
        self.writer.lend_write(&self.file, offset, len, resident, f)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    // `fdatasync` also writes back pages dirtied through the writable mapping: on Linux a
    // MAP_SHARED store dirties the page-cache page itself (through `page_mkwrite`, or the page
    // table's dirty bit gathered by write-back), so the sync that covers `pwrite`s covers them,
    // and a failed write-back of them is reported to it the same way.
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (off, l) = (to_off(offset)?, to_off(len)?);
        // Before the punch: a reader must not take these pages as resident once they are holes
        // (on tmpfs, touching a hole through the mapping would allocate it).
        self.lender.punched(offset, len);
        self.writer.punched(offset, len);
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        // And after: a reader that found them resident while the punch ran may have noted so.
        self.lender.punched(offset, len);
        self.writer.punched(offset, len);
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the file system cannot punch holes",
            )),
            _ => Err(e),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.lender.resized();
        self.writer.resized();
        Ok(())
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own. It moves the shared file offset, which nothing
        // here relies on (all I/O is positional).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), to_off(offset)?, libc::SEEK_DATA) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            // No SEEK_DATA support: everything is data.
            Some(libc::EINVAL) if offset < self.len()? => Ok(Some(offset)),
            _ => Err(e),
        }
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        // SAFETY: as in seek_data.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), to_off(offset)?, libc::SEEK_HOLE) };
        if r >= 0 {
            return Ok(r as u64);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(offset),
            Some(libc::EINVAL) => self.len(),
            _ => Err(e),
        }
    }

    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: posix_fadvise on a descriptor we own; it only affects caching.
        let rc = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                to_off(offset)?,
                to_off(len)?,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file backend on a new, empty file at `path`.
    fn new_file(path: &Path) -> FileBackend {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        // Every read size lends, so the small reads below exercise the mapping.
        FileBackend::new(f, path).with_mapped_min(0)
    }

    /// The non-blocking read gives the same bytes as `read_at` whenever it says it succeeded, on
    /// tmpfs (recognised as memory: always succeeds) and on the regular filesystem of the temp
    /// dir (RWF_NOWAIT: succeeds for cached data, which freshly written data is), also through
    /// a `Box<dyn Backend>`.
    #[test]
    fn nowait_read_matches_read_at() {
        let shm = std::path::Path::new("/dev/shm");
        let tmp = tempfile::tempdir().unwrap();
        let shm_dir = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
        let mut dirs = vec![(tmp.path().to_path_buf(), false)];
        if let Some(d) = &shm_dir {
            dirs.push((d.path().to_path_buf(), true));
        }
        for (dir, memory) in dirs {
            let b: Box<dyn Backend> = Box::new(new_file(&dir.join("f")));
            let data: Vec<u8> = (0..16384u32).map(|i| (i * 7) as u8).collect();
            b.write_at(&data, 4096).unwrap();
            let mut got = vec![0u8; 8192];
            let done = b.try_read_at_nowait(&mut got, 8192).unwrap();
            if memory {
                assert!(done, "tmpfs reads never wait");
            }
            if done {
                assert_eq!(got, data[4096..12288]);
            }
        }
    }

    /// Reads lent from the mapping are the file's bytes (on tmpfs and on the temp dir's file
    /// system), and touching a sparse tmpfs file through its mapping never fills its holes: a
    /// hole is not resident, so it is not lent (tmpfs would allocate a page on a mapped read of
    /// a hole, making the hole data and costing memory).
    #[test]
    fn mapped_reads_match_and_never_fill_tmpfs_holes() {
        let shm = std::path::Path::new("/dev/shm");
        let tmp = tempfile::tempdir().unwrap();
        let shm_dir = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
        let mut dirs = vec![tmp.path().to_path_buf()];
        dirs.extend(shm_dir.iter().map(|d| d.path().to_path_buf()));
        for dir in dirs {
            let b = new_file(&dir.join("f"));
            assert!(b.maps_reads(), "{dir:?} is a local file system");
            b.set_len(8 << 20).unwrap();
            let data: Vec<u8> = (0..16384u32).map(|i| (i * 13) as u8 | 1).collect();
            b.write_at(&data, 1 << 20).unwrap();
            let blocks = || {
                use std::os::unix::fs::MetadataExt;
                b.file().metadata().unwrap().blocks()
            };
            let before = blocks();
            let mut got = Vec::new();
            let lent = b
                .with_mapped((1 << 20) + 4096, 8192, false, &mut |s| got = s.to_vec())
                .unwrap();
            assert!(lent, "freshly written pages are resident");
            assert_eq!(got, data[4096..12288]);
            for off in [0u64, 2 << 20, (8 << 20) - 4096] {
                let mut touched = false;
                let lent = b
                    .with_mapped(off, 4096, false, &mut |_| touched = true)
                    .unwrap();
                if in_memory(&b) {
                    assert!(!lent && !touched, "a tmpfs hole is never lent");
                }
            }
            assert_eq!(blocks(), before, "holes stay holes");
            // Pages lent before (so known resident) and then punched are holes again: not lent
            // on tmpfs, and not filled.
            b.punch_hole(1 << 20, 16384).unwrap();
            let holes = blocks();
            let lent = b
                .with_mapped((1 << 20) + 4096, 8192, false, &mut |s| got = s.to_vec())
                .unwrap();
            if in_memory(&b) {
                assert!(!lent, "a punched tmpfs page is never lent");
            } else if lent {
                assert!(got.iter().all(|&x| x == 0));
            }
            assert_eq!(blocks(), holes, "punched holes stay holes");
            let plain = new_file(&dir.join("g")).with_mapping(false);
            plain.write_at(&data, 0).unwrap();
            assert!(!plain.with_mapped(0, 4096, false, &mut |_| {}).unwrap());
        }
    }

    /// Which writes are lent a writable mapping: on tmpfs every one from the threshold up (a
    /// hole too: the store allocates it, as `pwrite` would); on the temp dir's disk file system
    /// none by default, and with `with_write_mapping(true)` only pages in memory, never a hole
    /// that would be read from the device first. What is stored lands in the file; below the
    /// threshold and with mapping off nothing is lent.
    #[test]
    fn mapped_writes_lend_only_where_cheap() {
        let shm = std::path::Path::new("/dev/shm");
        let tmp = tempfile::tempdir().unwrap();
        let shm_dir = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
        let mut dirs = vec![tmp.path().to_path_buf()];
        dirs.extend(shm_dir.iter().map(|d| d.path().to_path_buf()));
        let fill =
            |v: u8| move |d: &[AtomicU8]| d.iter().for_each(|b| b.store(v, Ordering::Relaxed));
        for dir in dirs {
            let b = new_file(&dir.join("f")).with_mapped_write_min(8192);
            b.set_len(8 << 20).unwrap();
            let memory = in_memory(&b);
            assert_eq!(b.maps_writes(), memory, "{dir:?}: default");
            assert!(
                !b.with_mapped_write(0, 4096, &mut fill(1)).unwrap(),
                "below the threshold"
            );
            assert_eq!(
                b.with_mapped_write(1 << 20, 8192, &mut fill(2)).unwrap(),
                memory
            );
            let b = b.with_write_mapping(true);
            assert!(b.maps_writes());
            let hole = b.with_mapped_write(2 << 20, 8192, &mut fill(3)).unwrap();
            assert_eq!(hole, memory, "{dir:?}: a disk hole is never lent");
            b.write_at(&[4u8; 8192], 3 << 20).unwrap();
            assert!(
                b.with_mapped_write(3 << 20, 8192, &mut fill(5)).unwrap(),
                "resident"
            );
            let mut got = [0u8; 8192];
            b.read_at(&mut got, 3 << 20).unwrap();
            assert!(
                got.iter().all(|&x| x == 5),
                "{dir:?}: stores land in the file"
            );
            let off = b.with_write_mapping(false);
            assert!(!off.with_mapped_write(3 << 20, 8192, &mut fill(6)).unwrap());
        }
    }

    fn in_memory(b: &FileBackend) -> bool {
        b.nowait.load(Ordering::Relaxed) == NOWAIT_MEMORY
    }

    #[test]
    fn file_backend_reads_zeroes_past_eof_and_reports_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = new_file(&path);
        b.set_len(4 << 20).unwrap();
        b.write_at(&[7u8; 4096], 1 << 20).unwrap();
        let mut buf = [1u8; 8192];
        b.read_at(&mut buf, (4 << 20) - 4096).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        assert_eq!(b.seek_data(0).unwrap(), Some(1 << 20));
        assert_eq!(b.seek_hole(1 << 20).unwrap(), (1 << 20) + 4096);
        match b.punch_hole(1 << 20, 4096) {
            Ok(()) => assert_eq!(b.seek_data(0).unwrap(), None),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported),
        }
        let mut one = [1u8; 4096];
        b.read_at(&mut one, 1 << 20).unwrap();
        if b.seek_data(0).unwrap().is_none() {
            assert!(one.iter().all(|&x| x == 0));
        }
        b.sync().unwrap();
        b.will_need(0, 4096).unwrap();
    }
}
