//! The RBD backend through the library's `Backend` trait on a real cluster (feature `rbd`):
//! positional reads and writes (also from many threads at once), growth on write, zeroes past the
//! end, punched holes that read as zeroes, allocation queries, and the exclusive lock between two
//! cluster clients in one process.
#![cfg(feature = "rbd")]

use crate::rbd_common;

use std::sync::Arc;

use cryptnbd::backend::rbd::{
    create_image, remove_image, Access, RbdBackend, RbdError, RbdLocation,
};
use cryptnbd::backend::Backend;
use rbd_common::{ceph_conf, unique_image, POOL};

const MIB: u64 = 1 << 20;
const OBJ: u64 = 4 * MIB;

fn location(test: &str) -> Option<RbdLocation> {
    let conf = ceph_conf(test)?;
    Some(RbdLocation {
        pool: POOL.into(),
        image: unique_image("backend"),
        ceph: cryptnbd::backend::rbd::CephClient {
            ceph_conf: Some(conf),
            ..Default::default()
        },
    })
}

struct Remove(RbdLocation);
impl Drop for Remove {
    fn drop(&mut self) {
        let _ = remove_image(&self.0);
    }
}

#[test]
fn rbd_backend_io_holes_and_allocation() {
    let Some(loc) = location("rbd_backend_io_holes_and_allocation") else {
        return;
    };
    create_image(&loc, 16 * MIB).unwrap();
    let _rm = Remove(loc.clone());
    let b = Arc::new(RbdBackend::open(&loc, Access::Write).unwrap());
    assert_eq!(b.len().unwrap(), 16 * MIB);
    assert_eq!(b.describe(), format!("rbd:{POOL}/{}", loc.image));
    assert_eq!(b.seek_data(0).unwrap(), None, "a new image is all hole");
    assert_eq!(b.seek_hole(0).unwrap(), 0);

    // Eight threads write their own 1 MiB each, concurrently.
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let data = vec![i + 1; MIB as usize];
                b.write_at(&data, OBJ + u64::from(i) * MIB).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    b.sync().unwrap();
    for i in 0..8u8 {
        let mut buf = vec![0u8; MIB as usize];
        b.read_at(&mut buf, OBJ + u64::from(i) * MIB).unwrap();
        assert!(buf.iter().all(|&x| x == i + 1), "region {i}");
    }
    // Objects 1 and 2 hold data; 0 and 3 are holes (object granularity).
    assert_eq!(b.seek_data(0).unwrap(), Some(OBJ));
    assert_eq!(b.seek_hole(OBJ).unwrap(), 3 * OBJ);
    assert_eq!(b.seek_data(3 * OBJ).unwrap(), None);

    // Punching a whole object makes it a hole again, reading as zeroes.
    b.punch_hole(OBJ, OBJ).unwrap();
    let mut buf = vec![1u8; 4096];
    b.read_at(&mut buf, OBJ).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    assert_eq!(b.seek_data(0).unwrap(), Some(2 * OBJ));
    // A partial punch reads as zeroes too.
    b.punch_hole(2 * OBJ + 4096, 8192).unwrap();
    let mut buf = vec![1u8; 16384];
    b.read_at(&mut buf, 2 * OBJ).unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 5));
    assert!(buf[4096..12288].iter().all(|&x| x == 0));
    assert!(buf[12288..].iter().all(|&x| x == 5));

    // Past the end reads as zeroes; a write past the end grows the image.
    let mut buf = vec![9u8; 8192];
    b.read_at(&mut buf, 16 * MIB - 4096).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    b.write_at(&[7u8; 4096], 20 * MIB).unwrap();
    assert_eq!(b.len().unwrap(), 20 * MIB + 4096);
    b.set_len(32 * MIB).unwrap();
    assert_eq!(b.len().unwrap(), 32 * MIB);
    assert!(b.allocated_bytes().unwrap() >= 2 * OBJ);
}

#[test]
fn rbd_backend_exclusive_lock_between_clients() {
    let Some(loc) = location("rbd_backend_exclusive_lock_between_clients") else {
        return;
    };
    create_image(&loc, 8 * MIB).unwrap();
    let _rm = Remove(loc.clone());
    let first = RbdBackend::open(&loc, Access::Write).unwrap();
    first.write_at(&[3u8; 4096], 0).unwrap();
    assert!(first.holds_lock().unwrap());
    for access in [Access::Write, Access::ReadExclusive] {
        match RbdBackend::open(&loc, access) {
            Err(e @ RbdError::LockHeld { .. }) => {
                assert!(e.is_busy());
                assert!(e.to_string().contains("is in use"), "{e}");
            }
            other => panic!("{access:?} while another client holds the lock: {other:?}"),
        }
    }
    // A shared reader needs no lock and sees the data.
    let reader = RbdBackend::open(&loc, Access::ReadShared).unwrap();
    let mut buf = [0u8; 4096];
    reader.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [3u8; 4096]);
    // The first client still holds it and still writes.
    assert!(first.holds_lock().unwrap());
    first.write_at(&[4u8; 4096], 4096).unwrap();
    drop(reader);
    // A clean close releases the lock: the next writer gets it without any breaking.
    drop(first);
    let second = RbdBackend::open(&loc, Access::Write).unwrap();
    assert!(second.holds_lock().unwrap());
    second.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [4u8; 4096]);
    // Removing an image that is open is refused as busy.
    let e = remove_image(&loc).unwrap_err();
    assert!(e.is_busy(), "{e}");
}
