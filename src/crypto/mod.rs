//! Cryptographic primitives: the AES-256-XTS sector engine, the AEAD that wraps keys, and the secret
//! key types. Nothing here knows about files, sockets or async.

pub mod aead;
pub mod keys;
pub mod locked;
pub mod xts;
#[cfg(target_arch = "x86_64")]
mod xts_ni;
#[cfg(target_arch = "x86_64")]
mod xts_vaes;

pub use keys::{Key256, SecretBytes, XtsKey};
pub use xts::{Kernel, Xts};
