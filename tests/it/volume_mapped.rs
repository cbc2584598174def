//! Reads decrypted straight from a mapping of the volume file (issue #13, "passes over the data"):
//! they give exactly what the `pread` path gives, and storage trouble under a mapping never
//! crashes the server — a volume file truncated by another process while a real client reads,
//! and an I/O error below the file system (lazyfs failing reads of a range with EIO), each give
//! the client zeroes past the end or an EIO error, and the server keeps serving.

use crate::clients_common;
use crate::durability_common::have_python_nbd;
use crate::lazyfs;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clients_common::libnbd_phase::run_phase;
use clients_common::xts_oracle::PYTHON;
use clients_common::{
    find_tool, report_missing, run_bounded, run_ok, skip_environment, DataDir, HEADER_BYTES, MIB,
};
use cryptnbd::backend::FileBackend;
use cryptnbd::crypto::XtsKey;
use cryptnbd::volume::{Volume, VolumeHeader};
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const SIZE: u64 = 32 * MIB;

/// Two volumes on one file: one reading through the mapping, one with `pread` only.
fn twin_volumes(dir: &Path, size: u64, sector: u32) -> (Volume, Volume) {
    let path = dir.join(format!("v{sector}.vol"));
    let mut h = VolumeHeader::new(Uuid::new_v4(), size, sector);
    h.key_id = Uuid::new_v4();
    h.key_version = 1;
    h.wrapped_dek = vec![7; 80];
    let key = XtsKey::generate();
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mapped =
        Volume::create(FileBackend::new(file, &path).with_mapped_min(0), &h, &key).unwrap();
    let plain = FileBackend::open(&path, false).unwrap().with_mapping(false);
    assert!(!plain.maps_reads());
    let plain = Volume::with_key(Box::new(plain), h, &key, false).unwrap();
    (mapped, plain)
}

/// Random reads (any offset and length, sub-sector edges, holes, trimmed and zeroed ranges)
/// give byte-identical results and the same all-zero outcome through the mapping and through
/// `pread`, for both sector sizes, on tmpfs (where holes are never lent) and on the temp dir's
/// file system (where they are, once cached); also the non-blocking cached-read path.
#[test]
fn mapped_reads_equal_pread_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm")
        .is_dir()
        .then(|| tempfile::tempdir_in("/dev/shm").unwrap());
    let mut dirs = vec![tmp.path()];
    dirs.extend(shm.as_ref().map(|d| d.path()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for dir in dirs {
        for sector in [4096u32, 512] {
            let size = 4 * MIB;
            let (mapped, plain) = twin_volumes(dir, size, sector);
            // Data in random places, some of it trimmed or zeroed again; the rest stays holes.
            for _ in 0..60 {
                let off = rng.gen_range(0..size - 1);
                let len = rng.gen_range(1..=(size - off).min(96 << 10)) as usize;
                let mut data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                mapped.write(off, &mut data, false).unwrap();
            }
            for _ in 0..10 {
                let off = rng.gen_range(0..size - 1);
                let len = rng.gen_range(1..=(size - off).min(64 << 10));
                if rng.gen_bool(0.5) {
                    plain.trim(off, len, false).unwrap();
                } else {
                    plain.write_zeroes(off, len, true, false).unwrap();
                }
            }
            let mut lent = 0;
            for i in 0..400 {
                let (off, len) = if i % 4 == 0 {
                    // Whole sectors, for the cached path too.
                    let ss = sector as u64;
                    let s = rng.gen_range(0..size / ss);
                    (s * ss, rng.gen_range(1..=(size / ss - s).min(64)) * ss)
                } else {
                    let off = rng.gen_range(0..size - 1);
                    (off, rng.gen_range(1..=(size - off).min(300 << 10)))
                };
                let (mut a, mut b) = (vec![1u8; len as usize], vec![2u8; len as usize]);
                let ra = mapped.read(off, &mut a).unwrap();
                let rb = plain.read(off, &mut b).unwrap();
                assert!(
                    a == b,
                    "{dir:?} sector {sector}: {len} bytes at {off} differ"
                );
                assert_eq!(ra, rb, "{dir:?} sector {sector}: outcome at {off}+{len}");
                let (mut c, mut d) = (vec![3u8; len as usize], vec![4u8; len as usize]);
                if let (Some(rc), Some(rd)) = (
                    mapped.try_read_cached(off, &mut c).unwrap(),
                    plain.try_read_cached(off, &mut d).unwrap(),
                ) {
                    assert!(c == a && d == a, "{dir:?}: cached read at {off}+{len}");
                    assert_eq!(rc, rd);
                }
                let fo = mapped.header().data_offset() + off;
                if mapped
                    .backend()
                    .with_mapped(fo, len as usize, false, &mut |_| {})
                    .unwrap()
                {
                    lent += 1;
                }
            }
            assert!(lent > 0, "{dir:?}: no read was served from the mapping");
        }
    }
}

/// The libnbd client's phases; every phase prints "ok" when all its checks passed.
/// (After `libnbd_phase::PRELUDE`.)
const SCRIPT: &str = r#"

def expect(off, n, keep):
    want = pat(off, n)
    if off + n > keep:
        cut = max(keep - off, 0)
        want = want[:cut] + bytes(n - cut)
    got = h.pread(n, off)
    assert got == want, "%d bytes at %d differ (keep %d)" % (n, off, keep)

if mode == "fill":
    for off in range(0, size, MIB):
        h.pwrite(pat(off, MIB), off)
    h.flush()
    for off in range(0, size, MIB):
        expect(off, MIB, size)
elif mode == "hammer":
    # Reads anywhere for a while: whatever they return, every one must be answered.
    end, n = time.time() + args[0], 0
    while time.time() < end:
        off = random.randrange(0, size // 4096) * 4096
        h.pread(min(random.choice([4096, 65536, MIB]), size - off), off)
        n += 1
    assert n > 0
elif mode == "check":
    keep = args[0]
    for off in range(0, size, MIB):
        expect(off, MIB, keep)
    # Around the cut, unaligned.
    got = h.pread(10000, keep - 5000)
    assert got == pat(keep - 8192, 8192)[3192:] + bytes(5000), "across the cut"
elif mode == "regrow":
    off = size - MIB
    h.pwrite(pat(off, MIB), off)
    h.flush()
    expect(off, MIB, size)
elif mode == "eio":
    bad_start, bad_end = args
    try:
        h.pread(MIB, bad_start)
        raise AssertionError("read of the failing range succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EIO, "errno %r (%s), expected EIO" % (e.errnum, e)
    expect(0, MIB, size)
    expect(bad_end, MIB, size)
elif mode == "all":
    for off in range(0, size, MIB):
        expect(off, MIB, size)
h.shutdown()
print("ok")
"#;

fn phase(d: &DataDir, srv: &clients_common::Server, mode: &str, args: &[u64]) {
    let script = d.path().join("mapped.py");
    let out = run_phase(&script, SCRIPT, srv, mode, args, Duration::from_secs(180));
    assert_eq!(out, "ok", "client phase {mode}");
}

/// A data directory (key store, CMK, a 32 MiB volume "disk") inside `parent`.
fn data_dir_in(parent: &Path) -> DataDir {
    let dir = tempfile::Builder::new()
        .prefix("cryptnbd-mapped-")
        .tempdir_in(parent)
        .expect("data dir");
    let d = DataDir { dir };
    d.cli(&["kms", "init"]);
    d.cli(&["kms", "create-key", "--alias", "clients"]);
    d.create_volume("disk", SIZE, 4096);
    d
}

/// `truncate -s` on the volume file while a libnbd client reads all over it: every read is
/// answered, the cut-off part then reads as zeroes and the rest as before, writes past the cut
/// grow the file again, and the server exits cleanly on SIGTERM afterwards (it never died of
/// SIGBUS). On the temp dir's file system and on tmpfs.
#[test]
fn truncated_under_server_while_client_reads_server_survives() {
    let test = "truncated_under_server_while_client_reads_server_survives";
    if !have_python_nbd(test) {
        return;
    }
    if find_tool("truncate").is_none() {
        report_missing(test, "truncate (coreutils)");
        return;
    }
    let tmp = std::env::temp_dir();
    let mut parents = vec![tmp.as_path()];
    if Path::new("/dev/shm").is_dir() {
        parents.push(Path::new("/dev/shm"));
    }
    for parent in parents {
        let d = data_dir_in(parent);
        let srv = d.serve(&["disk"]);
        phase(&d, &srv, "fill", &[]);
        let script = d.path().join("mapped.py");
        let mut hammer = Command::new(PYTHON);
        hammer
            .arg(&script)
            .arg(srv.uri("disk"))
            .args(["hammer", "6"]);
        let hammer = std::thread::spawn(move || run_bounded(&mut hammer, Duration::from_secs(120)));
        std::thread::sleep(Duration::from_millis(1500));
        let keep = 8 * MIB;
        let vol = d.volume_path("disk");
        run_ok(
            Command::new("truncate")
                .arg("-s")
                .arg((HEADER_BYTES + keep).to_string())
                .arg(&vol),
        );
        let out = hammer.join().expect("hammer thread");
        assert!(
            out.status.success(),
            "{parent:?}: reads during the truncation failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            srv.log_text()
        );
        phase(&d, &srv, "check", &[keep]);
        phase(&d, &srv, "regrow", &[]);
        eprintln!(
            "{parent:?}: faults absorbed by the server: {}",
            srv.log_text()
                .matches("a fault in the mapped volume file")
                .count()
        );
        srv.stop();
    }
}

/// lazyfs fails every read of one range of the volume file with EIO (a failing disk under the
/// file system): the client's read of that range gets EIO, reads elsewhere still work, the
/// server stays up, and once the range reads again so does the client. (FUSE files are not
/// mapped, so this is the `pread` fallback; the guard's handling of the same SIGBUS is covered
/// by the truncation test and the backend's unit test.)
#[test]
fn eio_below_reaches_client_and_server_stays_up() {
    let test = "eio_below_reaches_client_and_server_stays_up";
    if !have_python_nbd(test) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        skip_environment(test, "no /dev/fuse");
        return;
    }
    if find_tool("fusermount3").is_none() {
        report_missing(test, "fusermount3 (Debian package fuse3)");
        return;
    }
    let mnt = tempfile::Builder::new()
        .prefix("cryptnbd-lazyfs-")
        .tempdir()
        .expect("mount point");
    let mounted = match lazyfs::LazyFs::mount(mnt.path()) {
        Ok(m) => m,
        Err(e) => {
            skip_environment(test, &format!("cannot mount a FUSE file system: {e}"));
            return;
        }
    };
    {
        // The data directory (and its socket: FUSE has none) stays on the temp dir; only the
        // volume file moves onto lazyfs, behind a symbolic link.
        let d = data_dir_in(&std::env::temp_dir());
        let vol = d.volume_path("disk");
        let moved = mnt.path().join("disk.vol");
        std::fs::copy(&vol, &moved).expect("copy the volume onto lazyfs");
        std::fs::remove_file(&vol).unwrap();
        std::os::unix::fs::symlink(&moved, &vol).unwrap();
        let srv = d.serve(&["disk"]);
        phase(&d, &srv, "fill", &[]);
        let (bad_start, bad_end) = (4 * MIB, 5 * MIB);
        mounted
            .fs
            .fail_reads(HEADER_BYTES + bad_start, HEADER_BYTES + bad_end);
        phase(&d, &srv, "eio", &[bad_start, bad_end]);
        assert!(mounted.fs.eio_reads() > 0, "lazyfs failed no read");
        mounted.fs.heal_reads();
        phase(&d, &srv, "all", &[]);
        srv.stop();
        std::fs::remove_file(&moved).unwrap();
    }
    drop(mounted);
}
