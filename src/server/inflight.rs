//! Requests in flight on one connection, for volumes whose backend submits asynchronously (RBD).
//!
//! Without this, every request to such a volume held a worker thread for a network round trip:
//! the leader handed the reader to a follower, which encrypted, submitted, slept until librbd
//! woke it, then replied — two thread wake-ups per request, and never more requests in flight
//! than workers. Here the worker that read a WRITE encrypts it in its buffer, submits it
//! ([`Volume::submit_write`]) and goes on reading requests; the request's buffer travels with
//! it. A READ is submitted the same way into a spare buffer ([`Volume::submit_read`], which
//! decrypts on completion). librbd's completion only queues the outcome and wakes this
//! connection's replier thread, which sends every queued reply in one write. A WRITE's reply is
//! sent only after the write completed (the data is in librbd, so a later FLUSH covers it),
//! exactly as on the blocking path.
//!
//! Limits: only whole-sector requests of at most [`MAX_SUBMIT`] bytes, and WRITEs without FUA,
//! take this path (FUA waits for a flush anyway; partial sectors need a read-modify-write); at
//! most [`MAX_IN_FLIGHT`] per connection; each in-flight buffer's capacity is reserved from the
//! server's [`Budget`] without waiting. When any of these says no, the request takes the
//! blocking path, which waits (backpressure). A connection ends only after every submitted
//! request has completed and its reply was sent (or the socket was found dead): the volume
//! outlives them. Up to [`SPARE_BYTES`] of returned buffers are kept per connection for reuse;
//! they stay reserved in the budget while kept, and are kept only while the budget is at most
//! half used, so idle connections' spares count like buffers in flight, never push the server
//! past the budget and never starve requests on other connections.

use std::io::{self, IoSlice};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::budget::{Budget, WorkBuf, FREE_BYTES};
use super::export::{errno_for, error_chain};
use crate::nbd::consts::{CMD_READ, CMD_WRITE};
use crate::nbd::reply;
use crate::nbd::request::Request;
use crate::volume::{ReadOutcome, Volume, VolumeError};

/// Largest request submitted asynchronously: one worker's own buffer share.
pub(crate) const MAX_SUBMIT: usize = FREE_BYTES;
/// Submitted, unreplied requests per connection (fio and qemu queue 32 to 128 at most).
pub(crate) const MAX_IN_FLIGHT: usize = 128;
/// Replies up to this size are copied into the batch; larger read data goes out vectored.
const COALESCE_MAX: usize = 64 * 1024;
/// A batch of replies is sent once it reaches this size.
const PENDING_MAX: usize = 256 * 1024;
/// Bytes of returned buffers a connection keeps for reuse: enough for 1 MiB requests at queue
/// depth 8 plus the reading worker's own, so sequential I/O allocates (and zero-fills) nothing
/// per request — about what the 16 blocking workers' own buffers held before.
const SPARE_BYTES: usize = 16 << 20;

/// Called when a submitted request completes, before its reply is queued (the session's
/// latency and in-flight counters).
pub(crate) type OnDone = Box<dyn FnOnce() + Send>;

/// A completed request whose reply is owed.
struct Completed {
    cookie: u64,
    outcome: Outcome,
}

enum Outcome {
    Written(Result<(), VolumeError>),
    /// The buffer (plaintext on success) travels to the reply.
    Read {
        offset: u64,
        data: Vec<u8>,
        /// Budget bytes held for `data` until its reply is out.
        reserved: usize,
        result: Result<ReadOutcome, VolumeError>,
    },
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

impl State {
    /// Counts a new submission whose in-flight buffer holds `cost` bytes, if the limits allow
    /// it (`None` when `cost` is `None`: the spare buffer handed out is then the one in flight,
    /// and its capacity, at least `len`, is what is reserved). Returns a spare buffer and the
    /// bytes reserved. A spare's capacity is already reserved (see [`State::keep_spare`]): that
    /// reservation turns into the new one, so only the difference goes through the budget.
    fn admit(
        &mut self,
        budget: &Budget,
        len: usize,
        cost: Option<usize>,
    ) -> Option<(Vec<u8>, usize)> {
        if self.closed || self.owed >= MAX_IN_FLIGHT {
            return None;
        }
        let v = self.spare.pop().unwrap_or_default();
        let held = v.capacity();
        self.spare_bytes -= held;
        let cost = cost.unwrap_or(held).max(len);
        if cost > held && !budget.try_reserve(cost - held) {
            // Back where it was, still reserved.
            self.spare_bytes += held;
            self.spare.push(v);
            return None;
        }
        if cost < held {
            budget.release(held - cost);
        }
        self.owed += 1;
        Some((v, cost))
    }

    /// Keeps a returned buffer for reuse, within [`SPARE_BYTES`], or frees it. `reserved` is
    /// what the budget holds for it now; a kept buffer keeps exactly its capacity reserved, so
    /// the server's buffer memory stays within the budget (plus each worker's own share) however
    /// many connections keep spares, and spares alone never take more than half of it.
    fn keep_spare(&mut self, budget: &Budget, data: Vec<u8>, reserved: usize) {
        let cap = data.capacity();
        let fits = cap > 0 && cap <= MAX_SUBMIT && self.spare_bytes + cap <= SPARE_BYTES;
        // Kept only while the budget is at most half used (counting this buffer): a spare is a
        // cache, and requests on other connections come first.
        if !fits {
            budget.release(reserved);
            return;
        }
        budget.release(reserved);
        if !budget.try_reserve_cache(cap) {
            return;
        }
        self.spare_bytes += cap;
        self.spare.push(data);
    }
}

/// One connection's in-flight requests.
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

    fn push(&self, c: Completed) {
        self.lock().completed.push(c);
        self.wake.notify_one();
    }

    /// Submits `req` (a validated WRITE whose payload is in `buf[..len]`) if it may take the
    /// asynchronous path; `false` means "run it the blocking way". On `true` the payload's
    /// buffer left with the request and `buf` holds a spare one.
    pub(crate) fn try_submit(
        self: &Arc<Self>,
        vol: &Arc<Volume>,
        req: &Request,
        buf: &mut WorkBuf,
        on_done: Option<OnDone>,
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
        // The payload's buffer goes with the request (so its whole capacity is reserved); the
        // worker keeps a spare of at most FREE_BYTES, so its own accounting is unchanged.
        let Some((mut data, cost)) = self.lock().admit(&self.budget, len, Some(buf.capacity()))
        else {
            return false;
        };
        std::mem::swap(&mut **buf, &mut data);
        data.truncate(len);
        let me = Arc::clone(self);
        let cookie = req.cookie;
        vol.submit_write(
            req.offset,
            data,
            Box::new(move |data, result| {
                if let Some(f) = on_done {
                    f();
                }
                me.lock().keep_spare(&me.budget, data, cost);
                me.push(Completed {
                    cookie,
                    outcome: Outcome::Written(result),
                });
            }),
        );
        true
    }

    /// Submits `req` if it is a READ that may take the asynchronous path (as for WRITEs); its
    /// buffer is a spare one and comes back after the reply is sent.
    pub(crate) fn try_submit_read(
        self: &Arc<Self>,
        vol: &Arc<Volume>,
        req: &Request,
        on_done: Option<OnDone>,
    ) -> bool {
        let len = req.len as usize;
        if req.command != CMD_READ
            || len > MAX_SUBMIT
            || !vol.can_submit_read(req.offset, u64::from(req.len))
        {
            return false;
        }
        let Some((mut data, reserved)) = self.lock().admit(&self.budget, len, None) else {
            return false;
        };
        // The read overwrites the whole buffer: a reused one needs no clearing.
        data.resize(len, 0);
        let me = Arc::clone(self);
        let (cookie, offset) = (req.cookie, req.offset);
        vol.submit_read(
            offset,
            data,
            Box::new(move |data, result| {
                if let Some(f) = on_done {
                    f();
                }
                me.push(Completed {
                    cookie,
                    outcome: Outcome::Read {
                        offset,
                        data,
                        reserved,
                        result,
                    },
                })
            }),
        );
        true
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
        mut write: impl FnMut(&mut [IoSlice<'_>]) -> io::Result<()>,
    ) {
        let mut batch: Vec<Completed> = Vec::new();
        let mut out: Vec<u8> = Vec::new();
        let mut spent: Vec<(Vec<u8>, usize)> = Vec::new();
        let mut dead = false;
        let mut send = |out: &mut Vec<u8>, data: &[u8], dead: &mut bool| {
            if !*dead {
                if let Err(e) = write(&mut [IoSlice::new(out), IoSlice::new(data)]) {
                    tracing::debug!("cannot send replies: {e}");
                    *dead = true;
                }
            }
            out.clear();
        };
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
            for c in batch.drain(..) {
                match c.outcome {
                    Outcome::Written(Ok(())) => ok_reply(&mut out, c.cookie),
                    Outcome::Written(Err(e)) => error_reply(&mut out, structured, c.cookie, &e),
                    Outcome::Read {
                        result: Err(e),
                        data,
                        reserved,
                        ..
                    } => {
                        error_reply(&mut out, structured, c.cookie, &e);
                        spent.push((data, reserved));
                    }
                    Outcome::Read {
                        offset,
                        data,
                        reserved,
                        result: Ok(r),
                    } => {
                        let len = data.len() as u32;
                        if structured && r.all_zero {
                            out.extend_from_slice(&reply::offset_hole(c.cookie, offset, len));
                        } else {
                            if structured {
                                let h = reply::offset_data_header(c.cookie, offset, len);
                                out.extend_from_slice(&h);
                            } else {
                                out.extend_from_slice(&reply::simple(0, c.cookie));
                            }
                            if data.len() <= COALESCE_MAX {
                                out.extend_from_slice(&data);
                            } else {
                                send(&mut out, &data, &mut dead);
                            }
                        }
                        spent.push((data, reserved));
                    }
                }
                if out.len() >= PENDING_MAX {
                    send(&mut out, &[], &mut dead);
                }
            }
            if !out.is_empty() {
                send(&mut out, &[], &mut dead);
            }
            // Read buffers (and their reservations) go back once their replies are out.
            if !spent.is_empty() {
                let mut st = self.lock();
                for (data, reserved) in spent.drain(..) {
                    st.keep_spare(&self.budget, data, reserved);
                }
            }
        }
    }
}

impl Drop for InFlight {
    /// The spares' reservations go back with the connection.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        self.budget.release(st.spare_bytes);
    }
}

/// Starts the connection's replier thread in scope `s` (only when the volume submits
/// asynchronously, `async_io`), sending through `write`; `None` when there is none (then
/// `inflight` is closed and every request takes the blocking path).
pub(crate) fn spawn_replier<'s, W>(
    s: &'s std::thread::Scope<'s, '_>,
    inflight: &'s InFlight,
    async_io: bool,
    structured: bool,
    write: W,
) -> Option<std::thread::ScopedJoinHandle<'s, ()>>
where
    W: FnMut(&mut [IoSlice<'_>]) -> io::Result<()> + Send + 's,
{
    if !async_io {
        inflight.close();
        return None;
    }
    match std::thread::Builder::new()
        .name("nbd-replier".into())
        .spawn_scoped(s, move || inflight.reply_loop(structured, write))
    {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("could not start the replier thread, requests will wait: {e}");
            inflight.close();
            None
        }
    }
}

/// A simple reply whatever was negotiated, as `session::send_ok` says why.
fn ok_reply(out: &mut Vec<u8>, cookie: u64) {
    out.extend_from_slice(&reply::simple(0, cookie));
}

fn error_reply(out: &mut Vec<u8>, structured: bool, cookie: u64, e: &VolumeError) {
    let errno = errno_for(e);
    let msg = error_chain(e);
    tracing::debug!(errno, "request failed: {msg}");
    if structured {
        reply::encode_error_chunk(out, cookie, errno, &msg);
    } else {
        out.extend_from_slice(&reply::simple(errno, cookie));
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
    /// is given back (spares' share with the connection), and the replier returns only when
    /// nothing is owed.
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
            assert!(inf.try_submit(&vol, &write_req(i, i * 4096, 4096), &mut buf, None));
        }
        // Not eligible: FUA, partial sectors, too large for one submission.
        let mut fua = write_req(99, 0, 4096);
        fua.flags = CMD_FLAG_FUA;
        assert!(!inf.try_submit(&vol, &fua, &mut buf, None));
        assert!(!inf.try_submit(&vol, &write_req(98, 512, 4096), &mut buf, None));
        assert!(buf.ensure(MAX_SUBMIT + 4096, &|| false));
        assert!(!inf.try_submit(
            &vol,
            &write_req(97, 0, (MAX_SUBMIT + 4096) as u32),
            &mut buf,
            None
        ));
        buf.shrink();
        inf.close();
        let mut sent = Vec::new();
        inf.reply_loop(false, |bufs| {
            for b in bufs.iter() {
                sent.extend_from_slice(b);
            }
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
        // Returned buffers are kept for reuse, and their memory stays reserved in the budget
        // (so spares on many connections cannot grow past it) until the connection goes.
        let spare = inf.lock().spare_bytes;
        assert!(spare > 0, "returned buffers are kept for reuse");
        assert!(!budget.try_reserve(1 << 20), "spares hold budget");
        assert!(
            budget.try_reserve((1 << 20) - spare),
            "spares hold only their capacity"
        );
        budget.release((1 << 20) - spare);
        // A completion drops its handle just after pushing its reply: wait for the last one.
        let t0 = std::time::Instant::now();
        while Arc::strong_count(&inf) > 1 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(inf);
        assert!(budget.try_reserve(1 << 20), "the whole budget is back");
    }

    /// Submitted READs reply with their plaintext (or a hole chunk when structured and never
    /// written) once they complete; unaligned ones are left to the blocking path.
    #[test]
    fn submitted_reads_reply_with_their_data() {
        let vol = volume(Box::new(AsyncBackend::new(MemBackend::new())));
        let mut plain = vec![0u8; 8192];
        plain
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        vol.write(0, &mut plain.clone(), false).unwrap();
        let inf = InFlight::new(Budget::new(1 << 20));
        let read = |cookie, offset, len| Request {
            flags: 0,
            command: CMD_READ,
            cookie,
            offset,
            len,
        };
        // The completion hook (the session's latency counter) runs once per submitted read.
        let completed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hook = |c: &Arc<std::sync::atomic::AtomicUsize>| -> Option<OnDone> {
            let c = c.clone();
            Some(Box::new(move || {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }))
        };
        assert!(inf.try_submit_read(&vol, &read(1, 0, 8192), hook(&completed)));
        assert!(!inf.try_submit_read(&vol, &read(2, 100, 8192), hook(&completed)));
        inf.close();
        let mut sent = Vec::new();
        inf.reply_loop(false, |bufs| {
            bufs.iter().for_each(|b| sent.extend_from_slice(b));
            Ok(())
        });
        assert_eq!(&sent[..16], &reply::simple(0, 1));
        assert_eq!(&sent[16..], &plain[..]);
        assert_eq!(
            completed.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "only the submitted read completes"
        );

        let inf = InFlight::new(Budget::new(1 << 20));
        assert!(inf.try_submit_read(&vol, &read(3, 1 << 20, 4096), None));
        inf.close();
        let mut sent = Vec::new();
        inf.reply_loop(true, |bufs| {
            bufs.iter().for_each(|b| sent.extend_from_slice(b));
            Ok(())
        });
        assert_eq!(sent, reply::offset_hole(3, 1 << 20, 4096));
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
        assert!(!inf.try_submit(&vol, &write_req(1, 0, 4096), &mut buf, None));
        inf.close();
        inf.reply_loop(true, |_| panic!("nothing to send"));
    }
}
