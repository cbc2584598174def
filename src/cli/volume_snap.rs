//! `cryptnbd volume snapshot|clone|flatten|copy`: snapshots, volumes made from them, and copies
//! under another key. Argument parsing, progress bars and output only; the work is in
//! `cryptnbd::datadir` (snapshot and layers modules).

use std::time::{Duration, UNIX_EPOCH};

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
    /// The snapshot to take: NAME@SNAP. A file volume a server has attached is snapshotted
    /// online by that server, through the control socket in the data directory; an RBD volume
    /// may be served meanwhile (RBD's own snapshot).
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

/// When snapshot `name` was taken, in Unix seconds: the status-change time of its file, set by
/// the link that took it (the format records no time of its own; deleting an older snapshot,
/// which merges into this one, moves it to that time).
fn taken(dd: &DataDir, name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dd.layer_path(name).ok()?).ok()?;
    u64::try_from(m.ctime()).ok()
}

pub fn snapshot(global: &Global, dd: &DataDir, args: SnapshotArgs) -> anyhow::Result<()> {
    match (args.command, args.target) {
        (Some(SnapshotCommand::List { name, json }), _) => {
            let snaps = dd.snapshots(&name)?;
            if json {
                let v: Vec<Value> = snaps
                    .iter()
                    .map(|s| {
                        json!({
                            "name": s.name,
                            "taken": taken(dd, &s.name),
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
                "{:<32} {:<20} {:>12} {:>12}  CLONES",
                "SNAPSHOT", "TAKEN (UTC)", "SIZE", "OWN DATA"
            );
            for s in snaps {
                let when = taken(dd, &s.name)
                    .and_then(|t| {
                        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t))
                            .to_string()
                            .get(..19)
                            .map(|x| x.replace('T', " "))
                    })
                    .unwrap_or_else(|| "?".into());
                println!(
                    "{:<32} {:<20} {:>12} {:>12}  {}",
                    s.name,
                    when,
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
            let h = match dd.snapshot(&target) {
                // Attached: the server holding it takes it online.
                Err(e @ cryptnbd::datadir::DataDirError::SnapshotAttached { .. }) => {
                    return super::ctl::snapshot_via_server(global, &target, e)
                }
                r => r?,
            };
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
