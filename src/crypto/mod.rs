//! Cryptographic primitives: the AES-256-XTS sector engine, the AEAD that wraps keys, and the secret
//! key types. Nothing here knows about files, sockets or async.
//!
//! The XTS engine is seven files: `xts` chooses the kernel, `xts_portable` is the portable one
//! (the `aes` crate, safe code, any target), `xts_ni`, `xts_vaes` and `xts_vaes512` are the
//! AES-NI kernels (128-, 256- and 512-bit vectors), `xts_common` is the leaf they share (key
//! schedules, tweak helpers) and `xts_zmm` the 512-bit kernel's leaf (CPU model preference,
//! tweaks on `zmm`); no cycle between them. `unsafe` is allowed only in the AES-NI kernels,
//! `xts_common`, `xts_zmm`, `locked`, and the three dispatch functions of `xts` (plain, flagging
//! decryption, and encryption into shared memory for mapped
//! writes); `xts_flag_tests` tests the flagging.

pub mod aead;
pub mod keys;
// mlock/madvise and raw allocation of locked pages.
#[allow(unsafe_code)]
pub mod locked;
pub mod xts;
// AES-NI intrinsics and inline assembly.
#[allow(unsafe_code)]
mod xts_common;
#[cfg(test)]
mod xts_flag_tests;
#[allow(unsafe_code)]
#[cfg(target_arch = "x86_64")]
mod xts_ni;
mod xts_portable;
#[allow(unsafe_code)]
#[cfg(target_arch = "x86_64")]
mod xts_vaes;
#[allow(unsafe_code)]
#[cfg(target_arch = "x86_64")]
mod xts_vaes512;
#[allow(unsafe_code)]
#[cfg(target_arch = "x86_64")]
mod xts_zmm;

pub use keys::{Key256, KeyError, SecretBytes, XtsKey};
pub use xts::{Kernel, Xts};
