//! Memory protection for key material: a heap box whose pages are locked in RAM (`mlock`, so they
//! are never written to swap) and excluded from core dumps (`MADV_DONTDUMP`), zeroized before it is
//! freed; and a process-wide switch that turns core dumps off.
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

impl<T: Zeroize + Zeroable> LockedBox<T> {
    /// Allocates locked pages holding an all-zero `T`, then lets `init` fill in the secret there.
    pub fn new_with(init: impl FnOnce(&mut T)) -> Self {
        let page = page_size();
        let size = std::mem::size_of::<T>().max(1).div_ceil(page) * page;
        let align = page.max(std::mem::align_of::<T>());
        let layout = Layout::from_size_align(size, align).expect("page-rounded layout is valid");
        // SAFETY: layout has a non-zero size; zeroed memory is a valid T (T: Zeroable).
        let raw = unsafe { alloc_zeroed(layout) } as *mut T;
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
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.layout.size());
            }
            dealloc(self.ptr.as_ptr().cast(), self.layout);
        }
    }
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

    #[test]
    fn large_values_span_pages() {
        let b = LockedBox::<[[u8; 16]; 600]>::new_with(|v| v[599] = [1; 16]);
        assert_eq!(b[599], [1; 16]);
        assert_eq!(b[0], [0; 16]);
    }
}
