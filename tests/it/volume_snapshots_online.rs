//! Online snapshots of a served volume, through the real `serve` and its control socket: two
//! clients write sequence-numbered blocks continuously while snapshots are taken with `volume
//! snapshot` (which finds the server's socket) and `ctl snapshot`; each snapshot, exported while
//! the volume stays served, must be exactly the state after a prefix of each client's writes,
//! holding every write acknowledged before the command started and none begun after it
//! returned. The volume keeps serving (reads back its last writes), the snapshots are listed,
//! served read-only and named in `nbdinfo --list`, with the time each was taken. A server
//! killed (SIGKILL) at a random moment while snapshots are taken leaves every acknowledged write
//! in the volume and every listed snapshot whole.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::raw::RawClient;
use crate::common::{require_tool, run_bounded};
use crate::ops_ctl::{text, Serve};

const BLOCK: usize = 4096;
/// Blocks each writer cycles through (its own region).
const BLOCKS: u64 = 64;
const WRITERS: u64 = 2;
const NBDINFO: &str = "/usr/bin/nbdinfo";

/// A writer's block `b` after its writes `1..=seq` (write n goes to block n % BLOCKS): the
/// last sequence number that wrote it, 0 for none.
fn expected(seq: u64, b: u64) -> u64 {
    if seq < b {
        0
    } else {
        seq - (seq - b) % BLOCKS
    }
}

fn block_of(w: u64, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        v.extend_from_slice(&(w << 56 | seq).to_le_bytes());
    }
    v
}

fn offset(w: u64, b: u64) -> u64 {
    (w * BLOCKS + b) * BLOCK as u64
}

/// Progress of one writer: the last write it sent, the last it got a reply for.
#[derive(Default)]
struct Progress {
    started: AtomicU64,
    acked: AtomicU64,
}

fn writer(
    sock: &Path,
    export: &str,
    w: u64,
    p: Arc<Progress>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    let mut c = RawClient::unix(sock);
    c.connect_export(export, true);
    thread::spawn(move || {
        let mut seq = 0;
        while !stop.load(SeqCst) {
            seq += 1;
            p.started.store(seq, SeqCst);
            let r = c.write(seq, offset(w, seq % BLOCKS), &block_of(w, seq), 0);
            assert_eq!(r.error(), 0, "write {seq} of writer {w}");
            p.acked.store(seq, SeqCst);
        }
    })
}

/// The sequence number writer `w`'s region of `image` shows it reached, after checking the
/// region is exactly its state after that many writes.
fn prefix_of(image: &[u8], w: u64) -> u64 {
    let at = |b: u64| {
        let o = offset(w, b) as usize;
        let word = u64::from_le_bytes(image[o..o + 8].try_into().unwrap());
        let blk = &image[o..o + BLOCK];
        if word == 0 {
            assert!(blk.iter().all(|&x| x == 0), "block {b} of writer {w} torn");
            return 0;
        }
        assert_eq!(
            word >> 56,
            w,
            "block {b} of writer {w} holds another's data"
        );
        assert_eq!(
            blk,
            &block_of(w, word & !(0xff << 56))[..],
            "block {b} torn"
        );
        word & !(0xff << 56)
    };
    let seq = (0..BLOCKS).map(at).max().unwrap();
    for b in 0..BLOCKS {
        assert_eq!(
            at(b),
            expected(seq, b),
            "writer {w}, block {b}: not the state after its writes 1..={seq}"
        );
    }
    seq
}

fn export(s: &Serve, name: &str) -> Vec<u8> {
    let to = s.data.parent().unwrap().join(format!("{name}.raw"));
    let o = s.cli(&["volume", "export", name, "--to", to.to_str().unwrap()]);
    assert!(o.status.success(), "export {name}: {}", text(&o));
    let b = std::fs::read(&to).unwrap();
    std::fs::remove_file(&to).unwrap();
    b
}

#[test]
fn online_snapshots_hold_exactly_a_prefix_of_the_acknowledged_writes() {
    let s = Serve::start(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let progress: Vec<Arc<Progress>> = (0..WRITERS).map(|_| Arc::default()).collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let p = progress[w as usize].clone();
            writer(&s.nbd_sock(), "disk0", w, p, stop.clone())
        })
        .collect();
    let wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while progress.iter().any(|p| p.acked.load(SeqCst) < n) {
            assert!(Instant::now() < deadline, "the writers stalled");
            thread::sleep(Duration::from_millis(5));
        }
    };
    let mut bounds = Vec::new();
    for i in 0..6u64 {
        wait_for(20 * (i + 1));
        let before: Vec<u64> = progress.iter().map(|p| p.acked.load(SeqCst)).collect();
        let name = format!("disk0@s{i}");
        // Both ways in: the volume command finds the server's socket; ctl names it.
        let o = if i % 2 == 0 {
            s.cli(&["volume", "snapshot", &name])
        } else {
            s.cli(&["ctl", "snapshot", &name])
        };
        let after: Vec<u64> = progress.iter().map(|p| p.started.load(SeqCst)).collect();
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(text(&o).contains("online"), "{}", text(&o));
        bounds.push((name, before, after));
    }
    wait_for(bounds.len() as u64 * 20 + 40);
    // Snapshots read while the volume is served and written: exported through their own
    // (shared) lock.
    for (name, before, after) in &bounds {
        let image = export(&s, name);
        for w in 0..WRITERS {
            let seq = prefix_of(&image, w);
            let (lo, hi) = (before[w as usize], after[w as usize]);
            assert!(
                lo <= seq && seq <= hi,
                "{name}, writer {w}: holds writes 1..={seq}, acknowledged before: {lo}, begun by the end: {hi}"
            );
        }
    }
    stop.store(true, SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    // The served volume kept working: a fresh client reads each writer's last writes.
    let mut c = RawClient::unix(&s.nbd_sock());
    c.connect_export("disk0", true);
    let len = (WRITERS * BLOCKS) as usize * BLOCK;
    let live = c.read(1, 0, len as u32).unwrap();
    for w in 0..WRITERS {
        let last = progress[w as usize].acked.load(SeqCst);
        assert_eq!(prefix_of(&live, w), last, "writer {w}");
    }
    let o = s.cli(&["volume", "snapshot", "list", "disk0", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), bounds.len(), "{list}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for snap in list.as_array().unwrap() {
        let t = snap["taken"].as_u64().unwrap_or_else(|| panic!("{snap}"));
        assert!(t <= now && now - t < 3600, "{snap}");
    }
    // A snapshot is served read-only by the running server too.
    let mut c = RawClient::unix(&s.nbd_sock());
    let (_, flags) = c.connect_export("disk0@s0", true);
    assert_ne!(flags & cryptnbd::nbd::consts::FLAG_READ_ONLY, 0);
    // `nbdinfo --list` names the snapshots as read-only exports after their volume.
    if require_tool(NBDINFO) {
        let uri = format!("nbd+unix:///?socket={}", s.nbd_sock().display());
        let (ok, out, err) = run_bounded(
            Command::new(NBDINFO).args(["--list", "--json", &uri]),
            Duration::from_secs(60),
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let exports = v["exports"].as_array().unwrap();
        let names: Vec<&str> = exports
            .iter()
            .map(|e| e["export-name"].as_str().unwrap())
            .collect();
        assert_eq!(names[0], "disk0", "{names:?}");
        for (name, _, _) in &bounds {
            let e = exports.iter().find(|e| e["export-name"] == name.as_str());
            let e = e.unwrap_or_else(|| panic!("{name} not listed: {names:?}"));
            assert_eq!(e["is_read_only"], true, "{e}");
            assert!(
                e["description"].as_str().unwrap().contains("snapshot"),
                "{e}"
            );
        }
    }
    // Taking an existing snapshot again is refused, and changes nothing.
    let o = s.cli(&["ctl", "snapshot", "disk0@s0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already exists"), "{}", text(&o));
    let o = s.cli(&["ctl", "snapshot", "nosuch@s0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no export"), "{}", text(&o));
    let o = s.cli(&["ctl", "snapshot", "disk0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("NAME@SNAP"), "{}", text(&o));
}

#[test]
fn a_server_killed_during_online_snapshots_leaves_whole_snapshots_and_every_acked_write() {
    let mut s = Serve::start(&[]);
    let o = s.cli(&[
        "volume",
        "create",
        "small",
        "--size",
        "16M",
        "--key",
        "alias/default",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stop = Arc::new(AtomicBool::new(false));
    let p = Arc::new(Progress::default());
    let w = writer(&s.nbd_sock(), "small", 0, p.clone(), stop.clone());
    while p.acked.load(SeqCst) < 50 {
        thread::sleep(Duration::from_millis(5));
    }
    // Snapshots one after another until the server is gone.
    let data = s.data.clone();
    let snapper = thread::spawn(move || {
        let mut taken = 0;
        loop {
            let o = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
                .arg("--data-dir")
                .arg(&data)
                .args(["ctl", "snapshot", &format!("small@k{taken}")])
                .output()
                .unwrap();
            if !o.status.success() {
                return taken;
            }
            taken += 1;
            if taken == 40 {
                // Well inside the chain's depth limit (a snapshot beyond it is refused).
                return taken;
            }
        }
    });
    let pause = 300 + (std::process::id() % 700) as u64;
    thread::sleep(Duration::from_millis(pause));
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let taken = snapper.join().unwrap();
    // The writer stops at the broken connection (a panic in its thread, expected).
    let _ = w.join();
    let acked = p.acked.load(SeqCst);
    let started = p.started.load(SeqCst);
    let o = s.cli(&["check"]);
    assert!(o.status.success(), "{}", text(&o));
    // Every acknowledged write is in the volume (the process died, its page cache did not).
    let seq = prefix_of(&export(&s, "small"), 0);
    assert!(
        acked <= seq && seq <= started,
        "the volume holds writes 1..={seq}; acknowledged {acked}, begun {started}"
    );
    // Every snapshot listed is whole: the state after some prefix of the writes.
    let o = s.cli(&["volume", "snapshot", "list", "small", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    // In the order taken (the list is sorted by name: k10 before k2).
    names.sort_by_key(|n| n["small@k".len()..].parse::<u32>().unwrap());
    assert!(
        names.len() == taken || names.len() == taken + 1,
        "{taken} completed, listed {names:?}"
    );
    let mut last = 0;
    for n in names {
        let seq = prefix_of(&export(&s, n), 0);
        assert!(seq >= last && seq <= started, "{n}: writes 1..={seq}");
        last = seq;
    }
    eprintln!("killed after {pause} ms: {taken} snapshots completed, {acked} writes acknowledged");
}
