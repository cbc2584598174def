//! A connected client socket, TCP or Unix, as a blocking std stream (the transmission phase runs
//! on OS threads), plus a vectored `write_all` so a reply header and its data leave in one call.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A blocking client socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// Whether the peer has closed its end (checked without blocking and without consuming
    /// data: a non-blocking peek sees end of stream only once nothing is left to read).
    pub(crate) fn peer_hung_up(&self) -> bool {
        use nix::errno::Errno;
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        let mut b = [0u8; 1];
        match recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(_) => false,
            Err(Errno::EAGAIN | Errno::EINTR) => false,
            Err(_) => true,
        }
    }

    /// Asks for a kernel send buffer of `bytes` (the kernel doubles the value for its own
    /// bookkeeping and caps it at `net.core.wmem_max`; a TCP socket then no longer autotunes).
    pub(crate) fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => socket2::SockRef::from(s).set_send_buffer_size(bytes),
            Stream::Unix(s) => socket2::SockRef::from(s).set_send_buffer_size(bytes),
        }
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes every slice, in as few `writev` calls as the kernel allows.
pub(crate) fn write_all_vectored(
    w: &mut impl Write,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the client stopped accepting data",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte (a
/// clean close between messages), an `UnexpectedEof` error if it ended inside the message.
pub(crate) fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the stream ended after {got} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most 3 bytes per call, to exercise partial vectored writes.
    struct Dribble(Vec<u8>);
    impl Write for Dribble {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(3);
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_write_survives_partial_writes() {
        let mut w = Dribble(Vec::new());
        let a = [1u8, 2, 3, 4, 5];
        let b = [6u8; 7];
        write_all_vectored(
            &mut w,
            &mut [IoSlice::new(&a), IoSlice::new(&[]), IoSlice::new(&b)],
        )
        .unwrap();
        assert_eq!(w.0, [1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 6]);
    }

    #[test]
    fn truncated_reads_are_told_apart_from_clean_eof() {
        let mut buf = [0u8; 4];
        assert!(!read_exact_or_eof(&mut &[][..], &mut buf).unwrap());
        let e = read_exact_or_eof(&mut &[1u8, 2][..], &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(read_exact_or_eof(&mut &[1u8, 2, 3, 4, 5][..], &mut buf).unwrap());
    }
}

#[cfg(test)]
mod hangup_tests {
    use super::*;

    #[test]
    fn a_closed_peer_is_noticed_without_reading() {
        let (a, b) = UnixStream::pair().unwrap();
        let s = Stream::Unix(a);
        assert!(!s.peer_hung_up());
        drop(b);
        assert!(s.peer_hung_up());
    }
}

#[cfg(test)]
mod buffer_tests {
    use super::*;
    use std::net::TcpListener;

    /// What the kernel grants at most: `net.core.wmem_max` (doubled for bookkeeping).
    fn wmem_max() -> usize {
        std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn granted(s: &Stream) -> usize {
        match s {
            Stream::Tcp(s) => socket2::SockRef::from(s).send_buffer_size().unwrap(),
            Stream::Unix(s) => socket2::SockRef::from(s).send_buffer_size().unwrap(),
        }
    }

    #[test]
    fn send_buffer_grows_past_the_unix_default() {
        let want = crate::server::UNIX_SEND_BUFFER;
        let floor = want.min(wmem_max());
        let (a, _b) = UnixStream::pair().unwrap();
        let unix = Stream::Unix(a);
        let before = granted(&unix);
        unix.set_send_buffer(want).unwrap();
        let after = granted(&unix);
        assert!(
            after >= floor && after > before,
            "Unix send buffer {before} -> {after}, wanted at least {floor}"
        );
        // TCP autotunes and may already be larger; setting it only has to be honoured.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let tcp = Stream::Tcp(l.accept().unwrap().0);
        tcp.set_send_buffer(want).unwrap();
        assert!(granted(&tcp) >= floor);
    }
}
