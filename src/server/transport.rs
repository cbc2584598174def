//! The transport under a session: a plain socket (Unix or TCP) or a TLS session over one, so the
//! handshake and the request loop read and write without knowing which.
//!
//! During the handshake one thread owns the connection ([`Conn`]); STARTTLS upgrades it in
//! place. For the transmission phase [`Conn::into_halves`] splits it into a [`ReadHalf`] for the
//! worker that holds the reader and a [`WriteHalf`] for the worker that holds the writer lock.
//! The plain halves are the socket itself (one `read`/`writev` per call, as before TLS existed).
//!
//! A TLS session is one state machine for both directions, so the halves share it behind a
//! mutex, held only for the CPU work and never across a blocking socket call:
//! - the reader pulls ciphertext from the socket into its own buffer *without* the lock (it waits
//!   there most of the time), then locks the session to decrypt and copy out plaintext;
//! - a writer takes the send lock (the session's writer lock already serialises replies), locks
//!   the session to encrypt up to [`ENCRYPT_BATCH`] bytes into a ciphertext buffer, unlocks, and
//!   writes that buffer to the socket while still holding the send lock, so records reach the
//!   socket in the order they were sealed. Encrypting one batch while the reader decrypts is thus
//!   serialised only for the duration of the AES-GCM work, and a slow client blocks only writers.
//! - TLS messages the reader's side must answer (alerts, key updates) go out through the same
//!   send lock, taken before the session lock (the one lock order, so no deadlock).
//!
//! Alternatives considered: one thread owning the TLS session with channels to the workers adds
//! a queue hop per request (DESIGN.md: hops cost about half the throughput on 2 cores); holding
//! the session lock across socket reads would stall every reply while the reader waits.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::stream::Stream;

/// Ciphertext read from the socket per call (several full 16 KiB records).
const CIPHER_READ: usize = 64 * 1024;
/// Plaintext sealed per socket write: large enough to amortise the syscall, small enough that
/// the ciphertext buffer stays small and the reader is not kept from the session for long.
pub(crate) const ENCRYPT_BATCH: usize = 256 * 1024;

/// A connection during the handshake: plain, or TLS after STARTTLS.
#[derive(Debug)]
pub(crate) enum Conn {
    Plain(Stream),
    Tls(Box<StreamOwned<ServerConnection, Stream>>),
    /// Only while STARTTLS swaps the variant; never seen outside [`Conn::start_tls`].
    Upgrading,
}

impl Conn {
    fn socket(&self) -> io::Result<&Stream> {
        match self {
            Conn::Plain(s) => Ok(s),
            Conn::Tls(t) => Ok(t.get_ref()),
            Conn::Upgrading => Err(upgrading()),
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket()?.set_read_timeout(t)
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket()?.set_write_timeout(t)
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.socket()?.shutdown(how)
    }

    /// Ends a TLS session with close_notify, so the client can tell a deliberate end of the
    /// stream from a truncation by an attacker; nothing to do on a plain socket. The caller has
    /// set a write timeout (a client that stopped reading must not hold the thread).
    pub(crate) fn close_notify(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(_) | Conn::Upgrading => Ok(()),
            Conn::Tls(t) => {
                t.conn.send_close_notify();
                t.flush()
            }
        }
    }

    /// Runs the TLS handshake over the plain socket (the caller has set socket timeouts). On
    /// failure the connection is unusable and the error says why (unknown CA, expired...).
    pub(crate) fn start_tls(&mut self, config: Arc<ServerConfig>) -> io::Result<()> {
        let Conn::Plain(mut sock) = std::mem::replace(self, Conn::Upgrading) else {
            return Err(io::Error::other(
                "TLS is already running on this connection",
            ));
        };
        let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
        // The transmission phase drains the session after every write; no limit is needed.
        tls.set_buffer_limit(None);
        while tls.is_handshaking() {
            if let Err(e) = tls.complete_io(&mut sock) {
                // Send the alert rustls queued (bad certificate, unknown CA...) so the client can
                // say why; the connection is over either way.
                while tls.wants_write() && tls.write_tls(&mut sock).is_ok() {}
                return Err(e);
            }
        }
        while tls.wants_write() {
            tls.write_tls(&mut sock)?;
        }
        *self = Conn::Tls(Box::new(StreamOwned::new(tls, sock)));
        Ok(())
    }

    /// The client's certificate chain (leaf first); empty without TLS or without a client
    /// certificate.
    pub(crate) fn peer_chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        match self {
            Conn::Tls(t) => t
                .conn
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Splits the connection for the transmission phase: the reader, the writer, and a socket
    /// handle to shut it down from any thread.
    pub(crate) fn into_halves(self) -> io::Result<(ReadHalf, WriteHalf, Stream)> {
        match self {
            Conn::Plain(s) => {
                let w = s.try_clone()?;
                let c = s.try_clone()?;
                Ok((ReadHalf::Plain(s), WriteHalf::Plain(w), c))
            }
            Conn::Tls(t) => {
                let (conn, sock) = t.into_parts();
                let send_sock = sock.try_clone()?;
                let control = sock.try_clone()?;
                let shared = Arc::new(TlsShared {
                    conn: Mutex::new(conn),
                    send: Mutex::new(TlsSend {
                        sock: send_sock,
                        out: Vec::new(),
                    }),
                });
                let reader = TlsReader {
                    shared: shared.clone(),
                    sock,
                    cipher: vec![0u8; CIPHER_READ].into_boxed_slice(),
                    start: 0,
                    end: 0,
                    eof: false,
                };
                Ok((ReadHalf::Tls(reader), WriteHalf::Tls(shared), control))
            }
            Conn::Upgrading => Err(upgrading()),
        }
    }
}

fn upgrading() -> io::Error {
    io::Error::other("the connection broke while starting TLS")
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
            Conn::Upgrading => Err(upgrading()),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
            Conn::Upgrading => Err(upgrading()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(_) => Ok(()),
            Conn::Tls(t) => t.flush(),
            Conn::Upgrading => Err(upgrading()),
        }
    }
}

/// The TLS session shared by a connection's reader and writers.
pub(crate) struct TlsShared {
    conn: Mutex<ServerConnection>,
    send: Mutex<TlsSend>,
}

/// The sending side: the socket and the ciphertext buffer, under one lock.
struct TlsSend {
    sock: Stream,
    out: Vec<u8>,
}

impl TlsShared {
    fn conn(&self) -> MutexGuard<'_, ServerConnection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self) -> MutexGuard<'_, TlsSend> {
        self.send.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues close_notify and sends it.
    fn close_notify(&self) -> io::Result<()> {
        self.conn().send_close_notify();
        self.flush_queued()
    }

    /// Sends whatever the session has queued (alerts, key-update answers).
    fn flush_queued(&self) -> io::Result<()> {
        let mut send = self.send();
        let send = &mut *send;
        {
            let mut c = self.conn();
            while c.wants_write() {
                c.write_tls(&mut send.out)?;
            }
        }
        let r = send.sock.write_all(&send.out);
        send.out.clear();
        r
    }

    /// Seals up to [`ENCRYPT_BATCH`] bytes of `bufs` and sends them; returns the bytes consumed.
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut send = self.send();
        let send = &mut *send;
        let mut taken: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len());
        let mut total = 0usize;
        for b in bufs {
            if total == ENCRYPT_BATCH {
                break;
            }
            let n = b.len().min(ENCRYPT_BATCH - total);
            taken.push(IoSlice::new(&b[..n]));
            total += n;
        }
        {
            let mut c = self.conn();
            // No buffer limit is set (see `start_tls`), so rustls seals all of it.
            let n = c.writer().write_vectored(&taken)?;
            if n != total {
                return Err(io::Error::other(format!(
                    "the TLS session took {n} of {total} bytes"
                )));
            }
            while c.wants_write() {
                c.write_tls(&mut send.out)?;
            }
        }
        let r = send.sock.write_all(&send.out);
        send.out.clear();
        if send.out.capacity() > 2 * ENCRYPT_BATCH {
            send.out.shrink_to(2 * ENCRYPT_BATCH);
        }
        r.map(|()| total)
    }
}

/// The reading side of a transmission-phase connection.
pub(crate) enum ReadHalf {
    Plain(Stream),
    Tls(TlsReader),
}

pub(crate) struct TlsReader {
    shared: Arc<TlsShared>,
    sock: Stream,
    /// Ciphertext read from the socket, not yet given to the session: `cipher[start..end]`.
    cipher: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(s) => s.read(buf),
            ReadHalf::Tls(t) => t.read(buf),
        }
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let answer = {
                let mut c = self.shared.conn();
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The peer closed the socket without close_notify. NBD frames say where a
                    // message ends, so a cut inside one is still reported by the caller.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if self.start == self.end && !self.eof {
                    None
                } else {
                    if self.start < self.end {
                        let mut src = &self.cipher[self.start..self.end];
                        let n = c.read_tls(&mut src)?;
                        self.start += n;
                    } else {
                        // End of stream: rustls then reports close_notify or a truncation.
                        c.read_tls(&mut &[][..])?;
                    }
                    let processed = c.process_new_packets();
                    Some((processed, c.wants_write()))
                }
            };
            match answer {
                None => {
                    // Wait for ciphertext without holding the session: writers keep sealing.
                    let n = loop {
                        match self.sock.read(&mut self.cipher) {
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            r => break r?,
                        }
                    };
                    self.start = 0;
                    self.end = n;
                    self.eof = n == 0;
                }
                Some((processed, wants_write)) => {
                    if wants_write {
                        // Best effort for alerts after an error; the error below decides.
                        let sent = self.shared.flush_queued();
                        if processed.is_ok() {
                            sent?;
                        }
                    }
                    if let Err(e) = processed {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    if self.eof && self.start == self.end {
                        // Only reached twice if rustls neither returned data nor EOF.
                        let mut c = self.shared.conn();
                        return match c.reader().read(buf) {
                            Ok(n) => Ok(n),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                            Err(e) => Err(e),
                        };
                    }
                }
            }
        }
    }
}

/// The writing side of a transmission-phase connection.
pub(crate) enum WriteHalf {
    Plain(Stream),
    Tls(Arc<TlsShared>),
}

impl WriteHalf {
    /// Ends a TLS session with close_notify (see [`Conn::close_notify`]); a no-op when plain.
    pub(crate) fn close_notify(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Plain(_) => Ok(()),
            WriteHalf::Tls(t) => t.close_notify(),
        }
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(s) => s.write(buf),
            WriteHalf::Tls(t) => t.write_vectored(&[IoSlice::new(buf)]),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(s) => s.write_vectored(bufs),
            WriteHalf::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
