//! Power loss, not only process death: the data directory lives on `lazyfs` (tests/lazyfs), a FUSE
//! file system that forgets every write, create and rename not yet fsynced when the test "pulls the
//! plug". Each round either drives NBD writes (as `durability_kill9.rs` does) or runs one CLI
//! command that changes a volume header or the key store (`volume create/resize/rekey`,
//! `kms create-key/rotate-key/disable-key`), kills every process at a random moment
//! and drops all unsynced state (every other round, a random part of it survives instead: a torn
//! write-back, at 4 KiB granularity). Afterwards the key store and every volume must be in the old or
//! the new state — readable, attachable, their data as the durability model allows — and a
//! command that had finished before the plug was pulled must have left the new state, and what a
//! command does not change (another volume field) must not have changed.
//!
//! `CRYPTNBD_POWERLOSS_ROUNDS=N` runs more rounds (`tools/crash-loop --power-loss N`).

use crate::clients_common;
use crate::durability_common;
use crate::lazyfs;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clients_common::{find_tool, report_missing, run_bounded, skip_environment, wait_bounded};
use durability_common::{assert_clean, have_python_nbd, Round};
use rand::Rng;
use serde_json::Value;

const TEST: &str = "powerloss_leaves_old_or_new_state";
const KEY: &str = "alias/pl";
const MIB: u64 = 1 << 20;

/// The data directory on a mounted lazyfs, and a normal directory for sockets, logs and the
/// client's model (which must survive the power losses).
struct Rig {
    data: PathBuf,
    work: tempfile::TempDir,
    mounted: lazyfs::Mounted,
    _mnt: tempfile::TempDir,
}

impl Rig {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cryptnbd"));
        c.arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .env_remove("CRYPTNBD_PASSPHRASE")
            .env_remove("CRYPTNBD_DATA_DIR");
        c
    }

    fn cli(&self, args: &[&str]) -> Output {
        run_bounded(&mut self.cmd(args), Duration::from_secs(120))
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "cryptnbd {args:?} failed after a power loss: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.cli_ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start cryptnbd")
    }

    fn socket(&self) -> PathBuf {
        self.work.path().join("nbd.sock")
    }

    /// `cryptnbd serve` for `exports`, on a socket outside the lazyfs; waits until it listens.
    fn serve(&self, exports: &[&str]) -> Child {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::File::create(self.work.path().join("serve.log")).expect("log");
        let mut c = self.cmd(&["serve", "--socket"]);
        c.arg(self.socket());
        for e in exports {
            c.arg("--export").arg(e);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start cryptnbd serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(self.socket()).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "cryptnbd serve exited ({st}) after a power loss: {}",
                    std::fs::read_to_string(self.work.path().join("serve.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "cryptnbd serve did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn uri(&self, export: &str) -> String {
        clients_common::nbd_uri(&self.socket(), export)
    }

    /// Kills `victim` (SIGKILL) and drops every unsynced change: the plug is pulled.
    fn pull_plug(&self, victim: &mut Child, torn: bool) {
        let _ = victim.kill();
        let _ = wait_bounded(victim, Duration::from_secs(30));
        if torn {
            self.mounted.fs.power_loss_torn(&mut rand::thread_rng());
        } else {
            self.mounted.fs.power_loss();
        }
    }

    /// Serves `export` and lets the client check it against its model in `model_dir`.
    fn verify_volume(&self, export: &str, model_dir: &Path) -> Value {
        let mut server = self.serve(&[export]);
        let (ok, v) =
            Round::start(&self.uri(export), model_dir, 0.0, true).finish(Duration::from_secs(120));
        stop(&mut server);
        assert_clean(ok, &v, &format!("volume {export} after a power loss"));
        v
    }

    fn key(&self, alias: &str) -> Option<Value> {
        let keys = self.json(&["kms", "list-keys", "--json"]);
        keys["keys"]
            .as_array()
            .expect("keys array")
            .iter()
            .find(|k| k["key_alias"] == alias)
            .cloned()
    }

    fn volumes(&self) -> Vec<String> {
        let list = self.json(&["volume", "list", "--json"]);
        list.as_array()
            .expect("volume list array")
            .iter()
            .map(|v| v["name"].as_str().expect("name").to_string())
            .collect()
    }
}

fn stop(server: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    if wait_bounded(server, Duration::from_secs(20)).is_none() {
        let _ = server.kill();
        let _ = server.wait();
    }
}

fn mount(test: &str) -> Option<Rig> {
    if !Path::new("/dev/fuse").exists() {
        skip_environment(test, "no /dev/fuse");
        return None;
    }
    if find_tool("fusermount3").is_none() {
        report_missing(test, "fusermount3 (Debian package fuse3)");
        return None;
    }
    let mnt = tempfile::Builder::new()
        .prefix("cryptnbd-lazyfs-")
        .tempdir()
        .expect("mount point");
    let work = tempfile::tempdir().expect("work dir");
    let mounted = match lazyfs::LazyFs::mount(mnt.path()) {
        Ok(m) => m,
        Err(e) => {
            skip_environment(test, &format!("cannot mount a FUSE file system: {e}"));
            return None;
        }
    };
    Some(Rig {
        data: mnt.path().join("data"),
        work,
        mounted,
        _mnt: mnt,
    })
}

#[derive(Default)]
struct Counts {
    plug_pulls: u64,
    torn: u64,
    during_writes: u64,
    cli_interrupted: u64,
    cli_completed: u64,
    acked: u64,
    durable: u64,
    verified: u64,
}

#[test]
fn powerloss_leaves_old_or_new_state() {
    if !have_python_nbd(TEST) {
        return;
    }
    let Some(rig) = mount(TEST) else {
        return;
    };
    let rounds: usize = std::env::var("CRYPTNBD_POWERLOSS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    // Every other round (every round with CRYPTNBD_POWERLOSS_TORN=1), unsynced writes may also
    // have landed in part (lazyfs::power_loss_torn) rather than not at all.
    let all_torn = std::env::var("CRYPTNBD_POWERLOSS_TORN").is_ok_and(|v| v == "1");
    let mut rng = rand::thread_rng();
    let mut n = Counts::default();
    // Per kind of round: how long its command took when it last ran to the end.
    let mut took = [Duration::from_millis(150); 8];

    // Setup; each completed command must already be durable.
    // `kms init` makes the data directory itself: its entry must be durable too.
    for args in [
        &["kms", "init"][..],
        &["kms", "create-key", "--alias", "pl"],
        &["volume", "create", "v", "--size", "8M", "--key", KEY],
    ] {
        rig.cli_ok(args);
        rig.mounted.fs.power_loss();
    }
    assert!(
        rig.key(KEY).is_some(),
        "a completed kms create-key was lost"
    );
    assert_eq!(
        rig.volumes(),
        vec!["v".to_string()],
        "a completed volume create was lost"
    );
    let model = rig.work.path().join("model-v");
    std::fs::create_dir(&model).expect("model dir");

    for round in 0..rounds {
        let op = round % 8;
        let torn = all_torn || round % 2 == 1;
        n.torn += u64::from(torn);
        if op == 0 || op == 4 {
            // NBD writes, plug pulled at a random moment.
            let mut server = rig.serve(&["v"]);
            let mut client = Round::start(&rig.uri("v"), &model, 30.0, false);
            client.wait_writing(Duration::from_secs(120));
            std::thread::sleep(Duration::from_millis(rng.gen_range(200..2000)));
            rig.pull_plug(&mut server, torn);
            let (ok, v) = client.finish(Duration::from_secs(120));
            assert_clean(ok, &v, &format!("round {round}"));
            n.acked += v["acked"].as_u64().unwrap_or(0);
            n.durable += v["durable"].as_u64().unwrap_or(0);
            n.during_writes += 1;
            n.plug_pulls += 1;
            eprintln!("round {round}: plug pulled during NBD writes: {v}");
        } else {
            let before_key = rig.key(KEY).expect("alias/pl exists");
            let before_vol = rig.json(&["volume", "info", "v", "--json"]);
            let new_alias = format!("k{round}");
            let new_vol = format!("n{round}");
            let new_size = (before_vol["size"].as_u64().expect("size") + MIB).to_string();
            let args: Vec<&str> = match op {
                1 => vec!["kms", "rotate-key", KEY],
                2 => vec!["volume", "rekey", "v"],
                3 => vec!["volume", "resize", "v", "--size", &new_size],
                5 => vec!["kms", "create-key", "--alias", &new_alias],
                7 => vec!["kms", "disable-key", KEY],
                _ => vec!["volume", "create", &new_vol, "--size", "2M", "--key", KEY],
            };
            // Pull the plug at a random moment within how long this command took last time it
            // ran to the end, so most pulls land inside it.
            let est = took[op];
            let delay = est.mul_f64(rng.gen_range(0.0..1.1));
            let started = Instant::now();
            let mut child = rig.spawn(&args);
            let mut completed = false;
            while started.elapsed() < delay {
                if let Ok(Some(st)) = child.try_wait() {
                    completed = st.success();
                    took[op] = started.elapsed();
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if !completed && delay > est.mul_f64(0.9) {
                took[op] = est.mul_f64(1.3); // it takes longer than we thought
            }
            rig.pull_plug(&mut child, torn);
            n.plug_pulls += 1;
            if completed {
                n.cli_completed += 1;
            } else {
                n.cli_interrupted += 1;
            }
            let at = if completed { took[op] } else { delay };
            eprintln!("round {round}: plug pulled {at:?} into {args:?} (finished: {completed})");

            let key = rig.key(KEY).expect("alias/pl lost after a power loss");
            let vol = rig.json(&["volume", "info", "v", "--json"]);
            // What the command does not change must not change.
            for (field, changed_by) in [("size", 3), ("key_version", 2), ("volume_id", 99)] {
                assert!(
                    op == changed_by || vol[field] == before_vol[field],
                    "{args:?} changed volume v's {field}: {} became {}",
                    before_vol[field],
                    vol[field]
                );
            }
            match op {
                1 => {
                    let (b, a) = (&before_key["version_count"], &key["version_count"]);
                    let (b, a) = (b.as_u64().unwrap_or(0), a.as_u64().unwrap_or(0));
                    assert!(a == b || a == b + 1, "rotate: {b} versions became {a}");
                    assert!(!completed || a == b + 1, "a finished rotate-key was lost");
                }
                2 => {
                    let (b, a) = (&before_vol["key_version"], &vol["key_version"]);
                    let newest = &key["current_version"];
                    assert!(a == b || a == newest, "rekey: version {b} became {a}");
                    assert!(!completed || a == newest, "a finished rekey was lost");
                }
                3 => {
                    let (b, a) = (&before_vol["size"], &vol["size"]);
                    let grown = a.as_u64().map(|n| n.to_string()) == Some(new_size.clone());
                    assert!(a == b || grown, "resize to {new_size}: size {b} became {a}");
                    assert!(!completed || grown, "a finished resize was lost");
                }
                5 => {
                    let alias = format!("alias/{new_alias}");
                    match rig.key(&alias) {
                        Some(_) => {
                            rig.cli_ok(&["kms", "create-datakey", &alias, "--json"]);
                        }
                        None => {
                            assert!(!completed, "a finished create-key was lost");
                            rig.cli_ok(&["kms", "create-key", "--alias", &new_alias]);
                        }
                    }
                }
                7 => {
                    let state = key["key_state"].as_str().unwrap_or_default().to_string();
                    assert!(state == "2" || state == "3", "disable-key: state {state}");
                    assert!(
                        !completed || state == "3",
                        "a finished disable-key was lost"
                    );
                    if state == "3" {
                        rig.cli_ok(&["kms", "enable-key", KEY]);
                    }
                }
                _ => {
                    if rig.volumes().contains(&new_vol) {
                        let fresh = rig.work.path().join(format!("model-{new_vol}"));
                        std::fs::create_dir(&fresh).expect("model dir");
                        rig.verify_volume(&new_vol, &fresh);
                    } else {
                        assert!(!completed, "a finished volume create was lost");
                        // Nothing half-made may stand in the way of trying again.
                        rig.cli_ok(&["volume", "create", &new_vol, "--size", "2M", "--key", KEY]);
                    }
                }
            }
            // The unwrapped DEK must still work, whatever version wraps it now.
            rig.cli_ok(&["kms", "create-datakey", KEY, "--json"]);
        }
        let v = rig.verify_volume("v", &model);
        n.verified += v["check"]["verified"].as_u64().unwrap_or(0);
    }
    let st = rig.mounted.fs.stats();
    println!(
        "power loss x{} ({} torn): {} during NBD writes (writes acknowledged {}, durable {}), {} during a \
         CLI command (interrupted {}, finished just before {}); 512-byte pieces verified {}, \
         lost 0, garbage 0; lazyfs forgot {} files, rolled back {} files and {} directories",
        n.plug_pulls,
        n.torn,
        n.during_writes,
        n.acked,
        n.durable,
        n.cli_interrupted + n.cli_completed,
        n.cli_interrupted,
        n.cli_completed,
        n.verified,
        st.files_forgotten,
        st.files_rolled_back,
        st.dirs_rolled_back
    );
    assert!(n.acked > 0 && n.durable > 0, "no write was acknowledged");
}

/// The model itself: lazyfs forgets exactly what POSIX allows a power loss to forget.
#[test]
fn lazyfs_forgets_only_what_was_not_synced() {
    let Some(rig) = mount("lazyfs_forgets_only_what_was_not_synced") else {
        return;
    };
    let root = rig._mnt.path();
    let sync = |p: &Path| {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()))
    };
    let read = |p: &Path| std::fs::read(p).ok();
    let d = root.join("d");
    std::fs::create_dir(&d).expect("mkdir");
    sync(root);
    // Written and fsynced, entry synced: survives whole.
    std::fs::write(d.join("kept"), b"kept").expect("write");
    sync(&d.join("kept"));
    // Entry synced but data never fsynced: survives empty.
    std::fs::write(d.join("empty"), b"lost data").expect("write");
    sync(&d);
    // Data fsynced but its directory entry never: gone.
    std::fs::write(d.join("unlinked"), b"x").expect("write");
    sync(&d.join("unlinked"));
    // Renamed over `kept` without syncing the directory: `kept` keeps its old content.
    std::fs::write(d.join("new"), b"new").expect("write");
    sync(&d.join("new"));
    std::fs::rename(d.join("new"), d.join("kept")).expect("rename");
    // Appended after the last fsync: the tail is forgotten.
    std::fs::OpenOptions::new()
        .append(true)
        .open(d.join("empty"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"more"))
        .expect("append");
    assert_eq!(read(&d.join("kept")).as_deref(), Some(&b"new"[..]));
    rig.mounted.fs.power_loss();
    assert_eq!(read(&d.join("kept")).as_deref(), Some(&b"kept"[..]));
    assert_eq!(read(&d.join("empty")).as_deref(), Some(&b""[..]));
    assert_eq!(read(&d.join("unlinked")), None);
    assert_eq!(read(&d.join("new")), None);
    // And once the directory is synced, the rename sticks.
    std::fs::write(d.join("new"), b"new").expect("write");
    sync(&d.join("new"));
    std::fs::rename(d.join("new"), d.join("kept")).expect("rename");
    sync(&d);
    rig.mounted.fs.power_loss();
    assert_eq!(read(&d.join("kept")).as_deref(), Some(&b"new"[..]));
    assert_eq!(read(&d.join("new")), None);
    let st = rig.mounted.fs.stats();
    assert!(st.power_losses == 2 && st.files_forgotten >= 2, "{st:?}");

    // Torn: each unsynced 4 KiB block is the old or the new one, never anything else, and over
    // a few tries both happen.
    let f = d.join("torn");
    std::fs::write(&f, [b'o'; 8192]).expect("write");
    sync(&f);
    sync(&d);
    let mut seen = std::collections::HashSet::new();
    let mut rng = rand::thread_rng();
    for _ in 0..20 {
        std::fs::write(&f, [b'n'; 8192]).expect("write");
        rig.mounted.fs.power_loss_torn(&mut rng);
        let got = read(&f).expect("the synced file is still there");
        assert_eq!(got.len(), 8192);
        for block in got.chunks(4096) {
            assert!(
                block.iter().all(|&b| b == block[0]) && (block[0] == b'o' || block[0] == b'n'),
                "a torn power loss left a block that is neither old nor new"
            );
            seen.insert(block[0]);
        }
        std::fs::write(&f, [b'o'; 8192]).expect("write");
        sync(&f);
    }
    assert_eq!(
        seen.len(),
        2,
        "20 torn power losses kept always or never the new block"
    );
}
