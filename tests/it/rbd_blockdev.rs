//! An RBD volume as a real Linux block device across a gateway switch (feature `rbd`, real
//! cluster): `nbdfuse` + `losetup` turn gateway 1's export into /dev/loopN; `mkfs.ext4`, files
//! written, everything detached, gateway 1 stopped; then gateway 2 (another data directory with
//! the same key store, as on another host) serves the same image: `fsck.ext4 -fn` is clean and
//! the files read back intact. The image holds no plaintext of the files.
//!
//! The attach helper mirrors the one in `clients_blockdev.rs` (kept separate so the two test
//! binaries merge independently).
#![cfg(feature = "rbd")]

use crate::clients_common;
use crate::rbd_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clients_common::{
    have_tools, pseudo_random, run_bounded, run_ok, skip_environment, DataDir, MIB, TOOL_TIMEOUT,
};
use rbd_common::{ceph_conf, create_rbd_volume, rbd, second_host, unique_image, Gateway, POOL};

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

/// nbdfuse + loop device (+ ext4 mount while `mounted`); dropping it undoes what is left.
struct Attached {
    fuse_dir: PathBuf,
    fs_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mounted: bool,
}

impl Attached {
    fn new(base: &Path, uri: &str) -> Attached {
        let fuse_dir = base.join("fuse");
        let fs_dir = base.join("fs");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&fs_dir).unwrap();
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pidfile.exists() {
            if let Some(Ok(Some(st))) = a.nbdfuse.as_mut().map(|c| c.try_wait()) {
                panic!("nbdfuse exited ({st}) before it was ready");
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready within 30 s");
            std::thread::sleep(Duration::from_millis(25));
        }
        // 4096-byte loop sectors: libnbd refuses requests below the export's 4096-byte block.
        let dev = run_ok(
            Command::new("losetup")
                .args(["-f", "--show", "--sector-size", "4096"])
                .arg(a.fuse_dir.join("disk")),
        );
        a.loop_dev = Some(dev.trim().to_string());
        a
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().expect("loop device")
    }

    fn mount(&mut self) {
        run_ok(Command::new("mount").arg(self.dev()).arg(&self.fs_dir));
        self.mounted = true;
    }

    /// Retries while the kernel still calls the target busy (it lets go a moment later).
    fn retry_busy(what: &str, mut cmd: impl FnMut() -> Command) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run_bounded(&mut cmd(), TOOL_TIMEOUT);
            if out.status.success() {
                return;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("busy") && Instant::now() < deadline,
                "{what} failed: {err}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn detach(mut self) {
        if self.mounted {
            let fs = self.fs_dir.clone();
            Self::retry_busy("umount", || {
                let mut c = Command::new("umount");
                c.arg(&fs);
                c
            });
            self.mounted = false;
        }
        if let Some(dev) = self.loop_dev.take() {
            run_ok(Command::new("losetup").arg("-d").arg(&dev));
        }
        let fuse = self.fuse_dir.clone();
        Self::retry_busy("fusermount3 -u", || {
            let mut c = Command::new("fusermount3");
            c.arg("-u").arg(&fuse);
            c
        });
        if let Some(mut c) = self.nbdfuse.take() {
            let st = clients_common::wait_bounded(&mut c, Duration::from_secs(30));
            assert!(
                st.map(|s| s.success()).unwrap_or(false),
                "nbdfuse exit: {st:?}"
            );
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| {
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if self.mounted {
            quiet(Command::new("umount").arg("-l").arg(&self.fs_dir));
        }
        if let Some(dev) = self.loop_dev.take() {
            quiet(Command::new("losetup").arg("-d").arg(&dev));
        }
        if let Some(mut c) = self.nbdfuse.take() {
            quiet(Command::new("fusermount3").arg("-uz").arg(&self.fuse_dir));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn rbd_ext4_on_nbdfuse_loop_survives_gateway_switch() {
    let test = "rbd_ext4_on_nbdfuse_loop_survives_gateway_switch";
    let tools = [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
        "rbd",
    ];
    if !have_tools(test, &tools) {
        return;
    }
    if let Some(why) = environment_limit() {
        skip_environment(test, &why);
        return;
    }
    let Some(conf) = ceph_conf(test) else { return };
    let d = DataDir::new();
    let image = unique_image("ext4");
    let _guard = create_rbd_volume(&d, &conf, "disk0", &image, 128 * MIB, 4096);
    let host2 = second_host(&d);
    let files: Vec<(String, Vec<u8>)> = vec![
        (
            "hello.txt".into(),
            b"cryptnbd on rbd on a loop device\n".repeat(200),
        ),
        (
            "dir/random.bin".into(),
            pseudo_random(3 * MIB as usize + 123, 5),
        ),
    ];

    let gw1 = Gateway::start(d.path(), &[]);
    let mut a = Attached::new(d.path(), &gw1.uri("disk0"));
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(a.dev()));
    a.mount();
    for (name, data) in &files {
        let p = a.fs_dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
    run_ok(&mut Command::new("sync"));
    a.detach();
    gw1.stop();

    let gw2 = Gateway::start(host2.path(), &[]);
    let mut a = Attached::new(host2.path(), &gw2.uri("disk0"));
    let fsck = run_bounded(
        Command::new("fsck.ext4").arg("-fn").arg(a.dev()),
        TOOL_TIMEOUT,
    );
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn not clean on gateway 2:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    a.mount();
    for (name, data) in &files {
        let back = std::fs::read(a.fs_dir.join(name)).expect("read back");
        assert!(back == *data, "{name} changed across the gateway switch");
    }
    a.detach();
    gw2.stop();

    let raw = d.path().join("raw.img");
    let out = rbd(
        &conf,
        &[
            "export",
            "--no-progress",
            &format!("{POOL}/{image}"),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "rbd export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found = run_bounded(
        Command::new("grep")
            .args(["-q", "-a", "-F", "cryptnbd on rbd on a loop device"])
            .arg(&raw),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        found.status.code(),
        Some(1),
        "plaintext file content found in the RBD image"
    );
}
