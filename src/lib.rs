//! cryptnbd: a userspace NBD server for AES-256-XTS encrypted volumes whose data keys are wrapped by
//! an embedded key store (a small KMS).
//!
//! Data flows one way: [`server`] → [`volume`] → ([`crypto`], [`backend`]); a volume's data key
//! is asked of a key provider once, when it is attached (see [`datadir`]). The binary
//! (`src/main.rs`) only turns command-line arguments into typed values and calls this library.
//!
//! Three seams carry new capabilities, each in one place:
//! - **storage**: [`backend::Backend`], the positional byte store under a volume (file; RBD);
//!   the server serves [`volume::Volume`]s found through [`server::ExportProvider`], and validates
//!   requests with [`nbd::validate`];
//! - **keys**: [`kms::KeyProvider`], what attach asks for a data key (the embedded
//!   [`kms::KeyStore`]; a remote KMS);
//! - **transport**: the stream under a session, in `server` (Unix, TCP, TLS).
//!
//! Composition (which key provider, which data directory, which exports) happens once, in
//! [`exports`], above [`server`], which knows neither [`kms`] nor [`datadir`].

// The compiler's fences: `unsafe` only where a module allows it (the file backend's syscalls, the
// AES-NI kernels, locked key memory), and every `unsafe` block says why it is sound.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod config;
pub mod control;
pub mod crypto;
pub mod datadir;
pub mod exports;
pub mod kms;
pub mod kms_http;
pub mod metrics;
pub mod nbd;
pub mod server;
pub mod systemd;
pub mod vhost;
pub mod volume;
