//! The NBD wire format: protocol constants, the fixed-newstyle handshake (greeting, client flags,
//! option requests and replies), transmission request headers, request validation against the
//! negotiated export ([`validate`]: every refusal's errno is chosen there) and reply encoding.
//!
//! Everything here works on byte slices and owned buffers: no sockets, no I/O, no volumes. Every
//! length read from the wire is checked against the bytes present and a cap before anything is
//! allocated for it, and nothing here panics on input (parsers return [`WireError`]). The
//! encoders are used by the server; the matching client-side encoders and reply decoders exist so
//! tests (and fuzzers) can speak the protocol without a second implementation.

pub mod consts;
pub mod option;
pub mod reply;
pub mod request;
pub mod validate;

pub use consts::*;

/// Why bytes from the wire were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("truncated {what}: need {need} bytes, got {got}")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("bad magic in {what}: {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    #[error("{what} is {len} bytes, over the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what} has {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("client flags {flags:#x} contain unknown bits {unknown:#x}")]
    UnknownClientFlags { flags: u32, unknown: u32 },
    #[error("the client does not speak fixed newstyle (client flags {flags:#x}); oldstyle and plain newstyle are refused")]
    NotFixedNewstyle { flags: u32 },
    #[error("malformed {what}: {why}")]
    Malformed {
        what: &'static str,
        why: &'static str,
    },
}

/// A cursor over a byte slice that refuses to read past its end.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what: self.what,
                need: n,
                got: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A 32-bit length then that many bytes of UTF-8, at most `MAX_STRING`.
    pub(crate) fn string32(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(WireError::TooLong {
                what,
                len: len as u64,
                max: MAX_STRING as u64,
            });
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::NotUtf8 { what })
    }

    pub(crate) fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}
