//! Writes in flight on one connection, for volumes whose backend submits asynchronously (RBD).
//!
//! Without this, every WRITE to such a volume held a worker thread for a network round trip: the
//! leader handed the reader to a follower, encrypted, submitted, slept until librbd woke it, then
//! replied — two thread wake-ups per request, and never more requests in flight than workers.
//! Here the worker that read the WRITE encrypts it in its buffer, submits it
//! ([`Volume::submit_write`]) and goes on reading requests; the request's buffer travels with
//! it. librbd's completion only queues the outcome and wakes this connection's replier thread,
//! which sends every queued reply in one write. A reply is sent only after the write completed
//! (the data is in librbd, so a later FLUSH covers it), exactly as on the blocking path.
//!
//! Limits: only whole-sector WRITEs of at most [`MAX_SUBMIT`] bytes without FUA take this path
//! (FUA waits for a flush anyway; partial sectors need a read-modify-write), at most
//! [`MAX_IN_FLIGHT`] per connection, and each in-flight buffer's bytes are reserved from the
//! server's [`Budget`] without waiting: when either is exhausted the request takes the blocking
//! path, which waits (backpressure). A connection ends only after every submitted write has
//! completed and its reply was sent (or the socket was found dead): the volume outlives them.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::budget::{Budget, WorkBuf, FREE_BYTES};
use super::export::{errno_for, error_chain};
use crate::nbd::consts::CMD_WRITE;
use crate::nbd::reply;
use crate::nbd::request::Request;
use crate::volume::{Volume, VolumeError};

/// Largest WRITE submitted asynchronously: one worker's own buffer share.
pub(crate) const MAX_SUBMIT: usize = FREE_BYTES;
/// Submitted, unreplied WRITEs per connection (fio and qemu queue 32 to 128 at most).
pub(crate) const MAX_IN_FLIGHT: usize = 128;
/// Bytes of returned buffers a connection keeps for reuse.
const SPARE_BYTES: usize = 4 << 20;

/// A completed write whose reply is owed.
struct Completed {
    cookie: u64,
    result: Result<(), VolumeError>,
}

#[derive(Default)]
struct State {
    /// Submitted and not yet replied to.
    owed: usize,
    completed: Vec<Completed>,
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
    /// No more submissions (the connection's workers have stopped).
    closed: bool,
}

/// One connection's in-flight writes.
pub(crate) struct InFlight {
    state: Mutex<State>,
    wake: Condvar,
    budget: Arc<Budget>,
}

impl InFlight {
    pub(crate) fn new(budget: Arc<Budget>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            budget,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Submits `req` (a validated WRITE whose payload is in `buf[..len]`) if it may take the
    /// asynchronous path; `false` means "run it the blocking way". On `true` the payload's
    /// buffer left with the request and `buf` holds a spare one.
    pub(crate) fn try_submit(
        self: &Arc<Self>,
        vol: &Arc<Volume>,
        req: &Request,
        buf: &mut WorkBuf,
    ) -> bool {
        let len = req.len as usize;
        if req.command != CMD_WRITE
            || req.fua()
            || len > MAX_SUBMIT
            || buf.len() < len
            || !vol.can_submit_write(req.offset, u64::from(req.len))
        {
            return false;
        }
        let mut spare = {
            let mut st = self.lock();
            if st.closed || st.owed >= MAX_IN_FLIGHT {
                return false;
            }
            if !self.budget.try_reserve(len) {
                return false;
            }
            st.owed += 1;
            let v = st.spare.pop().unwrap_or_default();
            st.spare_bytes -= v.capacity();
            v
        };
        // The payload's buffer goes with the request; the worker keeps a spare of up to
        // FREE_BYTES, so its own budget accounting is unchanged.
        std::mem::swap(&mut **buf, &mut spare);
        let mut data = spare;
        data.truncate(len);
        let me = Arc::clone(self);
        let cookie = req.cookie;
        vol.submit_write(
            req.offset,
            data,
            Box::new(move |data, result| me.complete(cookie, len, data, result)),
        );
        true
    }

    /// A submitted write completed (on the storage's thread): queue its reply, keep its buffer.
    fn complete(
        &self,
        cookie: u64,
        reserved: usize,
        data: Vec<u8>,
        result: Result<(), VolumeError>,
    ) {
        {
            let mut st = self.lock();
            st.completed.push(Completed { cookie, result });
            let cap = data.capacity();
            if cap > 0 && cap <= MAX_SUBMIT && st.spare_bytes + cap <= SPARE_BYTES {
                st.spare_bytes += cap;
                st.spare.push(data);
            }
        }
        self.budget.release(reserved);
        self.wake.notify_one();
    }

    /// No more submissions: [`InFlight::reply_loop`] returns once every owed reply is sent.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// The connection's replier: waits for completions and sends their replies (`structured` or
    /// simple) through `write`, batched, until closed with nothing owed. After a failed write
    /// (the socket is gone) it only counts the remaining completions down.
    pub(crate) fn reply_loop(
        &self,
        structured: bool,
        mut write: impl FnMut(&[u8]) -> io::Result<()>,
    ) {
        let mut batch: Vec<Completed> = Vec::new();
        let mut out: Vec<u8> = Vec::new();
        let mut dead = false;
        loop {
            {
                let mut st = self.lock();
                while st.completed.is_empty() && !(st.closed && st.owed == 0) {
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.completed.is_empty() {
                    return;
                }
                std::mem::swap(&mut batch, &mut st.completed);
                st.owed -= batch.len();
            }
            out.clear();
            for c in batch.drain(..) {
                match c.result {
                    Ok(()) if structured => out.extend_from_slice(&reply::none(c.cookie)),
                    Ok(()) => out.extend_from_slice(&reply::simple(0, c.cookie)),
                    Err(e) => {
                        let errno = errno_for(&e);
                        tracing::debug!(
                            command = "WRITE",
                            errno,
                            "request failed: {}",
                            error_chain(&e)
                        );
                        if structured {
                            reply::encode_error_chunk(&mut out, c.cookie, errno, &error_chain(&e));
                        } else {
                            out.extend_from_slice(&reply::simple(errno, c.cookie));
                        }
                    }
                }
            }
            if !dead {
                if let Err(e) = write(&out) {
                    tracing::debug!("cannot send write replies: {e}");
                    dead = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::testing::{AsyncBackend, MemBackend};
    use crate::backend::Backend;
    use crate::crypto::XtsKey;
    use crate::nbd::consts::CMD_FLAG_FUA;
    use crate::volume::VolumeHeader;

    fn volume(backend: Box<dyn Backend>) -> Arc<Volume> {
        let h = VolumeHeader::new(uuid::Uuid::new_v4(), 4 << 20, 4096);
        Arc::new(Volume::with_key(backend, h, &XtsKey::generate(), false).unwrap())
    }

    fn write_req(cookie: u64, offset: u64, len: u32) -> Request {
        Request {
            flags: 0,
            command: CMD_WRITE,
            cookie,
            offset,
            len,
        }
    }

    /// Submitted writes land, every reply is sent once (after its write completed), the budget
    /// is given back, and the replier returns only when nothing is owed.
    #[test]
    fn every_submitted_write_gets_one_reply_after_it_landed() {
        let mem = MemBackend::new();
        let backend = AsyncBackend::new(mem.clone()).with_delay(Duration::from_millis(20));
        let vol = volume(Box::new(backend));
        let budget = Budget::new(1 << 20);
        let inf = InFlight::new(budget.clone());
        let mut buf = WorkBuf::new(budget.clone());
        let n = 40u64;
        for i in 0..n {
            assert!(buf.ensure(4096, &|| false));
            buf[..4096].fill(i as u8 + 1);
            assert!(inf.try_submit(&vol, &write_req(i, i * 4096, 4096), &mut buf));
        }
        // Not eligible: FUA, partial sectors, too large for one submission.
        let mut fua = write_req(99, 0, 4096);
        fua.flags = CMD_FLAG_FUA;
        assert!(!inf.try_submit(&vol, &fua, &mut buf));
        assert!(!inf.try_submit(&vol, &write_req(98, 512, 4096), &mut buf));
        assert!(buf.ensure(MAX_SUBMIT + 4096, &|| false));
        assert!(!inf.try_submit(
            &vol,
            &write_req(97, 0, (MAX_SUBMIT + 4096) as u32),
            &mut buf
        ));
        buf.shrink();
        inf.close();
        let mut sent = Vec::new();
        inf.reply_loop(false, |b| {
            sent.extend_from_slice(b);
            Ok(())
        });
        assert_eq!(sent.len(), n as usize * 16, "one simple reply per write");
        let mut cookies: Vec<u64> = sent
            .chunks(16)
            .map(|r| {
                assert_eq!(&r[4..8], &[0, 0, 0, 0], "no error");
                u64::from_be_bytes(r[8..16].try_into().unwrap())
            })
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, (0..n).collect::<Vec<_>>());
        for i in 0..n {
            let mut got = vec![0u8; 4096];
            vol.read(i * 4096, &mut got).unwrap();
            assert!(got.iter().all(|&b| b == i as u8 + 1), "write {i} landed");
        }
        assert!(budget.try_reserve(1 << 20), "the whole budget is back");
    }

    /// With the budget used up, a write is not submitted (it takes the blocking path).
    #[test]
    fn no_budget_means_no_submission() {
        let vol = volume(Box::new(AsyncBackend::new(MemBackend::new())));
        let budget = Budget::new(1 << 20);
        assert!(budget.try_reserve(1 << 20));
        let inf = InFlight::new(budget.clone());
        let mut buf = WorkBuf::new(Budget::new(0));
        assert!(buf.ensure(4096, &|| false));
        assert!(!inf.try_submit(&vol, &write_req(1, 0, 4096), &mut buf));
        inf.close();
        inf.reply_loop(true, |_| panic!("nothing to send"));
    }
}
