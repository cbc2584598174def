//! The data directory with a real key store: create/attach round trips, the data area being
//! standard AES-XTS under the DEK that `decrypt-datakey` returns for the header's wrapped DEK,
//! refusals (disabled, pending-deletion and deleted key, wrong context), rekey, resize, delete,
//! locking, import/export with holes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use aes::cipher::KeyInit;
use aes::Aes256;
use cryptnbd::backend::FileBackend;
use cryptnbd::datadir::{CreateOptions, DataDir, DataDirError};
use cryptnbd::kms::{KeyStore, KmsError, ManualClock};
use cryptnbd::volume::VolumeHeader;

use crate::common;
use common::{assert_refusal, keys::KeyFixture};

const MIB: u64 = 1 << 20;

fn setup() -> (tempfile::TempDir, DataDir, KeyStore, ManualClock) {
    let f = KeyFixture::new().with_key("vol");
    (f.dir, f.dd, f.ks, f.clock)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 2)
        .collect()
}

#[test]
fn create_attach_round_trip_file_is_0600_and_sparse() {
    let (_t, dd, ks, _) = setup();
    let h = dd
        .create_volume(&ks, "disk0", 1 << 30, "alias/vol", CreateOptions::default())
        .unwrap();
    assert_eq!(
        h.encryption_context.get("volume_id").unwrap(),
        &h.volume_id.to_string()
    );
    assert_eq!(h.key_version, 1);
    let path = dd.volume_path("disk0").unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), MIB + (1 << 30));
    assert!(meta.blocks() * 512 < 4 * MIB);
    assert_eq!(dd.list_volumes().unwrap(), vec!["disk0".to_string()]);
    assert!(matches!(
        dd.create_volume(&ks, "disk0", MIB, "vol", CreateOptions::default()),
        Err(DataDirError::AlreadyExists { .. })
    ));

    let v = dd.attach(&ks, "disk0", false).unwrap();
    v.write(12345, &mut pattern(100_000, 1), true).unwrap();
    drop(v);
    let v = dd.attach(&ks, "disk0", true).unwrap();
    let mut back = vec![0u8; 100_000];
    v.read(12345, &mut back).unwrap();
    assert_eq!(back, pattern(100_000, 1));
    let info = dd.info("disk0").unwrap();
    assert_eq!(info.header, h);
    assert!(info.allocated_bytes >= 100_000);
}

#[test]
fn data_area_is_standard_xts_under_the_unwrapped_dek() {
    use xts_mode::{get_tweak_default, Xts128};
    let (_t, dd, ks, _) = setup();
    for ss in [512u32, 4096] {
        let name = format!("x{ss}");
        dd.create_volume(
            &ks,
            &name,
            4 * MIB,
            "vol",
            CreateOptions {
                sector_size: ss,
                discard: true,
            },
        )
        .unwrap();
        let v = dd.attach(&ks, &name, false).unwrap();
        let data = pattern(64 << 10, 3);
        v.write(MIB, &mut data.clone(), true).unwrap();
        drop(v);
        // Independently: header from the file, DEK from the key store, xts-mode to decrypt.
        let path = dd.volume_path(&name).unwrap();
        let h = VolumeHeader::read_from(&FileBackend::open(&path, true).unwrap()).unwrap();
        let dek = ks
            .decrypt_data_key(&h.key_id.to_string(), &h.wrapped_dek, &h.encryption_context)
            .unwrap();
        let k = dek.plain_text.dangerous_as_bytes();
        let oracle = Xts128::new(Aes256::new(k[..32].into()), Aes256::new(k[32..].into()));
        let file = std::fs::read(&path).unwrap();
        let start = (MIB + MIB) as usize;
        let mut area = file[start..start + data.len()].to_vec();
        let first_unit = MIB / 512;
        for (i, s) in area.chunks_exact_mut(ss as usize).enumerate() {
            oracle.decrypt_sector(
                s,
                get_tweak_default((first_unit + (i * ss as usize / 512) as u64) as u128),
            );
        }
        assert_eq!(area, data, "sector size {ss}");
    }
}

#[test]
fn attach_refused_when_key_disabled_but_attached_volume_keeps_working() {
    let (_t, dd, ks, _) = setup();
    dd.create_volume(&ks, "d", MIB, "vol", CreateOptions::default())
        .unwrap();
    let attached = dd.attach(&ks, "d", false).unwrap();
    ks.disable_key("vol").unwrap();
    let e = dd.attach(&ks, "d", false).unwrap_err();
    assert!(
        matches!(
            &e,
            DataDirError::Kms {
                source: KmsError::KeyNotUsable { .. },
                ..
            }
        ),
        "{e}"
    );
    assert_refusal(&e, &["\"d\"", "disabled"]);
    attached.write(0, &mut pattern(4096, 9), true).unwrap();
    ks.enable_key("vol").unwrap();
    drop(attached);
    let v = dd.attach(&ks, "d", true).unwrap();
    let mut b = vec![0u8; 4096];
    v.read(0, &mut b).unwrap();
    assert_eq!(b, pattern(4096, 9));
}

#[test]
fn attach_refused_when_key_pending_deletion_and_after_deletion() {
    let (_t, dd, ks, clock) = setup();
    dd.create_volume(&ks, "d", MIB, "vol", CreateOptions::default())
        .unwrap();
    ks.schedule_key_deletion("vol", 7).unwrap();
    let e = dd.attach(&ks, "d", false).unwrap_err();
    assert!(
        matches!(
            &e,
            DataDirError::Kms {
                source: KmsError::KeyNotUsable { .. },
                ..
            }
        ),
        "{e}"
    );
    assert_refusal(&e, &["pending deletion"]);
    clock.advance_days(8);
    let e = dd.attach(&ks, "d", false).unwrap_err();
    assert!(
        matches!(
            &e,
            DataDirError::Kms {
                source: KmsError::KeyDeleted { .. },
                ..
            }
        ),
        "{e}"
    );
    // Crypto-shredded: the header is still readable, the data is not.
    assert!(dd.info("d").is_ok());
}

#[test]
fn attach_refused_with_wrong_context() {
    let (_t, dd, ks, _) = setup();
    let h = dd
        .create_volume(&ks, "d", MIB, "vol", CreateOptions::default())
        .unwrap();
    let path = dd.volume_path("d").unwrap();
    let b = FileBackend::open(&path, false).unwrap();
    let mut forged = h.clone();
    forged
        .encryption_context
        .insert("purpose".into(), "forged".into());
    forged.write_update(&b).unwrap();
    drop(b);
    let e = dd.attach(&ks, "d", false).unwrap_err();
    assert!(
        matches!(
            &e,
            DataDirError::Kms {
                source: KmsError::CannotDecrypt { .. },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn rekey_rewraps_under_newest_version_or_another_key_and_keeps_data() {
    let (_t, dd, ks, _) = setup();
    let h0 = dd
        .create_volume(&ks, "d", MIB, "vol", CreateOptions::default())
        .unwrap();
    let v = dd.attach(&ks, "d", false).unwrap();
    v.write(0, &mut pattern(8192, 4), true).unwrap();
    drop(v);
    let before = std::fs::read(dd.volume_path("d").unwrap()).unwrap();
    ks.rotate_key("vol").unwrap();
    let h1 = dd.rekey(&ks, "d", None).unwrap();
    assert_eq!(
        (h1.key_id, h1.key_version, h1.generation),
        (h0.key_id, 2, 1)
    );
    assert_ne!(h1.wrapped_dek, h0.wrapped_dek);
    let other = ks.create_key("other", "").unwrap();
    let h2 = dd.rekey(&ks, "d", Some("alias/other")).unwrap();
    assert_eq!((h2.key_id, h2.key_version), (other.key_id, 1));
    let after = std::fs::read(dd.volume_path("d").unwrap()).unwrap();
    assert_eq!(
        before[MIB as usize..],
        after[MIB as usize..],
        "data area untouched"
    );
    // The old key no longer matters for this volume.
    ks.disable_key("vol").unwrap();
    let v = dd.attach(&ks, "d", true).unwrap();
    let mut b = vec![0u8; 8192];
    v.read(0, &mut b).unwrap();
    assert_eq!(b, pattern(8192, 4));
}

#[test]
fn resize_grows_and_refuses_shrink() {
    let (_t, dd, ks, _) = setup();
    dd.create_volume(&ks, "d", MIB, "vol", CreateOptions::default())
        .unwrap();
    let v = dd.attach(&ks, "d", false).unwrap();
    v.write(MIB - 4096, &mut pattern(4096, 5), true).unwrap();
    drop(v);
    let h = dd.resize("d", 3 * MIB).unwrap();
    assert_eq!(h.size, 3 * MIB);
    assert!(matches!(
        dd.resize("d", MIB),
        Err(DataDirError::Shrink { .. })
    ));
    assert!(matches!(
        dd.resize("d", 3 * MIB + 1),
        Err(DataDirError::Volume { .. })
    ));
    let v = dd.attach(&ks, "d", false).unwrap();
    assert_eq!(v.size(), 3 * MIB);
    let mut b = vec![1u8; 8192];
    v.read(MIB - 4096, &mut b).unwrap();
    assert_eq!(&b[..4096], &pattern(4096, 5)[..]);
    assert!(b[4096..].iter().all(|&x| x == 0));
}

#[test]
fn changes_and_delete_are_refused_while_attached() {
    let (_t, dd, ks, _) = setup();
    dd.create_volume(&ks, "d", MIB, "vol", CreateOptions::default())
        .unwrap();
    let v = dd.attach(&ks, "d", false).unwrap();
    let _second = dd.attach(&ks, "d", true).unwrap();
    assert!(matches!(dd.delete("d"), Err(DataDirError::InUse { .. })));
    assert!(matches!(
        dd.resize("d", 2 * MIB),
        Err(DataDirError::InUse { .. })
    ));
    assert!(matches!(
        dd.rekey(&ks, "d", None),
        Err(DataDirError::InUse { .. })
    ));
    drop(v);
    drop(_second);
    dd.delete("d").unwrap();
    assert!(dd.list_volumes().unwrap().is_empty());
    assert!(matches!(
        dd.attach(&ks, "d", false),
        Err(DataDirError::NotFound { .. })
    ));
}

#[test]
fn import_export_round_trip_preserves_holes() {
    let (t, dd, ks, _) = setup();
    let img = t.path().join("in.img");
    // 5 MiB + 100 bytes: data, a 3 MiB hole, data, and an odd tail.
    let len = 5 * MIB + 100;
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(len).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(MIB as usize, 6), 0).unwrap();
    f.write_all_at(&pattern(MIB as usize + 100, 7), 4 * MIB)
        .unwrap();
    drop(f);
    let mut calls = 0;
    let h = dd
        .import(
            &ks,
            "imp",
            &img,
            "vol",
            CreateOptions {
                sector_size: 512,
                discard: true,
            },
            |d, t| {
                calls += 1;
                assert!(d <= t);
            },
        )
        .unwrap();
    assert!(calls > 0);
    assert_eq!(h.size, 5 * MIB + 512);
    let out = t.path().join("out.img");
    let size = dd.export(&ks, "imp", &out, |_, _| {}).unwrap();
    assert_eq!(size, 5 * MIB + 512);
    let got = std::fs::read(&out).unwrap();
    let want = std::fs::read(&img).unwrap();
    assert_eq!(&got[..len as usize], &want[..]);
    assert!(got[len as usize..].iter().all(|&x| x == 0));
    let meta = std::fs::metadata(&out).unwrap();
    assert!(
        meta.blocks() * 512 < 4 * MIB,
        "export is sparse: {} allocated",
        meta.blocks() * 512
    );
    assert!(matches!(
        dd.export(&ks, "imp", &out, |_, _| {}),
        Err(DataDirError::Io { .. })
    ));
}

#[test]
fn attach_refuses_a_data_key_copied_from_another_volume() {
    let (_t, dd, ks, _) = setup();
    dd.create_volume(&ks, "a", MIB, "vol", CreateOptions::default())
        .unwrap();
    let hb = dd
        .create_volume(&ks, "b", MIB, "vol", CreateOptions::default())
        .unwrap();
    // Graft b's wrapped DEK and context into a's header: the key store would unwrap it (the
    // context is b's own), so the data directory must notice it names another volume.
    let pa = dd.volume_path("a").unwrap();
    let ba = FileBackend::open(&pa, false).unwrap();
    let mut ha = VolumeHeader::read_from(&ba).unwrap();
    ha.wrapped_dek = hb.wrapped_dek.clone();
    ha.encryption_context = hb.encryption_context.clone();
    ha.write_update(&ba).unwrap();
    drop(ba);
    let e = dd.attach(&ks, "a", false).unwrap_err();
    assert!(matches!(e, DataDirError::ContextMismatch { .. }), "{e}");
}
