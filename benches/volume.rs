//! Volume data path throughput: read and write MB/s for 4 KiB and 1 MiB requests on a file in
//! tmpfs (/dev/shm, falling back to the temp dir), single thread, no network. Measures the
//! volume's own overhead (sector math, zero detection, XTS, pread/pwrite) without a disk.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cryptnbd::backend::FileBackend;
use cryptnbd::crypto::XtsKey;
use cryptnbd::volume::{Volume, VolumeHeader};
use uuid::Uuid;

const VOL_SIZE: u64 = 256 << 20;

fn volume() -> (tempfile::TempDir, Volume) {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    let path = base.path().join("bench.vol");
    let f = std::fs::File::options()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("create bench volume");
    let h = VolumeHeader::new(Uuid::new_v4(), VOL_SIZE, 4096);
    let v = Volume::create(FileBackend::new(f, &path), &h, &XtsKey::generate()).expect("create");
    (base, v)
}

fn bench(c: &mut Criterion) {
    let (_dir, vol) = volume();
    // Fill the volume so reads decrypt real data (not holes).
    let mut chunk = vec![0xA5u8; 1 << 20];
    for off in (0..VOL_SIZE).step_by(1 << 20) {
        chunk.fill(0xA5);
        vol.write(off, &mut chunk, false).expect("fill");
    }
    let mut g = c.benchmark_group("volume");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_millis(500));
    for &size in &[4096usize, 1 << 20] {
        let mut buf = vec![0x5Au8; size];
        let span = VOL_SIZE / size as u64;
        g.throughput(Throughput::Bytes(size as u64));
        let mut i = 0u64;
        g.bench_with_input(BenchmarkId::new("read", size), &size, |b, _| {
            b.iter(|| {
                i = (i + 7919) % span;
                vol.read(i * size as u64, &mut buf).expect("read");
            })
        });
        g.bench_with_input(BenchmarkId::new("write", size), &size, |b, _| {
            b.iter(|| {
                i = (i + 7919) % span;
                vol.write(i * size as u64, &mut buf, false).expect("write");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
