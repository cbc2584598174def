//! Repeated requests for a volume whose CMK is disabled are cheap for the server (issue #10,
//! defect 5): the refusal is remembered for a few seconds, so a client asking again and again
//! gets the same clear refusal without the server unwrapping (and auditing, with an fsync) each
//! time. Before the fix, every NBD_OPT_INFO/GO appended an audit record. Re-enabling the key
//! still lets a client attach within the cache time.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::RawClient;
use common::TestServer;
use cryptnbd::datadir::{CreateOptions, DataDir};
use cryptnbd::exports::{DataDirProvider, ExportSelection};
use cryptnbd::kms::{InitRoot, KeyStore, RootSecret};
use cryptnbd::nbd::*;

#[test]
fn repeated_refusals_are_answered_from_memory_and_audited_once() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
    ks.create_key("alias/off", "test").unwrap();
    let dd = DataDir::new(dir.path());
    dd.create_volume(&ks, "vol", 1 << 20, "alias/off", CreateOptions::default())
        .unwrap();
    ks.disable_key("alias/off").unwrap();
    let admin =
        KeyStore::open(dir.path(), RootSecret::KeyFile(dir.path().join("root.key"))).unwrap();
    let audited = || admin.audit_tail(None).unwrap().len();
    let provider = DataDirProvider::new(dd.clone(), ks, ExportSelection::default());
    let srv = TestServer::start(Arc::new(provider));

    let before = audited();
    let start = Instant::now();
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    const TRIES: usize = 40;
    for i in 0..TRIES {
        let option = if i % 2 == 0 { OPT_INFO } else { OPT_GO };
        let r = c.info_go(option, "vol", &[]);
        let last = r.last().unwrap();
        assert_eq!(last.h.reply_type, REP_ERR_POLICY, "try {i}");
        assert!(last.message().contains("disabled"), "{}", last.message());
    }
    let elapsed = start.elapsed();
    let added = audited() - before;
    // One unwrap attempt per 5 s cache time at most (plus one for a boundary crossed).
    let allowed = 1 + (elapsed.as_secs() / 5) as usize + 1;
    assert!(
        (1..=allowed).contains(&added),
        "{TRIES} refused attaches in {elapsed:?} wrote {added} audit records (at most {allowed} expected)"
    );

    // Re-enabled: a client gets the volume within the cache time.
    admin.enable_key("alias/off").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut d = RawClient::unix(&srv.socket);
        d.start();
        if d.info_go(OPT_GO, "vol", &[]).last().unwrap().h.reply_type == REP_ACK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the volume never attached after enable"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
