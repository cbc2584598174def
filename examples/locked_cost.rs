//! Micro-measure of what keeping secrets on locked, non-dumpable pages costs per value (issue #10,
//! defect 6): one page allocation + madvise + mlock, then wipe + munlock + madvise + free, per
//! `SecretBytes` / unsealed key, against the ordinary-heap equivalents it replaced.
//! Run: `cargo run --release --example locked_cost` (prints microseconds per operation).

use std::time::Instant;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use cryptnbd::crypto::{aead, Key256, SecretBytes};

const N: u32 = 20_000;

fn time(what: &str, mut f: impl FnMut()) {
    let t = Instant::now();
    for _ in 0..N {
        f();
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(N);
    println!("{what:<44} {us:8.2} us");
}

fn main() {
    let key = Key256::generate();
    let sealed = aead::seal(&key, b"aad", &[7u8; 64]);
    let sealed32 = aead::seal(&key, b"aad", &[9u8; 32]);
    time("ordinary heap: Zeroizing<Vec<u8>> (64 B)", || {
        std::hint::black_box(zeroize::Zeroizing::new(vec![0u8; 64]));
    });
    time("locked: SecretBytes::random(64)", || {
        std::hint::black_box(SecretBytes::random(64));
    });
    time("ordinary heap: AES-GCM decrypt to a Vec (64 B)", || {
        let c = Aes256Gcm::new(key.dangerous_as_bytes().into());
        let msg = Payload {
            msg: &sealed[12..],
            aad: b"aad",
        };
        let v = c.decrypt(Nonce::from_slice(&sealed[..12]), msg).unwrap();
        std::hint::black_box(zeroize::Zeroizing::new(v));
    });
    time("locked: aead::open, in place (64 B)", || {
        std::hint::black_box(aead::open(&key, b"aad", &sealed).unwrap());
    });
    time("locked: CMK material into a Key256 (open_into)", || {
        let k = Key256::try_fill(|o| aead::open_into(&key, b"aad", &sealed32, o)).unwrap();
        std::hint::black_box(k);
    });
}
