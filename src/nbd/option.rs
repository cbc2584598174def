//! The fixed-newstyle handshake on the wire: the server greeting, client flags, option request
//! headers and payloads (INFO/GO, LIST/SET_META_CONTEXT), and option replies.

use super::{consts::*, Cursor, WireError};

/// Length of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The bytes the server sends first: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What the client's flags say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

/// Checks the client flags: unknown bits or a client that is not fixed-newstyle are refused (the
/// spec says the server MUST close on unknown flags; plain newstyle cannot get error replies).
pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, WireError> {
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return Err(WireError::UnknownClientFlags {
            flags,
            unknown: flags & !known,
        });
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(WireError::NotFixedNewstyle { flags });
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option request header; `len` bytes of payload follow it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "option header");
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic {
                what: "option header",
                got: magic,
            });
        }
        let option = c.u32()?;
        let len = c.u32()?;
        c.finish()?;
        Ok(Self { option, len })
    }

    /// Client side: the header followed by `payload`.
    pub fn encode_with(option: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(OPTION_HEADER_LEN + payload.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "INFO/GO request");
        let name = c.string32("export name")?;
        let n = c.u16()? as usize;
        // The count is bounded by the bytes present, so this allocation is too.
        if c.remaining() < n * 2 {
            return Err(WireError::Truncated {
                what: "INFO/GO information requests",
                need: n * 2,
                got: c.remaining(),
            });
        }
        let mut requests = Vec::with_capacity(n);
        for _ in 0..n {
            requests.push(c.u16()?);
        }
        c.finish()?;
        Ok(Self { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "meta context request");
        let name = c.string32("export name")?;
        let n = c.u32()? as usize;
        // Each query needs at least its 4-byte length: bound the count by the bytes present.
        if n > c.remaining() / 4 {
            return Err(WireError::Truncated {
                what: "meta context queries",
                need: n.saturating_mul(4),
                got: c.remaining(),
            });
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            queries.push(c.string32("meta context query")?);
        }
        c.finish()?;
        Ok(Self { name, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
}

/// Appends one option reply (header + payload) to `out`.
pub fn encode_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends an error reply whose payload is a message for a human, cut to the protocol's limit.
pub fn encode_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    encode_reply(out, option, reply_type, truncate_str(message).as_bytes());
}

/// Appends an NBD_REP_SERVER reply: name, then a description for humans.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut p = Vec::with_capacity(4 + name.len() + description.len());
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(truncate_str(description).as_bytes());
    encode_reply(out, OPT_LIST, REP_SERVER, &p);
}

/// Appends NBD_REP_INFO / NBD_INFO_EXPORT.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut p = [0u8; 12];
    p[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    p[2..10].copy_from_slice(&size.to_be_bytes());
    p[10..12].copy_from_slice(&flags.to_be_bytes());
    encode_reply(out, option, REP_INFO, &p);
}

/// Appends NBD_REP_INFO carrying a string (NBD_INFO_NAME or NBD_INFO_DESCRIPTION).
pub fn encode_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let s = truncate_str(s);
    let mut p = Vec::with_capacity(2 + s.len());
    p.extend_from_slice(&info.to_be_bytes());
    p.extend_from_slice(s.as_bytes());
    encode_reply(out, option, REP_INFO, &p);
}

/// Appends NBD_REP_INFO / NBD_INFO_BLOCK_SIZE.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, pref: u32, max: u32) {
    let mut p = [0u8; 14];
    p[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    p[2..6].copy_from_slice(&min.to_be_bytes());
    p[6..10].copy_from_slice(&pref.to_be_bytes());
    p[10..14].copy_from_slice(&max.to_be_bytes());
    encode_reply(out, option, REP_INFO, &p);
}

/// Appends NBD_REP_META_CONTEXT.
pub fn encode_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut p = Vec::with_capacity(4 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    encode_reply(out, option, REP_META_CONTEXT, &p);
}

/// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless the client
/// negotiated NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A decoded option reply header (client side, for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "option reply header");
        let magic = c.u64()?;
        if magic != REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "option reply header",
                got: magic,
            });
        }
        let r = Self {
            option: c.u32()?,
            reply_type: c.u32()?,
            len: c.u32()?,
        };
        c.finish()?;
        Ok(r)
    }

    pub fn is_error(&self) -> bool {
        self.reply_type & (1 << 31) != 0
    }
}

/// Cuts a string to at most `MAX_STRING` bytes on a character boundary.
pub fn truncate_str(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_flags() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(1).unwrap(),
            ClientFlags { no_zeroes: false }
        );
        assert_eq!(
            parse_client_flags(3).unwrap(),
            ClientFlags { no_zeroes: true }
        );
        assert!(matches!(
            parse_client_flags(0),
            Err(WireError::NotFixedNewstyle { .. })
        ));
        assert!(matches!(
            parse_client_flags(2),
            Err(WireError::NotFixedNewstyle { .. })
        ));
        assert!(matches!(
            parse_client_flags(1 | 4),
            Err(WireError::UnknownClientFlags { unknown: 4, .. })
        ));
    }

    #[test]
    fn option_header_round_trip_and_bad_magic() {
        let b = OptionHeader::encode_with(OPT_GO, &[]);
        assert_eq!(
            OptionHeader::parse(&b).unwrap(),
            OptionHeader {
                option: OPT_GO,
                len: 0
            }
        );
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn truncated_option_header() {
        let b = OptionHeader::encode_with(OPT_GO, &[]);
        for n in 0..b.len() {
            assert!(matches!(
                OptionHeader::parse(&b[..n]),
                Err(WireError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn truncated_info_request() {
        let r = InfoRequest {
            name: "disk0".into(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let b = r.encode();
        assert_eq!(InfoRequest::parse(&b).unwrap(), r);
        for n in 0..b.len() {
            assert!(InfoRequest::parse(&b[..n]).is_err(), "prefix {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            InfoRequest::parse(&long),
            Err(WireError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn oversized_name_is_refused_before_reading() {
        let mut b = Vec::new();
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        b.extend_from_slice(b"abc");
        assert!(matches!(
            InfoRequest::parse(&b),
            Err(WireError::TooLong { .. })
        ));
        assert!(matches!(
            MetaContextRequest::parse(&b),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn garbage_meta_query_count_does_not_allocate() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            MetaContextRequest::parse(&b),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn non_utf8_name_is_refused() {
        let mut b = Vec::new();
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(&[0xff, 0xfe]);
        b.extend_from_slice(&0u16.to_be_bytes());
        assert!(matches!(
            InfoRequest::parse(&b),
            Err(WireError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn reply_encoding() {
        let mut out = Vec::new();
        encode_info_export(&mut out, OPT_GO, 1 << 30, FLAG_HAS_FLAGS);
        let h = OptionReplyHeader::parse(&out[..20]).unwrap();
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_INFO,
                len: 12
            }
        );
        assert_eq!(&out[20..22], &[0, 0]);
        assert_eq!(&out[22..30], &(1u64 << 30).to_be_bytes());
        out.clear();
        encode_error(&mut out, OPT_GO, REP_ERR_UNKNOWN, &"x".repeat(10_000));
        assert_eq!(out.len(), 20 + MAX_STRING);
        assert!(OptionReplyHeader::parse(&out[..20]).unwrap().is_error());
        out.clear();
        encode_export_name_reply(&mut out, 5, 1, false);
        assert_eq!(out.len(), 134);
        out.clear();
        encode_export_name_reply(&mut out, 5, 1, true);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(3000);
        let t = truncate_str(&s);
        assert!(t.len() <= MAX_STRING);
        assert!(t.chars().all(|c| c == 'é'));
    }

    proptest! {
        #[test]
        fn info_request_round_trip(name in "\\PC{0,40}", reqs in proptest::collection::vec(any::<u16>(), 0..20)) {
            let r = InfoRequest { name, requests: reqs };
            prop_assert_eq!(InfoRequest::parse(&r.encode()).unwrap(), r);
        }

        #[test]
        fn meta_request_round_trip(name in "\\PC{0,40}", qs in proptest::collection::vec("\\PC{0,30}", 0..8)) {
            let r = MetaContextRequest { name, queries: qs };
            prop_assert_eq!(MetaContextRequest::parse(&r.encode()).unwrap(), r);
        }

        #[test]
        fn option_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = OptionHeader::parse(&bytes);
            let _ = InfoRequest::parse(&bytes);
            let _ = MetaContextRequest::parse(&bytes);
            let _ = OptionReplyHeader::parse(&bytes);
        }
    }
}
