//! The server over real encrypted volumes (DataDir + KeyStore): data written through NBD is never
//! stored in plaintext, survives a restart, all connections share one attached volume, and a
//! refused attach (disabled CMK) reaches the client with its reason while other exports work.

use crate::common;

use std::sync::Arc;

use common::keys::KeyFixture;
use common::raw::RawClient;
use common::TestServer;
use cryptnbd::datadir::{CreateOptions, DataDir};
use cryptnbd::exports::{DataDirProvider, ExportSelection};
use cryptnbd::kms::KeyStore;
use cryptnbd::nbd::*;

const SIZE: u64 = 16 << 20;
const MARKER: &[u8] = b"CRYPTNBD-PLAINTEXT-MARKER-0123456789";

fn setup() -> (tempfile::TempDir, KeyStore, DataDir) {
    let f = KeyFixture::new().with_key("alias/default");
    f.volume("vol", SIZE, "alias/default");
    (f.dir, f.ks, f.dd)
}

fn provider(ks: KeyStore, dd: &DataDir) -> Arc<DataDirProvider> {
    Arc::new(DataDirProvider::new(
        dd.clone(),
        ks,
        ExportSelection::default(),
    ))
}

fn marked(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn volume_file_never_contains_the_plaintext_written_through_nbd() {
    let (dir, ks, dd) = setup();
    let srv = TestServer::start(provider(ks, &dd));
    let mut c = RawClient::unix(&srv.socket);
    let (size, flags) = c.connect_export("vol", true);
    assert_eq!(size, SIZE);
    assert_eq!(flags & FLAG_CAN_MULTI_CONN, FLAG_CAN_MULTI_CONN);
    let writes: [(u64, usize); 4] = [
        (0, 65536),
        (1 << 20, 4096),
        ((2 << 20) + 100, 10_000),
        (SIZE - 4096, 4096),
    ];
    for (i, (off, len)) in writes.iter().enumerate() {
        assert_eq!(
            c.write(i as u64, *off, &marked(*len), CMD_FLAG_FUA).error(),
            0
        );
    }
    for (i, (off, len)) in writes.iter().enumerate() {
        assert_eq!(
            c.read(100 + i as u64, *off, *len as u32).unwrap(),
            marked(*len)
        );
    }
    // A second connection shares the same attached volume (the volume file is locked, so a
    // second attach would fail) and sees the data.
    let mut d = RawClient::unix(&srv.socket);
    d.connect_export("vol", false);
    assert!(d.read(1, 0, 4096).unwrap() == marked(4096));
    c.request(CMD_FLUSH, 0, 50, 0, 0);
    assert_eq!(c.reply(0).error(), 0);
    drop((c, d));
    srv.stop().unwrap();

    let path = DataDir::new(dir.path()).volume_path("vol").unwrap();
    let file = std::fs::read(&path).unwrap();
    assert!(
        !contains(&file, &MARKER[..16]),
        "plaintext found in the volume file"
    );

    // After a restart the data is still there (decrypted with the unwrapped DEK).
    let ks = KeyStore::open(
        dir.path(),
        cryptnbd::kms::RootSecret::KeyFile(dir.path().join("root.key")),
    )
    .unwrap();
    let srv = TestServer::start(provider(ks, &dd));
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("vol", false);
    for (i, (off, len)) in writes.iter().enumerate() {
        assert!(
            c.read(i as u64, *off, *len as u32).unwrap() == marked(*len),
            "after restart at {off}"
        );
    }
}

#[test]
fn disabled_cmk_refuses_attach_with_its_reason_and_other_exports_work() {
    let (_dir, ks, dd) = setup();
    ks.create_key("alias/locked", "will be disabled").unwrap();
    dd.create_volume(
        &ks,
        "secret",
        SIZE,
        "alias/locked",
        CreateOptions::default(),
    )
    .unwrap();
    ks.disable_key("alias/locked").unwrap();
    let ks2 = KeyStore::open(
        _dir.path(),
        cryptnbd::kms::RootSecret::KeyFile(_dir.path().join("root.key")),
    )
    .unwrap();
    let srv = TestServer::start(provider(ks, &dd));
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    let r = c.info_go(OPT_GO, "secret", &[]);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].h.reply_type, REP_ERR_POLICY);
    let msg = r[0].message();
    assert!(
        msg.contains("secret") && msg.to_lowercase().contains("disabled"),
        "{msg}"
    );
    for bad in ["../vol", "missing", "a/b", ".hidden"] {
        let r = c.info_go(OPT_GO, bad, &[]);
        assert_eq!(
            r[0].h.reply_type,
            REP_ERR_UNKNOWN,
            "{bad}: {}",
            r[0].message()
        );
    }
    let r = c.info_go(OPT_GO, "vol", &[]);
    assert_eq!(r.last().unwrap().h.reply_type, REP_ACK);
    assert_eq!(c.write(1, 0, &[7u8; 4096], 0).error(), 0);

    // Refusals are not cached: once the key is enabled again, the next client gets the volume.
    ks2.enable_key("alias/locked").unwrap();
    let mut d = RawClient::unix(&srv.socket);
    d.connect_export("secret", false);
    assert_eq!(d.read(1, 0, 4096).unwrap(), vec![0u8; 4096]);
}

#[test]
fn read_only_selection_and_export_filter() {
    let (_dir, ks, dd) = setup();
    dd.create_volume(
        &ks,
        "other",
        SIZE,
        "alias/default",
        CreateOptions::default(),
    )
    .unwrap();
    let sel = ExportSelection {
        only: Some(vec!["vol".into()]),
        read_only: ["vol".to_string()].into_iter().collect(),
    };
    let p = Arc::new(DataDirProvider::new(dd.clone(), ks, sel));
    assert_eq!(p.attach_all(), vec!["vol".to_string()]);
    let srv = TestServer::start(p);
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    let r = c.info_go(OPT_GO, "other", &[]);
    assert_eq!(r[0].h.reply_type, REP_ERR_UNKNOWN);
    for bad in ["../vol", "nope", "a/b"] {
        let r = c.info_go(OPT_GO, bad, &[]);
        assert_eq!(r[0].h.reply_type, REP_ERR_UNKNOWN, "{bad}");
    }
    let r = c.info_go(OPT_GO, "", &[]);
    assert_eq!(
        r.last().unwrap().h.reply_type,
        REP_ACK,
        "default export is vol"
    );
    assert_eq!(c.write(1, 0, &[1u8; 4096], 0).error(), EPERM);
    assert_eq!(c.read(2, 0, 4096).unwrap(), vec![0u8; 4096]);
}

/// libnbd (what nbdsh runs): several connections to one volume, many requests in flight on each,
/// FLUSH on one covering writes acknowledged on the others, holes after TRIM.
const MULTI_CONN: &str = r#"
import sys, nbd
hs = []
for _ in range(4):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(sys.argv[1])
    assert h.can_multi_conn()
    hs.append(h)
for k, h in enumerate(hs):
    for i in range(32):
        buf = nbd.Buffer.from_bytearray(bytearray([k * 32 + i + 1]) * 65536)
        h.aio_pwrite(buf, (k * 32 + i) * 65536)
for h in hs:
    while h.aio_in_flight() > 0:
        h.poll(-1)
hs[3].flush()
for k in range(4):
    for i in range(32):
        got = hs[(k + 1) % 4].pread(65536, (k * 32 + i) * 65536)
        assert got == bytearray([k * 32 + i + 1]) * 65536, (k, i)
hs[0].trim(65536, 0)
ext = []
hs[1].block_status(131072, 0, lambda m, o, e, err: ext.extend(e))
assert ext[0] == 65536 and ext[1] & nbd.STATE_HOLE, ext
assert hs[2].pread(65536, 0) == bytearray(65536)
for h in hs:
    h.shutdown()
print("OK")
"#;

#[test]
fn libnbd_multi_conn_on_a_real_volume() {
    if !common::require_python_nbd() {
        return;
    }
    let (_dir, ks, dd) = setup();
    let srv = TestServer::start(provider(ks, &dd));
    let (ok, out, err) = common::run_bounded(
        std::process::Command::new("/usr/bin/python3").args(["-c", MULTI_CONN, &srv.uri("vol")]),
        std::time::Duration::from_secs(120),
    );
    assert!(ok && out.contains("OK"), "stdout: {out}\nstderr: {err}");
}

#[test]
fn concurrent_first_clients_share_one_lazy_attach() {
    let (_dir, ks, dd) = setup();
    // Not attached at start: the first clients race to attach it.
    let srv = TestServer::start(provider(ks, &dd));
    let socket = srv.socket.clone();
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::unix(&socket);
                c.connect_export("vol", i % 2 == 0);
                let off = u64::from(i) * 4096;
                assert_eq!(c.write(1, off, &[i + 1; 4096], 0).error(), 0);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client failed to attach or write");
    }
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("vol", false);
    for i in 0..8u8 {
        assert!(c.read(2, u64::from(i) * 4096, 4096).unwrap() == vec![i + 1; 4096]);
    }
}
