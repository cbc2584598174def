//! XTS engine throughput (single thread): encrypt and decrypt, 512- and 4096-byte sectors,
//! 64 KiB and 1 MiB buffers, on every kernel this CPU runs (AES-NI + 512-bit VAES, AES-NI +
//! 256-bit VAES, AES-NI, portable).
//! OpenSSL's own figure for `openssl speed -evp aes-256-xts` is printed first, so the ratio is
//! visible beside criterion's `thrpt` lines (`tools/bench-xts` prints the ratio table).
//!
//! Filter like any criterion bench, e.g. `cargo bench --bench xts -- aes-ni/encrypt/4096`.
//! `XTS_SPEED=1 cargo bench --bench xts` prints a quick table against OpenSSL instead
//! (`tools/bench-xts --speed`).

use std::process::Command;
use std::time::Duration;

use criterion::{black_box, criterion_group, BenchmarkId, Criterion, Throughput};
use cryptnbd::crypto::{Kernel, Xts, XtsKey};

const BUFFERS: [(usize, &str); 2] = [(64 << 10, "64KiB"), (1 << 20, "1MiB")];
const SECTORS: [usize; 2] = [512, 4096];

/// OpenSSL's bytes/s for one `-bytes` size, or why there is none.
fn openssl_speed(bytes: usize) -> Result<f64, String> {
    let out = Command::new("openssl")
        .args(["speed", "-evp", "aes-256-xts", "-seconds", "1", "-bytes"])
        .arg(bytes.to_string())
        .output()
        .map_err(|e| format!("cannot run `openssl` ({e}); install it to see OpenSSL's figure"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line reads `AES-256-XTS   7705498.63k`: thousands of bytes per second.
    text.lines()
        .rev()
        .find_map(|l| {
            let l = l.trim();
            l.to_ascii_lowercase()
                .starts_with("aes-256-xts")
                .then(|| l.split_whitespace().last())
                .flatten()
                .and_then(|v| v.strip_suffix('k'))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|k| k * 1000.0)
        .ok_or_else(|| format!("could not parse `openssl speed` output: {text:?}"))
}

fn print_openssl() {
    for &ss in &SECTORS {
        match openssl_speed(ss) {
            Ok(bps) => println!(
                "openssl speed -evp aes-256-xts -bytes {ss}: {:.0} MB/s ({:.2} GiB/s)",
                bps / 1e6,
                bps / (1u64 << 30) as f64
            ),
            Err(e) => println!("OpenSSL figure for {ss} B unavailable: {e}"),
        }
    }
}

fn bench_xts(c: &mut Criterion) {
    print_openssl();
    let key = XtsKey::generate();
    let kernels = Kernel::available();
    if kernels == [Kernel::Portable] {
        println!("this CPU has no AES-NI: only the portable path is measured");
    }
    let engines: Vec<Xts> = kernels
        .iter()
        .map(|&k| Xts::with_kernel(&key, k).expect("an available kernel"))
        .collect();
    let mut group = c.benchmark_group("xts");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for xts in &engines {
        for &(len, label) in &BUFFERS {
            let mut buf = vec![0x5au8; len];
            let mut out = vec![0u8; len];
            group.throughput(Throughput::Bytes(len as u64));
            for &ss in &SECTORS {
                let name = format!("{}/encrypt/{ss}", xts.kernel().name());
                group.bench_with_input(BenchmarkId::new(name, label), &ss, |b, &ss| {
                    b.iter(|| xts.encrypt_sectors(black_box(&mut buf), ss, 1 << 20))
                });
                let name = format!("{}/decrypt/{ss}", xts.kernel().name());
                group.bench_with_input(BenchmarkId::new(name, label), &ss, |b, &ss| {
                    b.iter(|| xts.decrypt_sectors(black_box(&mut buf), ss, 1 << 20))
                });
                let name = format!("{}/encrypt_to/{ss}", xts.kernel().name());
                group.bench_with_input(BenchmarkId::new(name, label), &ss, |b, &ss| {
                    b.iter(|| xts.encrypt_sectors_to(black_box(&buf), &mut out, ss, 1 << 20))
                });
                let name = format!("{}/decrypt_flag/{ss}", xts.kernel().name());
                group.bench_with_input(BenchmarkId::new(name, label), &ss, |b, &ss| {
                    let mut zero = vec![0u64; len / 512 / 64];
                    b.iter(|| {
                        xts.decrypt_sectors_flagging(black_box(&mut buf), ss, 1 << 20, &mut zero)
                    })
                });
                let name = format!("{}/decrypt_to_flag/{ss}", xts.kernel().name());
                group.bench_with_input(BenchmarkId::new(name, label), &ss, |b, &ss| {
                    let mut zero = vec![0u64; len / 512 / 64];
                    b.iter(|| {
                        xts.decrypt_sectors_to_flagging(
                            black_box(&buf),
                            &mut out,
                            ss,
                            1 << 20,
                            &mut zero,
                        )
                    })
                });
                // The read path's form: from a (mapped) source straight into the reply buffer.
                let name = format!("{}/decrypt_to/{ss}", xts.kernel().name());
                group.bench_with_input(BenchmarkId::new(name, label), &ss, |b, &ss| {
                    b.iter(|| xts.decrypt_sectors_to(black_box(&buf), &mut out, ss, 1 << 20))
                });
            }
        }
    }
    group.finish();
}

/// This thread's CPU time. `openssl speed` divides by user CPU time, not wall time (unless given
/// `-elapsed`), so that is what we divide by too: on a machine shared with other work, wall time
/// would charge us for time slices other processes used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec`; CLOCK_THREAD_CPUTIME_ID is always available
    // on Linux. On failure `ts` stays zero and the figure printed is obviously wrong, not UB.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The operations of the speed table: the read path's decryptions with and without the fused
/// zero-block flags (in place after `pread`, out of place from a mapping).
const OPS: [&str; 5] = [
    "encrypt",
    "decrypt",
    "decrypt+flag",
    "decrypt_to",
    "decrypt_to+flag",
];

fn run_op(xts: &Xts, op: &str, buf: &mut [u8], out: &mut [u8], ss: usize) {
    let mut zero = [0u64; (1 << 20) / 512 / 64];
    match op {
        "encrypt" => xts.encrypt_sectors(buf, ss, 1 << 20),
        "decrypt" => xts.decrypt_sectors(buf, ss, 1 << 20),
        "decrypt+flag" => {
            black_box(xts.decrypt_sectors_flagging(buf, ss, 1 << 20, &mut zero));
        }
        "decrypt_to" => xts.decrypt_sectors_to(buf, out, ss, 1 << 20),
        _ => {
            black_box(xts.decrypt_sectors_to_flagging(buf, out, ss, 1 << 20, &mut zero));
        }
    }
}

/// `XTS_SPEED=1`: instead of criterion, a side-by-side table measured the same way on both sides:
/// OpenSSL's `-seconds 1` figure and ours (1 MiB calls for one second, divided by the CPU time
/// they took, as `openssl speed` does), each the best of three runs, interleaved per sector size.
fn speed_table() {
    const RUNS: usize = 3;
    let key = XtsKey::generate();
    let len = 1 << 20;
    let mut buf = vec![0x5au8; len];
    let mut out = vec![0u8; len];
    println!("kernel         op              sector | ours MB/s | openssl MB/s | ratio");
    println!("----------------------------------------+-----------+--------------+------");
    for &ss in &SECTORS {
        let openssl = (0..RUNS)
            .map(|_| openssl_speed(ss))
            .reduce(|a, b| match (a, b) {
                (Ok(a), Ok(b)) => Ok(a.max(b)),
                (e @ Err(_), _) | (_, e @ Err(_)) => e,
            })
            .expect("RUNS > 0");
        if let Err(e) = &openssl {
            println!("(no OpenSSL figure: {e})");
        }
        for kernel in Kernel::available() {
            let xts = Xts::with_kernel(&key, kernel).expect("an available kernel");
            for op in OPS {
                let ours = (0..RUNS)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        let cpu = thread_cpu_time();
                        let mut bytes = 0usize;
                        while start.elapsed() < Duration::from_secs(1) {
                            run_op(&xts, op, black_box(&mut buf), &mut out, ss);
                            bytes += len;
                        }
                        bytes as f64 / (thread_cpu_time() - cpu).as_secs_f64()
                    })
                    .fold(0.0, f64::max);
                let (theirs, ratio) = match &openssl {
                    Ok(o) => (format!("{:.0}", o / 1e6), format!("{:.2}", ours / o)),
                    Err(_) => ("-".into(), "-".into()),
                };
                println!(
                    "{:<14} {op:<15} {ss:>6} | {:>9.0} | {theirs:>12} | {ratio:>5}",
                    kernel.name(),
                    ours / 1e6
                );
            }
        }
    }
    println!(
        "(best of {RUNS} one-second runs on both sides, bytes per CPU second, 1 MiB buffers, \
         single thread)"
    );
}

criterion_group!(benches, bench_xts);

fn main() {
    if std::env::var_os("XTS_SPEED").is_some() {
        speed_table();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
