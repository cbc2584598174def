//! The key store's root of trust on the command line: where the passphrase comes from
//! (`--passphrase-file`, `$CRYPTNBD_PASSPHRASE`) or else the key file `root.key`, opening the
//! store with it (`open_keystore`, shared by every command that needs the store), and
//! `cryptnbd kms init`, which creates a store and its root. Apart from `kms`, which parses and
//! dispatches the key commands, because these are the only lines of the CLI that handle the root
//! secret itself.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use cryptnbd::kms::{InitRoot, KeyStore, KmsError, RootSecret};
use serde_json::json;
use zeroize::Zeroizing;

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

pub(super) fn init(
    global: &Global,
    root_key_file: Option<PathBuf>,
    json_out: bool,
) -> anyhow::Result<()> {
    let dir = &global.data_dir;
    let pass = passphrase(global.passphrase_file.as_deref())?;
    let (ks, root_desc) = match (root_key_file, pass) {
        (Some(_), Some(_)) => bail!(
            "give either --root-key-file or a passphrase (--passphrase-file / ${PASSPHRASE_ENV}), not both"
        ),
        (Some(src), None) => (
            KeyStore::init_with_key_file(dir, &src)?,
            format!("key file {} (copied from {})", dir.join("root.key").display(), src.display()),
        ),
        (None, Some(p)) => (
            KeyStore::init(dir, InitRoot::Passphrase(p))?,
            "passphrase (Argon2id)".to_string(),
        ),
        (None, None) => (
            KeyStore::init(dir, InitRoot::GenerateKeyFile)?,
            format!("key file {}", dir.join("root.key").display()),
        ),
    };
    if json_out {
        return print_json(&json!({
            "store_id": ks.store_id(),
            "data_dir": dir,
            "root": root_desc,
        }));
    }
    println!(
        "created key store {} in {}\nroot of trust: {root_desc}\n\
         back it up: without it nothing this store wraps can ever be decrypted.\n\
         next: cryptnbd kms create-key --alias NAME",
        ks.store_id(),
        dir.display()
    );
    Ok(())
}
