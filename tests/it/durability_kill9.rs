//! Durability under `kill -9`, end to end: four libnbd connections write a 4096-byte-sector volume
//! (sub-sector and multi-sector writes, FUA writes, write-zeroes, FLUSHes), the server is
//! SIGKILLed at a random moment, restarted, and the client checks every 512-byte piece: a write
//! acknowledged with FUA or covered by an acknowledged FLUSH reads back exactly (or something
//! written after it), every other piece holds an old or a new version, never garbage.
//!
//! SIGKILL keeps the page cache, so this proves the server acknowledges nothing it has not handed
//! to the kernel (and replies to FUA/FLUSH only after the sync); power loss is
//! `durability_powerloss.rs`. `tools/crash-loop` runs the same for longer.

use crate::clients_common;
use crate::durability_common;

use std::time::Duration;

use clients_common::{DataDir, MIB};
use durability_common::{assert_clean, have_python_nbd, kill9, Round};
use rand::Rng;

const ROUNDS: usize = 10;

#[test]
fn acknowledged_writes_survive_sigkill() {
    if !have_python_nbd("acknowledged_writes_survive_sigkill") {
        return;
    }
    let d = DataDir::new();
    d.create_volume("v", 8 * MIB, 4096);
    let mut rng = rand::thread_rng();
    let (mut acked, mut durable, mut verified) = (0u64, 0u64, 0u64);
    for round in 0..ROUNDS {
        let server = d.serve(&["v"]);
        let mut client = Round::start(&server.uri("v"), d.path(), 30.0, false);
        client.wait_writing(Duration::from_secs(120));
        let delay = Duration::from_millis(rng.gen_range(200..3000));
        std::thread::sleep(delay);
        kill9(server.pid());
        let (ok, v) = client.finish(Duration::from_secs(120));
        assert_clean(
            ok,
            &v,
            &format!("round {round} (check of the round before)"),
        );
        eprintln!("round {round}: killed after {delay:?}: {v}");
        acked += v["acked"].as_u64().unwrap_or(0);
        durable += v["durable"].as_u64().unwrap_or(0);
        verified += v["check"]["verified"].as_u64().unwrap_or(0);
        drop(server);
    }
    let server = d.serve(&["v"]);
    let (ok, v) =
        Round::start(&server.uri("v"), d.path(), 0.0, true).finish(Duration::from_secs(120));
    assert_clean(ok, &v, "after the last kill");
    verified += v["check"]["verified"].as_u64().unwrap_or(0);
    assert!(acked > 0, "no write was acknowledged in {ROUNDS} rounds");
    assert!(
        durable > 0,
        "no write was made durable (FUA/FLUSH) in {ROUNDS} rounds"
    );
    println!(
        "kill -9 x{ROUNDS}: writes acknowledged {acked}, durable (FUA or flushed) {durable}, \
         512-byte pieces verified {verified}, lost 0, garbage 0"
    );

    // The checker itself must see a loss: the same model against a fresh, never-written volume.
    d.create_volume("blank", 8 * MIB, 4096);
    server.stop();
    let server = d.serve(&["blank"]);
    let (ok, v) =
        Round::start(&server.uri("blank"), d.path(), 0.0, true).finish(Duration::from_secs(120));
    assert!(
        !ok && v["check"]["lost"].as_u64().unwrap_or(0) > 0,
        "the checker did not notice that every durable write is missing: {v}"
    );
}
