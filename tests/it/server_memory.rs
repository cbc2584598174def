//! Memory one group of clients can pin: 64 connections (the default limit), each with two
//! maximum-size (32 MiB) READs in flight and never reading the replies, so every worker of the
//! server would hold a full buffer. The server's peak RSS (VmHWM) stays near the buffer budget
//! (256 MiB by default) plus each worker's first MiB, instead of 64 × 2 × 32 MiB = 4 GiB; and
//! once those clients go, the server still serves. Prints the figure.

use crate::clients_common;
use crate::common;

use std::time::{Duration, Instant};

use clients_common::*;
use common::raw::RawClient;
use cryptnbd::nbd::consts::CMD_READ;

const MAX_REQUEST: u32 = 32 << 20;

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

#[test]
fn stalled_maximum_requests_pin_at_most_the_budget() {
    let d = DataDir::new();
    d.create_volume("disk0", 128 * MIB, 4096);
    let s = d.serve(&["disk0"]);
    let pid = s.pid();
    let base = status_kib(pid, "VmHWM:");
    let mut clients = Vec::new();
    for _ in 0..64 {
        let mut c = RawClient::unix(&s.socket);
        c.connect_export("disk0", false);
        c.request(CMD_READ, 0, 1, 0, MAX_REQUEST);
        c.request(CMD_READ, 0, 2, u64::from(MAX_REQUEST), MAX_REQUEST);
        clients.push(c);
    }
    // Let the workers fill what they can; the peak stops growing once the budget is used up.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut peak = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        peak = status_kib(pid, "VmHWM:");
    }
    eprintln!(
        "server peak RSS with 64 connections x 2 stalled 32 MiB READs: {} MiB (before: {} MiB)",
        peak / 1024,
        base / 1024
    );
    assert!(
        peak < 640 * 1024,
        "peak RSS {} MiB: buffers are not bounded by the budget",
        peak / 1024
    );
    drop(clients);
    // Their connections end (blocked replies fail, waiting workers give up) and free their
    // slots; the server is then there for everyone else.
    let t = Instant::now();
    loop {
        let ok = std::panic::catch_unwind(|| {
            let mut c = RawClient::unix(&s.socket);
            c.connect_export("disk0", false);
            c.request(CMD_READ, 0, 7, 0, 4096);
            c.reply(4096).error()
        });
        if let Ok(errno) = ok {
            assert_eq!(errno, 0);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "server never recovered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "a new client got in {:?} after the stalled ones left",
        t.elapsed()
    );
    s.stop();
}
