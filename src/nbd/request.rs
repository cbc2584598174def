//! Transmission requests on the wire: the 28-byte request header and which command flags each
//! command accepts.

use super::{consts::*, Cursor, WireError};

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;

/// A request header. `command` stays raw so an unknown command can be answered with EINVAL
/// rather than killing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Parses a header; only a wrong magic or a short buffer is an error here (the stream cannot
    /// be trusted after either).
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "request header");
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "request header",
                got: magic as u64,
            });
        }
        let r = Self {
            flags: c.u16()?,
            command: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u32()?,
        };
        c.finish()?;
        Ok(r)
    }

    /// Client side: the header bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Whether a payload of `len` bytes follows this header on the wire.
    pub fn has_payload(&self) -> bool {
        self.command == CMD_WRITE
    }

    /// Whether every flag set is one this command accepts (`df` = structured replies negotiated,
    /// so NBD_FLAG_SEND_DF was advertised). FUA is accepted on every command, as the spec asks.
    pub fn flags_valid(&self, df: bool) -> bool {
        let allowed = CMD_FLAG_FUA
            | match self.command {
                CMD_READ if df => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        self.flags & !allowed == 0
    }

    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(command: u16, flags: u16) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset: 4096,
            len: 512,
        }
    }

    #[test]
    fn bad_magic_and_truncated_header() {
        let b = req(CMD_READ, 0).encode();
        let mut bad = b;
        bad[3] ^= 0xff;
        assert!(matches!(
            Request::parse(&bad),
            Err(WireError::BadMagic { .. })
        ));
        for n in 0..REQUEST_LEN {
            assert!(matches!(
                Request::parse(&b[..n]),
                Err(WireError::Truncated { .. })
            ));
        }
        assert!(Request::parse(&[0u8; 64]).is_err());
    }

    #[test]
    fn flag_rules() {
        assert!(req(CMD_READ, CMD_FLAG_FUA).flags_valid(false));
        assert!(!req(CMD_READ, CMD_FLAG_DF).flags_valid(false));
        assert!(req(CMD_READ, CMD_FLAG_DF).flags_valid(true));
        assert!(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO).flags_valid(false));
        assert!(!req(CMD_WRITE, CMD_FLAG_NO_HOLE).flags_valid(true));
        assert!(req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE).flags_valid(false));
        assert!(!req(CMD_TRIM, CMD_FLAG_REQ_ONE).flags_valid(true));
        assert!(!req(CMD_FLUSH, 1 << 9).flags_valid(true));
        assert!(req(CMD_WRITE, 0).has_payload());
        assert!(!req(CMD_WRITE_ZEROES, 0).has_payload());
    }

    proptest! {
        #[test]
        fn request_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
            let r = Request { flags, command, cookie, offset, len };
            prop_assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        }

        #[test]
        fn request_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::parse(&bytes);
        }
    }
}
