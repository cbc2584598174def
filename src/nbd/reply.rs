//! Transmission replies on the wire: simple replies and structured reply chunks (OFFSET_DATA,
//! OFFSET_HOLE, BLOCK_STATUS, ERROR, NONE), plus decoders of their headers for clients and tests.

use super::{consts::*, option::truncate_str, Cursor, WireError};

pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
/// A chunk header plus the 8-byte offset that starts OFFSET_DATA and OFFSET_HOLE payloads.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;
pub const OFFSET_HOLE_LEN: usize = CHUNK_HEADER_LEN + 12;
/// The spec asks servers not to send more extents than this in one chunk.
pub const MAX_EXTENTS: usize = 1 << 20;

/// A simple reply header (data, for a successful simple READ, follows it).
pub fn simple(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, ty: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of a final OFFSET_DATA chunk carrying `data_len` bytes read at `offset`; the data
/// itself is sent right after it (one vectored write), so it is never copied into a frame.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32) -> [u8; OFFSET_DATA_HEADER_LEN] {
    let mut b = [0u8; OFFSET_DATA_HEADER_LEN];
    // data_len <= MAX_PAYLOAD, so + 8 cannot overflow.
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A final OFFSET_HOLE chunk: `len` bytes at `offset` read as zeroes.
pub fn offset_hole(cookie: u64, offset: u64, len: u32) -> [u8; OFFSET_HOLE_LEN] {
    let mut b = [0u8; OFFSET_HOLE_LEN];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// A final NONE chunk (success without payload).
pub fn none(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// Appends a final ERROR chunk with a message for humans.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32, message: &str) {
    let msg = truncate_str(message).as_bytes();
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends a final BLOCK_STATUS chunk for context `context_id`; `extents` are (length, flags)
/// pairs and are cut to [`MAX_EXTENTS`]. An empty list is a caller bug and encodes nothing.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
) {
    let extents = &extents[..extents.len().min(MAX_EXTENTS)];
    if extents.is_empty() {
        return;
    }
    let len = 4 + 8 * extents.len() as u32;
    out.reserve(CHUNK_HEADER_LEN + len as usize);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    ));
    out.extend_from_slice(&context_id.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// A decoded reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        len: u32,
    },
}

impl ReplyHeader {
    /// How many header bytes a reply starting with `magic` has.
    pub fn header_len(magic: [u8; 4]) -> Result<usize, WireError> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
            m => Err(WireError::BadMagic {
                what: "reply header",
                got: m as u64,
            }),
        }
    }

    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "reply header");
        let r = match c.u32()? {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: c.u32()?,
                cookie: c.u64()?,
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: c.u16()?,
                ty: c.u16()?,
                cookie: c.u64()?,
                len: c.u32()?,
            },
            m => {
                return Err(WireError::BadMagic {
                    what: "reply header",
                    got: m as u64,
                })
            }
        };
        c.finish()?;
        Ok(r)
    }

    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn simple_and_chunk_headers_parse_back() {
        assert_eq!(
            ReplyHeader::parse(&simple(EINVAL, 9)).unwrap(),
            ReplyHeader::Simple {
                error: EINVAL,
                cookie: 9
            }
        );
        let h = offset_data_header(3, 4096, 512);
        assert_eq!(
            ReplyHeader::parse(&h[..20]).unwrap(),
            ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                ty: REPLY_TYPE_OFFSET_DATA,
                cookie: 3,
                len: 520
            }
        );
        let hole = offset_hole(4, 8192, 4096);
        assert_eq!(&hole[6..8], &REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&hole[28..32], &4096u32.to_be_bytes());
        assert_eq!(
            ReplyHeader::header_len(hole[..4].try_into().unwrap()),
            Ok(20)
        );
        assert!(ReplyHeader::parse(&[0u8; 20]).is_err());
        assert!(ReplyHeader::parse(&none(1)[..19]).is_err());
    }

    #[test]
    fn block_status_type_is_5() {
        let mut out = Vec::new();
        encode_block_status(&mut out, 1, 7, &[(4096, STATE_HOLE | STATE_ZERO), (512, 0)]);
        assert_eq!(&out[6..8], &[0, 5]);
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(&out[20..24], &7u32.to_be_bytes());
        assert_eq!(out.len(), 40);
        out.clear();
        encode_block_status(&mut out, 1, 7, &[]);
        assert!(out.is_empty());
    }

    #[test]
    fn error_chunk_message_is_capped() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 5, EIO, &"m".repeat(9000));
        assert_eq!(out.len(), 20 + 6 + MAX_STRING);
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
    }

    proptest! {
        #[test]
        fn reply_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = ReplyHeader::parse(&bytes);
        }

        #[test]
        fn chunk_round_trip(flags: u16, ty: u16, cookie: u64, len: u32) {
            let h = chunk_header(flags, ty, cookie, len);
            prop_assert_eq!(ReplyHeader::parse(&h).unwrap(), ReplyHeader::Chunk { flags, ty, cookie, len });
        }
    }
}
