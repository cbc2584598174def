//! The key store's root of trust on the command line: where the passphrase comes from
//! (`--passphrase-file`, `$CRYPTNBD_PASSPHRASE`) or else the key file `root.key`, opening the
//! store with it (`open_keystore`, shared by every command that needs the store), and
//! `cryptnbd kms init`, which creates a store and its root. Apart from `kms`, which parses and
//! dispatches the key commands, because these are the only lines of the CLI that handle the root
//! secret itself.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use cryptnbd::kms::{InitRoot, KeyStore, KmsError, RadosStore, RootSecret, SystemClock};
use serde_json::json;
use zeroize::Zeroizing;

use super::rbd::CephArgs;
use super::{print_json, Global};

/// The environment variable holding the key store passphrase.
pub const PASSPHRASE_ENV: &str = "CRYPTNBD_PASSPHRASE";

/// Reads a passphrase file, dropping one trailing newline.
fn read_passphrase_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let mut s = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading passphrase file {}", path.display()))?,
    );
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    if s.is_empty() {
        bail!("passphrase file {} is empty", path.display());
    }
    Ok(s)
}

/// The passphrase from `--passphrase-file`, else `$CRYPTNBD_PASSPHRASE`, else none.
fn passphrase(file: Option<&Path>) -> anyhow::Result<Option<Zeroizing<String>>> {
    if let Some(f) = file {
        return read_passphrase_file(f).map(Some);
    }
    match std::env::var(PASSPHRASE_ENV) {
        Ok(p) if !p.is_empty() => Ok(Some(Zeroizing::new(p))),
        _ => Ok(None),
    }
}

/// Opens the key store in the data directory: passphrase from `--passphrase-file`, else
/// `$CRYPTNBD_PASSPHRASE`, else the key file `root.key` in the data directory.
pub fn open_keystore(global: &Global) -> anyhow::Result<KeyStore> {
    let dir = &global.data_dir;
    if !KeyStore::exists(dir) {
        bail!(
            "no key store in {}: run `cryptnbd kms init` (or pass --data-dir)",
            dir.display()
        );
    }
    let root = match passphrase(global.passphrase_file.as_deref())? {
        Some(p) => RootSecret::Passphrase(p),
        None => RootSecret::KeyFile(dir.join("root.key")),
    };
    match KeyStore::open(dir, root) {
        Ok(ks) => Ok(ks),
        Err(
            e @ KmsError::RootKindMismatch {
                given: "a key file",
                ..
            },
        ) => bail!("{e}: pass --passphrase-file FILE or set ${PASSPHRASE_ENV}"),
        Err(e @ KmsError::RootKindMismatch { .. }) => bail!(
            "{e}: drop --passphrase-file and unset ${PASSPHRASE_ENV} (the store uses root.key)"
        ),
        Err(e) => Err(e.into()),
    }
}

/// Where `kms init` (and `kms import-store`) puts the store: the data directory, or RADOS.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Where the store lives: `dir` (files in the data directory, the default) or
    /// `rados:POOL[/NAMESPACE]` (objects in a Ceph pool, shared by several `kms serve` hosts;
    /// the data directory then keeps the root key, the audit log and a marker, store.json).
    #[arg(long, default_value = "dir", value_name = "dir|rados:POOL[/NS]")]
    store: String,
    #[command(flatten)]
    ceph: CephArgs,
}

impl StoreArgs {
    /// The RADOS store asked for, or `None` for the data directory.
    pub fn rados(&self) -> anyhow::Result<Option<RadosStore>> {
        if self.store == "dir" {
            self.ceph.refuse_unused("--store rados:POOL[/NAMESPACE]")?;
            return Ok(None);
        }
        let mut r = RadosStore::parse(&self.store).map_err(anyhow::Error::msg)?;
        r.ceph = self.ceph.client();
        Ok(Some(r))
    }
}

pub(super) fn init(
    global: &Global,
    root_key_file: Option<PathBuf>,
    store: &StoreArgs,
    join: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    let dir = &global.data_dir;
    let rados = store.rados()?;
    let pass = passphrase(global.passphrase_file.as_deref())?;
    if root_key_file.is_some() && pass.is_some() {
        bail!(
            "give either --root-key-file or a passphrase (--passphrase-file / ${PASSPHRASE_ENV}), not both"
        );
    }
    if join {
        let Some(r) = rados else {
            bail!("--join needs --store rados:POOL[/NAMESPACE]: the store to join");
        };
        let root = match (pass, root_key_file) {
            (Some(p), _) => RootSecret::Passphrase(p),
            (None, Some(f)) => RootSecret::KeyFile(f),
            (None, None) => RootSecret::KeyFile(dir.join("root.key")),
        };
        let ks = KeyStore::join(dir, &r, root)?;
        if json_out {
            return print_json(&json!({
                "store_id": ks.store_id(),
                "data_dir": dir,
                "store": ks.location(),
            }));
        }
        println!(
            "joined key store {} ({}) from {}: the root key matches; every `kms` command and \
             `kms serve` here now use it",
            ks.store_id(),
            ks.location(),
            dir.display()
        );
        return Ok(());
    }
    let key_desc = |src: Option<&Path>| match src {
        Some(s) => format!(
            "key file {} (copied from {})",
            dir.join("root.key").display(),
            s.display()
        ),
        None => format!("key file {}", dir.join("root.key").display()),
    };
    let (root, root_desc) = match pass {
        Some(p) => (InitRoot::Passphrase(p), "passphrase (Argon2id)".to_string()),
        None => (
            InitRoot::GenerateKeyFile,
            key_desc(root_key_file.as_deref()),
        ),
    };
    let ks = KeyStore::init_at(
        dir,
        rados.as_ref(),
        root,
        root_key_file.as_deref(),
        std::sync::Arc::new(SystemClock),
    )?;
    if json_out {
        return print_json(&json!({
            "store_id": ks.store_id(),
            "data_dir": dir,
            "store": ks.location(),
            "root": root_desc,
        }));
    }
    println!(
        "created key store {} in {}\nroot of trust: {root_desc}\n\
         back it up: without it nothing this store wraps can ever be decrypted.\n\
         next: cryptnbd kms create-key --alias NAME",
        ks.store_id(),
        ks.location()
            .strip_prefix("file:")
            .unwrap_or(&ks.location()),
    );
    if rados.is_some() {
        println!(
            "other hosts join it with the same root: cryptnbd kms init --store {} --join \
             [--root-key-file COPY-OF-root.key | --passphrase-file F]",
            ks.location()
        );
    }
    Ok(())
}
