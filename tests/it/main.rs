//! Every integration test, as one binary (link time dominates CI on two cores). Each module is one
//! former `tests/NAME.rs`; `cargo test --test it NAME::` runs one of them. New test files go in
//! this directory with a `mod NAME;` line below (or in `tests/` and `tools/merge-test-binaries`).

#[path = "../clients_common/mod.rs"]
mod clients_common;
#[path = "../common/mod.rs"]
mod common;
#[path = "../durability_common/mod.rs"]
mod durability_common;
#[path = "../kms_http_support/mod.rs"]
mod kms_http_support;
#[path = "../lazyfs/mod.rs"]
mod lazyfs;
#[cfg(feature = "rbd")]
#[path = "../rbd_common/mod.rs"]
mod rbd_common;

mod cli_check;
mod cli_docs;
mod cli_kms;
mod cli_kms_crash;
mod cli_volume;
mod clients_align;
mod clients_at_rest;
mod clients_blockdev;
mod clients_fio;
mod clients_nbdcopy;
mod clients_nbdsh;
mod clients_qemu;
mod durability_kill9;
mod durability_powerloss;
mod durability_snapshots;
mod gcm_kat;
mod kernel_guest;
mod kms_access_golden;
mod kms_aead_kat;
mod kms_api;
mod kms_golden;
mod kms_golden_v2;
mod kms_http_aliases_raw;
mod kms_http_dew_sdk;
mod kms_http_failover;
mod kms_http_grants;
mod kms_http_hardening;
mod kms_http_limits;
mod kms_http_remote;
mod kms_http_revoke;
mod kms_http_vault;
mod kms_props;
mod kms_python_oracle;
mod kms_rados;
mod kms_store;
mod nbd_wire;
mod ops_ctl;
mod ops_metrics;
mod ops_systemd;
mod rbd_backend;
mod rbd_blockdev;
mod rbd_clients;
mod rbd_gateways;
mod rbd_inflight;
mod rbd_orphans;
mod rbd_remote_kms;
mod rbd_snapshots;
mod seams;
mod secrets_locked;
mod server_access;
mod server_cli;
mod server_full_disk;
mod server_garbage;
mod server_handshake;
mod server_memory;
mod server_nbdinfo;
mod server_nbdsh;
mod server_peercred;
mod server_protocol;
mod server_refusal_cache;
mod server_reload;
mod server_sticky_writeback;
mod server_tls;
mod server_volume;
mod vhost_access;
mod vhost_guest;
mod volume_datadir;
mod volume_exclusive;
mod volume_fused_zero;
mod volume_header;
mod volume_header_two_crashes;
mod volume_io;
mod volume_layers;
mod volume_mapped;
mod volume_mapped_write;
mod volume_model;
mod volume_rmw;
mod volume_snapshots;
mod volume_snapshots_online;
mod volume_torn_reads;
mod xts_kat;
mod xts_oracle;
