//! Writes encrypted straight into a writable mapping of the volume file (issue #13, "the mirror
//! question"): they leave exactly the bytes the `pwrite` path leaves; storage trouble under the
//! mapping never crashes the server nor loses an acknowledged write — a full file system gives
//! the client ENOSPC (the fault is absorbed and the write redone with `pwrite`), a file truncated
//! under the server while a real client writes is survived; and FLUSH makes pages dirtied through
//! the mapping durable.

use crate::clients_common;
use crate::durability_common::have_python_nbd;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clients_common::libnbd_phase::{pattern, run_phase};
use clients_common::xts_oracle::{oracle_decrypt, python_has_cryptography, PYTHON};
use clients_common::{find_tool, report_missing, run_bounded, run_ok, DataDir, HEADER_BYTES, MIB};
use cryptnbd::backend::FileBackend;
use cryptnbd::crypto::{Xts, XtsKey};
use cryptnbd::volume::{Volume, VolumeHeader};
use rand::{Rng, SeedableRng};
use uuid::Uuid;

/// Two volumes with one key and one header on two files in `dir`: one writing (and reading)
/// through mappings at every size, one with `pread`/`pwrite` only.
fn twin_volumes(dir: &Path, size: u64, sector: u32) -> (Volume, Volume, XtsKey) {
    let mut h = VolumeHeader::new(Uuid::new_v4(), size, sector);
    h.key_id = Uuid::new_v4();
    h.key_version = 1;
    h.wrapped_dek = vec![7; 80];
    let key = XtsKey::generate();
    let open = |name: &str| {
        let path = dir.join(format!("{name}{sector}.vol"));
        let f = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (f, path)
    };
    let (f, path) = open("mapped");
    // Mapped writes on disk file systems too (off by default there, see `with_write_mapping`).
    let b = FileBackend::new(f, &path)
        .with_mapped_min(0)
        .with_mapped_write_min(0)
        .with_write_mapping(true);
    assert!(b.maps_writes(), "{dir:?} is a local file system");
    let mapped = Volume::create(b, &h, &key).unwrap();
    let (f, path) = open("plain");
    let plain = Volume::create(FileBackend::new(f, &path).with_mapping(false), &h, &key).unwrap();
    (mapped, plain, key)
}

/// Whether `v` would take a whole-sector write at `off` through its mapping just now (the probe
/// stores nothing).
fn lends_write(v: &Volume, off: u64, len: usize) -> bool {
    let fo = v.header().data_offset() + off;
    v.backend().with_mapped_write(fo, len, &mut |_| {}).unwrap()
}

fn data_area(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.backend()
        .read_at(&mut b, v.header().data_offset())
        .unwrap();
    b
}

/// Random writes (any offset and length: sub-sector edges go read-modify-write, the rest through
/// the mapping), trims and write-zeroes into a sparse volume, while another thread reads the
/// mapped volume all over: the mapped volume's file ends byte-identical to the `pwrite` one's,
/// for both sector sizes, on tmpfs (every write lends) and on the temp dir's ext4 (mapped writes
/// turned on there; they lend once their pages are resident).
#[test]
fn mapped_writes_leave_the_same_bytes_as_pwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm")
        .is_dir()
        .then(|| tempfile::tempdir_in("/dev/shm").unwrap());
    let mut dirs = vec![tmp.path()];
    dirs.extend(shm.as_ref().map(|d| d.path()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(1313);
    for dir in dirs {
        for sector in [4096u32, 512] {
            let size = 8 * MIB;
            let (mapped, plain, _) = twin_volumes(dir, size, sector);
            let stop = AtomicBool::new(false);
            let mut lent = 0;
            std::thread::scope(|s| {
                // A concurrent reader: any mix of old and new bytes is fine, but every read
                // must succeed and nothing may crash.
                let reader = s.spawn(|| {
                    let mut r = rand::rngs::StdRng::seed_from_u64(7);
                    let mut buf = vec![0u8; 256 << 10];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let off = r.gen_range(0..size - 1);
                        let len = r.gen_range(1..=(size - off).min(256 << 10)) as usize;
                        mapped.read(off, &mut buf[..len]).unwrap();
                        n += 1;
                    }
                    n
                });
                for i in 0..200 {
                    let ss = u64::from(sector);
                    let (off, len) = if i % 3 == 0 {
                        let off = rng.gen_range(0..size - 1);
                        (off, rng.gen_range(1..=(size - off).min(200 << 10)))
                    } else {
                        let s = rng.gen_range(0..size / ss);
                        (s * ss, rng.gen_range(1..=(size / ss - s).min(128)) * ss)
                    };
                    match rng.gen_range(0..10) {
                        0 => {
                            mapped.trim(off, len, false).unwrap();
                            plain.trim(off, len, false).unwrap();
                        }
                        1 => {
                            let punch = rng.gen_bool(0.5);
                            mapped.write_zeroes(off, len, punch, false).unwrap();
                            plain.write_zeroes(off, len, punch, false).unwrap();
                        }
                        _ => {
                            let mut data = vec![0u8; len as usize];
                            rng.fill(&mut data[..]);
                            if off % ss == 0
                                && len % ss == 0
                                && lends_write(&mapped, off, len as usize)
                            {
                                lent += 1;
                            }
                            let fua = rng.gen_bool(0.02);
                            mapped.write(off, &mut data.clone(), fua).unwrap();
                            plain.write(off, &mut data.clone(), fua).unwrap();
                        }
                    }
                }
                stop.store(true, Ordering::Relaxed);
                assert!(reader.join().unwrap() > 0, "the reader ran");
            });
            mapped.flush().unwrap();
            let (a, b) = (data_area(&mapped), data_area(&plain));
            let first = a.iter().zip(&b).position(|(x, y)| x != y);
            assert!(
                first.is_none(),
                "{dir:?} sector {sector}: files differ at {first:?}"
            );
            assert!(
                lent > 20,
                "{dir:?} sector {sector}: only {lent} writes went through the mapping"
            );
        }
    }
}

/// FLUSH after writes through the mapping on ext4 (the temp dir) leaves no page of the file dirty
/// or under write-back (`cachestat`: the `fdatasync` covered pages dirtied by stores, not only by
/// `pwrite`), and a separate `pread` of the file after it decrypts, with an independent engine, to
/// what was written.
#[test]
fn flush_after_mapped_writes_leaves_nothing_dirty() {
    let tmp = tempfile::tempdir().unwrap();
    let (mapped, _plain, key) = twin_volumes(tmp.path(), 16 * MIB, 4096);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut data = vec![0u8; 8 * MIB as usize];
    rng.fill(&mut data[..]);
    // First write: the pages are not resident on ext4, so pwrite; then they are.
    mapped.write(MIB, &mut data.clone(), false).unwrap();
    mapped.flush().unwrap();
    assert!(
        lends_write(&mapped, MIB, data.len()),
        "resident pages are lent"
    );
    rng.fill(&mut data[..]);
    mapped.write(MIB, &mut data.clone(), false).unwrap();
    let path = tmp.path().join("mapped4096.vol");
    let file = std::fs::File::open(&path).unwrap();
    let before = cachestat(&file);
    eprintln!("before FLUSH: {before:?} (dirty, writeback)");
    mapped.flush().unwrap();
    let after = cachestat(&file);
    assert_eq!(
        after,
        (0, 0),
        "pages still dirty or under write-back after FLUSH"
    );
    let mut back = vec![0u8; data.len()];
    file.read_exact_at(&mut back, HEADER_BYTES + MIB).unwrap();
    let xts = Xts::new_portable(&key);
    xts.decrypt_sectors(&mut back, 4096, MIB / 512);
    assert!(back == data, "the file holds what was written");
}

/// `cachestat(2)` of the whole file: (dirty pages, pages under write-back).
#[allow(unsafe_code)]
fn cachestat(f: &std::fs::File) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    #[derive(Default)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range::default();
    let mut st = Stat::default();
    // SAFETY: cachestat reads `range` and fills `st`, both ours and of the kernel's layout;
    // len 0 means "to the end of the file".
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    assert_eq!(rc, 0, "cachestat: {}", std::io::Error::last_os_error());
    (st.dirty, st.writeback)
}

/// A tmpfs of `size` mounted for the test; unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(test: &str, size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            report_missing(test, "permission to mount a tmpfs (root)");
            return None;
        }
        Some(Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The libnbd client's phases; each prints "ok …" when all its checks passed.
/// (After `libnbd_phase::PRELUDE`.)
const SCRIPT: &str = r#"

if mode == "until-full":
    off = 0
    while True:
        assert off < size, "never ran out of space"
        try:
            h.pwrite(pat(off, MIB), off)
        except nbd.Error as e:
            assert e.errnum == errno.ENOSPC, "errno %r (%s), expected ENOSPC" % (e.errnum, e)
            break
        off += MIB
    assert off > 0
    # The server is still up, and every acknowledged write reads back.
    for o in range(0, off, MIB):
        assert h.pread(MIB, o) == pat(o, MIB), "%d differs after ENOSPC" % o
    h.flush()
    print("ok", off)
elif mode == "write-for":
    # Writes all over for a while; every write must be answered (success or an error reply).
    end, n, errs = time.time() + args[0], 0, 0
    while time.time() < end:
        for off in range(0, size, MIB):
            try:
                h.pwrite(pat(off, MIB), off)
            except nbd.Error:
                errs += 1
            n += 1
    print("ok", n, errs)
elif mode == "fill-check":
    for off in range(0, size, MIB):
        h.pwrite(pat(off, MIB), off)
    h.flush()
    for off in range(0, size, MIB):
        assert h.pread(MIB, off) == pat(off, MIB), "%d differs" % off
    print("ok")
h.shutdown()
"#;

fn phase(d: &DataDir, srv: &clients_common::Server, mode: &str, args: &[u64]) -> String {
    let script = d.path().join("mapw.py");
    run_phase(&script, SCRIPT, srv, mode, args, Duration::from_secs(240))
}

/// A data directory in the temp dir with a volume "disk" of `size`, whose file is moved to `dir`
/// (behind a symbolic link), so only the volume runs out of space there, not the server's log.
fn data_dir_with_volume_in(dir: &Path, size: u64) -> DataDir {
    let d = DataDir::new();
    d.create_volume("disk", size, 4096);
    let vol = d.volume_path("disk");
    let moved = dir.join("disk.vol");
    // Header and length only: the data area is all holes, and must stay sparse.
    let mut header = vec![0u8; HEADER_BYTES as usize];
    std::fs::File::open(&vol)
        .and_then(|f| f.read_exact_at(&mut header, 0))
        .expect("read the volume header");
    std::fs::write(&moved, &header).expect("copy the volume header");
    std::fs::File::options()
        .write(true)
        .open(&moved)
        .and_then(|f| f.set_len(HEADER_BYTES + size))
        .expect("size the moved volume");
    std::fs::remove_file(&vol).unwrap();
    std::os::unix::fs::symlink(&moved, &vol).unwrap();
    d
}

/// A sparse 64 MiB volume on a 16 MiB tmpfs, written 1 MiB at a time into its holes by a real
/// client (libnbd): the write that finds no space gets ENOSPC — not success, not a dropped
/// connection — after the server absorbed the fault of the mapped store and redid the write
/// with `pwrite`; the server stays up, every acknowledged write reads back, FLUSH succeeds, and
/// the file decrypts independently (Python `cryptography`) to exactly what was acknowledged.
#[test]
fn enospc_during_mapped_write_reaches_the_client() {
    let test = "enospc_during_mapped_write_reaches_the_client";
    if !have_python_nbd(test) {
        return;
    }
    if !python_has_cryptography() {
        report_missing(test, "python3-cryptography");
        return;
    }
    let Some(fs) = Tmpfs::mount(test, "16m") else {
        return;
    };
    let d = data_dir_with_volume_in(&fs.path, 64 * MIB);
    let srv = d.serve(&["disk"]);
    let out = phase(&d, &srv, "until-full", &[]);
    let written: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        (4 * MIB..16 * MIB).contains(&written),
        "wrote {written} bytes"
    );
    let log = srv.log_text();
    assert!(
        log.contains("a fault in the writable mapping"),
        "the write into the full tmpfs did not go through the mapping:\n{log}"
    );
    // Independently: decrypt the file (still on the full tmpfs; the output goes elsewhere).
    let plain = tempfile::tempdir().unwrap();
    let out_path = plain.path().join("plain");
    oracle_decrypt(
        &fs.path.join("disk.vol"),
        &out_path,
        4096,
        &d.unwrap_dek("disk"),
    );
    let got = std::fs::read(&out_path).unwrap();
    assert!(
        got[..written as usize] == pattern(0, written)[..],
        "the acknowledged writes decrypt to what was written"
    );
    srv.stop();
}

/// `truncate -s` on the volume file while a real client writes 1 MiB requests all over it, on
/// tmpfs and on the temp dir's ext4: every write is answered, the server survives (it exits
/// cleanly on SIGTERM afterwards: it never died of SIGBUS), reports the write faults it absorbed
/// in its log (tmpfs, where writes are mapped by default), and the volume then takes a full
/// rewrite that reads back.
#[test]
fn truncated_under_server_while_client_writes_server_survives() {
    let test = "truncated_under_server_while_client_writes_server_survives";
    if !have_python_nbd(test) {
        return;
    }
    if find_tool("truncate").is_none() {
        report_missing(test, "truncate (coreutils)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm")
        .is_dir()
        .then(|| tempfile::tempdir_in("/dev/shm").unwrap());
    let mut dirs = vec![tmp.path()];
    dirs.extend(shm.as_ref().map(|d| d.path()));
    for dir in dirs {
        let d = data_dir_with_volume_in(dir, 32 * MIB);
        let srv = d.serve(&["disk"]);
        phase(&d, &srv, "fill-check", &[]);
        let script = d.path().join("mapw.py");
        let mut writer = Command::new(PYTHON);
        writer
            .arg(&script)
            .arg(srv.uri("disk"))
            .args(["write-for", "6"]);
        let writer = std::thread::spawn(move || run_bounded(&mut writer, Duration::from_secs(120)));
        std::thread::sleep(Duration::from_millis(1500));
        run_ok(
            Command::new("truncate")
                .arg("-s")
                .arg((HEADER_BYTES + 8 * MIB).to_string())
                .arg(dir.join("disk.vol")),
        );
        let out = writer.join().expect("writer thread");
        assert!(
            out.status.success(),
            "{dir:?}: writes during the truncation failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            srv.log_text()
        );
        let faults = srv
            .log_text()
            .matches("a fault in the writable mapping")
            .count();
        eprintln!(
            "{dir:?}: client {}; write faults absorbed by the server: {faults}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        // On tmpfs the writes past the cut went through the mapping made before it, faulted,
        // and were reported; the client saw them succeed (`pwrite` grows the file again). On
        // ext4 the server writes with `pwrite` only (mapped writes are off on disk file systems
        // by default), which this checks too.
        assert!(
            faults >= 1 || !dir.starts_with("/dev/shm"),
            "{dir:?}: no write fault was reported:\n{}",
            srv.log_text()
        );
        phase(&d, &srv, "fill-check", &[]);
        srv.stop();
    }
}
