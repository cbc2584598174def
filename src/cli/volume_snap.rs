//! `cryptnbd volume snapshot|clone|flatten|copy`: snapshots, volumes made from them, and copies
//! under another key. Argument parsing, progress bars and output only; the work is in
//! `cryptnbd::datadir` (snapshot and layers modules).

use anyhow::Context as _;
use clap::{Args, Subcommand};
use cryptnbd::datadir::DataDir;
use serde_json::{json, Value};

use super::rbd::BackendArgs;
use super::remote::RemoteKmsArgs;
use super::volume::{human, progress_bar};
use super::{print_json, Global};

/// `volume snapshot NAME@SNAP`, or `volume snapshot list NAME` / `delete NAME@SNAP`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: Option<SnapshotCommand>,
    /// The snapshot to take: NAME@SNAP (offline: NAME must not be attached; an RBD volume may
    /// also be served meanwhile).
    #[arg(required = true, value_name = "NAME@SNAP")]
    target: Option<String>,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// List the snapshots of a volume, with the clones made from each.
    List {
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot: its data is merged into the next layer of the volume (refused while
    /// clones depend on it: flatten them first).
    Delete {
        #[arg(value_name = "NAME@SNAP")]
        target: String,
    },
}

/// `volume clone NAME@SNAP NEW [--key CMK]`.
#[derive(Args, Debug)]
pub struct CloneArgs {
    #[arg(value_name = "NAME@SNAP")]
    source: String,
    new: String,
    /// The key store key for the clone's own data key (default: the snapshot's key). Reading
    /// the data it shares with the snapshot still needs the snapshot's key until it is flattened.
    #[arg(long)]
    key: Option<String>,
    /// For a snapshot of an RBD volume: where the clone goes (`rbd:POOL[/IMAGE]`, default the
    /// snapshot's pool and the name NEW). Without --key it is an RBD clone (same data key);
    /// with --key a new image that cryptnbd layers over the snapshot.
    #[command(flatten)]
    storage: BackendArgs,
}

/// `volume copy SRC[@SNAP] DST --key CMK [--backend …]`.
#[derive(Args, Debug)]
pub struct CopyArgs {
    #[arg(value_name = "SRC[@SNAP]")]
    source: String,
    dest: String,
    /// The key store key that wraps the copy's new data key.
    #[arg(long)]
    key: String,
    #[command(flatten)]
    storage: BackendArgs,
}

/// `(NAME@SNAP, its key id)` of a layered volume's parent, for `volume info`.
pub fn parent_fields(dd: &DataDir, h: &cryptnbd::volume::VolumeHeader) -> Option<(String, String)> {
    let p = h.parent.as_ref()?;
    let key = match dd.info(&p.name) {
        Ok(i) => i.header.key_id.to_string(),
        Err(e) => format!("unreadable: {e}"),
    };
    Some((p.name.clone(), key))
}

fn bar_progress(bar: &indicatif::ProgressBar) -> impl FnMut(u64, u64) + '_ {
    |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }
}

pub fn snapshot(dd: &DataDir, args: SnapshotArgs) -> anyhow::Result<()> {
    match (args.command, args.target) {
        (Some(SnapshotCommand::List { name, json }), _) => {
            let snaps = dd.snapshots(&name)?;
            if json {
                let v: Vec<Value> = snaps
                    .iter()
                    .map(|s| {
                        json!({
                            "name": s.name,
                            "layer_id": s.header.layer_id,
                            "size": s.header.size,
                            "allocated_bytes": s.allocated_bytes,
                            "parent": s.header.parent.as_ref().map(|p| &p.name),
                            "clones": s.clones,
                        })
                    })
                    .collect();
                return print_json(&Value::Array(v));
            }
            if snaps.is_empty() {
                println!("volume {name} has no snapshots");
                return Ok(());
            }
            println!(
                "{:<32} {:>12} {:>12}  CLONES",
                "SNAPSHOT", "SIZE", "OWN DATA"
            );
            for s in snaps {
                println!(
                    "{:<32} {:>12} {:>12}  {}",
                    s.name,
                    human(s.header.size),
                    human(s.allocated_bytes),
                    s.clones.join(",")
                );
            }
            Ok(())
        }
        (Some(SnapshotCommand::Delete { target }), _) => {
            let bar = progress_bar(&format!("merging {target}"));
            dd.delete_snapshot(&target, bar_progress(&bar))?;
            bar.finish_and_clear();
            println!("deleted snapshot {target}");
            Ok(())
        }
        (None, Some(target)) => {
            let h = dd.snapshot(&target)?;
            println!(
                "took snapshot {target} ({}); serve it read-only as export {target}, or clone it with `cryptnbd volume clone {target} NEW`",
                human(h.size)
            );
            Ok(())
        }
        (None, None) => anyhow::bail!("name the snapshot: volume snapshot NAME@SNAP"),
    }
}

pub fn clone(
    global: &Global,
    remote: &RemoteKmsArgs,
    dd: &DataDir,
    a: CloneArgs,
) -> anyhow::Result<()> {
    let ks = super::remote::key_provider(global, remote)?;
    let h = match a.storage.location(&a.new)? {
        Some(loc) => dd.clone_rbd(ks.as_ref(), &a.source, &a.new, a.key.as_deref(), Some(&loc))?,
        None => dd.clone_volume(ks.as_ref(), &a.source, &a.new, a.key.as_deref())?,
    };
    if a.key.is_none() && dd.rbd_location(&a.new)?.is_some() {
        println!(
            "created volume {} as an RBD clone of snapshot {} ({}); it uses the snapshot's data key, \
             wrapped for it by key {}; `cryptnbd volume flatten {}` ends its dependency on the snapshot",
            a.new,
            a.source,
            human(h.size),
            h.key_id,
            a.new
        );
        return Ok(());
    }
    println!(
        "created volume {} from snapshot {} ({}); its own writes use a new data key wrapped by key {}; \
         the data it shares is read with the snapshot's key until `cryptnbd volume flatten {}`",
        a.new,
        a.source,
        human(h.size),
        h.key_id,
        a.new
    );
    Ok(())
}

pub fn flatten(
    global: &Global,
    remote: &RemoteKmsArgs,
    dd: &DataDir,
    name: String,
) -> anyhow::Result<()> {
    let ks = super::remote::key_provider(global, remote)?;
    let bar = progress_bar(&format!("flattening {name}"));
    let copied = dd
        .flatten(ks.as_ref(), &name, bar_progress(&bar))
        .with_context(|| format!("flattening volume {name}"))?;
    bar.finish_and_clear();
    println!(
        "volume {name} no longer depends on a snapshot ({} copied in)",
        human(copied)
    );
    Ok(())
}

pub fn copy(
    global: &Global,
    remote: &RemoteKmsArgs,
    dd: &DataDir,
    a: CopyArgs,
) -> anyhow::Result<()> {
    let loc = a.storage.location(&a.dest)?;
    let ks = super::remote::key_provider(global, remote)?;
    let bar = progress_bar(&format!("copying {} to {}", a.source, a.dest));
    let h = dd
        .copy_volume(
            ks.as_ref(),
            &a.source,
            &a.dest,
            &a.key,
            loc.as_ref(),
            bar_progress(&bar),
        )
        .with_context(|| format!("copying {} to volume {}", a.source, a.dest))?;
    bar.finish_and_clear();
    println!(
        "copied {} to volume {} ({}), re-encrypted under a new data key wrapped by key {} version {}",
        a.source,
        a.dest,
        human(h.size),
        h.key_id,
        h.key_version
    );
    Ok(())
}
