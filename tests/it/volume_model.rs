//! Model test: random reads, writes, trims and write-zeroes at random offsets and lengths against
//! a volume on the memory backend and against a plain `Vec<u8>` give identical results, at both
//! sector sizes, with discard on and off; the volume is reopened at the end and compared again.

use cryptnbd::backend::testing::MemBackend;
use cryptnbd::crypto::XtsKey;
use cryptnbd::volume::{Volume, VolumeError, VolumeHeader};
use proptest::prelude::*;
use uuid::Uuid;

const SIZE: u64 = 96 << 10;

#[derive(Debug, Clone)]
enum Cmd {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    Trim { off: u64, len: u64 },
    Zero { off: u64, len: u64, may_punch: bool },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Anywhere, any length.
        (0..SIZE).prop_flat_map(|o| (Just(o), 0..=(SIZE - o).min(20_000))),
        // Sector-ish aligned.
        (0..SIZE / 512).prop_flat_map(
            |s| (Just(s * 512), 0..=((SIZE / 512 - s).min(24))).prop_map(|(o, n)| (o, n * 512))
        ),
    ]
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Cmd::Write { off, len: len as usize, seed }),
        3 => range().prop_map(|(off, len)| Cmd::Read { off, len: len as usize }),
        1 => range().prop_map(|(off, len)| Cmd::Trim { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), may_punch)| Cmd::Zero { off, len, may_punch }),
    ]
}

fn run(ss: u32, discard: bool, cmds: &[Cmd]) -> Result<(), TestCaseError> {
    let b = MemBackend::new();
    let key = XtsKey::generate();
    let mut h = VolumeHeader::new(Uuid::new_v4(), SIZE, ss);
    h.discard = discard;
    let v = Volume::create(b.clone(), &h, &key).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let ssz = ss as u64;
    for c in cmds {
        match *c {
            Cmd::Write { off, len, seed } => {
                let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed)).collect();
                v.write(off, &mut data.clone(), false).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Cmd::Read { off, len } => {
                let mut buf = vec![0xEE; len];
                let out = v.read(off, &mut buf).unwrap();
                let want = &model[off as usize..off as usize + len];
                prop_assert_eq!(&buf[..], want, "read {} +{}", off, len);
                if out.all_zero {
                    prop_assert!(want.iter().all(|&x| x == 0));
                }
            }
            Cmd::Trim { off, len } => {
                v.trim(off, len, false).unwrap();
                if discard {
                    // Whole sectors inside the range are discarded (read as zeroes).
                    let s = off.div_ceil(ssz) * ssz;
                    let e = (off + len) / ssz * ssz;
                    if s < e {
                        model[s as usize..e as usize].fill(0);
                    }
                }
            }
            Cmd::Zero {
                off,
                len,
                may_punch,
            } => {
                v.write_zeroes(off, len, may_punch, false).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
        }
    }
    drop(v);
    let k = XtsKey::from_slice(key.dangerous_as_bytes()).unwrap();
    let v = Volume::open(b, true, move |_| Ok::<_, VolumeError>(k)).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    v.read(0, &mut all).unwrap();
    prop_assert!(all == model, "final contents differ");
    let covered: u64 = v
        .block_status(0, SIZE)
        .unwrap()
        .iter()
        .map(|e| e.length)
        .sum();
    prop_assert_eq!(covered, SIZE);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn model_sector_512(cmds in prop::collection::vec(cmd(), 1..40), discard in any::<bool>()) {
        run(512, discard, &cmds)?;
    }

    #[test]
    fn model_sector_4096(cmds in prop::collection::vec(cmd(), 1..40), discard in any::<bool>()) {
        run(4096, discard, &cmds)?;
    }
}
