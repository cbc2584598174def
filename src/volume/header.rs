//! The on-disk volume header (format version 1) and its crash-safe update.
//!
//! A volume file is a 1 MiB header region then the data area. The region holds two copies of the
//! header: the primary at offset 0 and the backup at 512 KiB. `header_codec.rs` (module `codec`)
//! encodes and decodes one copy (its byte layout is there); this file owns the header's fields
//! and rules, and the reading, repair and crash-safe update of the two copies.
//!
//! The magic, version, length and checksum sit at fixed places in every version, so a copy is
//! first checked whole (crc) and only then judged by its version: a flipped bit reads as
//! "corrupt" (and the other copy is used), a genuinely newer format as "unsupported version".
//! Open takes the valid copy with the highest generation; an update writes and syncs first the
//! copy that is behind (older or unusable), then the other, each with the next generation, so a
//! crash at any point leaves one valid copy of either the old or the new header — also when the
//! previous update was interrupted too (writing the newest copy first would tear it and fall back
//! to the older one).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::error::{Op, VolumeError};
use crate::backend::Backend;

// The encoding of one copy: its own file, declared here so it sees this file's private items.
#[path = "header_codec.rs"]
mod codec;
pub use codec::CopyError;

pub const MAGIC: &[u8; 8] = b"CRYPTNBD";
/// The single-layer format: every volume without snapshots or a parent is still written so.
pub const FORMAT_VERSION: u32 = 1;
/// The layered format (v1 + a layer id and an optional parent reference): written only for
/// volumes that have taken part in a snapshot or clone (see `crate::volume::layer`).
pub const FORMAT_VERSION_LAYERED: u32 = 2;
/// Bytes before the data area; keeps the data area aligned for any sector and page size.
pub const HEADER_REGION: u64 = 1 << 20;
/// Offsets of the two header copies.
pub const PRIMARY_OFFSET: u64 = 0;
pub const BACKUP_OFFSET: u64 = 512 << 10;
/// Largest encoded copy accepted (bounds what a parser allocates).
pub const MAX_HEADER_LEN: usize = 64 << 10;
pub const CIPHER: &str = "aes-256-xts";
pub const TWEAK: &str = "plain64";
/// Flag: trim and write-zeroes may punch holes (reveals which sectors are unused).
pub const FLAG_DISCARD: u32 = 1;
/// Largest virtual size accepted: keeps every file offset inside `off_t`.
pub const MAX_SIZE: u64 = 1 << 60;

/// A parsed volume header. The key fields are opaque metadata here: the volume layer never
/// interprets the CMK id, version, wrapped DEK or context; whoever attaches the volume does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHeader {
    pub generation: u64,
    pub volume_id: Uuid,
    /// Virtual size in bytes (a multiple of `sector_size`).
    pub size: u64,
    /// Encryption sector size: 512 or 4096.
    pub sector_size: u32,
    /// Whether trim/write-zeroes may punch holes.
    pub discard: bool,
    /// Unix seconds.
    pub created: u64,
    pub cipher: String,
    pub tweak: String,
    pub key_id: Uuid,
    pub key_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub encryption_context: BTreeMap<String, String>,
    /// This layer's own id (format v2): set once a volume takes part in a snapshot or clone, so
    /// a child can name exactly the parent it was made on. `None` = a v1 single-layer volume.
    pub layer_id: Option<Uuid>,
    /// The read-only layer this one falls through to for never-written sectors (format v2).
    pub parent: Option<ParentRef>,
}

/// A child layer's record of its parent: which layer (name in the data directory, volume and
/// layer ids) and its size, so a missing, replaced or resized parent is detected, not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// `NAME@SNAP`: the parent's name in the data directory.
    pub name: String,
    pub volume_id: Uuid,
    pub layer_id: Uuid,
    pub size: u64,
}

impl VolumeHeader {
    /// A header for a new volume (generation 0, created now); the caller fills in the key fields.
    pub fn new(volume_id: Uuid, size: u64, sector_size: u32) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            generation: 0,
            volume_id,
            size,
            sector_size,
            discard: true,
            created,
            cipher: CIPHER.to_string(),
            tweak: TWEAK.to_string(),
            key_id: Uuid::nil(),
            key_version: 0,
            wrapped_dek: Vec::new(),
            encryption_context: BTreeMap::new(),
            layer_id: None,
            parent: None,
        }
    }

    /// The format version this header is written in: 1 unless it needs the layered fields.
    pub fn format_version(&self) -> u32 {
        if self.layer_id.is_none() && self.parent.is_none() {
            FORMAT_VERSION
        } else {
            FORMAT_VERSION_LAYERED
        }
    }

    /// Where the data area starts in the file.
    pub fn data_offset(&self) -> u64 {
        HEADER_REGION
    }

    /// Checks the geometry and metadata sizes.
    pub fn validate(&self) -> Result<(), VolumeError> {
        if self.sector_size != 512 && self.sector_size != 4096 {
            return Err(VolumeError::Invalid(format!(
                "sector size {} (must be 512 or 4096)",
                self.sector_size
            )));
        }
        if self.size == 0 || !self.size.is_multiple_of(self.sector_size as u64) {
            return Err(VolumeError::Invalid(format!(
                "size {} bytes (must be a positive multiple of the {}-byte sector size)",
                self.size, self.sector_size
            )));
        }
        if self.size > MAX_SIZE {
            return Err(VolumeError::Invalid(format!(
                "size {} bytes is larger than the maximum {MAX_SIZE}",
                self.size
            )));
        }
        if self.cipher != CIPHER || self.tweak != TWEAK {
            return Err(VolumeError::Invalid(format!(
                "cipher {:?}/{:?} (only {CIPHER}/{TWEAK})",
                self.cipher, self.tweak
            )));
        }
        self.encode().map(|_| ())
    }

    /// Reads the newest valid copy from `backend`, checking the file is long enough for it.
    pub fn read_from(backend: &dyn Backend) -> Result<Self, VolumeError> {
        Self::read_newest(backend).map(|(h, _)| h)
    }

    /// Decodes both copies as they are on `backend` (primary, backup), without judging them.
    pub fn read_copies(backend: &dyn Backend) -> Result<[Result<Self, CopyError>; 2], VolumeError> {
        let target = backend.describe();
        let mut buf = vec![0u8; MAX_HEADER_LEN];
        let mut read = |name: &str, off: u64| {
            backend.read_at(&mut buf, off).map_err(|e| {
                VolumeError::io(format!("reading the {name} volume header"), &target, e)
            })?;
            Ok::<_, VolumeError>(Self::decode(&buf))
        };
        let primary = read("primary", PRIMARY_OFFSET)?;
        let backup = read("backup", BACKUP_OFFSET)?;
        Ok([primary, backup])
    }

    /// The newest valid copy, and whether the other copy is behind it (older or unusable):
    /// `Some(offset of the stale copy)`, `None` when both copies are the same generation.
    fn read_newest(backend: &dyn Backend) -> Result<(Self, Option<u64>), VolumeError> {
        let target = backend.describe();
        let len = backend
            .len()
            .map_err(|e| VolumeError::io("reading the length of the volume file", &target, e))?;
        let [primary, backup] = Self::read_copies(backend)?;
        let (header, stale) = match (primary, backup) {
            (Ok(p), Ok(b)) => {
                if b.generation > p.generation {
                    tracing::warn!(volume = %target, primary = p.generation, backup = b.generation,
                        "the backup volume header is newer than the primary (an update was interrupted); using the backup");
                    (b, Some(PRIMARY_OFFSET))
                } else if p.generation > b.generation {
                    (p, Some(BACKUP_OFFSET))
                } else {
                    (p, None)
                }
            }
            (Ok(p), Err(e)) => {
                tracing::warn!(volume = %target, error = %e, "the backup volume header is unusable; using the primary");
                (p, Some(BACKUP_OFFSET))
            }
            (Err(e), Ok(b)) => {
                tracing::warn!(volume = %target, error = %e, "the primary volume header is unusable; recovered the volume from the backup header (it is not rewritten until the next header update)");
                (b, Some(PRIMARY_OFFSET))
            }
            (Err(p), Err(b)) => {
                if len < HEADER_REGION {
                    return Err(VolumeError::Truncated {
                        target,
                        len,
                        needed: HEADER_REGION,
                    });
                }
                return Err(both_bad(target, p, b));
            }
        };
        header.check_supported(&target)?;
        let needed = header.data_offset() + header.size;
        if len < needed {
            return Err(VolumeError::Truncated {
                target,
                len,
                needed,
            });
        }
        Ok((header, stale))
    }

    /// Rewrites a stale or damaged header copy from the newest valid one (same generation), then
    /// syncs. Returns which copy was rewritten ("primary" or "backup"), or `None` when both
    /// copies were already the same.
    pub fn repair(backend: &dyn Backend) -> Result<Option<&'static str>, VolumeError> {
        let (header, stale) = Self::read_newest(backend)?;
        let Some(off) = stale else {
            return Ok(None);
        };
        let target = backend.describe();
        let name = copy_name(off);
        let enc = header.encode()?;
        backend.write_at(&enc, off).map_err(|e| {
            VolumeError::io(format!("rewriting the {name} volume header"), &target, e)
        })?;
        backend.sync().map_err(|e| {
            VolumeError::io(format!("syncing the {name} volume header"), &target, e)
        })?;
        tracing::info!(volume = %target, copy = name, generation = header.generation, "volume header copy repaired");
        Ok(Some(name))
    }

    fn check_supported(&self, target: &str) -> Result<(), VolumeError> {
        if self.cipher != CIPHER || self.tweak != TWEAK {
            return Err(VolumeError::UnsupportedCipher {
                target: target.to_string(),
                cipher: self.cipher.clone(),
                tweak: self.tweak.clone(),
            });
        }
        self.validate().map_err(|e| VolumeError::CorruptHeader {
            target: target.to_string(),
            primary: e.to_string(),
            backup: "(not used)".to_string(),
        })
    }

    /// Writes both copies of a new volume's header (generation 0), then syncs.
    pub fn write_new(&self, backend: &dyn Backend) -> Result<(), VolumeError> {
        self.validate()?;
        let target = backend.describe();
        let enc = self.encode()?;
        for off in [PRIMARY_OFFSET, BACKUP_OFFSET] {
            backend
                .write_at(&enc, off)
                .map_err(|e| VolumeError::io("writing the volume header", &target, e))?;
        }
        backend
            .sync()
            .map_err(|e| VolumeError::io("syncing the volume header", &target, e))
    }

    /// Replaces the header on `backend` with `self` at the next generation, crash-safely: the
    /// copy that is behind (older or unusable) is written and synced first, then the other. Until
    /// the second write is durable the newest valid copy still says the old header, so a crash at
    /// any step — and a second crash during the next update — leaves the old or the new header,
    /// never an older one. Returns the header as written.
    pub fn write_update(&self, backend: &dyn Backend) -> Result<VolumeHeader, VolumeError> {
        let (current, stale) = Self::read_newest(backend)?;
        let mut next = self.clone();
        next.generation = current.generation + 1;
        next.validate()?;
        let target = backend.describe();
        let enc = next.encode()?;
        let order = match stale {
            Some(BACKUP_OFFSET) => [BACKUP_OFFSET, PRIMARY_OFFSET],
            _ => [PRIMARY_OFFSET, BACKUP_OFFSET],
        };
        for off in order {
            let name = copy_name(off);
            backend.write_at(&enc, off).map_err(|e| {
                VolumeError::io(format!("writing the {name} volume header"), &target, e)
            })?;
            backend.sync().map_err(|e| {
                VolumeError::io(format!("syncing the {name} volume header"), &target, e)
            })?;
        }
        tracing::debug!(volume = %target, generation = next.generation, op = %Op::UpdateHeader, "volume header updated");
        Ok(next)
    }

    /// Grows the volume on `backend` to `new_size` bytes, crash-safely: the file is extended
    /// (sparsely) and synced before the header says so, so a crash leaves the old size (with a
    /// longer file, harmless) or the new one. Shrinking is refused.
    pub fn grow(backend: &dyn Backend, new_size: u64) -> Result<VolumeHeader, VolumeError> {
        let current = Self::read_from(backend)?;
        if new_size < current.size {
            return Err(VolumeError::Invalid(format!(
                "cannot shrink from {} to {new_size} bytes (only growing is supported)",
                current.size
            )));
        }
        if new_size == current.size {
            return Ok(current);
        }
        let mut next = current.clone();
        next.size = new_size;
        next.validate()?;
        let target = backend.describe();
        let total = next.data_offset() + new_size;
        backend.set_len(total).map_err(|e| {
            VolumeError::io(
                format!("extending the volume file to {total} bytes"),
                &target,
                e,
            )
        })?;
        backend
            .sync()
            .map_err(|e| VolumeError::io("syncing the extended volume file", &target, e))?;
        next.write_update(backend)
    }
}

fn copy_name(off: u64) -> &'static str {
    if off == PRIMARY_OFFSET {
        "primary"
    } else {
        "backup"
    }
}

fn both_bad(target: String, p: CopyError, b: CopyError) -> VolumeError {
    // A newer format (or feature) is reported as such; it is not corruption.
    for e in [&p, &b] {
        match e {
            CopyError::Version(v) => {
                return VolumeError::UnsupportedVersion {
                    target,
                    version: *v,
                    supported: FORMAT_VERSION_LAYERED,
                }
            }
            CopyError::Flags(flags) => {
                return VolumeError::UnsupportedFlags {
                    target,
                    flags: *flags,
                }
            }
            _ => {}
        }
    }
    if p == CopyError::NoMagic && b == CopyError::NoMagic {
        return VolumeError::NotAVolume { target };
    }
    VolumeError::CorruptHeader {
        target,
        primary: p.to_string(),
        backup: b.to_string(),
    }
}

/// Describing a volume to people (NBD_OPT_LIST and NBD_INFO_DESCRIPTION show this).
impl VolumeHeader {
    /// `AES-256-XTS encrypted volume, 1 GiB, 4096-byte sectors`.
    ///
    /// It names no key: which CMK wraps a volume's DEK is for the operator (`volume info`), not
    /// for anyone who can list exports.
    pub fn describe(&self) -> String {
        format!(
            "AES-256-XTS encrypted volume, {}, {}-byte sectors",
            human_size(self.size),
            self.sector_size,
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_humans() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 20), "3 MiB");
        assert_eq!(human_size(1536 << 20), "1536 MiB");
        assert_eq!(human_size(4097), "4097 bytes");
        let h = VolumeHeader::new(uuid::Uuid::nil(), 1 << 30, 4096);
        assert_eq!(
            h.describe(),
            "AES-256-XTS encrypted volume, 1 GiB, 4096-byte sectors"
        );
    }
}
