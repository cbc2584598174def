//! Every client at every alignment: the server advertises a minimum block size of 1 (and the
//! encryption sector as the preferred size), so libnbd-based clients in their default strict mode
//! send byte-granular and 512-byte requests to a 4096-byte-sector volume and the server serves
//! them by read-modify-write. Shown with the python `nbd` module (strict mode kept on), `nbdcopy`
//! of an image whose size is not a multiple of 4096, fio's `nbd` engine with `bs=512` and `bs=1k`
//! plus verify, and `nbdfuse` + a plain `losetup` (512-byte logical blocks) + ext4 + fsck.

use crate::clients_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clients_common::blockdev::{environment_limit, Attached};
use clients_common::{
    have_tools, pseudo_random, report_missing, run_bounded, run_ok, run_ok_within,
    skip_environment, DataDir, MIB, TOOL_TIMEOUT,
};

const PYTHON: &str = "/usr/bin/python3";

/// Debian's python with python3-libnbd (the `python3` on PATH may be another build).
fn have_python_nbd(test: &str) -> bool {
    let ok = Path::new(PYTHON).exists()
        && run_bounded(
            Command::new(PYTHON).args(["-c", "import nbd"]),
            Duration::from_secs(30),
        )
        .status
        .success();
    ok || report_missing(test, "python3-libnbd (`import nbd` in /usr/bin/python3)")
}

/// Writes and zeroes at 1-byte and 512-byte alignment with libnbd in its default strict
/// mode, mirrored in a bytearray; reads back sub-ranges and the whole export; then a second
/// connection (after the first one closed) sees the same bytes.
const STRICT_SCRIPT: &str = r#"
import sys
import nbd

uri, size = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
strict = h.get_strict_mode()
assert strict & nbd.STRICT_ALIGN, "libnbd's alignment check must stay on for this test"
h.connect_uri(uri)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1, h.get_block_size(nbd.SIZE_MINIMUM)
pref = h.get_block_size(nbd.SIZE_PREFERRED)
model = bytearray(size)

def pat(n, seed):
    return bytes(((i * 131 + seed * 17) % 255) + 1 for i in range(n))

seed = 0
def write(off, n):
    global seed
    seed += 1
    data = pat(n, seed)
    h.pwrite(data, off)
    model[off:off + n] = data

# 1-byte granularity: single bytes at and around sector edges, odd lengths across edges.
for off, n in [(0, 1), (1, 1), (4095, 1), (4096, 1), (4097, 3), (511, 2), (8191, 2),
               (12345, 6789), (3, 4093), (4093, 4100), (size - 1, 1), (size - 7, 7),
               (20000, 1), (20002, 1), (20001, 1)]:
    write(off, n)
# 512-byte granularity: the loop device / kernel client pattern.
for blk in [0, 1, 7, 8, 9, 15, 63, 64, 100, 101, 102, 103, (size // 512) - 1]:
    write(blk * 512, 512)
write(512 * 33, 512 * 5)
# Zeroes at unaligned offsets.
h.zero(777, 1000)  # (count, offset)
model[1000:1777] = bytes(777)
h.zero(4096 * 2, 4096 * 3 + 5)
model[4096 * 3 + 5:4096 * 5 + 5] = bytes(4096 * 2)
h.flush()

for off, n in [(0, 1), (4095, 2), (511, 1026), (12000, 9000), (size - 3, 3), (0, size)]:
    got = h.pread(n, off)
    assert got == bytes(model[off:off + n]), "read %d+%d differs" % (off, n)
h.shutdown()

h2 = nbd.NBD()
h2.connect_uri(uri)
assert h2.pread(size, 0) == bytes(model), "a new connection sees other bytes"
h2.shutdown()
print("preferred", pref)
"#;

fn strict_mode_round_trip(test: &str, sector: u32) {
    if !have_python_nbd(test) {
        return;
    }
    let d = DataDir::new();
    let size = MIB;
    d.create_volume("disk", size, sector);
    let srv = d.serve(&["disk"]);
    let out = run_ok(
        Command::new(PYTHON)
            .args(["-c", STRICT_SCRIPT])
            .arg(srv.uri("disk"))
            .arg(size.to_string()),
    );
    // The preferred size is the encryption sector (or the 4096-byte default when smaller).
    assert!(
        out.contains(&format!("preferred {}", sector.max(4096))),
        "{out}"
    );
    srv.stop();
}

#[test]
fn libnbd_strict_mode_byte_and_512_aligned_io_on_4096_sector_volume() {
    strict_mode_round_trip(
        "libnbd_strict_mode_byte_and_512_aligned_io_on_4096_sector_volume",
        4096,
    );
}

#[test]
fn libnbd_strict_mode_byte_and_512_aligned_io_on_512_sector_volume() {
    strict_mode_round_trip(
        "libnbd_strict_mode_byte_and_512_aligned_io_on_512_sector_volume",
        512,
    );
}

/// An image whose size is not a multiple of 4096 (nor of 512): nbdcopy's last request is short
/// and unaligned. The export then holds the image followed by zeroes, and copying the export out
/// again gives exactly that.
#[test]
fn nbdcopy_image_not_a_multiple_of_4096() {
    if !have_tools("nbdcopy_image_not_a_multiple_of_4096", &["nbdcopy"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", 8 * MIB, 4096);
    let len = 5 * MIB as usize + 1234;
    let data = pseudo_random(len, 0xa119);
    let input = d.path().join("odd.img");
    std::fs::write(&input, &data).expect("write input");
    let srv = d.serve(&["disk"]);
    let uri = srv.uri("disk");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=2", "--request-size=65536"])
            .arg(&input)
            .arg(&uri),
    );
    let output = d.path().join("back.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&output));
    let back = std::fs::read(&output).expect("read output");
    assert_eq!(back.len() as u64, 8 * MIB);
    assert!(back[..len] == data[..], "the image did not arrive intact");
    assert!(
        back[len..].iter().all(|&b| b == 0),
        "bytes past the image must stay zero"
    );
    srv.stop();
}

/// fio's nbd engine (libnbd, strict) writing `bs` blocks at random with 16 requests in flight on
/// one connection, so neighbouring sub-sector writes of one 4096-byte sector race each other;
/// then fio verifies every block.
fn fio_small_blocks(test: &str, bs: &str) {
    if !have_tools(test, &["fio"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", 8 * MIB, 4096);
    let srv = d.serve(&["disk"]);
    let mut c = Command::new("fio");
    c.current_dir(d.path()).args([
        "--name=small",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("disk")),
        "--rw=randwrite",
        &format!("--bs={bs}"),
        "--size=4M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]);
    let out = run_ok_within(&mut c, Duration::from_secs(300));
    let json = &out[out.find('{').unwrap_or(0)..];
    let r: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {out}"));
    let j = &r["jobs"][0];
    assert_eq!(j["error"].as_i64(), Some(0), "fio job failed: {j}");
    assert_eq!(j["write"]["io_bytes"].as_u64(), Some(4 * MIB), "{j}");
    assert_eq!(j["read"]["io_bytes"].as_u64(), Some(4 * MIB), "{j}");
    srv.stop();
}

#[test]
fn fio_bs512_verify_on_4096_sector_volume() {
    fio_small_blocks("fio_bs512_verify_on_4096_sector_volume", "512");
}

#[test]
fn fio_bs1k_verify_on_4096_sector_volume() {
    fio_small_blocks("fio_bs1k_verify_on_4096_sector_volume", "1k");
}

#[test]
fn plain_losetup_ext4_on_4096_sector_volume() {
    let test = "plain_losetup_ext4_on_4096_sector_volume";
    let tools = [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "blockdev",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
    ];
    if !have_tools(test, &tools) {
        return;
    }
    if let Some(why) = environment_limit() {
        skip_environment(test, &why);
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk0", 128 * MIB, 4096);
    let srv = d.serve(&["disk0"]);
    let files = [
        ("a.txt", b"plain losetup, 512-byte blocks\n".to_vec()),
        ("b.bin", pseudo_random(2 * MIB as usize + 333, 9)),
    ];
    let mut a = Attached::new(d.path(), &srv.uri("disk0"), None);
    assert_eq!(
        a.logical_block_size(),
        "512",
        "losetup's default block size"
    );
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(a.dev()));
    a.mount();
    for (name, data) in &files {
        std::fs::write(a.fs_dir.join(name), data).expect("write on ext4");
    }
    run_ok(&mut Command::new("sync"));
    a.umount();
    let fsck = run_bounded(
        Command::new("fsck.ext4").arg("-fn").arg(a.dev()),
        TOOL_TIMEOUT,
    );
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn is not clean:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    a.mount();
    for (name, data) in &files {
        let back = std::fs::read(a.fs_dir.join(name)).expect("read back from ext4");
        assert!(back == *data, "{name} differs after remount");
    }
    a.detach();
    srv.stop();
}

/// What every client sees through NBD_OPT_LIST and NBD_INFO_DESCRIPTION names no key: neither the
/// CMK's id nor its alias (those are for the operator's `volume info`).
#[test]
fn list_and_info_descriptions_name_no_cmk() {
    if !have_tools("list_and_info_descriptions_name_no_cmk", &["nbdinfo"]) {
        return;
    }
    let d = DataDir::new();
    d.create_volume("disk", 4 * MIB, 4096);
    let key_id = d.volume_info("disk")["key_id"]
        .as_str()
        .expect("key_id")
        .to_string();
    let srv = d.serve(&[]);
    for args in [
        vec!["--list".to_string(), "--json".into(), srv.uri("")],
        vec!["--json".to_string(), srv.uri("disk")],
    ] {
        let out = run_ok(Command::new("nbdinfo").args(&args));
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}: {out}"));
        let exports = v["exports"].as_array().expect("exports");
        assert!(!exports.is_empty(), "{out}");
        for e in exports {
            let desc = e["description"].as_str().unwrap_or_default();
            assert!(desc.contains("AES-256-XTS"), "description: {desc:?}");
            for secret in [key_id.as_str(), "alias/", "clients", "CMK"] {
                assert!(
                    !desc.contains(secret),
                    "the description {desc:?} names the key ({secret:?})"
                );
            }
        }
    }
    srv.stop();
}
