//! Memory protection for key material: heap boxes whose pages are locked in RAM (`mlock`, so they
//! are never written to swap) and excluded from core dumps (`MADV_DONTDUMP`), zeroized before they
//! are freed — [`LockedBox`] for plain byte arrays built in place, [`LockedBytes`] for byte
//! buffers whose length is known only at run time, [`LockedValue`] for any type (a cipher's key
//! schedule) — and a process-wide switch that turns core dumps off.
//!
//! Locking is best effort: an unprivileged process may have a small `RLIMIT_MEMLOCK`, and refusing
//! to run would help nobody, so a failed `mlock` is logged once and the box still works.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroize;

/// Types for which all-zero bytes are a valid value and which own no heap memory, so they can be
/// built in zeroed locked pages and wiped there.
///
/// # Safety
/// Implement only for plain-old-data types: every bit pattern of zeroes must be a valid value.
pub unsafe trait Zeroable {}
// SAFETY: byte and word arrays are valid when zeroed and own nothing.
unsafe impl<const N: usize> Zeroable for [u8; N] {}
// SAFETY: as above.
unsafe impl<const N: usize> Zeroable for [[u8; 16]; N] {}
// SAFETY: as above.
unsafe impl<const N: usize> Zeroable for [u64; N] {}

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// A `T` on its own locked, non-dumpable pages, zeroized on drop. Build it in place with
/// [`LockedBox::new_with`] so the secret never sits in a temporary on the stack.
pub struct LockedBox<T: Zeroize + Zeroable> {
    ptr: NonNull<T>,
    layout: Layout,
    locked: bool,
}

// SAFETY: LockedBox owns its T exclusively (like Box<T>), so it is Send/Sync exactly when T is.
unsafe impl<T: Zeroize + Zeroable + Send> Send for LockedBox<T> {}
// SAFETY: shared access only hands out &T, as Box<T> does.
unsafe impl<T: Zeroize + Zeroable + Sync> Sync for LockedBox<T> {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p <= 0 {
        4096
    } else {
        p as usize
    }
}

/// Allocates zeroed whole pages for a `T`, marks them non-dumpable and locks them (best effort).
/// Returns the pointer, the layout (to free with) and whether the lock succeeded.
fn alloc_locked_pages<T>() -> (NonNull<T>, Layout, bool) {
    let (ptr, layout, locked) =
        alloc_locked_bytes(std::mem::size_of::<T>(), std::mem::align_of::<T>());
    (ptr.cast(), layout, locked)
}

/// Allocates zeroed whole pages holding at least `size` bytes (at least one page) aligned to
/// `align` (and to a page), marks them non-dumpable and locks them (best effort).
fn alloc_locked_bytes(size: usize, align: usize) -> (NonNull<u8>, Layout, bool) {
    let page = page_size();
    let size = size.max(1).div_ceil(page) * page;
    let align = page.max(align);
    let layout = Layout::from_size_align(size, align).expect("page-rounded layout is valid");
    // SAFETY: layout has a non-zero size.
    let raw = unsafe { alloc_zeroed(layout) };
    let Some(ptr) = NonNull::new(raw) else {
        std::alloc::handle_alloc_error(layout);
    };
    // SAFETY: the range [ptr, ptr+size) is our own allocation; mlock/madvise only change
    // paging attributes of it.
    let locked = unsafe {
        libc::madvise(ptr.as_ptr().cast(), size, libc::MADV_DONTDUMP);
        libc::mlock(ptr.as_ptr().cast(), size) == 0
    };
    if !locked && !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "could not lock key memory (mlock: {}); keys may be swapped out — raise RLIMIT_MEMLOCK to avoid this",
            std::io::Error::last_os_error()
        );
    }
    (ptr, layout, locked)
}

/// Wipes, unlocks and frees pages from [`alloc_locked_pages`] (the value in them already dropped).
///
/// # Safety
/// `ptr` and `layout` come from one `alloc_locked_pages` call and are not used afterwards.
unsafe fn free_locked_pages(ptr: *mut u8, layout: Layout, locked: bool) {
    // SAFETY: the caller hands over the whole allocation (see `# Safety`), used by no one else.
    unsafe {
        // Volatile, so the wipe of memory about to be freed is not optimised away.
        for i in 0..layout.size() {
            std::ptr::write_volatile(ptr.add(i), 0);
        }
        if locked {
            libc::munlock(ptr.cast(), layout.size());
        }
        // The allocator will reuse the (wiped) pages for ordinary data: make them dumpable again
        // (this also lets the kernel merge the mapping back with its neighbours).
        libc::madvise(ptr.cast(), layout.size(), libc::MADV_DODUMP);
        dealloc(ptr, layout);
    }
}

impl<T: Zeroize + Zeroable> LockedBox<T> {
    /// Allocates locked pages holding an all-zero `T`, then lets `init` fill in the secret there.
    pub fn new_with(init: impl FnOnce(&mut T)) -> Self {
        // Zeroed memory is a valid T (T: Zeroable).
        let (ptr, layout, locked) = alloc_locked_pages::<T>();
        let mut b = Self {
            ptr,
            layout,
            locked,
        };
        init(&mut b);
        b
    }

    /// Whether the pages are actually locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl<T: Zeroize + Zeroable> Deref for LockedBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr holds an initialised T for the box's whole life.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: Zeroize + Zeroable> DerefMut for LockedBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref; &mut self guarantees exclusivity.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: Zeroize + Zeroable> Drop for LockedBox<T> {
    fn drop(&mut self) {
        // SAFETY: ptr holds an initialised T; after zeroizing and dropping it in place we only
        // unlock and free the allocation made in new_with with the same layout.
        unsafe {
            self.ptr.as_mut().zeroize();
            std::ptr::drop_in_place(self.ptr.as_ptr());
            free_locked_pages(self.ptr.as_ptr().cast(), self.layout, self.locked);
        }
    }
}

/// Any `T` (e.g. a cipher from another crate holding round keys) on its own locked,
/// non-dumpable pages. Unlike [`LockedBox`] it needs no all-zero value: `make` builds the value,
/// which is written straight into the pages (the compiler constructs a returned value in its
/// destination when it can, so the round keys normally never sit on the stack). On drop the
/// value is dropped in place (run its own zeroizing `Drop`) and every byte of the pages wiped.
pub struct LockedValue<T> {
    ptr: NonNull<T>,
    layout: Layout,
    locked: bool,
}

// SAFETY: LockedValue owns its T exclusively (like Box<T>).
unsafe impl<T: Send> Send for LockedValue<T> {}
// SAFETY: shared access only hands out &T, as Box<T> does.
unsafe impl<T: Sync> Sync for LockedValue<T> {}

impl<T> LockedValue<T> {
    pub fn new_with(make: impl FnOnce() -> T) -> Self {
        let (ptr, layout, locked) = alloc_locked_pages::<T>();
        // SAFETY: ptr is a fresh allocation sized and aligned for T; writing initialises it.
        unsafe { ptr.as_ptr().write(make()) };
        // `make` ran in stack frames below this one; whatever key bytes its callees left there
        // (a value built before being moved out) are overwritten now.
        scrub_stack();
        Self {
            ptr,
            layout,
            locked,
        }
    }

    /// Whether the pages are actually locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl<T> Deref for LockedValue<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr holds an initialised T for the value's whole life.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for LockedValue<T> {
    fn drop(&mut self) {
        // SAFETY: ptr holds an initialised T, dropped exactly once here; then the allocation
        // made in new_with is wiped and freed with its own layout.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            free_locked_pages(self.ptr.as_ptr().cast(), self.layout, self.locked);
        }
    }
}

/// A variable-length byte buffer on its own locked, non-dumpable pages (whole pages, at least
/// one), every byte wiped before the pages are freed. For secrets whose length is known only at
/// run time (a data key, unsealed CMK material, a credential's secret): fill it in place
/// ([`LockedBytes::zeroed`] then write through `DerefMut`, e.g. decrypt in place or draw random
/// bytes into it) so the secret never exists in ordinary heap memory.
pub struct LockedBytes {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    locked: bool,
}

// SAFETY: LockedBytes owns its bytes exclusively (like Box<[u8]>); u8 is Send and Sync.
unsafe impl Send for LockedBytes {}
// SAFETY: shared access only hands out &[u8], as Box<[u8]> does.
unsafe impl Sync for LockedBytes {}

impl LockedBytes {
    /// `len` zero bytes on fresh locked pages.
    pub fn zeroed(len: usize) -> Self {
        let (ptr, layout, locked) = alloc_locked_bytes(len, 1);
        Self {
            ptr,
            len,
            layout,
            locked,
        }
    }

    /// A copy of `bytes` on fresh locked pages (the caller wipes its own copy).
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.copy_from_slice(bytes);
        b
    }

    /// Whether the pages are actually locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Deref for LockedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() >= len zero-initialised (then written) bytes that
        // live as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for LockedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for LockedBytes {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl Zeroize for LockedBytes {
    /// Wipes the bytes and empties the buffer (as zeroizing a `Vec` does); the pages stay
    /// allocated until drop.
    fn zeroize(&mut self) {
        self.deref_mut().zeroize();
        self.len = 0;
    }
}

impl Drop for LockedBytes {
    fn drop(&mut self) {
        // SAFETY: ptr and layout come from the alloc_locked_bytes call in `zeroed` and are not
        // used after this; free_locked_pages wipes every byte of the allocation first.
        unsafe { free_locked_pages(self.ptr.as_ptr(), self.layout, self.locked) };
    }
}

/// Overwrites the 16 KiB of stack below the caller's frame with zeroes (where the frames of
/// functions it just called, and any key bytes they left, were).
#[inline(never)]
fn scrub_stack() {
    let mut area = [0u8; 16 << 10];
    // black_box: the writes must happen although nothing reads them.
    std::hint::black_box(&mut area);
}

/// The `VmFlags` of the memory mapping holding `addr`, from `/proc/self/smaps` (`lo`: locked,
/// `dd`: not dumped). For tests that check where secrets live; `None` if not found.
#[doc(hidden)]
pub fn vm_flags_of(addr: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_string());
            }
        }
    }
    None
}

/// Turns off core dumps for this process (`RLIMIT_CORE` = 0 and not dumpable), so a crash can
/// never write unwrapped keys to disk. Call it early in a process that will hold keys.
pub fn disable_core_dumps() -> std::io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit and prctl take plain values; no memory is shared with the kernel.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_and_mutates_value() {
        let mut b = LockedBox::<[u8; 64]>::new_with(|k| k.copy_from_slice(&[9u8; 64]));
        assert_eq!(b[0], 9);
        b[1] = 3;
        assert_eq!(b[1], 3);
        let addr = &*b as *const _ as usize;
        assert_eq!(addr % page_size(), 0, "box is page aligned");
    }

    /// The locked buffer behaves like a plain `Vec<u8>` of the same length, across page
    /// boundaries (and for the empty buffer, which still gets a page of its own).
    #[test]
    fn locked_bytes_match_a_vec() {
        for len in [0usize, 1, 4095, 4096, 4097, 70000] {
            let want: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let mut b = LockedBytes::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0), "len {len}: starts zeroed");
            b.copy_from_slice(&want);
            assert_eq!(&b[..], &want[..], "len {len}");
            let c = b.clone();
            assert_eq!(&c[..], &want[..], "len {len}: clone");
            assert_eq!(&LockedBytes::from_slice(&want)[..], &want[..], "len {len}");
            assert_eq!(b.as_ptr() as usize % page_size(), 0, "page aligned");
            assert_ne!(b.as_ptr(), c.as_ptr(), "a clone has its own pages");
            if len > 0 {
                let flags = vm_flags_of(b.as_ptr() as usize + len - 1).expect("mapping");
                assert!(
                    flags.split_whitespace().any(|f| f == "dd"),
                    "len {len}: {flags}"
                );
            }
            b.zeroize();
            assert!(b.is_empty());
        }
    }

    #[test]
    fn large_values_span_pages() {
        let b = LockedBox::<[[u8; 16]; 600]>::new_with(|v| v[599] = [1; 16]);
        assert_eq!(b[599], [1; 16]);
        assert_eq!(b[0], [0; 16]);
    }
}
