//! Serving the encrypted volumes of a data directory: `impl Export` for an attached
//! [`Volume`], and [`DataDirProvider`], which attaches volumes (unwrapping their data keys through
//! the key store) at start or on a client's first request, and caches one `Arc` per volume so
//! every connection to an export shares one open volume (a FLUSH on one covers all).
//!
//! A refused attach (disabled or deleted CMK, corrupt header, volume in use) is logged at warn with
//! its reason and returned to the client that asked; it is not cached, so re-enabling the key is
//! enough for the next client to succeed. An attached volume keeps working until the server stops.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{info, warn};

use super::export::{
    AttachError, Export, ExportError, ExportInfo, ExportProvider, Extent, ReadOutcome,
};
use crate::datadir::{DataDir, DataDirError};
use crate::kms::KeyStore;
use crate::volume::{Volume, VolumeError};

/// An attached volume under its export name.
pub struct VolumeExport {
    name: String,
    volume: Volume,
}

impl VolumeExport {
    pub fn new(name: &str, volume: Volume) -> Self {
        Self {
            name: name.to_string(),
            volume,
        }
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }
}

fn export_err(e: VolumeError) -> ExportError {
    // The message names the operation and range; it never carries data or key bytes.
    ExportError::new(e.nbd_errno(), e.to_string())
}

fn describe(size: u64, sector: u32, key: &str) -> String {
    format!(
        "AES-256-XTS encrypted volume, {}, {sector}-byte sectors, CMK {key}",
        human_size(size)
    )
}

/// `1 GiB`, `512 MiB`, or exact bytes when not a whole binary unit.
fn human_size(n: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} bytes")
}

impl Export for VolumeExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        let h = self.volume.header();
        describe(
            self.volume.size(),
            self.volume.sector_size(),
            &format!("{} v{}", h.key_id, h.key_version),
        )
    }

    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn sector_size(&self) -> u32 {
        self.volume.sector_size()
    }

    fn is_read_only(&self) -> bool {
        self.volume.is_read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadOutcome, ExportError> {
        self.volume.read(offset, buf).map_err(export_err)
    }

    fn try_read_cached(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<Result<ReadOutcome, ExportError>> {
        self.volume
            .try_read_cached(offset, buf)
            .map_err(export_err)
            .transpose()
    }

    fn writes_wait(&self) -> bool {
        self.volume.writes_wait()
    }

    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), ExportError> {
        self.volume.write(offset, data, fua).map_err(export_err)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.volume.flush().map_err(export_err)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.volume.trim(offset, len, fua).map_err(export_err)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.volume
            .write_zeroes(offset, len, may_punch, fua)
            .map_err(export_err)
    }

    fn zeroing_is_fast(&self, may_punch: bool) -> bool {
        self.volume.zeroing_is_fast(may_punch)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.volume.cache(offset, len).map_err(export_err)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.volume.block_status(offset, len).map_err(export_err)
    }
}

/// Which volumes of the data directory are exported, and how.
#[derive(Debug, Clone, Default)]
pub struct ExportSelection {
    /// Only these names (plus `read_only`); `None` = every volume, including ones created later.
    pub only: Option<Vec<String>>,
    /// Exported read-only.
    pub read_only: HashSet<String>,
}

impl ExportSelection {
    fn includes(&self, name: &str) -> bool {
        match &self.only {
            None => true,
            Some(v) => v.iter().any(|n| n == name) || self.read_only.contains(name),
        }
    }
}

/// Serves the volumes of a data directory.
pub struct DataDirProvider {
    dir: DataDir,
    keystore: KeyStore,
    selection: ExportSelection,
    /// Attached volumes; looked up by every handshake, so never held during an attach.
    attached: RwLock<HashMap<String, Arc<VolumeExport>>>,
    /// Serializes attaches (unwrapping a DEK can be slow), so a volume is opened once.
    attaching: Mutex<()>,
}

/// An error and its sources on one line (for the message a client sees).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl DataDirProvider {
    pub fn new(dir: DataDir, keystore: KeyStore, selection: ExportSelection) -> Self {
        Self {
            dir,
            keystore,
            selection,
            attached: RwLock::new(HashMap::new()),
            attaching: Mutex::new(()),
        }
    }

    /// The names exported now (volumes that exist and are selected).
    pub fn names(&self) -> Vec<String> {
        let mut names = match self.dir.list_volumes() {
            Ok(v) => v,
            Err(e) => {
                warn!(
                    "cannot list the volumes in the data directory: {}",
                    chain(&e)
                );
                Vec::new()
            }
        };
        names.retain(|n| self.selection.includes(n));
        // Explicitly named exports come first, in the order given (the first is the default).
        if let Some(order) = &self.selection.only {
            names.sort_by_key(|n| order.iter().position(|o| o == n).unwrap_or(usize::MAX));
        }
        names
    }

    /// Attaches every selected volume now; returns the names that attached. Refusals are logged.
    pub fn attach_all(&self) -> Vec<String> {
        let mut ok = Vec::new();
        if let Some(only) = &self.selection.only {
            let existing = self.names();
            for n in only.iter().chain(self.selection.read_only.iter()) {
                if !existing.contains(n) {
                    warn!(export = %n, "no volume named {n:?} in the data directory (yet)");
                }
            }
        }
        for n in self.names() {
            match self.attach_volume(&n) {
                Ok(_) => ok.push(n),
                Err(e) => warn!(export = %n, "attach refused: {e}"),
            }
        }
        ok
    }

    fn attach_volume(&self, name: &str) -> Result<Arc<VolumeExport>, AttachError> {
        let cached = |name: &str| {
            self.attached
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .cloned()
        };
        if let Some(v) = cached(name) {
            return Ok(v);
        }
        let _attaching = self.attaching.lock().unwrap_or_else(|p| p.into_inner());
        // Another client may have attached it while we waited.
        if let Some(v) = cached(name) {
            return Ok(v);
        }
        if !self.selection.includes(name) {
            return Err(AttachError::NotFound(name.to_string()));
        }
        let ro = self.selection.read_only.contains(name);
        match self.dir.attach(&self.keystore, name, ro) {
            Ok(vol) => {
                let h = vol.header();
                info!(
                    export = %name,
                    volume_id = %h.volume_id,
                    key_id = %h.key_id,
                    key_version = h.key_version,
                    size = vol.size(),
                    read_only = ro,
                    "volume attached"
                );
                let v = Arc::new(VolumeExport::new(name, vol));
                self.attached
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_string(), v.clone());
                Ok(v)
            }
            // A name that cannot be a volume (e.g. `../x`) is simply not an export.
            Err(DataDirError::NotFound { .. } | DataDirError::InvalidName { .. }) => {
                Err(AttachError::NotFound(name.to_string()))
            }
            Err(e) => {
                // Logged by the caller (with the client that asked, or at start).
                let reason = chain(&e);
                Err(AttachError::Refused {
                    name: name.to_string(),
                    reason,
                })
            }
        }
    }
}

impl ExportProvider for DataDirProvider {
    fn list(&self) -> Vec<ExportInfo> {
        self.names()
            .into_iter()
            .map(|name| {
                let description = match self.dir.info(&name) {
                    Ok(i) => describe(
                        i.header.size,
                        i.header.sector_size,
                        &format!("{} v{}", i.header.key_id, i.header.key_version),
                    ),
                    Err(e) => format!("unreadable volume: {}", chain(&e)),
                };
                ExportInfo { name, description }
            })
            .collect()
    }

    fn exists(&self, name: &str) -> bool {
        // Without reading every header, as `list` does.
        self.names().iter().any(|n| n == name)
    }

    fn default_export(&self) -> Option<String> {
        self.names().into_iter().next()
    }

    fn attach(&self, name: &str) -> Result<Arc<dyn Export>, AttachError> {
        self.attach_volume(name).map(|v| v as Arc<dyn Export>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_humans() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 20), "3 MiB");
        assert_eq!(human_size(1536 << 20), "1536 MiB");
        assert_eq!(human_size(4097), "4097 bytes");
        assert!(describe(1 << 30, 4096, "k v1").contains("1 GiB, 4096-byte sectors, CMK k v1"));
    }
}
