//! Cryptographic primitives: the AES-256-XTS sector engine, the AEAD that wraps keys, and the secret
//! key types. Nothing here knows about files, sockets or async.

pub mod aead;
pub mod keys;
pub mod locked;
pub mod xts;

pub use keys::{Key256, SecretBytes, XtsKey};
pub use xts::Xts;
