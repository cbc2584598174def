//! The transmission phase of one connection: a leader/follower group of worker threads.
//!
//! The leader holds the reader, reads one request header and (for WRITE) its payload into its own
//! reused buffer and runs it inline (the crypto happens on this thread while the data is in its
//! cache). A quick request — a small READ whose data is cached (`Volume::try_read_cached`), a
//! small aligned WRITE — runs while the leader keeps the reader, so followers sleep instead of
//! trading the lock and the CPU per request; anything that may wait (a read from the device, a
//! long transfer, FLUSH, FUA) hands the reader to a follower first, which reads and runs the next
//! request meanwhile. Replies therefore go out of order. They collect in the worker's pending
//! buffer while more requests are already buffered and go out in one write before the worker
//! could block. There is no queue or thread hop per request and no allocation on the hot path: a
//! worker's buffer grows to the largest request it has seen, capped by the advertised maximum.
//! Measured on 2 cores (fio, 4 KiB random I/O at queue depth 32): reply batching took one
//! connection from ~50 k to ~170 k IOPS, and keeping the reader took two connections from ~90 k to
//! ~240 k. (DESIGN.md "Performance": Cloudflare's dm-crypt work showed queue hops costing about
//! half the throughput.)
//!
//! Every request is validated once, by [`validate::check`], before its payload is read; a
//! volume error becomes an errno in one place, [`errno_for`](super::export::errno_for)
//! (sent by `session_reply.rs`).
//!
//! The socket under the session is a [`super::transport`] half: plain, or TLS (see there for how
//! the reader and the writers share one TLS session).
//!
//! A request that is malformed beyond recovery (bad magic, truncated frame, a WRITE too long to
//! discard) ends this connection only; everything else gets an error reply and the stream goes on.

use std::io::{self, BufReader, IoSlice, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use tracing::{debug, warn};

use super::budget::{Budget, WorkBuf, FREE_BYTES};
use super::handshake::Negotiated;
use super::inflight::{self, InFlight};
use super::stats::{ConnStats, ErrorKind, ExportStats};
use super::stream::{read_exact_or_eof, write_all_vectored, Stream};
use super::transport::{Conn, ReadHalf, WriteHalf};
use crate::config::ServerConfig;
use crate::nbd::request::{Request, REQUEST_LEN};
use crate::nbd::validate::{self, Limits};
use crate::nbd::{consts::*, reply, WireError};
use crate::volume::Volume;

// Sending replies: a file of its own, declared here so it sees this file's private items.
#[path = "session_reply.rs"]
mod replies;
use replies::{flush, queued, reply_result, send, send_error, send_volume_error};

/// The shared reader is this large so many small requests cost one `read` syscall.
const READ_BUFFER: usize = 64 * 1024;
/// WRITE payloads are read (and their buffer grown) in steps of this size.
const PAYLOAD_STEP: usize = 1 << 20;
/// Discarded WRITE payloads are read in chunks of this size (a stack buffer, not the request's).
const DISCARD_CHUNK: usize = 16 * 1024;
/// Replies up to this size are copied into the worker's pending-reply buffer and sent together
/// (one `write` for a burst of small replies); larger ones go straight from the data buffer.
const COALESCE_MAX: usize = 64 * 1024;
/// Pending replies are sent once they reach this size, even if more requests are waiting.
const PENDING_FLUSH: usize = 256 * 1024;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("socket error while {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("protocol violation")]
    Wire(#[from] WireError),
    #[error("a {len}-byte WRITE is too long to discard (limit {max}); closing the connection")]
    WriteTooLong { len: u32, max: u64 },
}

struct Shared {
    reader: Mutex<BufReader<ReadHalf>>,
    writer: Mutex<WriteHalf>,
    /// A handle to shut the socket down from any thread.
    control: Stream,
    closing: AtomicBool,
    volume: Arc<Volume>,
    /// What every request is validated against.
    limits: Limits,
    /// Server-wide memory for buffers beyond each worker's first MiB.
    budget: Arc<Budget>,
    structured: bool,
    meta_context: Option<u32>,
    max_discard: u64,
    /// Requests submitted without waiting, whose replies the replier sends (see `inflight`).
    inflight: Arc<InFlight>,
    /// The export's and this connection's counters (relaxed atomic adds per request).
    stats: Arc<ExportStats>,
    conn_stats: Arc<ConnStats>,
}

impl Shared {
    /// Stops every worker from reading more requests; in-flight ones still reply.
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.control.shutdown(Shutdown::Read);
    }

    /// Whether a request waiting for buffer memory should give up: the connection is closing,
    /// or the client hung up (nobody may be reading the socket to notice).
    fn cancelled(&self) -> bool {
        self.closing.load(Ordering::SeqCst) || self.control.peer_hung_up()
    }

    fn lock_writer(&self) -> MutexGuard<'_, WriteHalf> {
        // A worker that panicked while writing leaves a frame half sent: nothing after it can be
        // trusted, but the lock itself is still usable to fail fast.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What to do with a request after its header (and payload) were read.
enum Verdict {
    Run,
    Fail(u32, String),
    /// Reply with an error, then close: the WRITE payload could not be skipped.
    FailAndClose(u32, String),
    Disconnect,
}

impl From<validate::Verdict> for Verdict {
    fn from(v: validate::Verdict) -> Self {
        match v {
            validate::Verdict::Run => Verdict::Run,
            validate::Verdict::Refuse { errno, message } => Verdict::Fail(errno, message),
            validate::Verdict::Disconnect => Verdict::Disconnect,
        }
    }
}

/// The reader, held by the worker that is leader.
type ReaderGuard<'a> = MutexGuard<'a, BufReader<ReadHalf>>;

/// Serves requests on `stream` until the client disconnects, the stream breaks, or the server
/// shuts the socket's read side.
pub(crate) fn run(
    conn: Conn,
    neg: Negotiated,
    cfg: &ServerConfig,
    budget: Arc<Budget>,
    (stats, conn_stats): (Arc<ExportStats>, Arc<ConnStats>),
) -> Result<(), SessionError> {
    let io_err = |what| move |source| SessionError::Io { what, source };
    conn.set_read_timeout(None)
        .map_err(io_err("clearing the handshake timeout"))?;
    conn.set_write_timeout(None)
        .map_err(io_err("clearing the handshake timeout"))?;
    let (stream, writer, control) = conn.into_halves().map_err(io_err("cloning the socket"))?;
    let sh = Shared {
        reader: Mutex::new(BufReader::with_capacity(READ_BUFFER, stream)),
        writer: Mutex::new(writer),
        control,
        closing: AtomicBool::new(false),
        limits: Limits {
            size: neg.export.size(),
            read_only: neg.export.is_read_only(),
            structured: neg.structured,
            meta_context: neg.meta_context.is_some(),
            max_payload: cfg.max_payload,
        },
        volume: neg.export,
        inflight: InFlight::new(budget.clone()),
        budget,
        structured: neg.structured,
        meta_context: neg.meta_context,
        max_discard: cfg.max_discard,
        stats,
        conn_stats,
    };
    let workers = cfg.workers_per_connection.max(1);
    let result = std::thread::scope(|s| {
        let async_io = sh.volume.backend().submits_async();
        let replier = inflight::spawn_replier(s, &sh.inflight, async_io, sh.structured, |b| {
            let r = write_all_vectored(&mut *sh.lock_writer(), b);
            if r.is_err() {
                sh.close();
            }
            r
        });
        let mut handles = Vec::with_capacity(workers - 1);
        for i in 1..workers {
            let sh = &sh;
            match std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(s, move || worker(sh))
            {
                Ok(h) => handles.push(h),
                Err(e) => warn!("could not start a worker thread, serving with fewer: {e}"),
            }
        }
        let mut result = worker(&sh);
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(SessionError::Io {
                    what: "running a worker",
                    source: io::Error::other("a worker thread panicked"),
                })
            });
            if result.is_ok() {
                result = r;
            }
        }
        // Replies of submitted requests are owed: wait for every completion.
        sh.inflight.close();
        if let Some(h) = replier {
            let _ = h.join();
        }
        result
    });
    // Every reply is out: end a TLS session with close_notify (best effort; the stream may be
    // broken already), bounded in time in case the client stopped reading.
    let _ = sh.control.set_write_timeout(Some(CLOSE_NOTIFY_TIMEOUT));
    if let Err(e) = sh.lock_writer().close_notify() {
        debug!("could not send TLS close_notify: {e}");
    }
    result
}

/// How long the final TLS close_notify may wait for the socket.
const CLOSE_NOTIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn worker(sh: &Shared) -> Result<(), SessionError> {
    let mut buf = WorkBuf::new(sh.budget.clone());
    let mut out: Vec<u8> = Vec::new();
    let mut r = worker_loop(sh, &mut buf, &mut out);
    // Replies to requests already run are owed even when the stream ends.
    if let Err(e) = flush(sh, &mut out) {
        if r.is_ok() {
            r = Err(e);
        }
    }
    // Whatever ended this worker ends the connection: wake the others.
    sh.close();
    r
}

/// Runs requests until the stream ends. Replies collect in `out` while further requests are
/// already waiting in the read buffer, and go out in one write before the worker could block
/// on the socket: a burst of 32 small requests costs one `read` and one `write`, not 64 calls.
fn worker_loop(sh: &Shared, buf: &mut WorkBuf, out: &mut Vec<u8>) -> Result<(), SessionError> {
    // The reader kept from the last request: a worker stays leader through a run of quick
    // requests, so the followers sleep instead of trading the lock (and the CPU) per request.
    let mut kept: Option<ReaderGuard<'_>> = None;
    loop {
        let mut r = match kept.take() {
            Some(r) => r,
            // Never wait for the reader while holding replies: the worker inside may be
            // blocked on a client that waits for exactly those replies.
            None => match sh.reader.try_lock() {
                Ok(r) => r,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    flush(sh, out)?;
                    sh.reader.lock().unwrap_or_else(|e| e.into_inner())
                }
            },
        };
        if sh.closing.load(Ordering::SeqCst) {
            return Ok(());
        }
        if !out.is_empty() && !request_buffered(r.buffer()) {
            flush(sh, out)?;
        }
        let taken = take_request(sh, &mut r, buf);
        // Decide about closing while still holding the reader: once the stream is out of
        // sync (bad frame, unskippable payload, DISC), no other worker may parse another
        // "request" from it.
        match &taken {
            Ok(Some((_, Verdict::Run | Verdict::Fail(..)))) => {}
            _ => sh.close(),
        }
        let Some((req, verdict)) = taken? else {
            return Ok(());
        };
        // `execute` decides whether this worker keeps the reader; refusals are quick.
        let mut reader = Some(r);
        let large = buf.len() > FREE_BYTES;
        match verdict {
            Verdict::Run => {
                // A request submitted without waiting (`inflight`) is done when it completes:
                // its completion records it (see `execute`).
                let started = Instant::now();
                sh.stats.start(req.command, req.len, &sh.conn_stats);
                if !submit(sh, &req, buf, started) {
                    let r = execute(sh, &req, buf, out, &mut reader);
                    sh.stats.done(req.command, started.elapsed());
                    r?;
                }
            }
            Verdict::Fail(errno, msg) => {
                sh.stats.error(refusal_kind(errno));
                send_error(sh, &req, errno, &msg, out)?
            }
            Verdict::FailAndClose(errno, msg) => {
                sh.stats.error(refusal_kind(errno));
                send_error(sh, &req, errno, &msg, out)?;
                return Err(SessionError::WriteTooLong {
                    len: req.len,
                    max: sh.max_discard,
                });
            }
            // Requests already taken by other workers still get their replies.
            Verdict::Disconnect => return Ok(()),
        }
        kept = reader;
        if large || buf.len() > FREE_BYTES {
            // Memory beyond the worker's share goes back as soon as the request is done.
            buf.shrink();
        }
    }
}

/// How a request refused before it ran is counted.
fn refusal_kind(errno: u32) -> ErrorKind {
    if errno == ENOMEM {
        ErrorKind::NoMemory
    } else {
        ErrorKind::Invalid
    }
}

/// Requests below this size may run while their worker keeps the reader (see `worker_loop`).
const HANDOFF_MIN: u32 = 64 * 1024;

fn is_small(req: &Request) -> bool {
    req.len < HANDOFF_MIN
}

/// A WRITE that costs about as much as handing the reader to another thread: small, aligned to
/// 4 KiB (no read-modify-write, which may read from the device) and without FUA (which waits for
/// it). Buffered writes land in the page cache.
fn is_quick_write(req: &Request) -> bool {
    req.command == CMD_WRITE
        && is_small(req)
        && !req.fua()
        && req.offset.is_multiple_of(4096)
        && req.len.is_multiple_of(4096)
}

/// Whether `buffered` holds a whole request (header and any WRITE payload), so reading it will
/// not block. Anything that does not look like a request counts as "yes": parsing it will fail
/// without waiting for more bytes.
fn request_buffered(buffered: &[u8]) -> bool {
    let Some(hdr) = buffered.get(..REQUEST_LEN) else {
        return false;
    };
    let command = u16::from_be_bytes([hdr[6], hdr[7]]);
    let len = u32::from_be_bytes([hdr[24], hdr[25], hdr[26], hdr[27]]) as usize;
    command != CMD_WRITE || buffered.len() - REQUEST_LEN >= len
}

/// Reads one request (and its payload) from the locked reader; `None` at a clean end of stream.
fn take_request(
    sh: &Shared,
    r: &mut BufReader<ReadHalf>,
    buf: &mut WorkBuf,
) -> Result<Option<(Request, Verdict)>, SessionError> {
    let mut hdr = [0u8; REQUEST_LEN];
    match read_exact_or_eof(r, &mut hdr) {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(e) => {
            return Err(SessionError::Io {
                what: "reading a request header",
                source: e,
            })
        }
    }
    let req = Request::parse(&hdr)?;
    let verdict = Verdict::from(validate::check(&req, &sh.limits));
    let verdict = if req.has_payload() {
        read_payload(sh, r, &req, verdict, buf)?
    } else {
        verdict
    };
    Ok(Some((req, verdict)))
}

/// Reads a WRITE payload into `buf`, or skips it when the request was refused.
fn read_payload(
    sh: &Shared,
    r: &mut BufReader<ReadHalf>,
    req: &Request,
    verdict: Verdict,
    buf: &mut WorkBuf,
) -> Result<Verdict, SessionError> {
    let len = req.len as usize;
    let io_err = |source| SessionError::Io {
        what: "reading a WRITE payload",
        source,
    };
    let verdict = match verdict {
        Verdict::Run => {
            // len <= max_payload (checked). The buffer grows as the payload arrives, so a
            // header whose payload never comes pins no memory.
            let mut have = 0;
            let mut out_of_memory = false;
            while have < len {
                let n = (len - have).min(PAYLOAD_STEP);
                if !buf.ensure(have + n, &|| sh.cancelled()) {
                    out_of_memory = true;
                    break;
                }
                r.read_exact(&mut buf[have..have + n]).map_err(io_err)?;
                have += n;
            }
            if !out_of_memory {
                return Ok(Verdict::Run);
            }
            // Skip the rest of the payload and refuse the request; the stream stays in sync.
            let msg = format!("no buffer memory for a {len}-byte WRITE (server busy)");
            discard(r, len - have).map_err(io_err)?;
            return Ok(Verdict::Fail(ENOMEM, msg));
        }
        v => v,
    };
    match verdict {
        Verdict::Fail(errno, msg) if u64::from(req.len) <= sh.max_discard => {
            discard(r, len).map_err(io_err)?;
            Ok(Verdict::Fail(errno, msg))
        }
        Verdict::Fail(errno, msg) => Ok(Verdict::FailAndClose(errno, msg)),
        v => Ok(v),
    }
}

/// Reads and drops `len` payload bytes through a small stack buffer.
fn discard(r: &mut impl Read, len: usize) -> io::Result<()> {
    let mut left = len;
    let mut chunk = [0u8; DISCARD_CHUNK];
    while left > 0 {
        let n = left.min(DISCARD_CHUNK);
        r.read_exact(&mut chunk[..n])?;
        left -= n;
    }
    Ok(())
}

/// Submits `req` without waiting when it may take the asynchronous path (see `inflight`): a
/// WRITE's reply, or a READ's data, goes out when it completes, and this worker keeps the
/// reader. The completion records the request's latency, measured from `started`.
fn submit(sh: &Shared, req: &Request, buf: &mut WorkBuf, started: Instant) -> bool {
    // Only backends that complete asynchronously (RBD) take this path: the others pay nothing
    // for it (no hook is built).
    if !sh.volume.backend().submits_async() {
        return false;
    }
    let on_done = || -> inflight::OnDone {
        let (stats, command) = (sh.stats.clone(), req.command);
        Box::new(move || stats.done(command, started.elapsed()))
    };
    match req.command {
        CMD_WRITE => sh
            .inflight
            .try_submit(&sh.volume, req, buf, Some(on_done())),
        CMD_READ => sh
            .inflight
            .try_submit_read(&sh.volume, req, Some(on_done())),
        _ => false,
    }
}

/// Runs a validated request and queues its reply. `reader` is the reader this worker holds:
/// a quick request (a small READ served from cache, a small aligned WRITE) runs with it kept, so
/// this worker also reads the next request; anything that may wait (a device read, a long
/// transfer, FLUSH, FUA) first hands it to a follower (dropping it here), which reads and runs
/// the next request meanwhile: that is where a second thread pays off.
fn execute<'a>(
    sh: &'a Shared,
    req: &Request,
    buf: &mut WorkBuf,
    out: &mut Vec<u8>,
    reader: &mut Option<ReaderGuard<'a>>,
) -> Result<(), SessionError> {
    let ex = &*sh.volume;
    let len = req.len as usize;
    let fua = req.fua();
    if req.command != CMD_READ && (!is_quick_write(req) || ex.writes_wait()) {
        *reader = None;
    }
    match req.command {
        CMD_READ => {
            if !is_small(req) {
                // A large READ may wait for buffer memory and the device: not with the reader.
                *reader = None;
            }
            // len <= max_payload (validated); small reads stay within the worker's own share
            // and never wait for the budget.
            if !buf.ensure(len, &|| sh.cancelled()) {
                let msg = format!("no buffer memory for a {len}-byte READ (server busy)");
                sh.stats.error(ErrorKind::NoMemory);
                return send_error(sh, req, ENOMEM, &msg, out);
            }
            // The one place a READ starts: from cache, keeping the reader, when it is small and
            // cached; else from the device, after handing the reader over.
            let cached = match reader {
                Some(_) if is_small(req) => ex.try_read_cached(req.offset, &mut buf[..len]),
                _ => Ok(None),
            };
            let done = match cached {
                Ok(Some(outcome)) => Ok(outcome),
                Ok(None) => {
                    *reader = None;
                    ex.read(req.offset, &mut buf[..len])
                }
                Err(e) => Err(e),
            };
            match done {
                Ok(r) if sh.structured && r.all_zero => {
                    out.extend_from_slice(&reply::offset_hole(req.cookie, req.offset, req.len));
                    queued(sh, out)
                }
                Ok(_) if sh.structured => {
                    let h = reply::offset_data_header(req.cookie, req.offset, req.len);
                    send(sh, out, &mut [IoSlice::new(&h), IoSlice::new(&buf[..len])])
                }
                Ok(_) => {
                    let h = reply::simple(0, req.cookie);
                    send(sh, out, &mut [IoSlice::new(&h), IoSlice::new(&buf[..len])])
                }
                Err(e) => send_volume_error(sh, req, &e, out),
            }
        }
        CMD_WRITE => {
            let r = ex.write(req.offset, &mut buf[..len], fua);
            reply_result(sh, req, r, out)
        }
        CMD_FLUSH => reply_result(sh, req, ex.flush(), out),
        CMD_TRIM => {
            let r = ex.trim(req.offset, u64::from(req.len), fua);
            reply_result(sh, req, r, out)
        }
        CMD_WRITE_ZEROES => {
            let may_punch = req.flags & CMD_FLAG_NO_HOLE == 0;
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !ex.zeroing_is_fast(may_punch) {
                return send_error(
                    sh,
                    req,
                    ENOTSUP,
                    "zeroing this range is not faster than writing zeroes",
                    out,
                );
            }
            let r = ex.write_zeroes(req.offset, u64::from(req.len), may_punch, fua);
            reply_result(sh, req, r, out)
        }
        CMD_CACHE => {
            let r = ex.cache(req.offset, u64::from(req.len));
            reply_result(sh, req, r, out)
        }
        CMD_BLOCK_STATUS => block_status(sh, req, out),
        // `validate::check` lets no other command through.
        other => send_error(sh, req, EINVAL, &format!("unknown command {other}"), out),
    }
}

fn block_status(sh: &Shared, req: &Request, out: &mut Vec<u8>) -> Result<(), SessionError> {
    let Some(ctx) = sh.meta_context else {
        return send_error(sh, req, EINVAL, "no metadata context selected", out);
    };
    let extents = match sh.volume.block_status(req.offset, u64::from(req.len)) {
        Ok(x) => x,
        Err(e) => return send_volume_error(sh, req, &e, out),
    };
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut left = u64::from(req.len);
    let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(extents.len().min(reply::MAX_EXTENTS));
    for e in extents {
        if left == 0 || pairs.len() == reply::MAX_EXTENTS {
            break;
        }
        // Clipping to the request keeps every length within u32 (the request length is one).
        let l = e.length.min(left);
        if l == 0 {
            continue;
        }
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        match pairs.last_mut() {
            Some(last) if last.1 == flags => last.0 += l as u32,
            _ => pairs.push((l as u32, flags)),
        }
        left -= l;
        if req_one {
            break;
        }
    }
    if pairs.is_empty() {
        return send_error(
            sh,
            req,
            EIO,
            "the export reported no allocation status",
            out,
        );
    }
    reply::encode_block_status(out, req.cookie, ctx, &pairs);
    queued(sh, out)
}
