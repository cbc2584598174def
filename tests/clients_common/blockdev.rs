//! An export as a real Linux block device for the tests: the kernel here has no `nbd` module, so
//! the path is `nbdfuse` (export → a file in a FUSE mount) + `losetup` (file → /dev/loopN), with
//! an ext4 mount on top when asked. Shared by the file-volume and RBD-volume block-device tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{run_bounded, run_ok, TOOL_TIMEOUT};

/// Why this machine cannot attach a FUSE file as a loop device, if it cannot.
pub fn environment_limit() -> Option<String> {
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
pub struct Attached {
    fuse_dir: PathBuf,
    /// Where the file system is mounted while `mounted`.
    pub fs_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mounted: bool,
}

impl Attached {
    /// `loop_sector` is the loop device's logical block size (e.g. the volume's encryption
    /// sector); `None` is a plain `losetup` (the kernel's default, 512-byte blocks), which works
    /// too since the server advertises a minimum block size of 1: see `clients_align.rs`.
    pub fn new(base: &Path, uri: &str, loop_sector: Option<u32>) -> Attached {
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
        let mut losetup = Command::new("losetup");
        losetup.args(["-f", "--show"]);
        if let Some(s) = loop_sector {
            losetup.args(["--sector-size", &s.to_string()]);
        }
        let dev = run_ok(losetup.arg(a.fuse_dir.join("disk")));
        a.loop_dev = Some(dev.trim().to_string());
        a
    }

    pub fn dev(&self) -> &str {
        self.loop_dev.as_deref().expect("loop device attached")
    }

    /// The loop device's logical block size, as the kernel reports it.
    pub fn logical_block_size(&self) -> String {
        run_ok(Command::new("blockdev").arg("--getss").arg(self.dev()))
            .trim()
            .to_string()
    }

    pub fn mount(&mut self) {
        run_ok(Command::new("mount").arg(self.dev()).arg(&self.fs_dir));
        self.mounted = true;
    }

    /// Unmounts, retrying for a while on "target is busy": right after the last write the
    /// kernel (or a udev probe of the loop device) may still hold the file system briefly.
    pub fn umount(&mut self) {
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
    pub fn detach(mut self) {
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
            let st = super::wait_bounded(&mut c, Duration::from_secs(30));
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
            if super::wait_bounded(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
