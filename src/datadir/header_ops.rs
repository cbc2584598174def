//! The operations that change only a volume's header: resize (grow) and rekey (re-wrap the DEK
//! through the key provider's `re-encrypt`), each on a file or an RBD volume, under its exclusive
//! lock and through the crash-safe header update. Refused on snapshots and, for resize, on
//! volumes that read from a parent layer.

use super::{refuse_snapshot, DataDir, DataDirError};
use crate::backend::Backend;
use crate::kms::KeyProvider;
use crate::volume::VolumeHeader;

impl DataDir {
    /// Grows a volume to `new_size` bytes (a multiple of its sector size). The file is extended
    /// (sparsely) and synced before the header says so, so a crash leaves the old or new size.
    pub fn resize(&self, name: &str, new_size: u64) -> Result<VolumeHeader, DataDirError> {
        refuse_snapshot(name, "resize")?;
        if let Some(loc) = self.rbd_location(name)? {
            return Self::resize_on(name, &self.open_rbd_exclusive(name, &loc)?, new_size);
        }
        Self::resize_on(name, &self.open_locked(name, true, true)?, new_size)
    }

    fn resize_on(
        name: &str,
        backend: &dyn Backend,
        new_size: u64,
    ) -> Result<VolumeHeader, DataDirError> {
        let header = VolumeHeader::read_from(backend).map_err(Self::vol_err(name))?;
        if header.parent.is_some() && new_size != header.size {
            return Err(DataDirError::Invalid {
                name: name.to_string(),
                reason: "it reads unwritten data from a parent layer (a snapshot): flatten it before resizing".into(),
            });
        }
        if new_size < header.size {
            return Err(DataDirError::Shrink {
                name: name.to_string(),
                current: header.size,
                requested: new_size,
            });
        }
        if new_size == header.size {
            return Ok(header);
        }
        let written = VolumeHeader::grow(backend, new_size).map_err(Self::vol_err(name))?;
        tracing::info!(
            volume = name,
            old = header.size,
            new = new_size,
            "volume resized"
        );
        Ok(written)
    }

    /// Re-wraps the volume's DEK under the newest version of `key` (or of its current key) via
    /// the key store's `re-encrypt`: the plaintext DEK never leaves the key store, only the
    /// header changes (crash-safe), the data is untouched.
    pub fn rekey(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        key: Option<&str>,
    ) -> Result<VolumeHeader, DataDirError> {
        refuse_snapshot(name, "rekey")?;
        if let Some(loc) = self.rbd_location(name)? {
            return Self::rekey_on(keys, name, &self.open_rbd_exclusive(name, &loc)?, key);
        }
        Self::rekey_on(keys, name, &self.open_locked(name, true, true)?, key)
    }

    fn rekey_on(
        keys: &dyn KeyProvider,
        name: &str,
        backend: &dyn Backend,
        key: Option<&str>,
    ) -> Result<VolumeHeader, DataDirError> {
        let header = VolumeHeader::read_from(backend).map_err(Self::vol_err(name))?;
        let w = keys
            .re_encrypt(
                &header.wrapped_dek,
                &header.encryption_context,
                key,
                &header.encryption_context,
            )
            .map_err(|source| DataDirError::Kms {
                name: name.to_string(),
                action: "rekey",
                source,
            })?;
        let mut next = header.clone();
        next.key_id = w.key_id;
        next.key_version = w.key_version;
        next.wrapped_dek = w.cipher_text;
        let written = next.write_update(backend).map_err(Self::vol_err(name))?;
        tracing::info!(volume = name, key_id = %written.key_id, key_version = written.key_version,
            "volume rekeyed");
        Ok(written)
    }
}
