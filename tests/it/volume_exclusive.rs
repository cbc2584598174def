//! One writer per volume (issue #10, defect 3): a read-write attach takes an exclusive `flock`,
//! so a second `cryptnbd serve` on the same data directory is refused the volume with a clear
//! reason (before the fix, both served it read-write and their read-modify-write locks did not
//! see each other), and `volume import` builds the volume under a temporary name, so nothing can
//! attach a half-imported volume, and a stale temporary file of a killed import is cleaned up.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::raw::RawClient;
use cryptnbd::datadir::{CreateOptions, DataDir, DataDirError};
use cryptnbd::kms::{InitRoot, KeyStore};
use cryptnbd::nbd::*;

/// Kills the server (SIGTERM, then SIGKILL) when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.0.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `cryptnbd serve` and waits (bounded) until it printed its attach commands and the
/// socket exists.
fn serve(data: &Path, sock: &Path) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .args(["--data-dir", data.to_str().unwrap(), "serve", "--socket"])
        .arg(sock)
        .env_remove("CRYPTNBD_PASSPHRASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cryptnbd serve");
    let out = child.stdout.take().unwrap();
    let served = Served(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining after the test stopped listening: a closed pipe would make the
        // server's next line fail.
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = rx
            .recv_timeout(left)
            .expect("serve printed its attach commands");
        if l.contains("nbdinfo") {
            break;
        }
    }
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    served
}

#[test]
fn a_second_server_is_refused_a_volume_the_first_serves_read_write() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (s1, s2) = (tmp.path().join("1.sock"), tmp.path().join("2.sock"));
    let first = serve(&data, &s1);
    let second = serve(&data, &s2);

    let mut a = RawClient::unix(&s1);
    a.connect_export("disk0", false);
    assert_eq!(a.write(1, 0, &[0x42; 4096], CMD_FLAG_FUA).error(), 0);

    let mut b = RawClient::unix(&s2);
    b.start();
    let r = b.info_go(OPT_GO, "disk0", &[]);
    let last = r.last().unwrap();
    assert_ne!(
        last.h.reply_type, REP_ACK,
        "the second server attached disk0 too"
    );
    let msg = last.message();
    assert!(
        msg.contains("in use") && msg.contains("disk0"),
        "unclear refusal: {msg:?}"
    );
    drop(b);

    // Once the first server stops, the second one can attach it (the refusal is not forever).
    drop(a);
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut b = RawClient::unix(&s2);
        b.start();
        let r = b.info_go(OPT_GO, "disk0", &[]);
        if r.last().unwrap().h.reply_type == REP_ACK {
            break;
        }
        assert!(Instant::now() < deadline, "disk0 never became attachable");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(second);
}

#[test]
fn import_is_invisible_until_complete_and_cleans_up_a_stale_temporary() {
    let tmp = tempfile::tempdir().unwrap();
    let ks = KeyStore::init(tmp.path(), InitRoot::GenerateKeyFile).unwrap();
    ks.create_key("alias/default", "test").unwrap();
    let dd = DataDir::new(tmp.path());
    let img = tmp.path().join("disk.raw");
    let content: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&img, &content).unwrap();
    // What an import killed half-way leaves (another pid, nobody holds its lock).
    std::fs::create_dir_all(dd.volumes_dir()).unwrap();
    let stale = dd.volumes_dir().join(".vm.vol.4000000.tmp");
    std::fs::write(&stale, b"partial").unwrap();

    let mut checked = 0;
    dd.import(
        &ks,
        "vm",
        &img,
        "alias/default",
        CreateOptions::default(),
        |done, total| {
            if done < total {
                // Half-way: no volume "vm" to list, attach or serve yet.
                assert!(!dd.list_volumes().unwrap().contains(&"vm".to_string()));
                assert!(matches!(
                    dd.attach(&ks, "vm", true),
                    Err(DataDirError::NotFound { .. })
                ));
                checked += 1;
            }
        },
    )
    .unwrap();
    assert!(checked > 0, "the import reported no progress mid-way");
    assert!(!stale.exists(), "the stale temporary file was not removed");
    let leftovers: Vec<_> = std::fs::read_dir(dd.volumes_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let v = dd.attach(&ks, "vm", true).unwrap();
    let mut buf = vec![0u8; content.len()];
    v.read(0, &mut buf).unwrap();
    assert!(buf == content, "imported content differs");
    drop(v);

    // A failed import (the name exists) leaves the existing volume alone and no temporary.
    let e = dd
        .import(
            &ks,
            "vm",
            &img,
            "alias/default",
            CreateOptions::default(),
            |_, _| {},
        )
        .unwrap_err();
    assert!(matches!(e, DataDirError::AlreadyExists { .. }), "{e}");
    assert!(dd.attach(&ks, "vm", false).is_ok());
}

fn cli(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("CRYPTNBD_PASSPHRASE")
        .output()
        .expect("run cryptnbd")
}

/// `volume import` beside a running server: the new volume appears complete and is served; an
/// import over a served volume's name and an export of a volume served read-write are refused.
#[test]
fn import_beside_a_running_server() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sock = tmp.path().join("s.sock");
    let srv = serve(&data, &sock);
    let mut a = RawClient::unix(&sock);
    a.connect_export("disk0", false);

    let img = tmp.path().join("vm.raw");
    let content: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 241) as u8 | 2).collect();
    std::fs::write(&img, &content).unwrap();
    let img_s = img.to_str().unwrap();
    let out = cli(
        &data,
        &[
            "volume",
            "import",
            "vm",
            "--from",
            img_s,
            "--key",
            "alias/default",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = RawClient::unix(&sock);
    c.connect_export("vm", false);
    assert_eq!(c.read(1, 0, 65536).unwrap(), &content[..65536]);
    assert_eq!(
        c.read(2, (3 << 20) - 4096, 4096).unwrap(),
        &content[(3 << 20) - 4096..]
    );

    let out = cli(
        &data,
        &[
            "volume",
            "import",
            "disk0",
            "--from",
            img_s,
            "--key",
            "alias/default",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let to = tmp.path().join("copy.raw");
    let out = cli(
        &data,
        &["volume", "export", "disk0", "--to", to.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    drop(a);
    drop(c);
    drop(srv);
}
