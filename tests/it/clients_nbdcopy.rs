//! libnbd's `nbdcopy` as a client: a random file copied into an export and out again comes back
//! identical (over several connections), and a sparse input stays sparse: its holes are holes in
//! the export's `base:allocation` map (`nbdinfo --map`) and in the volume file itself.

use crate::clients_common;

use std::process::Command;

use clients_common::{
    allocated_bytes, have_tools, pseudo_random, run_ok, DataDir, HEADER_BYTES, MIB,
};

#[test]
fn nbdcopy_random_file_round_trips() {
    if !have_tools("nbdcopy_random_file_round_trips", &["nbdcopy"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", 48 * MIB, 4096);
    // Not a multiple of nbdcopy's request size, so the last request is a short one. (It must
    // stay a multiple of the 4096-byte sector: libnbd refuses requests below the export's
    // advertised minimum block size on the client side, before they reach the server.)
    let len = 40 * MIB as usize + 3 * 4096;
    let data = pseudo_random(len, 0x5eed);
    let input = d.path().join("in.bin");
    std::fs::write(&input, &data).expect("write input");

    let srv = d.serve(&["disk"]);
    let uri = srv.uri("disk");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(&input)
            .arg(&uri),
    );

    let output = d.path().join("out.bin");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&output));
    let back = std::fs::read(&output).expect("read output");
    assert_eq!(
        back.len() as u64,
        48 * MIB,
        "nbdcopy out copies the whole export"
    );
    assert!(
        back[..len] == data[..],
        "the export does not hold what nbdcopy wrote"
    );
    assert!(
        back[len..].iter().all(|&b| b == 0),
        "bytes past the copied file must read as zero"
    );
    srv.stop();
}

#[test]
fn nbdcopy_sparse_file_keeps_holes() {
    if !have_tools("nbdcopy_sparse_file_keeps_holes", &["nbdcopy", "nbdinfo"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("thin", 64 * MIB, 4096);
    // 64 MiB input with data in [0, 1M) and [40M, 41M) only; the rest is holes.
    let input = d.path().join("sparse.bin");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&input).expect("create sparse input");
        f.set_len(64 * MIB).expect("set_len");
        f.write_all_at(&pseudo_random(MIB as usize, 1), 0)
            .expect("write");
        f.write_all_at(&pseudo_random(MIB as usize, 2), 40 * MIB)
            .expect("write");
    }
    let srv = d.serve(&["thin"]);
    let uri = srv.uri("thin");
    run_ok(Command::new("nbdcopy").arg(&input).arg(&uri));

    // The export's allocation map: everything outside the two data runs is a hole.
    let map = run_ok(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let extents: Vec<serde_json::Value> =
        serde_json::from_str(&map).unwrap_or_else(|e| panic!("nbdinfo --map --json: {e}: {map}"));
    let data_runs: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e["type"].as_u64().unwrap_or(0) & 1 == 0) // bit 0 = NBD_STATE_HOLE
        .map(|e| {
            let o = e["offset"].as_u64().expect("offset");
            (o, o + e["length"].as_u64().expect("length"))
        })
        .collect();
    let in_data = |lo: u64, hi: u64| data_runs.iter().any(|&(a, b)| a < hi && lo < b);
    assert!(
        in_data(0, MIB) && in_data(40 * MIB, 41 * MIB),
        "data runs missing: {map}"
    );
    assert!(
        !in_data(MIB, 40 * MIB) && !in_data(41 * MIB, 64 * MIB),
        "the input's holes became allocated data in the export: {map}"
    );

    // And on disk: the volume file holds about 2 MiB of ciphertext plus its header, not 64 MiB.
    srv.stop();
    let used = allocated_bytes(&d.volume_path("thin"));
    assert!(
        used <= HEADER_BYTES + 2 * MIB + MIB,
        "volume file allocates {used} bytes for 2 MiB of data"
    );

    // The data itself made the trip.
    let srv = d.serve(&["thin"]);
    let out = d.path().join("back.bin");
    run_ok(Command::new("nbdcopy").arg(srv.uri("thin")).arg(&out));
    assert!(
        std::fs::read(&out).expect("read back") == std::fs::read(&input).expect("read input"),
        "sparse file did not round-trip"
    );
    srv.stop();
}
