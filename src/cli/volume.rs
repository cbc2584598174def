//! `cryptnbd volume …`: create, list, inspect, resize, rekey, delete, import and export encrypted
//! volumes in the data directory. Only argument parsing, confirmation, progress bars and output
//! live here; the work is in `cryptnbd::datadir`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use cryptnbd::datadir::{CreateOptions, DataDir, VolumeInfo};
use cryptnbd::kms::clock;
use cryptnbd::volume::VolumeHeader;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::rbd::{BackendArgs, RBD_SUPPORT};
use super::{print_fields, print_json, Global};

const VOLUME_AFTER_HELP: &str = "\
Volumes live in DATA_DIR/volumes/NAME.vol (sparse, mode 0600), or on Ceph RBD images
(`--backend rbd:POOL[/IMAGE]`, referenced by DATA_DIR/volumes/NAME.rbd). Each has its own data key
(DEK), wrapped by the key store's KEY (a key id or alias) and stored in the volume header.

Examples:
  cryptnbd volume create disk0 --size 10G --key alias/volumes
  cryptnbd volume create vm1 --size 20G --key alias/vols --grant-to storage-1   # gateway's grant
  cryptnbd volume info disk0 --json
  cryptnbd volume rekey disk0                   # re-wrap under the key's newest version
  cryptnbd volume import vm1 --from vm1.raw --key alias/volumes
  cryptnbd volume export vm1 --to backup.raw
  cryptnbd volume create vm2 --size 20G --key alias/volumes --backend rbd:rbd --ceph-id gw";

#[derive(Args, Debug)]
#[command(after_help = format!("{VOLUME_AFTER_HELP}\n\n{RBD_SUPPORT}"))]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
    #[command(flatten)]
    remote: super::remote::RemoteKmsArgs,
}

#[derive(Args, Debug)]
struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct FormatArgs {
    /// Encryption sector size in bytes (4096 is faster; 512 for clients that need it).
    #[arg(long, default_value_t = 4096, value_parser = parse_sector_size)]
    sector_size: u32,
    /// Never punch holes on trim/write-zeroes (hides which sectors are in use; costs space).
    #[arg(long)]
    no_discard: bool,
}

impl FormatArgs {
    fn options(&self) -> CreateOptions {
        CreateOptions {
            sector_size: self.sector_size,
            discard: !self.no_discard,
        }
    }
}

fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4k" | "4K" => Ok(4096),
        _ => Err(format!("{s:?}: the sector size is 512 or 4096")),
    }
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create an empty (sparse) volume with a fresh data key wrapped by KEY.
    Create {
        name: String,
        /// Virtual size, e.g. 10G, 512M (a multiple of the sector size).
        #[arg(long, value_parser = super::parse_size)]
        size: u64,
        /// The key store key (id or alias) that wraps the volume's data key.
        #[arg(long)]
        key: String,
        /// Grant this credential (a name in the local key store, or a user id; a user id with
        /// --kms-url) create-datakey and decrypt-datakey on KEY for this volume's volume_id only:
        /// the storage gateway that serves it then needs no other right.
        #[arg(long, value_name = "CREDENTIAL")]
        grant_to: Option<String>,
        #[command(flatten)]
        format: FormatArgs,
        #[command(flatten)]
        storage: BackendArgs,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// List the volumes.
    List {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Show a volume's header: size, allocation, key id/version, the wrapped DEK (cipher_text)
    /// and its encryption context (enough to unwrap it by hand with `kms decrypt-datakey`).
    Info {
        name: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Grow a volume (shrinking is refused). Not while it is attached.
    Resize {
        name: String,
        /// New virtual size, e.g. 20G.
        #[arg(long, value_parser = super::parse_size)]
        size: u64,
    },
    /// Re-wrap the volume's data key under the newest version of its key, or under --key.
    /// Only the header changes (crash-safe); the data is not re-encrypted.
    Rekey {
        name: String,
        /// Another key to wrap the data key under.
        #[arg(long)]
        key: Option<String>,
    },
    /// Delete a volume file. Its data key dies with it.
    Delete {
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Encrypt a raw image into a new volume of the image's size (rounded up to the sector size).
    Import {
        name: String,
        /// The raw image to read.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The key store key that wraps the new volume's data key.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        format: FormatArgs,
        #[command(flatten)]
        storage: BackendArgs,
    },
    /// Take a snapshot NAME@SNAP (no data copied; NAME must not be attached), or list/delete
    /// snapshots. Serve one read-only as export NAME@SNAP, export or clone it.
    Snapshot(super::volume_snap::SnapshotArgs),
    /// Create a writable volume NEW from snapshot NAME@SNAP, sharing its data until written.
    Clone(super::volume_snap::CloneArgs),
    /// Copy the data a clone still shares into it, ending its dependency on the snapshot.
    Flatten { name: String },
    /// Copy a volume or snapshot into a new volume, re-encrypted under a new data key.
    Copy(super::volume_snap::CopyArgs),
    /// Decrypt a volume (or snapshot NAME@SNAP) into a new raw image file (holes stay holes:
    /// the image is sparse).
    Export {
        name: String,
        /// The raw image to create (must not exist).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

pub(super) fn human(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

fn header_json(name: &str, h: &VolumeHeader) -> Value {
    json!({
        "name": name,
        "volume_id": h.volume_id,
        "size": h.size,
        "sector_size": h.sector_size,
        "discard": h.discard,
        "cipher": h.cipher,
        "tweak": h.tweak,
        "key_id": h.key_id,
        "key_version": h.key_version,
        "cipher_text": hex::encode(&h.wrapped_dek),
        "encryption_context": h.encryption_context,
        "created": clock::rfc3339(h.created),
        "header_generation": h.generation,
    })
}

fn info_json(i: &VolumeInfo) -> Value {
    let mut v = header_json(&i.name, &i.header);
    v["allocated_bytes"] = json!(i.allocated_bytes);
    v["path"] = json!(i.path);
    v["backend"] = json!(i.backend);
    v
}

fn print_info(i: &VolumeInfo) {
    let h = &i.header;
    let ctx = serde_json::to_string(&h.encryption_context).unwrap_or_default();
    print_fields(&[
        ("name", i.name.clone()),
        ("path", i.path.display().to_string()),
        ("backend", i.backend.clone()),
        ("volume_id", h.volume_id.to_string()),
        ("size", format!("{} ({})", h.size, human(h.size))),
        (
            "allocated_bytes",
            format!("{} ({})", i.allocated_bytes, human(i.allocated_bytes)),
        ),
        ("sector_size", h.sector_size.to_string()),
        ("discard", h.discard.to_string()),
        ("cipher", format!("{} ({})", h.cipher, h.tweak)),
        ("key_id", h.key_id.to_string()),
        ("key_version", h.key_version.to_string()),
        ("cipher_text", hex::encode(&h.wrapped_dek)),
        ("encryption_context", ctx),
        ("created", clock::rfc3339(h.created)),
    ]);
}

pub(super) fn progress_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

fn confirm_delete(name: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to delete volume {name:?} without confirmation: pass --yes");
    }
    eprint!("Delete volume {name:?} and all its data? Type the volume name to confirm: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if line.trim() != name {
        bail!("not confirmed: volume {name:?} was not deleted");
    }
    Ok(())
}

pub fn run(global: &Global, args: VolumeArgs) -> anyhow::Result<()> {
    use VolumeCommand as C;
    let dd = DataDir::new(&global.data_dir);
    match args.command {
        C::Create {
            name,
            size,
            key,
            grant_to,
            format,
            storage,
            out,
        } => {
            let loc = storage.location(&name)?;
            let ks = super::remote::key_provider(global, &args.remote)?;
            let ks = ks.as_ref();
            let h = match &loc {
                None => dd.create_volume(ks, &name, size, &key, format.options())?,
                Some(loc) => dd.create_rbd_volume(ks, &name, size, &key, format.options(), loc)?,
            };
            if let Some(who) = grant_to {
                let g = super::kms_access::grant_volume(global, &args.remote, &who, &h)
                    .with_context(|| {
                        format!("volume {name} was created, but granting {who} failed")
                    })?;
                eprintln!("granted {who} create-datakey,decrypt-datakey on key {} for volume_id {} (grant {g})", h.key_id, h.volume_id);
            }
            if out.json {
                return print_json(&header_json(&name, &h));
            }
            println!(
                "created volume {name} ({}, {}-byte sectors) with data key wrapped by key {} version {}\n\
                 attach it with: cryptnbd serve, then nbd+unix:///{name}?socket=…",
                human(h.size),
                h.sector_size,
                h.key_id,
                h.key_version
            );
            Ok(())
        }
        C::List { out } => {
            let names = dd.list_volumes()?;
            let mut rows = Vec::with_capacity(names.len());
            for n in &names {
                rows.push((n, dd.info(n)));
            }
            if out.json {
                let v: Vec<Value> = rows
                    .iter()
                    .map(|(n, r)| match r {
                        Ok(i) => info_json(i),
                        Err(e) => json!({ "name": n, "error": e.to_string() }),
                    })
                    .collect();
                return print_json(&Value::Array(v));
            }
            if rows.is_empty() {
                println!("no volumes in {}", dd.volumes_dir().display());
                return Ok(());
            }
            println!(
                "{:<20} {:>12} {:>12} {:>6}  {:<36} {:>3}",
                "NAME", "SIZE", "ALLOCATED", "SECTOR", "KEY_ID", "VER"
            );
            for (n, r) in rows {
                match r {
                    Ok(i) => println!(
                        "{:<20} {:>12} {:>12} {:>6}  {:<36} {:>3}",
                        n,
                        human(i.header.size),
                        human(i.allocated_bytes),
                        i.header.sector_size,
                        i.header.key_id,
                        i.header.key_version
                    ),
                    Err(e) => println!("{n:<20} error: {:#}", anyhow::Error::new(e)),
                }
            }
            Ok(())
        }
        C::Info { name, out } => {
            let i = dd.info(&name)?;
            let parent = super::volume_snap::parent_fields(&dd, &i.header);
            if out.json {
                let mut v = info_json(&i);
                v["parent"] = json!(parent.as_ref().map(|p| &p.0));
                v["parent_key_id"] = json!(parent.as_ref().map(|p| &p.1));
                return print_json(&v);
            }
            print_info(&i);
            if let Some((p, key)) = parent {
                print_fields(&[
                    ("parent", p),
                    ("parent_key_id", format!("{key} (unwritten data is read from the parent, which needs this key too, until `volume flatten`)")),
                ]);
            }
            Ok(())
        }
        C::Snapshot(a) => super::volume_snap::snapshot(global, &dd, a),
        C::Clone(a) => super::volume_snap::clone(global, &args.remote, &dd, a),
        C::Flatten { name } => super::volume_snap::flatten(global, &args.remote, &dd, name),
        C::Copy(a) => super::volume_snap::copy(global, &args.remote, &dd, a),
        C::Resize { name, size } => {
            let h = dd
                .resize(&name, size)
                .map_err(|e| super::ctl::explain_in_use(global, &name, e))?;
            println!("volume {name} is now {} ({} bytes)", human(h.size), h.size);
            Ok(())
        }
        C::Rekey { name, key } => {
            let ks = super::remote::key_provider(global, &args.remote)?;
            let h = dd
                .rekey(ks.as_ref(), &name, key.as_deref())
                .map_err(|e| super::ctl::explain_in_use(global, &name, e))?;
            println!(
                "volume {name}: data key now wrapped by key {} version {} (data unchanged)",
                h.key_id, h.key_version
            );
            Ok(())
        }
        C::Delete { name, yes } => {
            // Check it exists before asking. An RBD reference whose image is unreadable or gone
            // (e.g. a delete interrupted half-way) can still be deleted.
            if let Err(e) = dd.info(&name) {
                if dd.rbd_location(&name)?.is_none() {
                    return Err(e.into());
                }
                eprintln!("warning: {e:#}");
            }
            if !yes {
                confirm_delete(&name)?;
            }
            dd.delete(&name)
                .map_err(|e| super::ctl::explain_in_use(global, &name, e))?;
            println!("deleted volume {name}");
            Ok(())
        }
        C::Import {
            name,
            from,
            key,
            format,
            storage,
        } => {
            let loc = storage.location(&name)?;
            let ks = super::remote::key_provider(global, &args.remote)?;
            let ks = ks.as_ref();
            let bar = progress_bar(&format!("importing {name}"));
            let progress = |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            };
            let opts = format.options();
            let h = match &loc {
                None => dd.import(ks, &name, &from, &key, opts, progress),
                Some(loc) => dd.import_rbd(ks, &name, &from, &key, opts, loc, progress),
            }
            .with_context(|| format!("importing {} into volume {name}", from.display()))?;
            bar.finish_and_clear();
            println!(
                "imported {} into volume {name} ({})",
                from.display(),
                human(h.size)
            );
            Ok(())
        }
        C::Export { name, to } => {
            let ks = super::remote::key_provider(global, &args.remote)?;
            let bar = progress_bar(&format!("exporting {name}"));
            let size = dd
                .export(ks.as_ref(), &name, &to, |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })
                .with_context(|| format!("exporting volume {name} to {}", to.display()))?;
            bar.finish_and_clear();
            println!(
                "exported volume {name} to {} ({})",
                to.display(),
                human(size)
            );
            Ok(())
        }
    }
}
