//! The process-wide SIGBUS guard for [`super::Mapping`]s: a lock-free registry of our mapped
//! ranges, and a signal handler that turns a fault inside one of them into "this mapping is
//! poisoned" instead of a crash.
//!
//! Touching a shared file mapping raises SIGBUS when the page is past the end of the file (the
//! file was truncated by someone else) or cannot be read (an I/O error below). The handler looks
//! the faulting address up in the registry; if it is ours, it counts the fault on that mapping,
//! then maps an anonymous zero page over the faulting page (`MAP_FIXED`), so the interrupted load
//! completes (reading zeroes) when the handler returns. The reader checks the count after it is
//! done and throws away what it read (see `Mapping::read_with`). A store faults too — on a file
//! system out of space (the fault that would allocate a hole), an I/O error, a truncated file —
//! so the page mapped over a *writable* mapping's faulting page is writable: the retried store
//! lands in that throw-away page instead of faulting again forever, and the writer, seeing the
//! count, writes the range with `pwrite`, which returns the real error (see
//! `Mapping::write_with`). An address that is not ours goes
//! to the handler that was installed before (Rust's std installs one for stack overflows), or,
//! if there was none, the default action is restored, so the fault repeats and kills the process
//! as it would have without us.
//!
//! Everything the handler does is async-signal-safe: atomic loads and stores, `mmap` and
//! `sigaction` (both plain system calls in glibc and musl; `mmap` is not on POSIX's list, but on
//! Linux it takes no user-space lock), and `errno` is saved and restored around them.

use std::ffi::c_void;
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

/// Most mappings registered at once (each volume has at most a few; see `FileBackend`).
const SLOTS: usize = 128;

/// One registered range. Written only under [`WRITERS`]; read by the handler without a lock, as
/// a sequence lock: `seq` is odd while the range changes, and a reader that sees it odd or
/// changed ignores the slot. A slot that changes while a fault is handled can only belong to a
/// mapping being created or destroyed, which no one is touching, so ignoring it is right.
struct Slot {
    seq: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    /// Whether the range is mapped writable (then so is the page the handler maps over a fault).
    writable: AtomicBool,
    faults: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            seq: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            writable: AtomicBool::new(false),
            faults: AtomicU64::new(0),
        }
    }

    fn set(&self, start: usize, len: usize, writable: bool) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.start.store(start, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.writable.store(writable, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// Serializes registering and unregistering (never taken by the handler).
static WRITERS: Mutex<()> = Mutex::new(());
/// Faults handled in all our mappings since the process started.
static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
/// The SIGBUS action before ours, to chain to for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Faults our handler absorbed, process-wide (for tests and diagnostics).
pub fn faults_handled() -> u64 {
    FAULTS.load(Ordering::SeqCst)
}

/// The system's page size, as the handler uses it.
pub(super) fn page_size() -> usize {
    PAGE.load(Ordering::Relaxed)
}

/// Installs the handler once per process; later calls return the first outcome.
pub(super) fn install() -> io::Result<()> {
    INSTALL.call_once(|| {
        let r = install_once();
        let _ = INSTALLED.set(r.map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL)));
    });
    match INSTALLED.get() {
        Some(Ok(())) => Ok(()),
        Some(Err(code)) => Err(io::Error::from_raw_os_error(*code)),
        None => Err(io::Error::other(
            "SIGBUS handler installation did not finish",
        )),
    }
}

fn install_once() -> io::Result<()> {
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, empty mask, no flags).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: querying the current action into a struct we own.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Stored before ours is installed, so the handler always finds it.
    let _ = PREVIOUS.set(old);
    // SAFETY: as above, a valid starting value.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) = on_sigbus;
    new.sa_sigaction = handler as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: the mask is ours to initialise.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // SAFETY: installs a handler whose body is async-signal-safe (see the module doc).
    if unsafe { libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Registers `[start, start+len)`, mapped writable or not; `None` when every slot is taken (then
/// do not map).
pub(super) fn register(start: usize, len: usize, writable: bool) -> Option<usize> {
    let _w = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
    let i = REGISTRY
        .iter()
        .position(|s| s.len.load(Ordering::Relaxed) == 0)?;
    REGISTRY[i].faults.store(0, Ordering::SeqCst);
    REGISTRY[i].set(start, len, writable);
    Some(i)
}

/// Forgets slot `i`; call before unmapping its range.
pub(super) fn unregister(i: usize) {
    let _w = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
    REGISTRY[i].set(0, 0, false);
}

/// Faults handled in slot `i` since it was registered.
pub(super) fn faults_in(i: usize) -> u64 {
    REGISTRY[i].faults.load(Ordering::SeqCst)
}

/// The registered slot whose range holds `addr`, and whether it is writable. Lock-free; called
/// from the handler.
fn find(addr: usize) -> Option<(usize, bool)> {
    for (i, s) in REGISTRY.iter().enumerate() {
        let before = s.seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            continue;
        }
        let start = s.start.load(Ordering::Relaxed);
        let len = s.len.load(Ordering::Relaxed);
        let writable = s.writable.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if s.seq.load(Ordering::Relaxed) != before {
            continue;
        }
        if len > 0 && addr >= start && addr - start < len {
            return Some((i, writable));
        }
    }
    None
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; for SIGBUS `si_addr`
    // is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some((i, writable)) = find(addr) {
        // Poison first: a reader that later sees the zero page also sees the count (see
        // `Mapping::read_with`).
        REGISTRY[i].faults.fetch_add(1, Ordering::SeqCst);
        FAULTS.fetch_add(1, Ordering::SeqCst);
        let page = page_size();
        let at = (addr & !(page - 1)) as *mut c_void;
        // SAFETY: errno is this thread's; we put it back before returning to the interrupted code.
        let errno = unsafe { *libc::__errno_location() };
        // A store must be able to complete on the replacement page, or it faults again forever.
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: `at` is a page inside a live mapping of ours: the faulting thread is inside
        // `Mapping::read_with` or `write_with`, which keep the mapping alive, and a registered
        // range is never unmapped before it is unregistered. Replacing that page with an
        // anonymous zero page (as writable as the mapping was) changes no memory anyone else
        // owns: what is stored there is thrown away with the mapping.
        let r = unsafe {
            libc::mmap(
                at,
                page,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
        if r != libc::MAP_FAILED {
            return;
        }
    }
    chain(sig, info, ctx);
}

/// Hands a fault that is not ours to the previous action, or restores the default action and
/// returns, so the faulting instruction runs again and the default action (a core dump) happens.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    if let Some(prev) = PREVIOUS.get() {
        let h = prev.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO action's handler has this signature, and we pass it what
                // the kernel passed us.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask; sigaction is async-signal-safe.
    unsafe {
        let dfl: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
    }
}
