//! cryptnbd: a userspace NBD server for AES-256-XTS encrypted volumes whose data keys are wrapped by
//! an embedded key store (a small KMS).
//!
//! Data flows one way: [`server`] → [`volume`] → ([`crypto`], [`backend`]); a volume asks [`kms`]
//! once, when it is attached (see [`datadir`]). The binary (`src/main.rs`) only turns command-line
//! arguments into typed values and calls this library.

pub mod backend;
pub mod config;
pub mod crypto;
pub mod datadir;
pub mod kms;
pub mod kms_http;
pub mod nbd;
pub mod server;
pub mod volume;
