//! Sending replies, for the session (`session.rs`): queueing small replies in the worker's
//! pending buffer and writing them out in one vectored write before the worker could block, and
//! turning a volume error into an NBD error reply with its errno and a message that names no
//! server path (the log has the detail, under a request id the client also sees). A child
//! module of `session`, so it sees the session's private state.

use std::io::IoSlice;

use tracing::{debug, warn};

use super::{SessionError, Shared, COALESCE_MAX, PENDING_FLUSH};
use crate::nbd::request::Request;
use crate::nbd::{consts::*, reply};
use crate::server::export::{errno_for, error_chain};
use crate::server::stats::ErrorKind;
use crate::server::stream::write_all_vectored;
use crate::volume::VolumeError;

/// Queues a reply in `out`, or (when it is large) sends what is queued and then the reply itself.
pub(super) fn send(
    sh: &Shared,
    out: &mut Vec<u8>,
    bufs: &mut [IoSlice<'_>],
) -> Result<(), SessionError> {
    let len: usize = bufs.iter().map(|b| b.len()).sum();
    if len <= COALESCE_MAX {
        for b in bufs.iter() {
            out.extend_from_slice(b);
        }
        return queued(sh, out);
    }
    flush(sh, out)?;
    write_reply(sh, bufs)
}

/// Sends the queued replies once there are enough of them.
pub(super) fn queued(sh: &Shared, out: &mut Vec<u8>) -> Result<(), SessionError> {
    if out.len() >= PENDING_FLUSH {
        flush(sh, out)?;
    }
    Ok(())
}

/// Sends every queued reply.
pub(super) fn flush(sh: &Shared, out: &mut Vec<u8>) -> Result<(), SessionError> {
    if out.is_empty() {
        return Ok(());
    }
    let r = write_reply(sh, &mut [IoSlice::new(out)]);
    out.clear();
    r
}

pub(super) fn write_reply(sh: &Shared, bufs: &mut [IoSlice<'_>]) -> Result<(), SessionError> {
    let mut w = sh.lock_writer();
    write_all_vectored(&mut *w, bufs).map_err(|source| SessionError::Io {
        what: "sending a reply",
        source,
    })
}

/// A success without data is a simple reply even when structured replies were negotiated (the
/// spec allows either for everything but READ): 16 bytes instead of 20, and libnbd reads it with
/// one `recv` where a chunk header costs two — measured as one fewer syscall per WRITE on the
/// client, whose CPU is what limits 4 KiB random writes on two cores.
pub(super) fn send_ok(sh: &Shared, req: &Request, out: &mut Vec<u8>) -> Result<(), SessionError> {
    out.extend_from_slice(&reply::simple(0, req.cookie));
    queued(sh, out)
}

pub(super) fn send_error(
    sh: &Shared,
    req: &Request,
    errno: u32,
    msg: &str,
    out: &mut Vec<u8>,
) -> Result<(), SessionError> {
    debug!(
        command = command_name(req.command),
        offset = req.offset,
        len = req.len,
        errno,
        "request failed: {msg}"
    );
    if sh.structured {
        reply::encode_error_chunk(out, req.cookie, errno, msg);
    } else {
        out.extend_from_slice(&reply::simple(errno, req.cookie));
    }
    queued(sh, out)
}

/// Replies with a volume error: its errno from [`errno_for`] and a message for the client that
/// names the operation and the OS error but not the backing file (a server path) — the log line
/// has the whole chain under the request id the client sees.
pub(super) fn send_volume_error(
    sh: &Shared,
    req: &Request,
    e: &VolumeError,
    out: &mut Vec<u8>,
) -> Result<(), SessionError> {
    sh.stats.error(ErrorKind::Volume);
    let msg = match e {
        VolumeError::OutOfRange { .. } | VolumeError::ReadOnly { .. } | VolumeError::Invalid(_) => {
            error_chain(e)
        }
        _ => {
            let rid = format!("{:08x}", rand::random::<u32>());
            warn!(
                command = command_name(req.command),
                offset = req.offset,
                len = req.len,
                request = %rid,
                "request failed: {}",
                error_chain(e)
            );
            match e {
                VolumeError::Io { what, cause, .. } => {
                    format!("{what} failed: {cause} (request {rid})")
                }
                _ => format!("the volume failed (request {rid}; the server log has the details)"),
            }
        }
    };
    send_error(sh, req, errno_for(e), &msg, out)
}

pub(super) fn reply_result(
    sh: &Shared,
    req: &Request,
    r: Result<(), VolumeError>,
    out: &mut Vec<u8>,
) -> Result<(), SessionError> {
    match r {
        Ok(()) => send_ok(sh, req, out),
        Err(e) => send_volume_error(sh, req, &e, out),
    }
}
