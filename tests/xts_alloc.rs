//! The XTS engine allocates nothing per call (the hot path of every read and write): a counting
//! global allocator, private to this test binary, sees no allocation during encrypt/decrypt calls
//! on any kernel, in place or out of place, at either sector size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use cryptnbd::crypto::{Kernel, Xts, XtsKey};

struct Counting;

thread_local! {
    // Per thread, so allocations by the test harness's other threads do not count.
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to `System` unchanged; the counter is a const-initialized
// thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's own contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's own contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's own contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

#[test]
fn no_allocation_per_call_on_any_kernel() {
    let key = XtsKey::generate();
    let mut buf = vec![0x3cu8; 64 << 10];
    let mut out = vec![0u8; 64 << 10];
    // The counter must actually see allocations, or the assertion below proves nothing.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 10]))) >= 1);
    for kernel in Kernel::available() {
        let xts = Xts::with_kernel(&key, kernel).expect("an available kernel");
        for ss in [512, 4096] {
            let n = allocations_during(|| {
                xts.encrypt_sectors(&mut buf, ss, 1 << 40);
                xts.decrypt_sectors(&mut buf, ss, 1 << 40);
                xts.encrypt_sectors_to(&buf, &mut out, ss, 7);
                xts.decrypt_sectors_to(&out, &mut buf, ss, 7);
                xts.encrypt_sectors(&mut buf[..ss], ss, 0);
            });
            assert_eq!(
                n,
                0,
                "{} allocated {n} times at sector size {ss}",
                kernel.name()
            );
        }
    }
}
