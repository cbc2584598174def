//! Whole RADOS objects with versions, for the key store: read an object and its version, replace
//! it only if it is still at a version (`rados_write_op_assert_version` + `write_full` in one
//! write op, or `create(exclusive)` + `write_full` for a new one: the OSD applies both or
//! neither), stat, remove, and watch/notify to tell other clients an object changed. Every
//! `unsafe` block of this file carries a SAFETY note; the rest of the program sees a safe API.
//!
//! `rados_get_last_version` is per I/O context, so each call borrows a context of its own from a
//! small pool (all on one cluster connection): concurrent callers never read each other's version.

use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::ffi::{check, cstring, sys, Cluster, ConnectOptions, IoCtx};

const CREATE_EXCLUSIVE: c_int = 1;

/// What a watch calls for each notify, with its payload.
pub type OnNotify = Box<dyn Fn(&[u8]) + Send + Sync>;

/// The objects of one pool and namespace.
pub struct RadosPool {
    cluster: Arc<Cluster>,
    pool: String,
    namespace: CString,
    /// Idle I/O contexts (each set to `namespace`).
    idle: Mutex<Vec<Arc<IoCtx>>>,
}

impl RadosPool {
    /// Connects as the Ceph tools do (see [`ConnectOptions`]) and opens `pool`/`namespace`.
    pub fn connect(
        conf: Option<&Path>,
        client_id: Option<&str>,
        keyring: Option<&Path>,
        pool: &str,
        namespace: &str,
    ) -> io::Result<Self> {
        let opts = ConnectOptions {
            conf,
            client_id,
            keyring,
        };
        let p = RadosPool {
            cluster: Cluster::connect(&opts)?,
            pool: pool.to_string(),
            namespace: cstring("the RADOS namespace", namespace)?,
            idle: Mutex::new(Vec::new()),
        };
        // Open one context now, so a missing pool is reported at connect time.
        let ctx = p.context()?;
        p.give_back(ctx);
        Ok(p)
    }

    fn context(&self) -> io::Result<Arc<IoCtx>> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        let c = self.cluster.ioctx(&self.pool)?;
        // SAFETY: a valid context not yet shared with another thread; the string outlives the call
        // (librados copies it).
        unsafe { sys::rados_ioctx_set_namespace(c.raw(), self.namespace.as_ptr()) };
        Ok(c)
    }

    fn give_back(&self, c: Arc<IoCtx>) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// Runs `f` with a context no other thread uses meanwhile.
    fn with<R>(&self, f: impl FnOnce(sys::rados_ioctx_t) -> io::Result<R>) -> io::Result<R> {
        let c = self.context()?;
        let r = f(c.raw());
        self.give_back(c);
        r
    }

    /// The object's bytes and version (`None`: no such object). Refuses one larger than `max`.
    pub fn read(&self, oid: &str, max: u64) -> io::Result<Option<(Vec<u8>, u64)>> {
        let o = cstring("the object name", oid)?;
        self.with(|io| {
            let mut want = 64 << 10;
            loop {
                let mut buf = vec![0u8; want];
                // SAFETY: `buf` is writable for `want` bytes and lives across the call.
                let rc = unsafe {
                    sys::rados_read(io, o.as_ptr(), buf.as_mut_ptr().cast::<c_char>(), want, 0)
                };
                if rc == -libc::ENOENT {
                    return Ok(None);
                }
                let n = check(rc as i64)? as usize;
                // SAFETY: `io` is a context only this thread uses now; it reports the version
                // of the object the read above saw.
                let version = unsafe { sys::rados_get_last_version(io) };
                if n < want {
                    buf.truncate(n);
                    return Ok(Some((buf, version)));
                }
                // The buffer was filled: the object may be larger. Read it again, whole.
                let size = stat_size(io, &o)?.unwrap_or(0);
                if size > max {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the object is {size} bytes, more than the {max} it can be"),
                    ));
                }
                want = size as usize + 1;
            }
        })
    }

    /// The object's version (`None`: no such object).
    pub fn version(&self, oid: &str) -> io::Result<Option<u64>> {
        let o = cstring("the object name", oid)?;
        self.with(|io| {
            // SAFETY: as in `read`: this thread's context, right after its stat.
            Ok(stat_size(io, &o)?.map(|_| unsafe { sys::rados_get_last_version(io) }))
        })
    }

    /// Replaces the object by `bytes` if it is at version `expected` (`None`: if it does not
    /// exist). `Ok(None)`: it was not (another writer got there first); else its new version.
    pub fn replace(
        &self,
        oid: &str,
        expected: Option<u64>,
        bytes: &[u8],
    ) -> io::Result<Option<u64>> {
        let o = cstring("the object name", oid)?;
        self.with(|io| {
            // SAFETY: creates an empty operation, released below on every path.
            let op = unsafe { sys::rados_create_write_op() };
            if op.is_null() {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            // SAFETY: `op` is valid; `bytes` outlives the operate call below (librados copies
            // the buffer into the op's bufferlist at once).
            let rc = unsafe {
                match expected {
                    Some(v) => sys::rados_write_op_assert_version(op, v),
                    None => sys::rados_write_op_create(op, CREATE_EXCLUSIVE, ptr::null()),
                }
                sys::rados_write_op_write_full(op, bytes.as_ptr().cast::<c_char>(), bytes.len());
                let rc = sys::rados_write_op_operate(op, io, o.as_ptr(), ptr::null_mut(), 0);
                sys::rados_release_write_op(op);
                rc
            };
            match -rc {
                // Newer (ERANGE) or older (EOVERFLOW) than asserted, gone, or already there.
                libc::ERANGE | libc::EOVERFLOW | libc::ENOENT | libc::EEXIST => Ok(None),
                _ => {
                    check(rc as i64)?;
                    // SAFETY: this thread's context, right after its write.
                    Ok(Some(unsafe { sys::rados_get_last_version(io) }))
                }
            }
        })
    }

    /// Removes the object (missing is fine).
    pub fn remove(&self, oid: &str) -> io::Result<()> {
        let o = cstring("the object name", oid)?;
        self.with(|io| {
            // SAFETY: valid context and NUL-terminated name.
            let rc = unsafe { sys::rados_remove(io, o.as_ptr()) };
            if rc == -libc::ENOENT {
                return Ok(());
            }
            check(rc as i64).map(|_| ())
        })
    }

    /// Tells every watcher of `oid` that something changed (`payload` says what) and waits up to
    /// `timeout_ms` for their acknowledgements; a watcher that does not answer in time (a dead
    /// client whose watch has not expired yet) makes this return `TimedOut`.
    pub fn notify(&self, oid: &str, payload: &[u8], timeout_ms: u64) -> io::Result<()> {
        let o = cstring("the object name", oid)?;
        self.with(|io| {
            let mut reply: *mut c_char = ptr::null_mut();
            let mut reply_len: usize = 0;
            // SAFETY: valid context, name and payload; the reply buffer librados allocates is
            // freed below.
            let rc = unsafe {
                sys::rados_notify2(
                    io,
                    o.as_ptr(),
                    payload.as_ptr().cast::<c_char>(),
                    c_int::try_from(payload.len()).unwrap_or(0),
                    timeout_ms,
                    &mut reply,
                    &mut reply_len,
                )
            };
            if !reply.is_null() {
                // SAFETY: allocated by librados for us.
                unsafe { sys::rados_buffer_free(reply) };
            }
            check(rc as i64).map(|_| ())
        })
    }

    /// Watches `oid`: every notify on it calls `on_notify` with its payload (then is
    /// acknowledged); a broken watch (e.g. the connection to the OSD was lost long enough)
    /// clears [`Watch::healthy`]. The watch ends when the `Watch` is dropped.
    pub fn watch(&self, oid: &str, on_notify: OnNotify) -> io::Result<Watch> {
        let ctx = self.context()?;
        let state = Arc::new(WatchState {
            oid: cstring("the object name", oid)?,
            io: AtomicU64::new(ctx.raw() as u64),
            cookie: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            on_notify,
        });
        let mut cookie = 0u64;
        // SAFETY: `state` is kept alive by the returned Watch until after unwatch2 and
        // watch_flush, so the callbacks never see a dangling pointer; the context `ctx` is owned
        // by the Watch too and used by no one else.
        let rc = unsafe {
            sys::rados_watch2(
                ctx.raw(),
                state.oid.as_ptr(),
                &mut cookie,
                Some(on_watch_notify),
                Some(on_watch_error),
                Arc::as_ptr(&state) as *mut c_void,
            )
        };
        check(rc as i64)?;
        state.cookie.store(cookie, Ordering::SeqCst);
        Ok(Watch { ctx, state, cookie })
    }
}

/// `rados_stat`'s size; `None` for a missing object.
fn stat_size(io: sys::rados_ioctx_t, o: &CString) -> io::Result<Option<u64>> {
    let mut size = 0u64;
    let mut mtime: libc::time_t = 0;
    // SAFETY: valid context, name and out-pointers.
    let rc = unsafe { sys::rados_stat(io, o.as_ptr(), &mut size, &mut mtime) };
    if rc == -libc::ENOENT {
        return Ok(None);
    }
    check(rc as i64)?;
    Ok(Some(size))
}

struct WatchState {
    oid: CString,
    /// The watch's context (a `rados_ioctx_t`), for acknowledging notifies.
    io: AtomicU64,
    cookie: AtomicU64,
    healthy: AtomicBool,
    on_notify: OnNotify,
}

unsafe extern "C" fn on_watch_notify(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    _notifier: u64,
    data: *mut c_void,
    len: usize,
) {
    // SAFETY: `arg` is the WatchState the Watch keeps alive until the callbacks are flushed.
    let state = unsafe { &*(arg as *const WatchState) };
    let payload = if data.is_null() || len == 0 {
        &[][..]
    } else {
        // SAFETY: librados passes `len` readable bytes at `data` for the callback's duration.
        unsafe { std::slice::from_raw_parts(data as *const u8, len) }
    };
    (state.on_notify)(payload);
    let io = state.io.load(Ordering::SeqCst) as sys::rados_ioctx_t;
    // SAFETY: the watch's own context and object; acknowledging from the callback is the
    // documented pattern. An error only makes the notifier wait for its timeout.
    unsafe { sys::rados_notify_ack(io, state.oid.as_ptr(), notify_id, handle, ptr::null(), 0) };
}

unsafe extern "C" fn on_watch_error(arg: *mut c_void, _cookie: u64, _err: c_int) {
    // SAFETY: as in `on_watch_notify`.
    let state = unsafe { &*(arg as *const WatchState) };
    state.healthy.store(false, Ordering::SeqCst);
}

/// A registered watch; unregistered (and its callbacks flushed) on drop.
pub struct Watch {
    ctx: Arc<IoCtx>,
    state: Arc<WatchState>,
    cookie: u64,
}

impl Watch {
    /// Whether the watch is registered and has not reported an error: while it is, every notify
    /// on the object reaches us.
    pub fn healthy(&self) -> bool {
        // SAFETY: the watch's context and cookie.
        let rc = unsafe { sys::rados_watch_check(self.ctx.raw(), self.cookie) };
        rc >= 0 && self.state.healthy.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: unregisters our cookie, then waits until no callback runs any more, so the
        // state may be freed afterwards.
        unsafe {
            sys::rados_unwatch2(self.ctx.raw(), self.cookie);
            sys::rados_watch_flush(self.ctx.cluster().raw());
        }
        let _ = &self.state;
    }
}
