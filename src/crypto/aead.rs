//! The AEAD that wraps keys: AES-256-GCM with a random 96-bit nonce. A sealed blob is
//! `nonce (12) || ciphertext || tag (16)`; the associated data binds it to its context, so the
//! same blob presented under another context, another key or with any flipped bit fails to open.

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use super::keys::{Key256, SecretBytes};

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Opening failed: wrong key, wrong associated data, or a tampered/truncated blob. Deliberately
/// says no more (which of these it was is not knowable, and guessing would help an attacker).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("authentication failed (wrong key, wrong context, or tampered data)")]
pub struct AeadError;

/// Seals `plaintext` under `key`, binding `aad`.
pub fn seal(key: &Key256, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.dangerous_as_bytes().into());
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut nonce).expect("the OS random number generator failed");
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of a bounded buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Opens a blob made by [`seal`] with the same key and associated data. The ciphertext is
/// copied into locked pages and decrypted there in place, so the plaintext (unsealed key
/// material) never exists in ordinary memory; on failure those pages are wiped and freed.
pub fn open(key: &Key256, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes, AeadError> {
    if sealed.len() < OVERHEAD {
        return Err(AeadError);
    }
    SecretBytes::try_fill(sealed.len() - OVERHEAD, |out| {
        open_into(key, aad, sealed, out)
    })
}

/// Like [`open`], but decrypts in place into `out` (the caller's locked buffer, e.g. a
/// [`Key256`] being filled), which must be exactly `sealed.len() - OVERHEAD` bytes: anything
/// else fails like a forged blob. On failure `out` may hold ciphertext, never plaintext.
pub fn open_into(key: &Key256, aad: &[u8], sealed: &[u8], out: &mut [u8]) -> Result<(), AeadError> {
    if sealed.len() < OVERHEAD || out.len() != sealed.len() - OVERHEAD {
        return Err(AeadError);
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
    out.copy_from_slice(ct);
    // aes-gcm checks the tag before it decrypts, so a forged blob leaves only ciphertext here.
    Aes256Gcm::new(key.dangerous_as_bytes().into())
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, out, Tag::from_slice(tag))
        .map_err(|_| AeadError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let key = Key256::generate();
        let sealed = seal(&key, b"ctx", b"secret");
        assert_eq!(
            open(&key, b"ctx", &sealed).unwrap().dangerous_as_bytes(),
            b"secret"
        );
        assert_eq!(open(&key, b"other", &sealed), Err(AeadError));
        assert_eq!(open(&Key256::generate(), b"ctx", &sealed), Err(AeadError));
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert_eq!(open(&key, b"ctx", &t), Err(AeadError), "bit flip at {i}");
        }
        assert_eq!(open(&key, b"ctx", &sealed[..10]), Err(AeadError));
        let mut out = [0u8; 6];
        open_into(&key, b"ctx", &sealed, &mut out).unwrap();
        assert_eq!(&out, b"secret");
        let mut short = [0u8; 5];
        assert_eq!(open_into(&key, b"ctx", &sealed, &mut short), Err(AeadError));
        let mut long = [0u8; 7];
        assert_eq!(open_into(&key, b"ctx", &sealed, &mut long), Err(AeadError));
    }
}
