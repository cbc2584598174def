//! Every integration test, as one binary (link time dominates CI on two cores). Each module is one
//! former `tests/NAME.rs`; `cargo test --test it NAME::` runs one of them. New test files go in
//! this directory with a `mod NAME;` line below (or in `tests/` and `tools/merge-test-binaries`).

#[path = "../clients_common/mod.rs"]
mod clients_common;
#[path = "../common/mod.rs"]
mod common;

mod cli_kms;
mod cli_kms_crash;
mod cli_volume;
mod clients_at_rest;
mod clients_blockdev;
mod clients_fio;
mod clients_nbdcopy;
mod clients_nbdsh;
mod clients_qemu;
mod gcm_kat;
mod kms_aead_kat;
mod kms_api;
mod kms_golden;
mod kms_props;
mod kms_python_oracle;
mod nbd_wire;
mod seams;
mod server_cli;
mod server_garbage;
mod server_handshake;
mod server_memory;
mod server_nbdinfo;
mod server_nbdsh;
mod server_peercred;
mod server_protocol;
mod server_tls;
mod server_volume;
mod volume_datadir;
mod volume_header;
mod volume_io;
mod volume_model;
mod xts_kat;
mod xts_oracle;
