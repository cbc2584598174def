//! Per-call cost of the XTS kernels on the small requests random I/O makes (one 4096-byte or one
//! 512-byte sector per call), beside 1 MiB calls: a kernel with a high fixed cost per call wins
//! on large buffers and loses on 4 KiB random I/O. CPU time (not wall time), best of 5 rounds.
//!
//! Encryption (the write path) and the read path's decryption with zero-block flags
//! (`decrypt_sectors_flagging`), which also shows what clearing the vector registers at the end
//! of each call costs.
//!
//!   cargo run --release --example xts_small_calls

use cryptnbd::crypto::{Kernel, Xts, XtsKey};

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we own.
    #[allow(unsafe_code)]
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts)
    };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let key = XtsKey::generate();
    println!(
        "{:16} {:13} {:>10} {:>12} {:>12}",
        "kernel", "op", "call", "ns/call", "GB/s"
    );
    for kernel in Kernel::available() {
        let xts = Xts::with_kernel(&key, kernel).expect("available kernel");
        for (op, ss, call) in [
            ("encrypt", 512usize, 512usize),
            ("encrypt", 4096, 4096),
            ("encrypt", 4096, 1 << 20),
            ("decrypt+flag", 512, 512),
            ("decrypt+flag", 4096, 4096),
            ("decrypt+flag", 4096, 1 << 20),
        ] {
            let mut buf = vec![0x5au8; call];
            let mut zero = vec![0u64; call.div_ceil(512 * 64)];
            let iters = (256 << 20) / call;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = cpu_seconds();
                for i in 0..iters {
                    if op == "encrypt" {
                        xts.encrypt_sectors(&mut buf, ss, i as u64);
                    } else {
                        xts.decrypt_sectors_flagging(&mut buf, ss, i as u64, &mut zero);
                    }
                }
                best = best.min(cpu_seconds() - t);
            }
            let ns = best * 1e9 / iters as f64;
            let gbs = (iters * call) as f64 / best / 1e9;
            println!(
                "{:16} {:13} {:>10} {:>12.1} {:>12.1}",
                kernel.name(),
                op,
                call,
                ns,
                gbs
            );
        }
    }
}
