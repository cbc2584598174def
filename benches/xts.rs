//! XTS engine throughput (single thread): encrypt and decrypt, 512- and 4096-byte sectors,
//! 64 KiB and 1 MiB buffers, on every kernel this CPU runs (AES-NI + VAES, AES-NI, portable). OpenSSL's own figure
//! for `openssl speed -evp aes-256-xts` is printed first, so the ratio is visible beside
//! criterion's `thrpt` lines (`tools/bench-xts` prints the ratio table).
//!
//! Filter like any criterion bench, e.g. `cargo bench --bench xts -- aes-ni/encrypt/4096`.

use std::process::Command;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
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
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_xts);
criterion_main!(benches);
