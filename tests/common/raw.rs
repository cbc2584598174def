//! A raw NBD client over a Unix or TCP socket, built on the library's wire encoders, that can also
//! send anything malformed. Every read has a timeout so a broken server fails the test instead of
//! hanging it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use cryptnbd::nbd::option::{InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader};
use cryptnbd::nbd::reply::ReplyHeader;
use cryptnbd::nbd::request::Request;
use cryptnbd::nbd::*;

pub trait Sock: Read + Write + Send {
    fn shutdown_write(&self);
}
impl Sock for UnixStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}
impl Sock for TcpStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

pub struct RawClient {
    pub s: Box<dyn Sock>,
    pub structured: bool,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub h: OptionReplyHeader,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// One transmission reply (a simple reply, or one structured chunk).
#[derive(Debug)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
    /// The error of a simple reply or an ERROR chunk (0 = success).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { ty, payload, .. } if *ty & 0x8000 != 0 => {
                u32::from_be_bytes(payload[0..4].try_into().unwrap())
            }
            _ => 0,
        }
    }
    /// The human message of an ERROR chunk.
    pub fn message(&self) -> String {
        match self {
            Reply::Chunk { ty, payload, .. } if *ty & 0x8000 != 0 => {
                let n = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                String::from_utf8_lossy(&payload[6..6 + n]).into_owned()
            }
            _ => String::new(),
        }
    }
}

pub const TIMEOUT: Duration = Duration::from_secs(10);

impl RawClient {
    pub fn unix(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect unix");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        Self {
            s: Box::new(s),
            structured: false,
        }
    }

    pub fn tcp(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).expect("connect tcp");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Self {
            s: Box::new(s),
            structured: false,
        }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn try_send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("recv");
        v
    }

    /// Reads the greeting and checks it.
    pub fn greeting(&mut self) {
        let g = self.recv(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }

    /// Greeting + client flags (fixed newstyle, no zeroes).
    pub fn start(&mut self) {
        self.greeting();
        self.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    }

    pub fn send_option(&mut self, option: u32, payload: &[u8]) {
        self.send(&OptionHeader::encode_with(option, payload));
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let h = OptionReplyHeader::parse(&self.recv(20)).expect("option reply header");
        let data = self.recv(h.len as usize);
        OptReply { h, data }
    }

    /// Sends an option and collects replies up to the final one (ACK or an error).
    pub fn option(&mut self, option: u32, payload: &[u8]) -> Vec<OptReply> {
        self.send_option(option, payload);
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.h.option, option, "reply to the wrong option");
            let last = r.h.reply_type == REP_ACK || r.h.is_error();
            v.push(r);
            if last {
                return v;
            }
        }
    }

    pub fn structured(&mut self) {
        let r = self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r.last().unwrap().h.reply_type, REP_ACK);
        self.structured = true;
    }

    pub fn set_meta(&mut self, name: &str) {
        let req = MetaContextRequest {
            name: name.into(),
            queries: vec![CONTEXT_BASE_ALLOCATION.into()],
        };
        let r = self.option(OPT_SET_META_CONTEXT, &req.encode());
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].h.reply_type, REP_META_CONTEXT);
        assert_eq!(r[1].h.reply_type, REP_ACK);
    }

    /// INFO or GO; returns every reply.
    pub fn info_go(&mut self, option: u32, name: &str, requests: &[u16]) -> Vec<OptReply> {
        let req = InfoRequest {
            name: name.into(),
            requests: requests.to_vec(),
        };
        self.option(option, &req.encode())
    }

    /// Full handshake to transmission: optional structured replies + base:allocation, then GO.
    /// Returns (size, transmission flags).
    pub fn connect_export(&mut self, name: &str, structured: bool) -> (u64, u16) {
        self.start();
        if structured {
            self.structured();
            self.set_meta(name);
        }
        let r = self.info_go(OPT_GO, name, &[INFO_BLOCK_SIZE]);
        assert_eq!(r.last().unwrap().h.reply_type, REP_ACK, "GO failed: {r:?}");
        let info = r
            .iter()
            .find(|x| x.h.reply_type == REP_INFO && x.data[0..2] == [0, 0])
            .expect("INFO_EXPORT");
        let size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.data[10..12].try_into().unwrap());
        (size, flags)
    }

    pub fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            len,
        };
        self.send(&r.encode());
    }

    /// Reads one reply. For a simple reply, `read_len` says how much data follows a success
    /// (the client has to know: simple replies are not self-describing).
    pub fn reply(&mut self, read_len: usize) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).expect("reply magic");
        let n = ReplyHeader::header_len(magic).expect("reply magic");
        let mut h = magic.to_vec();
        h.extend(self.recv(n - 4));
        match ReplyHeader::parse(&h).unwrap() {
            ReplyHeader::Simple { error, cookie } => {
                let data = if error == 0 {
                    self.recv(read_len)
                } else {
                    Vec::new()
                };
                Reply::Simple {
                    error,
                    cookie,
                    data,
                }
            }
            ReplyHeader::Chunk {
                flags,
                ty,
                cookie,
                len,
            } => Reply::Chunk {
                flags,
                ty,
                cookie,
                payload: self.recv(len as usize),
            },
        }
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> Reply {
        self.request(CMD_WRITE, flags, cookie, offset, data.len() as u32);
        self.send(data);
        self.reply(0)
    }

    /// READ; returns the data (structured: from OFFSET_DATA or OFFSET_HOLE), or the error.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, cookie, offset, len);
        decode_read(self.reply(len as usize), offset, len)
    }

    /// Whether the server closed the connection (EOF or reset within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}

/// Turns a READ reply into its data.
pub fn decode_read(r: Reply, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    match r {
        Reply::Simple { error: 0, data, .. } => Ok(data),
        Reply::Simple { error, .. } => Err(error),
        Reply::Chunk {
            flags, ty, payload, ..
        } => {
            assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
            match ty {
                REPLY_TYPE_OFFSET_DATA => {
                    assert_eq!(
                        u64::from_be_bytes(payload[0..8].try_into().unwrap()),
                        offset
                    );
                    assert_eq!(payload.len() - 8, len as usize);
                    Ok(payload[8..].to_vec())
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(
                        u64::from_be_bytes(payload[0..8].try_into().unwrap()),
                        offset
                    );
                    assert_eq!(u32::from_be_bytes(payload[8..12].try_into().unwrap()), len);
                    Ok(vec![0u8; len as usize])
                }
                t if t & 0x8000 != 0 => Err(u32::from_be_bytes(payload[0..4].try_into().unwrap())),
                t => panic!("unexpected chunk type {t}"),
            }
        }
    }
}
