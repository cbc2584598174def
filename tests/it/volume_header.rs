//! The volume header on disk: golden file, recovery from the backup copy, refusals (both copies
//! corrupt, unknown version, truncated file, not a volume) and crash safety of header updates
//! (a rekey/resize interrupted at every step, with lost and torn writes).

use cryptnbd::backend::testing::{CrashBackend, CrashMode, MemBackend};
use cryptnbd::backend::Backend;
use cryptnbd::crypto::XtsKey;
use cryptnbd::volume::header::{BACKUP_OFFSET, HEADER_REGION, PRIMARY_OFFSET};
use cryptnbd::volume::{Volume, VolumeError, VolumeHeader};
use uuid::Uuid;

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/volume-header-v1.bin"
);

fn golden_header() -> VolumeHeader {
    let mut h = VolumeHeader::new(
        Uuid::parse_str("6f1d2c1e-9a43-4a5e-8d47-0c3b2f1e5a77").unwrap(),
        10 << 30,
        4096,
    );
    h.created = 1_790_000_000;
    h.generation = 7;
    h.key_id = Uuid::parse_str("0b9f4a52-1c3d-4e6f-8a9b-c0d1e2f30415").unwrap();
    h.key_version = 2;
    h.wrapped_dek = (0..108u8).collect();
    h.encryption_context
        .insert("volume_id".into(), h.volume_id.to_string());
    h.encryption_context
        .insert("purpose".into(), "golden".into());
    h
}

#[test]
fn golden_header_v1_is_pinned() {
    let enc = golden_header().encode().unwrap();
    if std::env::var_os("CRYPTNBD_BLESS").is_some() {
        std::fs::write(GOLDEN, &enc).unwrap();
    }
    let golden = std::fs::read(GOLDEN).expect("tests/data/volume-header-v1.bin (regenerate with CRYPTNBD_BLESS=1 only for a deliberate format change)");
    assert_eq!(
        enc, golden,
        "the v1 header encoding changed: that is a format change"
    );
    assert_eq!(VolumeHeader::decode(&golden).unwrap(), golden_header());
    assert_eq!(&golden[..8], b"CRYPTNBD");
}

fn make(ss: u32) -> (MemBackend, XtsKey, VolumeHeader) {
    let b = MemBackend::new();
    let key = XtsKey::generate();
    let mut h = golden_header();
    h.generation = 0;
    h.size = 4 << 20;
    h.sector_size = ss;
    let v = Volume::create(b.clone(), &h, &key).unwrap();
    v.write(0, &mut vec![0x5A; 8192], true).unwrap();
    (b, key, h)
}

fn open(b: impl Backend + 'static, key: &XtsKey) -> Result<Volume, VolumeError> {
    let k = XtsKey::from_slice(key.dangerous_as_bytes()).unwrap();
    Volume::open(b, false, move |_| Ok::<_, VolumeError>(k))
}

fn read8k(v: &Volume) -> Vec<u8> {
    let mut buf = vec![0u8; 8192];
    v.read(0, &mut buf).unwrap();
    buf
}

#[test]
fn corrupted_primary_header_is_recovered_from_backup_without_rewrite() {
    let (b, key, h) = make(4096);
    let before = b.snapshot();
    b.poke(40, &[0xFF, 0xEE]);
    let v = open(b.clone(), &key).unwrap();
    assert_eq!(v.header().volume_id, h.volume_id);
    assert_eq!(read8k(&v), vec![0x5A; 8192]);
    // Opening did not repair (rewrite) the primary.
    let after = b.snapshot();
    assert_ne!(after[..64], before[..64]);
    assert_eq!(
        after[64..HEADER_REGION as usize],
        before[64..HEADER_REGION as usize]
    );
}

#[test]
fn corrupted_both_headers_are_refused_clearly() {
    let (b, key, _) = make(4096);
    b.poke(PRIMARY_OFFSET as usize + 50, &[1]);
    b.poke(BACKUP_OFFSET as usize + 120, &[1]);
    let e = open(b, &key).unwrap_err();
    assert!(matches!(e, VolumeError::CorruptHeader { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("corrupt in both copies") && msg.contains("checksum"),
        "{msg}"
    );
}

#[test]
fn zeroed_header_region_is_not_a_volume() {
    let (b, key, _) = make(512);
    b.poke(0, &vec![0u8; HEADER_REGION as usize]);
    let e = open(b, &key).unwrap_err();
    assert!(matches!(e, VolumeError::NotAVolume { .. }), "{e}");
}

#[test]
fn unknown_version_is_refused_naming_it() {
    let (b, key, _) = make(4096);
    for off in [PRIMARY_OFFSET, BACKUP_OFFSET] {
        let mut copy = vec![0u8; 4096];
        b.read_at(&mut copy, off).unwrap();
        copy[8..12].copy_from_slice(&9u32.to_le_bytes());
        let len = u32::from_le_bytes(copy[12..16].try_into().unwrap()) as usize;
        copy[16..20].fill(0);
        let crc = crc32c::crc32c(&copy[..len]);
        copy[16..20].copy_from_slice(&crc.to_le_bytes());
        b.poke(off as usize, &copy);
    }
    let e = open(b, &key).unwrap_err();
    assert!(
        matches!(e, VolumeError::UnsupportedVersion { version: 9, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("format version 9"));
}

#[test]
fn truncated_volume_file_is_refused() {
    let (b, key, _) = make(4096);
    b.set_len(HEADER_REGION + (1 << 20)).unwrap();
    let e = open(b.clone(), &key).unwrap_err();
    assert!(matches!(e, VolumeError::Truncated { .. }), "{e}");
    b.set_len(100).unwrap();
    let e = open(b, &key).unwrap_err();
    assert!(matches!(e, VolumeError::Truncated { len: 100, .. }), "{e}");
}

#[test]
fn unwrap_refusal_is_passed_through() {
    let (b, _, _) = make(4096);
    #[derive(Debug)]
    enum E {
        V(VolumeError),
        Refused(String),
    }
    impl From<VolumeError> for E {
        fn from(v: VolumeError) -> Self {
            E::V(v)
        }
    }
    let r = Volume::open(b, false, |h| Err(E::Refused(h.key_id.to_string())));
    match r {
        Err(E::Refused(id)) => assert_eq!(id, "0b9f4a52-1c3d-4e6f-8a9b-c0d1e2f30415"),
        Err(E::V(e)) => panic!("{e}"),
        Ok(_) => panic!("opened"),
    }
}

/// A header update (what rekey and resize do) interrupted by a power failure after every possible
/// number of steps, with un-synced writes lost or torn: the volume always opens with either the
/// old or the new header, and the data is intact.
#[test]
fn rekey_interrupted_at_every_step_leaves_old_or_new_header() {
    let (mem, key, old) = make(4096);
    let mut new = old.clone();
    new.key_id = Uuid::new_v4();
    new.key_version = 5;
    new.wrapped_dek = vec![0xCC; 120];
    let mut completed = false;
    for steps in 0..10 {
        for mode in [CrashMode::DropUnsynced, CrashMode::TearUnsynced] {
            let cb = CrashBackend::from_bytes(mem.snapshot());
            cb.fail_after(steps);
            let res = new.write_update(&cb);
            let disk = cb.after_crash(mode);
            let v = open(disk, &key).unwrap_or_else(|e| panic!("steps {steps} {mode:?}: {e}"));
            let h = v.header();
            if res.is_ok() {
                completed = true;
                assert_eq!((h.key_id, h.generation), (new.key_id, old.generation + 1));
            }
            assert!(
                (h.key_id == old.key_id
                    && h.wrapped_dek == old.wrapped_dek
                    && h.generation == old.generation)
                    || (h.key_id == new.key_id
                        && h.wrapped_dek == new.wrapped_dek
                        && h.generation == old.generation + 1),
                "steps {steps} {mode:?}: mixed header {h:?}"
            );
            assert_eq!(read8k(&v), vec![0x5A; 8192]);
        }
    }
    assert!(
        completed,
        "the update never completed within the step budget"
    );
}

#[test]
fn header_update_bumps_generation_and_survives_reopen() {
    let (b, key, old) = make(512);
    let mut grown = old.clone();
    grown.size = 8 << 20;
    b.set_len(HEADER_REGION + grown.size).unwrap();
    let written = grown.write_update(&b).unwrap();
    assert_eq!(written.generation, 1);
    let v = open(b, &key).unwrap();
    assert_eq!(v.size(), 8 << 20);
    assert_eq!(read8k(&v), vec![0x5A; 8192]);
}

/// Growing a volume interrupted by a power failure at every step: the volume always opens with
/// the old or the new size, and its data is intact.
#[test]
fn resize_interrupted_at_every_step_leaves_old_or_new_size() {
    let (mem, key, old) = make(4096);
    let new_size = old.size * 2;
    let mut completed = false;
    for steps in 0..10 {
        for mode in [CrashMode::DropUnsynced, CrashMode::TearUnsynced] {
            let cb = CrashBackend::from_bytes(mem.snapshot());
            cb.fail_after(steps);
            let res = VolumeHeader::grow(&cb, new_size);
            let v = open(cb.after_crash(mode), &key)
                .unwrap_or_else(|e| panic!("steps {steps} {mode:?}: {e}"));
            if res.is_ok() {
                completed = true;
                assert_eq!(v.size(), new_size);
            }
            assert!(v.size() == old.size || v.size() == new_size);
            assert_eq!(read8k(&v), vec![0x5A; 8192]);
        }
    }
    assert!(completed);
    assert!(VolumeHeader::grow(&mem, old.size - 4096).is_err());
}

mod decoder_robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes (with and without a valid magic/length prefix) never panic the
        /// decoder, and are never accepted unless they carry a valid checksum.
        #[test]
        fn random_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
            if magic && bytes.len() >= 20 {
                bytes[..8].copy_from_slice(b"CRYPTNBD");
                let l = (bytes.len() as u32).to_le_bytes();
                bytes[12..16].copy_from_slice(&l);
            }
            let _ = VolumeHeader::decode(&bytes);
        }

        /// Any single-byte change to a valid copy is rejected.
        #[test]
        fn mutated_copy_is_rejected(pos in 0usize..400, val in 1u8..=255) {
            let enc = golden_header().encode().unwrap();
            let mut m = enc.clone();
            let i = pos % m.len();
            m[i] ^= val;
            prop_assert!(VolumeHeader::decode(&m).is_err());
        }
    }
}
