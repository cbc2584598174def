//! Secret key types. Each zeroizes its bytes on drop, prints no bytes in `Debug`, and only hands the
//! raw bytes out through a method whose name says the caller takes responsibility (`dangerous_*`).
//! All of them live on locked, non-dumpable pages (`super::locked`).

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use super::locked::{LockedBox, LockedBytes};

/// Errors building a key from bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    #[error("a {what} must be {expected} bytes, got {got}")]
    WrongLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("an AES-XTS key must have two different halves (K1 == K2 is refused by IEEE 1619)")]
    EqualXtsHalves,
}

/// A 256-bit symmetric key (root key, CMK version material, AEAD key), on locked, non-dumpable
/// pages of its own; the bytes are copied there directly, never through a stack array.
pub struct Key256(LockedBox<[u8; 32]>);

impl Key256 {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != 32 {
            return Err(KeyError::WrongLength {
                what: "256-bit key",
                expected: 32,
                got: bytes.len(),
            });
        }
        Ok(Self(LockedBox::new_with(|k: &mut [u8; 32]| {
            k.copy_from_slice(bytes)
        })))
    }

    /// A key whose bytes `fill` writes straight into its locked pages (a KDF's output, a file's
    /// content); `fill`'s error is passed through (the partial key is wiped).
    pub fn try_fill<E>(fill: impl FnOnce(&mut [u8; 32]) -> Result<(), E>) -> Result<Self, E> {
        let mut result = Ok(());
        let k = LockedBox::new_with(|k: &mut [u8; 32]| result = fill(k));
        result.map(|()| Self(k))
    }

    /// A fresh key from the OS CSPRNG, drawn straight into its locked pages.
    pub fn generate() -> Self {
        Self(LockedBox::new_with(|k: &mut [u8; 32]| {
            getrandom::getrandom(&mut k[..]).expect("the OS random number generator failed")
        }))
    }

    /// The raw key bytes. The caller must not log, print or persist them unsealed.
    pub fn dangerous_as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether the key's pages are locked in RAM (`mlock` can fail under a low RLIMIT_MEMLOCK).
    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }
}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256(<redacted>)")
    }
}

impl PartialEq for Key256 {
    fn eq(&self, other: &Self) -> bool {
        self.0[..].ct_eq(&other.0[..]).into()
    }
}
impl Eq for Key256 {}

/// A 512-bit AES-256-XTS key: K1 (data) then K2 (tweak), refused when the halves are equal. On
/// locked, non-dumpable pages of its own, like [`Key256`].
pub struct XtsKey(LockedBox<[u8; 64]>);

impl XtsKey {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != 64 {
            return Err(KeyError::WrongLength {
                what: "AES-256-XTS key",
                expected: 64,
                got: bytes.len(),
            });
        }
        Self::checked(LockedBox::new_with(|k: &mut [u8; 64]| {
            k.copy_from_slice(bytes)
        }))
    }

    fn checked(k: LockedBox<[u8; 64]>) -> Result<Self, KeyError> {
        if bool::from(k[..32].ct_eq(&k[32..])) {
            return Err(KeyError::EqualXtsHalves);
        }
        Ok(Self(k))
    }

    /// A fresh key from the OS CSPRNG, drawn straight into its locked pages.
    pub fn generate() -> Self {
        loop {
            let k = LockedBox::new_with(|k: &mut [u8; 64]| {
                getrandom::getrandom(&mut k[..]).expect("the OS random number generator failed")
            });
            if let Ok(key) = Self::checked(k) {
                return key;
            }
        }
    }

    /// K1, the data-unit key.
    pub fn dangerous_k1(&self) -> &[u8; 32] {
        self.0[..32]
            .try_into()
            .expect("64-byte key has a 32-byte half")
    }

    /// K2, the tweak key.
    pub fn dangerous_k2(&self) -> &[u8; 32] {
        self.0[32..]
            .try_into()
            .expect("64-byte key has a 32-byte half")
    }

    /// All 64 bytes (K1 || K2). The caller must not log, print or persist them unsealed.
    pub fn dangerous_as_bytes(&self) -> &[u8; 64] {
        &self.0
    }

    /// Whether the key's pages are locked in RAM (`mlock` can fail under a low RLIMIT_MEMLOCK).
    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }
}

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XtsKey(<redacted>)")
    }
}

/// Secret bytes of variable length (a plaintext data key, unsealed CMK material, a credential's
/// secret), on locked, non-dumpable pages of their own (one allocation, whole pages, per value).
#[derive(Clone)]
pub struct SecretBytes(LockedBytes);

impl SecretBytes {
    /// Copies `bytes` into locked pages and wipes the `Vec` (including its spare capacity).
    pub fn new(mut bytes: Vec<u8>) -> Self {
        let s = Self(LockedBytes::from_slice(&bytes));
        bytes.zeroize();
        s
    }

    /// `len` zero bytes on locked pages, for `fill` to write the secret into in place (decrypt,
    /// decode); `fill`'s error is passed through (the partial secret is wiped).
    pub fn try_fill<E>(
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut b = LockedBytes::zeroed(len);
        fill(&mut b)?;
        Ok(Self(b))
    }

    /// `len` fresh bytes from the OS CSPRNG, drawn straight into locked pages.
    pub fn random(len: usize) -> Self {
        let mut b = LockedBytes::zeroed(len);
        getrandom::getrandom(&mut b).expect("the OS random number generator failed");
        Self(b)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw bytes. The caller must not log, print or persist them unsealed.
    pub fn dangerous_as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether the bytes' pages are locked in RAM (`mlock` can fail under a low
    /// RLIMIT_MEMLOCK).
    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && bool::from(self.0[..].ct_eq(&other.0[..]))
    }
}
impl Eq for SecretBytes {}

impl Zeroize for SecretBytes {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xts_key_refuses_equal_halves() {
        assert_eq!(
            XtsKey::from_slice(&[7u8; 64]).unwrap_err(),
            KeyError::EqualXtsHalves
        );
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert!(matches!(
            XtsKey::from_slice(&[1u8; 32]),
            Err(KeyError::WrongLength { got: 32, .. })
        ));
        assert!(matches!(
            Key256::from_slice(&[1u8; 31]),
            Err(KeyError::WrongLength { got: 31, .. })
        ));
    }

    #[test]
    fn debug_prints_no_bytes() {
        let k = Key256::from_slice(&[0xAB; 32]).unwrap();
        let s = format!("{k:?}");
        assert!(!s.contains("ab") && !s.contains("171"), "{s}");
        let d = SecretBytes::new(vec![0xCD; 16]);
        assert!(!format!("{d:?}").contains("cd"));
        let x = XtsKey::generate();
        assert_eq!(format!("{x:?}"), "XtsKey(<redacted>)");
    }
}
