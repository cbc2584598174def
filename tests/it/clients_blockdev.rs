//! An export used as a real Linux block device. The kernel here has no `nbd` module, so the path
//! is `nbdfuse` (export → a file in a FUSE mount) + `losetup` (file → /dev/loopN): `mkfs.ext4`,
//! mount, write files, unmount, detach, stop the server, start it again, attach again, the files
//! are intact and `fsck.ext4 -fn` is clean.
//!
//! Needs root, /dev/fuse and loop devices. Where the machine lacks them (an unprivileged
//! container), the test is skipped with the exact reason, also in CI: that is an environment
//! limit, not a missing tool.

use crate::clients_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clients_common::{
    have_tools, pseudo_random, run_bounded, run_ok, skip_environment, DataDir, Server, MIB,
    TOOL_TIMEOUT,
};

/// Why this machine cannot attach a FUSE file as a loop device, if it cannot.
fn environment_limit() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: losetup and mount need CAP_SYS_ADMIN".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .is_err()
        {
            return Some(format!("{dev} is missing or cannot be opened read-write"));
        }
    }
    None
}

/// One attachment: nbdfuse serving the export as `mnt/disk`, a loop device on it and, while
/// `mounted`, an ext4 mount. Dropping it undoes whatever is still set up, in reverse order, so a
/// failing assertion never leaves a mount or a loop device behind.
struct Attached {
    fuse_dir: PathBuf,
    fs_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mounted: bool,
}

impl Attached {
    /// `loop_sector` is the loop device's logical block size: it must be at least the volume's
    /// encryption sector, because nbdfuse's libnbd refuses (client-side, EINVAL) requests below
    /// the export's advertised minimum block size, and the loop device passes the kernel's
    /// 512-byte-aligned I/O through the FUSE file unchanged.
    fn new(base: &Path, uri: &str, loop_sector: u32) -> Attached {
        let fuse_dir = base.join("fuse");
        let fs_dir = base.join("fs");
        std::fs::create_dir_all(&fuse_dir).expect("mkdir fuse");
        std::fs::create_dir_all(&fs_dir).expect("mkdir fs");
        let pidfile = base.join("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(fuse_dir.join("disk"))
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdfuse");
        let mut a = Attached {
            fuse_dir,
            fs_dir,
            nbdfuse: Some(child),
            loop_dev: None,
            mounted: false,
        };
        // nbdfuse writes its pid file once the FUSE file is ready.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pidfile.exists() {
            if let Some(Ok(Some(st))) = a.nbdfuse.as_mut().map(|c| c.try_wait()) {
                panic!("nbdfuse exited ({st}) before it was ready");
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready within 30 s");
            std::thread::sleep(Duration::from_millis(25));
        }
        let file = a.fuse_dir.join("disk");
        let dev = run_ok(
            Command::new("losetup")
                .args(["-f", "--show", "--sector-size", &loop_sector.to_string()])
                .arg(&file),
        );
        a.loop_dev = Some(dev.trim().to_string());
        a
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().expect("loop device attached")
    }

    fn mount(&mut self) {
        run_ok(Command::new("mount").arg(self.dev()).arg(&self.fs_dir));
        self.mounted = true;
    }

    /// Unmounts, retrying for a while on "target is busy": right after the last write the
    /// kernel (or a udev probe of the loop device) may still hold the file system briefly.
    fn umount(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run_bounded(Command::new("umount").arg(&self.fs_dir), TOOL_TIMEOUT);
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("busy") && Instant::now() < deadline,
                "umount {} failed: {err}",
                self.fs_dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.mounted = false;
    }

    /// Unmounts, detaches the loop device, unmounts the FUSE file and waits for nbdfuse to exit
    /// (its connection closed), asserting each step succeeds.
    fn detach(mut self) {
        if self.mounted {
            self.umount();
        }
        if let Some(dev) = self.loop_dev.take() {
            run_ok(Command::new("losetup").arg("-d").arg(&dev));
        }
        // `losetup -d` only marks a loop device still in use for autoclear; the kernel drops
        // its reference to the FUSE file a moment later. Until then the FUSE mount is busy.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run_bounded(
                Command::new("fusermount3").arg("-u").arg(&self.fuse_dir),
                TOOL_TIMEOUT,
            );
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("busy") && Instant::now() < deadline,
                "fusermount3 -u {} failed: {err}",
                self.fuse_dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let st = clients_common::wait_bounded(&mut c, Duration::from_secs(30));
            assert!(
                st.map(|s| s.success()).unwrap_or(false),
                "nbdfuse did not exit cleanly after fusermount3 -u: {st:?}"
            );
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| {
            let _ = run_bounded(c, Duration::from_secs(30));
        };
        if self.mounted {
            quiet(Command::new("umount").arg("-l").arg(&self.fs_dir));
        }
        if let Some(dev) = self.loop_dev.take() {
            quiet(Command::new("losetup").arg("-d").arg(&dev));
        }
        if let Some(mut c) = self.nbdfuse.take() {
            quiet(
                Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.fuse_dir),
            );
            if clients_common::wait_bounded(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn sample_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("hello.txt".into(), b"cryptnbd on a loop device\n".to_vec()),
        (
            "random-3M.bin".into(),
            pseudo_random(3 * MIB as usize + 17, 42),
        ),
        ("sub/dir/nested.bin".into(), pseudo_random(123_457, 7)),
    ]
}

fn ext4_survives_server_restart(test: &str, sector: u32) {
    if !have_tools(
        test,
        &[
            "nbdfuse",
            "fusermount3",
            "losetup",
            "mkfs.ext4",
            "fsck.ext4",
            "mount",
            "umount",
            "grep",
        ],
    ) {
        return;
    }
    if let Some(why) = environment_limit() {
        skip_environment(test, &why);
        return;
    }
    // One attachment at a time: two tests setting up FUSE mounts, loop devices and ext4 mounts
    // at once have been seen to keep each other's mounts busy.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = DataDir::new();
    d.create_volume("disk0", 256 * MIB, sector);
    let files = sample_files();

    // First attach: make a file system and fill it.
    let srv: Server = d.serve(&["disk0"]);
    let mut a = Attached::new(d.path(), &srv.uri("disk0"), sector);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "cryptnbd"])
            .arg(a.dev()),
    );
    a.mount();
    for (name, data) in &files {
        let p = a.fs_dir.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir in ext4");
        std::fs::write(&p, data).expect("write file on ext4");
    }
    run_ok(&mut Command::new("sync"));
    a.detach();
    srv.stop();

    // Second attach, after a full server restart (the DEK is unwrapped again).
    let srv = d.serve(&["disk0"]);
    let mut a = Attached::new(d.path(), &srv.uri("disk0"), sector);
    let fsck = run_bounded(
        Command::new("fsck.ext4").arg("-fn").arg(a.dev()),
        TOOL_TIMEOUT,
    );
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn is not clean after the restart:\n{}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    a.mount();
    for (name, data) in &files {
        let back = std::fs::read(a.fs_dir.join(name)).expect("read file back from ext4");
        assert!(
            back == *data,
            "{name} changed across detach and server restart"
        );
    }
    a.detach();
    srv.stop();

    // The file system went to disk encrypted: a file's text is not in the clear. (grep, because a
    // byte-by-byte scan of 257 MiB in a debug build takes many seconds.)
    let found = run_bounded(
        Command::new("grep")
            .args(["-q", "-a", "-F", "cryptnbd on a loop device"])
            .arg(d.volume_path("disk0")),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        found.status.code(),
        Some(1),
        "grep should find no plaintext file content in the volume file (exit 0 = found)"
    );
}

#[test]
fn blockdev_ext4_on_nbdfuse_loop_survives_server_restart() {
    ext4_survives_server_restart(
        "blockdev_ext4_on_nbdfuse_loop_survives_server_restart",
        4096,
    );
}

/// The kernel's usual 512-byte logical blocks, on a volume with 512-byte encryption sectors.
#[test]
fn blockdev_ext4_512_byte_sectors_survives_server_restart() {
    ext4_survives_server_restart(
        "blockdev_ext4_512_byte_sectors_survives_server_restart",
        512,
    );
}
