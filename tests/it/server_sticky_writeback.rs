//! A failed write-back is sticky per volume (issue #10, defect 1): Linux reports a write-back
//! error to the first `fdatasync` only, and every connection to a volume shares its one open file.
//! Through the real server with two connections to one volume whose storage fails one sync: the
//! first FLUSH gets EIO, and the other connection's later FLUSH, FUA write and plain write get EIO
//! too (before the fix, they succeeded for data that never reached the disk). Reads keep working.

use crate::common;

use std::sync::Arc;

use common::raw::RawClient;
use common::TestServer;
use cryptnbd::backend::testing::{FaultyBackend, MemBackend};
use cryptnbd::crypto::XtsKey;
use cryptnbd::nbd::*;
use cryptnbd::server::export::{AttachError, ExportInfo, ExportProvider};
use cryptnbd::volume::{Volume, VolumeHeader};
use uuid::Uuid;

const SIZE: u64 = 1 << 20;
const EIO: u32 = 5;

/// One volume on a backend the test can make fail.
struct OneVolume(Arc<Volume>);

impl ExportProvider for OneVolume {
    fn list(&self) -> Vec<ExportInfo> {
        vec![ExportInfo {
            name: "vol".into(),
            description: String::new(),
        }]
    }
    fn attach(&self, name: &str) -> Result<Arc<Volume>, AttachError> {
        if name == "vol" || name.is_empty() {
            Ok(self.0.clone())
        } else {
            Err(AttachError::NotFound(name.into()))
        }
    }
}

fn volume(backend: FaultyBackend) -> Volume {
    let mut h = VolumeHeader::new(Uuid::new_v4(), SIZE, 4096);
    h.key_id = Uuid::new_v4();
    h.key_version = 1;
    h.wrapped_dek = vec![1; 80];
    Volume::create(backend, &h, &XtsKey::generate()).unwrap()
}

#[test]
fn a_failed_sync_fails_every_later_flush_and_write_on_every_connection() {
    let backend = FaultyBackend::new(MemBackend::new(), u64::MAX);
    let export = Arc::new(volume(backend.clone()));
    let srv = TestServer::start(Arc::new(OneVolume(export.clone())));
    let mut a = RawClient::unix(&srv.socket);
    let mut b = RawClient::unix(&srv.socket);
    a.connect_export("vol", false);
    b.connect_export("vol", false);

    // Both connections write; A's data is acknowledged but not yet flushed.
    assert_eq!(a.write(1, 0, &[0xAA; 4096], 0).error(), 0);
    assert_eq!(b.write(2, 4096, &[0xBB; 4096], 0).error(), 0);
    // The kernel fails to write A's pages back: B's FLUSH is the one that hears of it.
    backend.fail_next_sync();
    b.request(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(b.reply(0).error(), EIO, "the failing flush reports EIO");
    // The backend's next sync would succeed (Linux reports the error once): A must not be told
    // its earlier write is durable.
    a.request(CMD_FLUSH, 0, 4, 0, 0);
    assert_eq!(
        a.reply(0).error(),
        EIO,
        "a later FLUSH on the other connection"
    );
    assert_eq!(
        a.write(5, 8192, &[0xCC; 4096], CMD_FLAG_FUA).error(),
        EIO,
        "a FUA write"
    );
    assert_eq!(
        b.write(6, 8192, &[0xCC; 4096], 0).error(),
        EIO,
        "a plain write"
    );
    b.request(CMD_FLUSH, 0, 7, 0, 0);
    assert_eq!(b.reply(0).error(), EIO, "every later FLUSH");
    // Reads still work: the data written before is served as it is.
    assert_eq!(a.read(8, 4096, 4096).unwrap(), vec![0xBB; 4096]);
    assert!(export.writeback_failed());

    // Detach and attach again (a new Volume on the same storage): writes work again.
    drop(srv);
    let again = volume_reopen(backend);
    let mut buf = vec![0xDD; 4096];
    again.write(12288, &mut buf, true).unwrap();
    again.flush().unwrap();
}

fn volume_reopen(backend: FaultyBackend) -> Volume {
    // The header is in the backend; the key is not checked by `open`, only used.
    Volume::open(backend, false, |_| {
        Ok::<_, cryptnbd::volume::VolumeError>(XtsKey::generate())
    })
    .unwrap()
}
