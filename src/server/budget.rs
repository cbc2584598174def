//! The server-wide budget for request buffers, and the per-worker buffer that draws on it.
//!
//! Each worker reuses one buffer for request payloads and read data. Up to [`FREE_BYTES`] of it is
//! the worker's own (the common case: requests of 1 MiB or less never touch the budget); anything
//! larger is reserved from the [`Budget`] first and given back, with the memory, as soon as the
//! request is done. So a client that sends maximum-size requests and stops reading replies pins
//! at most the budget across all connections, not 32 MiB per worker (DESIGN.md, issue #9).
//! A WRITE payload's buffer grows as the payload arrives, so a header without its payload pins
//! nothing. When the budget is used up a worker waits for it (backpressure on that connection);
//! after [`BUDGET_WAIT`] the request fails with ENOMEM instead of hanging forever.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes of buffer each worker keeps without asking the budget.
pub(crate) const FREE_BYTES: usize = 1 << 20;
/// How long a request waits for buffer memory before it fails with ENOMEM.
pub(crate) const BUDGET_WAIT: Duration = Duration::from_secs(30);

/// How often a waiting request checks whether its connection is closing.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Buffer memory beyond each worker's [`FREE_BYTES`], shared by every connection.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: Mutex::new(0),
            freed: Condvar::new(),
        })
    }

    /// Bytes reserved now, and the limit (for status and metrics).
    pub(crate) fn in_use(&self) -> (usize, usize) {
        (
            *self.used.lock().unwrap_or_else(|p| p.into_inner()),
            self.limit,
        )
    }

    /// Reserves `n` bytes, waiting up to `wait` for other requests to give memory back, and
    /// giving up early once `cancel` says so (the connection is closing or its peer left).
    fn reserve(&self, n: usize, wait: Duration, cancel: &dyn Fn() -> bool) -> bool {
        if n > self.limit {
            return false;
        }
        let deadline = Instant::now() + wait;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // Checked even when memory is free: many waiters wake together, and one whose
            // client has left must not take memory a live client waits for.
            if cancel() {
                return false;
            }
            if *used + n <= self.limit {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Wake up now and then to notice a closing connection: nobody notifies for that.
            used = self
                .freed
                .wait_timeout(used, left.min(CANCEL_POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *used += n;
        true
    }

    /// Reserves `n` bytes only if they are free now.
    pub(crate) fn try_reserve(&self, n: usize) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if n > self.limit || *used + n > self.limit {
            return false;
        }
        *used += n;
        true
    }

    /// Reserves `n` bytes for a cached (idle) buffer: only while at least half the budget stays
    /// free, so buffers kept for reuse on idle connections never starve requests elsewhere.
    pub(crate) fn try_reserve_cache(&self, n: usize) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if *used + n > self.limit / 2 {
            return false;
        }
        *used += n;
        true
    }

    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        *self.used.lock().unwrap()
    }
}

/// A worker's reusable buffer; dereferences to its bytes.
#[derive(Debug)]
pub(crate) struct WorkBuf {
    data: Vec<u8>,
    /// Bytes reserved from the budget for this buffer (its capacity beyond FREE_BYTES).
    reserved: usize,
    budget: Arc<Budget>,
}

impl WorkBuf {
    pub(crate) fn new(budget: Arc<Budget>) -> Self {
        Self {
            data: Vec::new(),
            reserved: 0,
            budget,
        }
    }

    /// Makes the buffer at least `len` bytes long, reserving budget for what exceeds
    /// [`FREE_BYTES`]; `false` if the budget stayed exhausted for [`BUDGET_WAIT`].
    pub(crate) fn ensure(&mut self, len: usize, cancel: &dyn Fn() -> bool) -> bool {
        if self.data.len() >= len {
            return true;
        }
        let need = len.saturating_sub(FREE_BYTES);
        if need > self.reserved {
            if !self
                .budget
                .reserve(need - self.reserved, BUDGET_WAIT, cancel)
            {
                return false;
            }
            self.reserved = need;
        }
        self.data.resize(len, 0);
        true
    }

    /// After a large request: gives the memory beyond [`FREE_BYTES`] back to the system and the
    /// budget.
    pub(crate) fn shrink(&mut self) {
        if self.data.capacity() > FREE_BYTES {
            self.data.truncate(FREE_BYTES);
            self.data.shrink_to(FREE_BYTES);
        }
        let r = std::mem::take(&mut self.reserved);
        self.budget.release(r);
    }
}

impl Drop for WorkBuf {
    fn drop(&mut self) {
        self.budget.release(self.reserved);
    }
}

impl std::ops::Deref for WorkBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.data
    }
}

impl std::ops::DerefMut for WorkBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_draw_on_the_budget_and_give_it_back() {
        let b = Budget::new(8 << 20);
        let no = &|| false;
        let mut w = WorkBuf::new(b.clone());
        assert!(w.ensure(FREE_BYTES, no));
        assert_eq!(b.used(), 0, "the free part is not counted");
        assert!(w.ensure(FREE_BYTES + (4 << 20), no));
        assert_eq!(b.used(), 4 << 20);
        let mut other = WorkBuf::new(b.clone());
        assert!(other.ensure(FREE_BYTES + (4 << 20), no));
        assert_eq!(b.used(), 8 << 20);
        w.shrink();
        assert_eq!(b.used(), 4 << 20);
        assert!(w.capacity() <= FREE_BYTES);
        drop(other);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn cached_buffers_take_at_most_half_the_budget() {
        let b = Budget::new(8 << 20);
        assert!(b.try_reserve_cache(3 << 20));
        assert!(!b.try_reserve_cache(2 << 20), "past half: not for a cache");
        assert!(b.try_reserve_cache(1 << 20));
        assert!(b.try_reserve(4 << 20), "requests still get the other half");
        assert!(!b.try_reserve_cache(1), "nor once requests hold the rest");
        b.release(8 << 20);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn an_exhausted_budget_waits_then_refuses() {
        let b = Budget::new(2 << 20);
        let no = || false;
        assert!(b.reserve(2 << 20, Duration::ZERO, &no));
        let t = Instant::now();
        assert!(!b.reserve(1, Duration::from_millis(50), &no));
        assert!(t.elapsed() >= Duration::from_millis(50));
        let b2 = b.clone();
        let h = std::thread::spawn(move || b2.reserve(1 << 20, Duration::from_secs(60), &|| false));
        std::thread::sleep(Duration::from_millis(20));
        b.release(2 << 20);
        assert!(h.join().unwrap(), "a waiter gets memory once it is freed");
        assert!(
            !b.reserve(3 << 20, Duration::from_secs(60), &no),
            "over the limit: never"
        );
        assert!(
            !b.reserve(2 << 20, Duration::from_secs(60), &|| true),
            "a closing connection stops waiting"
        );
    }
}
