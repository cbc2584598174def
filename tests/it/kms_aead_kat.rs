//! Known answers for the primitive the key store seals with: AES-256-GCM test cases 13–16 of
//! McGrew & Viega's GCM specification (the NIST GCM vectors for 256-bit keys), through
//! `crypto::aead::open`, whose blob is `nonce || ciphertext || tag`.

use cryptnbd::crypto::{aead, Key256};

struct Vector {
    key: &'static str,
    iv: &'static str,
    aad: &'static str,
    plain: &'static str,
    cipher: &'static str,
    tag: &'static str,
}

const K15: &str = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
const P15: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                   1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
const C15: &str = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                   8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad";

const VECTORS: &[Vector] = &[
    // Test case 13: empty plaintext.
    Vector {
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        iv: "000000000000000000000000",
        aad: "",
        plain: "",
        cipher: "",
        tag: "530f8afbc74536b9a963b4f1c4cb738b",
    },
    // Test case 14: one zero block.
    Vector {
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        iv: "000000000000000000000000",
        aad: "",
        plain: "00000000000000000000000000000000",
        cipher: "cea7403d4d606b6e074ec5d3baf39d18",
        tag: "d0d1c8a799996bf0265b98b5d48ab919",
    },
    // Test case 15: four blocks.
    Vector {
        key: K15,
        iv: "cafebabefacedbaddecaf888",
        aad: "",
        plain: P15,
        cipher: C15,
        tag: "b094dac5d93471bdec1a502270e3cc6c",
    },
];

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.replace(char::is_whitespace, "")).unwrap()
}

fn check(key: &str, iv: &str, aad: &str, plain: &[u8], cipher: &[u8], tag: &str) {
    let key = Key256::from_slice(&h(key)).unwrap();
    let mut blob = h(iv);
    blob.extend_from_slice(cipher);
    blob.extend(h(tag));
    let opened = aead::open(&key, &h(aad), &blob).unwrap();
    assert_eq!(opened.dangerous_as_bytes(), plain);
    // The last tag bit flipped: refused.
    let last = blob.len() - 1;
    blob[last] ^= 1;
    assert!(aead::open(&key, &h(aad), &blob).is_err());
}

#[test]
fn gcm_spec_test_cases_13_to_15() {
    for v in VECTORS {
        check(v.key, v.iv, v.aad, &h(v.plain), &h(v.cipher), v.tag);
    }
}

#[test]
fn gcm_spec_test_case_16_with_aad() {
    // The first 60 bytes of test case 15's plaintext, with associated data.
    check(
        K15,
        "cafebabefacedbaddecaf888",
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        &h(P15)[..60],
        &h(C15)[..60],
        "76fc6ece0f4e1768cddf8853bb2d551b",
    );
}

#[test]
fn seal_output_opens_and_has_the_documented_layout() {
    let key = Key256::from_slice(&h(K15)).unwrap();
    let sealed = aead::seal(&key, b"aad", b"sixteen byte msg");
    assert_eq!(sealed.len(), aead::NONCE_LEN + 16 + aead::TAG_LEN);
    let again = aead::seal(&key, b"aad", b"sixteen byte msg");
    assert_ne!(
        sealed[..aead::NONCE_LEN],
        again[..aead::NONCE_LEN],
        "fresh nonces"
    );
    assert_eq!(
        aead::open(&key, b"aad", &sealed)
            .unwrap()
            .dangerous_as_bytes(),
        b"sixteen byte msg"
    );
}
