//! Keys live on locked, non-dumpable pages (issue #10, defect 6): the key store's root key and
//! unsealed CMK material (`Key256`), data keys (`XtsKey`) — and, in unit tests beside the code,
//! the key store's root and the portable XTS path's round keys. Checked from the outside: the
//! kernel's view of the mapping holding the key bytes (`/proc/self/smaps` VmFlags: `dd` = not in
//! core dumps, `lo` = locked in RAM). Before the fix these keys sat in ordinary heap memory.

use cryptnbd::crypto::locked::vm_flags_of;
use cryptnbd::crypto::{Key256, XtsKey};

fn assert_protected(what: &str, addr: usize, locked: bool) {
    let flags = vm_flags_of(addr).unwrap_or_else(|| panic!("{what}: no mapping found"));
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    assert!(has("dd"), "{what} is in dumpable memory (VmFlags: {flags})");
    if locked {
        assert!(has("lo"), "{what} says locked but VmFlags are {flags}");
    }
}

#[test]
fn key256_and_xts_keys_are_on_locked_non_dumpable_pages() {
    let k = Key256::generate();
    assert_protected(
        "a generated Key256",
        k.dangerous_as_bytes().as_ptr() as usize,
        k.is_locked(),
    );
    let k = Key256::from_slice(&[7u8; 32]).unwrap();
    assert_protected(
        "a Key256 from bytes",
        k.dangerous_as_bytes().as_ptr() as usize,
        k.is_locked(),
    );
    let x = XtsKey::generate();
    assert_protected(
        "a generated XtsKey",
        x.dangerous_as_bytes().as_ptr() as usize,
        x.is_locked(),
    );
    let mut bytes = [1u8; 64];
    bytes[40] = 2;
    let x = XtsKey::from_slice(&bytes).unwrap();
    assert_protected(
        "an XtsKey from bytes",
        x.dangerous_as_bytes().as_ptr() as usize,
        x.is_locked(),
    );
    // As root (CI), mlock works: then the keys must really be locked.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(k.is_locked() && x.is_locked());
    }
}

#[test]
fn a_passphrase_derived_root_key_is_protected_too() {
    let k = Key256::try_fill(|out| {
        out.copy_from_slice(&[3u8; 32]);
        Ok::<_, ()>(())
    })
    .unwrap();
    assert_protected(
        "a filled Key256",
        k.dangerous_as_bytes().as_ptr() as usize,
        k.is_locked(),
    );
    assert!(Key256::try_fill(|_| Err::<(), _>("kdf failed")).is_err());
}

/// The check discriminates: ordinary heap memory (where the keys were before) is dumpable.
#[test]
fn ordinary_heap_memory_is_not_protected() {
    let plain = Box::new([9u8; 32]);
    let flags = vm_flags_of(plain.as_ptr() as usize).expect("mapping");
    assert!(
        !flags.split_whitespace().any(|f| f == "dd"),
        "ordinary heap memory reported as non-dumpable: {flags}"
    );
}
