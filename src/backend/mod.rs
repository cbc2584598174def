//! The storage under a volume: a narrow positional trait ([`Backend`]) and its file implementation
//! ([`FileBackend`]: pread/pwrite, `fallocate(PUNCH_HOLE)`, `lseek(SEEK_DATA/SEEK_HOLE)`,
//! `fdatasync`). Backends move opaque bytes: they never see plaintext, tweaks or keys.
//!
//! [`testing`] holds the memory, faulty and crashing backends the tests use.

pub mod testing;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Positional byte storage. All methods take `&self`: a backend is shared by concurrent requests,
/// so implementations must be safe to call from many threads at once.
// `len` is a fallible storage query, not a collection length: `is_empty` would mean nothing here.
#[allow(clippy::len_without_is_empty)]
pub trait Backend: Send + Sync {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Fills `buf` from `offset`. Bytes past the end read as zeroes (sparse/short files).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;

    /// Deallocates `[offset, offset+len)` without changing the length; the range then reads as
    /// zeroes. `ErrorKind::Unsupported` when the storage cannot punch holes.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Truncates or extends (sparsely) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// The first offset `>= offset` that holds data, or `None` if only holes follow (SEEK_DATA).
    /// A backend without hole tracking may report everything as data.
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>>;

    /// The first offset `>= offset` that starts a hole; the end of the storage counts as one
    /// (SEEK_HOLE).
    fn seek_hole(&self, offset: u64) -> io::Result<u64>;

    /// Whether [`Backend::punch_hole`] is expected to work (used to answer "is zeroing fast").
    fn can_punch(&self) -> bool {
        true
    }

    /// Hints that `[offset, offset+len)` will be read soon (posix_fadvise WILLNEED).
    fn will_need(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// What the storage is, for error messages (a path, or "memory").
    fn describe(&self) -> String;
}

/// A backend on a regular (sparse) file.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
}

impl FileBackend {
    /// Wraps an already opened file; `path` is only used in error messages.
    pub fn new(file: File, path: impl Into<PathBuf>) -> Self {
        Self {
            file,
            path: path.into(),
        }
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

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (off, l) = (to_off(offset)?, to_off(len)?);
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
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
        self.file.set_len(len)
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

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        (**self).seek_data(offset)
    }
    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        (**self).seek_hole(offset)
    }
    fn can_punch(&self) -> bool {
        (**self).can_punch()
    }
    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).will_need(offset, len)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_backend_reads_zeroes_past_eof_and_reports_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let b = FileBackend::new(f, &path);
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
