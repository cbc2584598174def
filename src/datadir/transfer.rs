//! Raw image import (encrypt into a new volume) and export (decrypt to a sparse image), with a
//! progress callback so the library stays free of terminal concerns.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{io_err, round_up, CreateOptions, DataDir, DataDirError};
use crate::backend::rbd::RbdLocation;
use crate::backend::{Backend, FileBackend};
use crate::kms::KeyProvider;
use crate::volume::{Volume, VolumeHeader};

/// Bytes copied per step.
const COPY_CHUNK: usize = 1 << 20;

impl DataDir {
    /// Encrypts the raw image `from` into a new volume of its size (rounded up to the sector
    /// size, zero-padded). All-zero chunks are skipped, so they stay holes. `progress(done, total)`
    /// is called as bytes are copied. The volume is built under a temporary name and moved into
    /// place when complete: a server never serves a half-imported volume, and a failure (or a
    /// crash) leaves no volume under the real name.
    pub fn import(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        from: &Path,
        key: &str,
        opts: CreateOptions,
        progress: impl FnMut(u64, u64),
    ) -> Result<VolumeHeader, DataDirError> {
        let (src, len, size) = self.open_image(name, from, opts)?;
        let new = self.build_new(keys, name, size, key, opts)?;
        let header = new.volume.header().clone();
        self.copy_image(name, &new.volume, src, from, len, size, progress)?;
        new.publish(self, name)?;
        tracing::info!(volume = name, volume_id = %header.volume_id, size, "volume imported");
        Ok(header)
    }

    /// [`DataDir::import`] onto a new RBD image at `loc`. The image cannot be built under a
    /// temporary name, so its reference is written only once the copy is complete; a failed copy
    /// removes the image, and a crash leaves an intent record that resolves it (see
    /// [`super::rbd_intent`]).
    #[allow(clippy::too_many_arguments)]
    pub fn import_rbd(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        from: &Path,
        key: &str,
        opts: CreateOptions,
        loc: &RbdLocation,
        progress: impl FnMut(u64, u64),
    ) -> Result<VolumeHeader, DataDirError> {
        let (src, len, size) = self.open_image(name, from, opts)?;
        self.create_rbd_with(keys, name, size, key, opts, loc, |vol| {
            self.copy_image(name, vol, src, from, len, size, progress)
        })
    }

    /// Opens the image to import; returns it, its length and the volume size it needs.
    fn open_image(
        &self,
        name: &str,
        from: &Path,
        opts: CreateOptions,
    ) -> Result<(File, u64, u64), DataDirError> {
        let src = File::open(from).map_err(io_err("opening the image", from))?;
        let len = src
            .metadata()
            .map_err(io_err("reading the size of", from))?
            .len();
        let size = round_up(len, opts.sector_size as u64)
            .filter(|&s| s > 0)
            .ok_or_else(|| DataDirError::Invalid {
                name: name.to_string(),
                reason: format!("the image {} is empty", from.display()),
            })?;
        Ok((src, len, size))
    }

    /// Encrypts the image into `vol`, skipping all-zero chunks, and flushes.
    #[allow(clippy::too_many_arguments)]
    fn copy_image(
        &self,
        name: &str,
        vol: &Volume,
        src: File,
        from: &Path,
        len: u64,
        size: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), DataDirError> {
        let src = FileBackend::new(src, from);
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(COPY_CHUNK as u64) as usize;
            // Past the image's end reads as zeroes: the padding of the last sector.
            src.read_at(&mut buf[..n], done).map_err(io_err(
                format!("reading {n} bytes at offset {done} of"),
                from,
            ))?;
            if buf[..n].iter().any(|&b| b != 0) {
                vol.write(done, &mut buf[..n], false)
                    .map_err(Self::vol_err(name))?;
            }
            done += n as u64;
            progress(done.min(len), len);
        }
        vol.flush().map_err(Self::vol_err(name))
    }

    /// Decrypts a volume into the raw image `to` (created, must not exist). Holes of the volume
    /// stay holes in the image (and all-zero chunks are not written). `progress(done, total)`.
    pub fn export(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        to: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, DataDirError> {
        let vol = self.attach(keys, name, true)?;
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(io_err("creating the image", to))?;
        let size = vol.size();
        let copy = || -> Result<(), DataDirError> {
            out.set_len(size).map_err(io_err("sizing the image", to))?;
            let out = FileBackend::new(out, to);
            self.for_each_data(name, &vol, &mut progress, |pos, data| {
                out.write_at(data, pos).map_err(io_err(
                    format!("writing {} bytes at offset {pos} of", data.len()),
                    to,
                ))
            })?;
            out.sync().map_err(io_err("syncing the image", to))
        };
        if let Err(e) = copy() {
            // A partial image must not be mistaken for a complete one.
            let _ = std::fs::remove_file(to);
            return Err(e);
        }
        Ok(size)
    }

    /// Reads volume `vol` in order and calls `each(offset, plaintext)` for every piece that is
    /// not a hole and not all zeroes (so holes stay holes in whatever `each` writes);
    /// `progress(done, total)` as it goes.
    pub(super) fn for_each_data(
        &self,
        name: &str,
        vol: &Volume,
        progress: &mut impl FnMut(u64, u64),
        mut each: impl FnMut(u64, &mut [u8]) -> Result<(), DataDirError>,
    ) -> Result<(), DataDirError> {
        let size = vol.size();
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut pos = 0u64;
        while pos < size {
            let want = (size - pos).min(COPY_CHUNK as u64);
            let ext = vol.block_status(pos, want).map_err(Self::vol_err(name))?;
            for e in ext {
                if !e.hole {
                    let data = &mut buf[..e.length as usize];
                    let outcome = vol.read(pos, data).map_err(Self::vol_err(name))?;
                    if !outcome.all_zero && data.iter().any(|&b| b != 0) {
                        each(pos, data)?;
                    }
                }
                pos += e.length;
            }
            progress(pos, size);
        }
        Ok(())
    }
}
