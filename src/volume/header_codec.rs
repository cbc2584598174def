//! The byte encoding of one volume header copy (format versions 1 and 2): `VolumeHeader::encode` and
//! `VolumeHeader::decode`, the reasons a copy is rejected ([`CopyError`]), and the little-endian
//! field helpers. It is a file of its own (a child module of `header`, which owns the fields,
//! their rules and the crash-safe handling of the two copies) because it is the part a change
//! of the on-disk format touches, and the part the fuzzer reaches. Each copy is, little-endian:
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
//! Version 2 (layered volumes: snapshots, clones) is version 1 with these fields after the
//! context entries (still inside L and the checksum):
//!
//! ```text
//!  16  layer id (UUID)
//!   1  1 if a parent follows, else 0
//!      parent: 16 volume id, 16 layer id, 8 size, u16 length + name (`NAME@SNAP`)
//! ```
//!
//! A header without layer id and parent is written as version 1, byte for byte as before.
//!
//! The parser reads from a byte slice: it checks the encoded length against the slice and
//! `MAX_HEADER_LEN`, and the checksum, before it parses the fields, and bounds-checks every
//! variable-length field (`take`) before copying it.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::MAX_HEADER_LEN;
use super::{ParentRef, VolumeError, VolumeHeader};
use super::{FLAG_DISCARD, FORMAT_VERSION, FORMAT_VERSION_LAYERED, HEADER_REGION, MAGIC};

const KNOWN_FLAGS: u32 = FLAG_DISCARD;
const FIXED_LEN: usize = 136;

impl VolumeHeader {
    /// Encodes one header copy.
    pub fn encode(&self) -> Result<Vec<u8>, VolumeError> {
        let too_big =
            |what: &str| VolumeError::Invalid(format!("{what} is too large for the header"));
        let wlen = u16::try_from(self.wrapped_dek.len()).map_err(|_| too_big("wrapped DEK"))?;
        let count = u16::try_from(self.encryption_context.len())
            .map_err(|_| too_big("encryption context"))?;
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(MAGIC);
        let version = self.format_version();
        b.extend_from_slice(&version.to_le_bytes());
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
        if version == FORMAT_VERSION_LAYERED {
            b.extend_from_slice(self.layer_id.unwrap_or_default().as_bytes());
            match &self.parent {
                None => b.push(0),
                Some(p) => {
                    b.push(1);
                    b.extend_from_slice(p.volume_id.as_bytes());
                    b.extend_from_slice(p.layer_id.as_bytes());
                    b.extend_from_slice(&p.size.to_le_bytes());
                    let l = u16::try_from(p.name.len()).map_err(|_| too_big("parent name"))?;
                    b.extend_from_slice(&l.to_le_bytes());
                    b.extend_from_slice(p.name.as_bytes());
                }
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
        if version != FORMAT_VERSION && version != FORMAT_VERSION_LAYERED {
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
        let (mut layer_id, mut parent) = (None, None);
        if version == FORMAT_VERSION_LAYERED {
            layer_id = Some(uuid_at(take(b, &mut pos, 16)?));
            parent = match take(b, &mut pos, 1)?[0] {
                0 => None,
                1 => {
                    let volume_id = uuid_at(take(b, &mut pos, 16)?);
                    let parent_layer = uuid_at(take(b, &mut pos, 16)?);
                    let size = le64(take(b, &mut pos, 8)?, 0);
                    Some(ParentRef {
                        volume_id,
                        layer_id: parent_layer,
                        size,
                        name: take_str(b, &mut pos)?,
                    })
                }
                x => return Err(CopyError::Corrupt(format!("parent marker {x}"))),
            };
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
            layer_id,
            parent,
        })
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

fn uuid_at(b: &[u8]) -> Uuid {
    Uuid::from_bytes(b[..16].try_into().unwrap_or([0; 16]))
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

    fn layered() -> VolumeHeader {
        let mut h = sample();
        h.layer_id = Some(Uuid::from_u128(4));
        h.parent = Some(ParentRef {
            name: "base@monday".into(),
            volume_id: Uuid::from_u128(5),
            layer_id: Uuid::from_u128(6),
            size: 1 << 30,
        });
        h
    }

    #[test]
    fn layered_round_trips_as_version_2() {
        let h = layered();
        let enc = h.encode().unwrap();
        assert_eq!(le32(&enc, 8), FORMAT_VERSION_LAYERED);
        assert_eq!(VolumeHeader::decode(&enc).unwrap(), h);
        let mut top = h.clone();
        top.parent = None;
        assert_eq!(VolumeHeader::decode(&top.encode().unwrap()).unwrap(), top);
        assert_eq!(le32(&sample().encode().unwrap(), 8), FORMAT_VERSION);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_rejected() {
        for h in [sample(), layered()] {
            truncations_and_flips(&h);
        }
    }

    fn truncations_and_flips(h: &VolumeHeader) {
        let enc = h.encode().unwrap();
        for n in 0..enc.len() {
            assert!(VolumeHeader::decode(&enc[..n]).is_err(), "prefix {n}");
        }
        for i in 0..enc.len() {
            let mut c = enc.clone();
            c[i] ^= 0x10;
            assert!(VolumeHeader::decode(&c).is_err(), "flip at {i}");
        }
    }
}
