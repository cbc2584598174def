//! `cryptnbd kms export-store DIR` and `kms import-store DIR`: moving a key store between the
//! data directory's files and a RADOS pool (sealed material and metadata only — see
//! `cryptnbd::kms::transfer`). The root key never moves with them: the same root opens the copy.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use cryptnbd::kms::objects::{FileObjects, ObjectStore};
use cryptnbd::kms::{location, transfer, KeyStore};
use serde_json::json;

use super::kms_root::{open_keystore, StoreArgs};
use super::{print_json, Global};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The directory to write the store to, as a file store (keystore.json, grants.json,
    /// credentials.json; created mode 0700). No root key is written: copy root.key yourself.
    dir: PathBuf,
    /// Overwrite a store already in DIR.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A file store directory (e.g. an old data directory or an `export-store` copy).
    dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Overwrite the store already at the destination.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn report(what: &str, t: &transfer::Transferred, to: &str, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        return print_json(&json!({
            "store_id": t.store_id,
            "keys": t.keys,
            "objects": t.objects,
            "to": to,
        }));
    }
    println!(
        "{what} key store {} ({} keys; {}) to {to}",
        t.store_id,
        t.keys,
        t.objects.join(", ")
    );
    Ok(())
}

pub fn export(global: &Global, a: ExportArgs) -> anyhow::Result<()> {
    // Opening checks the root key: only the store's owner exports it.
    let ks = open_keystore(global)?;
    let t = transfer::export_to_dir(&**ks.objects(), &a.dir, a.force)?;
    report("exported", &t, &a.dir.display().to_string(), a.json)
}

/// Creates `dir` (mode 0700) if missing.
fn make_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

pub fn import(global: &Global, a: ImportArgs) -> anyhow::Result<()> {
    let dir = &global.data_dir;
    if !a.dir.join(cryptnbd::kms::store::STORE_FILE).is_file() {
        bail!(
            "{} holds no key store file ({})",
            a.dir.display(),
            cryptnbd::kms::store::STORE_FILE
        );
    }
    let rados = a.store.rados()?;
    make_dir(dir)?;
    let to: std::sync::Arc<dyn ObjectStore> = match &rados {
        Some(r) => location::connect(r)?,
        None => location::objects_for(dir)?,
    };
    if std::fs::canonicalize(&a.dir).ok() == std::fs::canonicalize(dir).ok() && rados.is_none() {
        bail!("the source is this data directory's own store");
    }
    let t = transfer::copy_store(&FileObjects::new(&a.dir), &*to, a.force)?;
    if let Some(r) = &rados {
        if KeyStore::exists(dir) {
            eprintln!(
                "note: {} already has a key store, so it was left as it is; use \
                 `cryptnbd kms init --store {r} --join` in a fresh data directory to serve the \
                 imported store",
                dir.display()
            );
        } else {
            location::write_marker(dir, r)?;
        }
    }
    // The same root opens the copy: bring the key file along when the destination has none.
    let (src_key, key) = (a.dir.join("root.key"), dir.join("root.key"));
    if src_key.is_file() && !key.exists() {
        let k = cryptnbd::kms::root::read_key_file(&src_key)?;
        cryptnbd::kms::root::write_key_file(&key, &k)?;
    }
    report("imported", &t, &to.location(), a.json)?;
    if let Err(e) = open_keystore(global) {
        eprintln!(
            "warning: the imported store does not open from {} yet: {e:#}",
            dir.display()
        );
    }
    Ok(())
}
