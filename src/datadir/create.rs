//! Building a new volume file out of sight: under a temporary name (`volumes/.NAME.vol.PID.tmp`,
//! exclusively locked while it is built), moved to its real name only when complete — so a server
//! never serves a half-created or half-imported volume, and a crash leaves no volume under the
//! real name. Temporary files left by a killed process (no longer locked) are removed by the next
//! create or import of that name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{io_err, sync_dir, try_lock, CreateOptions, DataDir, DataDirError};
use crate::backend::FileBackend;
use crate::kms::KeyProvider;
use crate::volume::Volume;

impl DataDir {
    /// Creates a new volume under a temporary name (`volumes/.NAME.vol.PID.tmp`, exclusively
    /// locked while it is built) and returns it open read-write; [`NewVolume::publish`] moves
    /// it into place. A server never sees it before that, and a failure removes it. Stale
    /// temporary files of `name` left by a crashed process (unlocked) are removed first.
    pub(crate) fn build_new(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        size: u64,
        key: &str,
        opts: CreateOptions,
    ) -> Result<NewVolume, DataDirError> {
        self.volume_path(name)?;
        self.check_free(name)?;
        let (header, xts) = self.new_header(keys, name, size, key, opts)?;
        self.build_with(name, &header, &xts)
    }

    /// [`DataDir::build_new`] with a header and DEK the caller made (a clone's).
    pub(crate) fn build_with(
        &self,
        name: &str,
        header: &crate::volume::VolumeHeader,
        xts: &crate::crypto::XtsKey,
    ) -> Result<NewVolume, DataDirError> {
        let path = self.volume_path(name)?;
        self.check_free(name)?;

        let dir = self.volumes_dir();
        let first = !dir.exists();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating the volumes directory", &dir))?;
        if first {
            // The new `volumes` entry is durable only once the data directory is synced: without
            // this a power loss after the first `volume create` loses the volume (lazyfs test).
            sync_dir(&self.root)?;
        }
        remove_stale_temporaries(&dir, name);
        let tmp = dir.join(format!(".{name}.vol.{}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating volume file", &tmp))?;
        let guard = TempFile(tmp.clone());
        // Held by the open file until it is closed: tells cleaners this one is alive.
        try_lock(&file, true, name, &tmp)?;
        let volume = Volume::create(FileBackend::new(file, &tmp), header, xts)
            .map_err(Self::vol_err(name))?;
        Ok(NewVolume {
            volume,
            tmp: guard,
            path,
        })
    }
}

/// A volume being built under a temporary name (see [`DataDir::build_new`]).
pub(crate) struct NewVolume {
    /// Open read-write on the temporary file.
    pub(crate) volume: Volume,
    tmp: TempFile,
    path: PathBuf,
}

impl NewVolume {
    /// Syncs the volume and moves it to its real name (failing, and removing it, if that name
    /// was taken meanwhile), then syncs the directory.
    pub(crate) fn publish(self, dd: &DataDir, name: &str) -> Result<(), DataDirError> {
        let NewVolume { volume, tmp, path } = self;
        volume.flush().map_err(DataDir::vol_err(name))?;
        // Closing the file drops its lock only after the real name exists (the link below),
        // so a server can attach it the moment it appears.
        let result = match std::fs::hard_link(&tmp.0, &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(DataDirError::AlreadyExists {
                    name: name.to_string(),
                    path: path.clone(),
                })
            }
            // File systems without hard links: a plain rename (not atomic against a concurrent
            // create of the same name, which the check in build_new makes unlikely).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EOPNOTSUPP)) => {
                std::fs::rename(&tmp.0, &path)
                    .map_err(io_err("renaming the new volume file to", &path))
            }
            Err(e) => Err(io_err("linking the new volume file to", &path)(e)),
        };
        drop(tmp);
        drop(volume);
        result?;
        sync_dir(&dd.volumes_dir())
    }
}

/// Removes its path on drop (a temporary volume file that was linked into place, or abandoned).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes `.NAME.vol.*.tmp` files of `dir` that no live process holds locked: what a create or
/// import killed half-way left behind.
pub(super) fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.vol.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(s) = file_name.to_str() else {
            continue;
        };
        let Some(rest) = s.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest.strip_suffix(".tmp") else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let path = entry.path();
        let Ok(f) = File::open(&path) else {
            continue;
        };
        if f.try_lock().is_ok() {
            tracing::warn!(volume = name, file = %path.display(),
                "removing a partial volume file left by an interrupted create or import");
            let _ = std::fs::remove_file(&path);
        }
    }
}
