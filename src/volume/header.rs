//! The on-disk volume header (format version 1) and its crash-safe update.
//!
//! A volume file is a 1 MiB header region then the data area. The region holds two copies of the
//! header: the primary at offset 0 and the backup at 512 KiB. Each copy is, little-endian:
//!
//! ```text
//!   0  8  magic "CRYPTNBD"          64  8  data offset (1 MiB)
//!   8  4  format version (1)        72  8  created (Unix seconds)
//!  12  4  encoded length L          80 16  cipher "aes-256-xts", NUL padded
//!  16  4  crc32c of [0, L) with     96 16  tweak "plain64", NUL padded
//!         this field zeroed        112 16  CMK id (UUID)
//!  20  4  flags (bit 0: discard)   128  4  CMK version
//!  24  8  generation               132  2  wrapped DEK length W
//!  32 16  volume id (UUID)         134  2  context entry count N
//!  48  8  virtual size             136  W  wrapped DEK, then N entries of
//!  56  4  sector size                      (u16 len, key, u16 len, value), keys sorted
//!  60  4  reserved (0)
//! ```
//!
//! The magic, version, length and checksum sit at fixed places in every version, so a copy is
//! first checked whole (crc) and only then judged by its version: a flipped bit reads as
//! "corrupt" (and the other copy is used), a genuinely newer format as "unsupported version".
//! Open takes the valid copy with the highest generation; an update writes and syncs the primary,
//! then the backup, each with the next generation, so a crash at any point leaves one valid copy
//! of either the old or the new header.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::error::{Op, VolumeError};
use crate::backend::Backend;

pub const MAGIC: &[u8; 8] = b"CRYPTNBD";
pub const FORMAT_VERSION: u32 = 1;
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
const KNOWN_FLAGS: u32 = FLAG_DISCARD;
const FIXED_LEN: usize = 136;
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

    /// Encodes one header copy.
    pub fn encode(&self) -> Result<Vec<u8>, VolumeError> {
        let too_big =
            |what: &str| VolumeError::Invalid(format!("{what} is too large for the header"));
        let wlen = u16::try_from(self.wrapped_dek.len()).map_err(|_| too_big("wrapped DEK"))?;
        let count = u16::try_from(self.encryption_context.len())
            .map_err(|_| too_big("encryption context"))?;
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&[0; 4]); // length, patched below
        b.extend_from_slice(&[0; 4]); // crc, patched below
        let flags = if self.discard { FLAG_DISCARD } else { 0 };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(self.volume_id.as_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.sector_size.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&HEADER_REGION.to_le_bytes());
        b.extend_from_slice(&self.created.to_le_bytes());
        b.extend_from_slice(&padded::<16>(&self.cipher).ok_or_else(|| too_big("cipher name"))?);
        b.extend_from_slice(&padded::<16>(&self.tweak).ok_or_else(|| too_big("tweak name"))?);
        b.extend_from_slice(self.key_id.as_bytes());
        b.extend_from_slice(&self.key_version.to_le_bytes());
        b.extend_from_slice(&wlen.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        debug_assert_eq!(b.len(), FIXED_LEN);
        b.extend_from_slice(&self.wrapped_dek);
        for (k, v) in &self.encryption_context {
            for s in [k, v] {
                let l = u16::try_from(s.len()).map_err(|_| too_big("encryption context"))?;
                b.extend_from_slice(&l.to_le_bytes());
                b.extend_from_slice(s.as_bytes());
            }
        }
        if b.len() > MAX_HEADER_LEN {
            return Err(too_big("the key metadata"));
        }
        let len = b.len() as u32;
        b[12..16].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Parses one header copy from the start of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, CopyError> {
        if buf.len() < 20 {
            return Err(CopyError::Corrupt("shorter than the fixed header".into()));
        }
        if &buf[..8] != MAGIC {
            return Err(CopyError::NoMagic);
        }
        let version = le32(buf, 8);
        let len = le32(buf, 12) as usize;
        if !(20..=MAX_HEADER_LEN).contains(&len) || len > buf.len() {
            return Err(CopyError::Corrupt(format!(
                "impossible header length {len}"
            )));
        }
        let stored = le32(buf, 16);
        let mut crc = crc32c::crc32c(&buf[..16]);
        crc = crc32c::crc32c_append(crc, &[0; 4]);
        crc = crc32c::crc32c_append(crc, &buf[20..len]);
        if crc != stored {
            return Err(CopyError::Corrupt(format!(
                "checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )));
        }
        if version != FORMAT_VERSION {
            return Err(CopyError::Version(version));
        }
        let b = &buf[..len];
        if len < FIXED_LEN {
            return Err(CopyError::Corrupt(format!(
                "header length {len} is too short"
            )));
        }
        let flags = le32(b, 20);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(CopyError::Flags(flags & !KNOWN_FLAGS));
        }
        let uuid = |o: usize| Uuid::from_bytes(b[o..o + 16].try_into().unwrap_or([0; 16]));
        let data_offset = le64(b, 64);
        if data_offset != HEADER_REGION {
            return Err(CopyError::Corrupt(format!("data offset {data_offset}")));
        }
        let cipher = unpad(&b[80..96])?;
        let tweak = unpad(&b[96..112])?;
        let wlen = le16(b, 132) as usize;
        let count = le16(b, 134) as usize;
        let mut pos = FIXED_LEN;
        let wrapped_dek = take(b, &mut pos, wlen)?.to_vec();
        let mut encryption_context = BTreeMap::new();
        for _ in 0..count {
            let k = take_str(b, &mut pos)?;
            let v = take_str(b, &mut pos)?;
            encryption_context.insert(k, v);
        }
        if pos != len {
            return Err(CopyError::Corrupt(format!(
                "{} trailing bytes after the fields",
                len - pos
            )));
        }
        Ok(VolumeHeader {
            generation: le64(b, 24),
            volume_id: uuid(32),
            size: le64(b, 48),
            sector_size: le32(b, 56),
            discard: flags & FLAG_DISCARD != 0,
            created: le64(b, 72),
            cipher,
            tweak,
            key_id: uuid(112),
            key_version: le32(b, 128),
            wrapped_dek,
            encryption_context,
        })
    }

    /// Reads the newest valid copy from `backend`, checking the file is long enough for it.
    pub fn read_from(backend: &dyn Backend) -> Result<Self, VolumeError> {
        let target = backend.describe();
        let io = |what: &str, e| VolumeError::io(what, &target, e);
        let len = backend
            .len()
            .map_err(|e| io("reading the length of the volume file", e))?;
        let mut buf = vec![0u8; MAX_HEADER_LEN];
        let mut results = Vec::with_capacity(2);
        for (name, off) in [("primary", PRIMARY_OFFSET), ("backup", BACKUP_OFFSET)] {
            backend
                .read_at(&mut buf, off)
                .map_err(|e| io(&format!("reading the {name} volume header"), e))?;
            results.push(Self::decode(&buf));
        }
        let backup = results.pop().expect("two copies");
        let primary = results.pop().expect("two copies");
        let header = match (primary, backup) {
            (Ok(p), Ok(b)) => {
                if b.generation > p.generation {
                    tracing::warn!(volume = %target, primary = p.generation, backup = b.generation,
                        "the backup volume header is newer than the primary (an update was interrupted); using the backup");
                    b
                } else {
                    p
                }
            }
            (Ok(p), Err(e)) => {
                tracing::warn!(volume = %target, error = %e, "the backup volume header is unusable; using the primary");
                p
            }
            (Err(e), Ok(b)) => {
                tracing::warn!(volume = %target, error = %e, "the primary volume header is unusable; recovered the volume from the backup header (it is not rewritten until the next header update)");
                b
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
        Ok(header)
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

    /// Replaces the header on `backend` with `self` at the next generation, crash-safely: primary
    /// then sync, backup then sync. Returns the header as written.
    pub fn write_update(&self, backend: &dyn Backend) -> Result<VolumeHeader, VolumeError> {
        let current = Self::read_from(backend)?;
        let mut next = self.clone();
        next.generation = current.generation + 1;
        next.validate()?;
        let target = backend.describe();
        let enc = next.encode()?;
        for (name, off) in [("primary", PRIMARY_OFFSET), ("backup", BACKUP_OFFSET)] {
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

/// Why one header copy was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyError {
    NoMagic,
    Corrupt(String),
    Version(u32),
    Flags(u32),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::NoMagic => f.write_str("no header magic"),
            CopyError::Corrupt(r) => f.write_str(r),
            CopyError::Version(v) => write!(f, "unknown format version {v}"),
            CopyError::Flags(x) => write!(f, "unknown flags {x:#x}"),
        }
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
                    supported: FORMAT_VERSION,
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

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn padded<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() >= N {
        return None;
    }
    let mut a = [0u8; N];
    a[..s.len()].copy_from_slice(s.as_bytes());
    Some(a)
}

fn unpad(b: &[u8]) -> Result<String, CopyError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    if b[end..].iter().any(|&c| c != 0) {
        return Err(CopyError::Corrupt("garbage after a name field".into()));
    }
    String::from_utf8(b[..end].to_vec()).map_err(|_| CopyError::Corrupt("non-UTF-8 name".into()))
}

fn take<'a>(b: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], CopyError> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| CopyError::Corrupt("a field runs past the header length".into()))?;
    let s = &b[*pos..end];
    *pos = end;
    Ok(s)
}

fn take_str(b: &[u8], pos: &mut usize) -> Result<String, CopyError> {
    let l = take(b, pos, 2)?;
    let n = u16::from_le_bytes([l[0], l[1]]) as usize;
    let s = take(b, pos, n)?;
    String::from_utf8(s.to_vec())
        .map_err(|_| CopyError::Corrupt("non-UTF-8 encryption context".into()))
}

/// Describing a volume to people (NBD_OPT_LIST and NBD_INFO_DESCRIPTION show this).
impl VolumeHeader {
    /// `AES-256-XTS encrypted volume, 1 GiB, 4096-byte sectors, CMK KEY_ID vVERSION`.
    pub fn describe(&self) -> String {
        format!(
            "AES-256-XTS encrypted volume, {}, {}-byte sectors, CMK {} v{}",
            human_size(self.size),
            self.sector_size,
            self.key_id,
            self.key_version
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

    fn sample() -> VolumeHeader {
        let mut h = VolumeHeader::new(Uuid::from_u128(1), 1 << 30, 4096);
        h.key_id = Uuid::from_u128(2);
        h.key_version = 3;
        h.wrapped_dek = vec![0xAB; 92];
        h.encryption_context
            .insert("volume_id".into(), h.volume_id.to_string());
        h
    }

    #[test]
    fn round_trips() {
        let h = sample();
        let enc = h.encode().unwrap();
        assert_eq!(VolumeHeader::decode(&enc).unwrap(), h);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_rejected() {
        let enc = sample().encode().unwrap();
        for n in 0..enc.len() {
            assert!(VolumeHeader::decode(&enc[..n]).is_err(), "prefix {n}");
        }
        for i in 0..enc.len() {
            let mut c = enc.clone();
            c[i] ^= 0x10;
            assert!(VolumeHeader::decode(&c).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn sizes_for_humans() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 20), "3 MiB");
        assert_eq!(human_size(1536 << 20), "1536 MiB");
        assert_eq!(human_size(4097), "4097 bytes");
        let h = VolumeHeader::new(uuid::Uuid::nil(), 1 << 30, 4096);
        assert!(h.describe().contains("1 GiB, 4096-byte sectors, CMK "));
    }
}
