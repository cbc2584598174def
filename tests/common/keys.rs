//! The key store + clock + data directory fixture that the data directory, server and key store
//! tests share: a fresh store in a temporary directory (which is also the data directory), a
//! manual clock the test moves, and the key provider seen as attach sees it.

use std::sync::Arc;

use cryptnbd::datadir::{CreateOptions, DataDir};
use cryptnbd::kms::{InitRoot, KeyProvider, KeyStore, ManualClock};
use cryptnbd::volume::VolumeHeader;

pub struct KeyFixture {
    /// Holds the key store and `volumes/`; removed on drop.
    pub dir: tempfile::TempDir,
    pub ks: KeyStore,
    pub clock: ManualClock,
    pub dd: DataDir,
}

impl KeyFixture {
    /// An empty key store (key-file root) on a manual clock that starts now.
    pub fn new() -> Self {
        Self::at(ManualClock::starting_now())
    }

    /// An empty key store on `clock`.
    pub fn at(clock: ManualClock) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ks = KeyStore::init_with_clock(
            dir.path(),
            InitRoot::GenerateKeyFile,
            Arc::new(clock.clone()),
        )
        .expect("init key store");
        let dd = DataDir::new(dir.path());
        Self { dir, ks, clock, dd }
    }

    /// Adds a CMK under `alias`.
    pub fn with_key(self, alias: &str) -> Self {
        self.ks.create_key(alias, "test key").expect("create key");
        self
    }

    /// The key store as attach sees it.
    pub fn keys(&self) -> &dyn KeyProvider {
        &self.ks
    }

    /// Creates volume `name` of `size` bytes under CMK `key` with default options.
    pub fn volume(&self, name: &str, size: u64, key: &str) -> VolumeHeader {
        self.dd
            .create_volume(self.keys(), name, size, key, CreateOptions::default())
            .expect("create volume")
    }

    /// Opens the same store again (another handle, as a second process would).
    pub fn reopen(&self) -> KeyStore {
        KeyStore::open_with_clock(
            self.dir.path(),
            cryptnbd::kms::RootSecret::KeyFile(self.dir.path().join("root.key")),
            Arc::new(self.clock.clone()),
        )
        .expect("reopen key store")
    }
}
