//! `cryptnbd serve`: turns arguments into a [`ServerConfig`], listeners and a data-directory
//! export provider, sets up the embedded default (key store, `alias/default`, 1 GiB `disk0`) on a
//! fresh data directory, prints how to attach, and runs the server until SIGINT/SIGTERM (a second
//! signal exits at once).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tracing::{info, warn};

use cryptnbd::config::ServerConfig;
use cryptnbd::datadir::{CreateOptions, DataDir};
use cryptnbd::kms::{InitRoot, KeyStore};
use cryptnbd::server::volumes::{DataDirProvider, ExportSelection};
use cryptnbd::server::{serve, Listener};

use super::Global;

/// The IANA port for NBD.
const DEFAULT_PORT: u16 = 10809;
const DEFAULT_VOLUME: &str = "disk0";
const DEFAULT_KEY: &str = "alias/default";
const DEFAULT_SIZE: u64 = 1 << 30;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Listen on this TCP address (repeatable). Default: 127.0.0.1:10809 plus a Unix socket
    /// `nbd.sock` in the data directory; once any --listen or --socket is given, only those.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,

    /// Listen on this Unix socket path (repeatable).
    #[arg(long, value_name = "PATH")]
    socket: Vec<PathBuf>,

    /// Export only this volume (repeatable; the first is the default export). Default: every
    /// volume in the data directory, including volumes created while the server runs.
    #[arg(long, value_name = "NAME")]
    export: Vec<String>,

    /// Export this volume read-only (repeatable; implies --export NAME).
    #[arg(long = "read-only", value_name = "NAME")]
    read_only: Vec<String>,

    /// Export the --read-only RBD volumes without taking their exclusive lock, so several
    /// gateways can export one image read-only at once. Without it a gateway holds the lock of
    /// every RBD volume it exports and other gateways are refused (a dead holder's lock is broken
    /// and the holder blocklisted).
    #[arg(long)]
    rbd_shared_read_only: bool,

    /// Connections served at once; more are closed immediately.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_connections: usize,

    /// Worker threads per connection (each reads, runs and answers one request at a time, so
    /// this is also how many requests of one connection are in flight at once). Default: 2, or
    /// 16 when the data directory has RBD volumes (each request waits for the cluster's round
    /// trip, and overlapping them is what makes RBD fast).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Time a client has to finish the handshake (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    handshake_timeout: Duration,

    /// At shutdown, how long clients get to finish requests in flight before being cut.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    shutdown_grace: Duration,
}

/// The commands a user runs to attach `name` through each listener.
pub fn attach_commands(name: &str, tcp: &[SocketAddr], unix: &[PathBuf]) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str("  ");
        s.push_str(&l);
        s.push('\n');
    };
    for p in unix {
        let p = p.display();
        let uri = format!("nbd+unix:///{name}?socket={p}");
        line(format!("nbd-client -N {name} -b 4096 -unix {p} /dev/nbd0"));
        line(format!(
            "qemu-system-x86_64 ... -drive file={uri},format=raw,if=virtio,cache=none"
        ));
        line(format!(
            "qemu-system-x86_64 ... -blockdev driver=nbd,node-name={name},export={name},server.type=unix,server.path={p}"
        ));
        line(format!(
            "fio --name=test --ioengine=nbd --uri='{uri}' --rw=randrw --bs=4k --size=1G"
        ));
        line(format!("nbdinfo '{uri}'"));
    }
    for a in tcp {
        let (host, port) = (a.ip(), a.port());
        let uri = format!("nbd://{host}:{port}/{name}");
        line(format!(
            "nbd-client -N {name} -b 4096 {host} {port} /dev/nbd0"
        ));
        line(format!(
            "qemu-system-x86_64 ... -drive file={uri},format=raw,if=virtio,cache=none"
        ));
        line(format!(
            "qemu-system-x86_64 ... -blockdev driver=nbd,node-name={name},export={name},server.type=inet,server.host={host},server.port={port}"
        ));
        line(format!(
            "fio --name=test --ioengine=nbd --uri='{uri}' --rw=randrw --bs=4k --size=1G"
        ));
        line(format!("nbdinfo '{uri}'"));
    }
    s
}

/// On a data directory without a key store: a key store with a generated root key, the CMK
/// `alias/default` and a 1 GiB volume `disk0`.
fn setup_default(dir: &Path) -> anyhow::Result<KeyStore> {
    // The directory holds the root key and the key store: owner only.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let ks = KeyStore::init(dir, InitRoot::GenerateKeyFile)
        .with_context(|| format!("creating a key store in {}", dir.display()))?;
    ks.create_key(DEFAULT_KEY, "default CMK created by `cryptnbd serve`")
        .context("creating the CMK alias/default")?;
    DataDir::new(dir)
        .create_volume(
            &ks,
            DEFAULT_VOLUME,
            DEFAULT_SIZE,
            DEFAULT_KEY,
            CreateOptions::default(),
        )
        .context("creating the default volume disk0")?;
    Ok(ks)
}

/// Default workers per connection for file volumes (the page cache answers quickly).
const DEFAULT_WORKERS: usize = 2;
/// Default workers per connection when RBD volumes are served: requests wait for the network.
const DEFAULT_WORKERS_RBD: usize = 16;

/// Whether any volume of the data directory lives on RBD.
fn has_rbd_volumes(dir: &std::path::Path) -> bool {
    let dd = DataDir::new(dir);
    dd.list_volumes()
        .map(|names| {
            names
                .iter()
                .any(|n| matches!(dd.rbd_location(n), Ok(Some(_))))
        })
        .unwrap_or(false)
}

pub fn run(global: &Global, args: ServeArgs) -> anyhow::Result<()> {
    let workers = args.workers.unwrap_or_else(|| {
        if has_rbd_volumes(&global.data_dir) {
            DEFAULT_WORKERS_RBD
        } else {
            DEFAULT_WORKERS
        }
    });
    let config = ServerConfig {
        max_connections: args.max_connections,
        workers_per_connection: workers,
        handshake_timeout: args.handshake_timeout,
        shutdown_grace: args.shutdown_grace,
        ..ServerConfig::default()
    };
    config.validate()?;
    let dir = &global.data_dir;
    let fresh = !KeyStore::exists(dir);
    let keystore = if fresh {
        if global.passphrase_file.is_some()
            || std::env::var_os(super::kms::PASSPHRASE_ENV).is_some()
        {
            // The embedded default uses a generated key file; silently ignoring a passphrase
            // the user meant to protect the store with would be worse than stopping.
            anyhow::bail!(
                "no key store in {}: create it with `cryptnbd kms init --passphrase-file FILE` \
                 first, or drop --passphrase-file/${} to let `serve` create one with a \
                 generated root key",
                dir.display(),
                super::kms::PASSPHRASE_ENV
            );
        }
        let ks = setup_default(dir)?;
        println!(
            "Set up {}: a key store (root key in root.key), the CMK {DEFAULT_KEY} and a 1 GiB encrypted volume {DEFAULT_VOLUME}.",
            dir.display()
        );
        ks
    } else {
        super::kms::open_keystore(global)?
    };

    let (tcp, unix) = if args.listen.is_empty() && args.socket.is_empty() {
        (
            vec![SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))],
            vec![dir.join("nbd.sock")],
        )
    } else {
        (args.listen.clone(), args.socket.clone())
    };
    let mut listeners = Vec::new();
    let mut tcp_bound = Vec::new();
    for a in &tcp {
        let l = Listener::bind_tcp(*a)?;
        tcp_bound.push(l.tcp_addr().unwrap_or(*a));
        listeners.push(l);
    }
    for p in &unix {
        listeners.push(Listener::bind_unix(p)?);
    }

    let mut only: Vec<String> = args.export.clone();
    for n in &args.read_only {
        if !only.contains(n) {
            only.push(n.clone());
        }
    }
    let selection = ExportSelection {
        only: (!only.is_empty()).then_some(only),
        read_only: args.read_only.iter().cloned().collect::<HashSet<_>>(),
    };
    let provider = Arc::new(DataDirProvider::new(
        DataDir::new(dir).with_rbd_shared_read_only(args.rbd_shared_read_only),
        keystore,
        selection,
    ));
    let attached = provider.attach_all();
    let names = provider.names();
    if names.is_empty() {
        warn!("no volumes to export yet: create one with `cryptnbd volume create NAME --size 10G`");
    }
    println!("Serving {} export(s): {}", names.len(), names.join(", "));
    if let Some(first) = attached.first().or(names.first()) {
        println!(
            "Attach {first} with:\n{}",
            attach_commands(first, &tcp_bound, &unix)
        );
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("cryptnbd-accept")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        // Both streams exist before the first signal, so a quick second one is never missed.
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            info!("signal received: shutting down (send it again to exit at once)");
            tokio::spawn(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("second signal: exiting now without waiting for clients");
                std::process::exit(130);
            });
        };
        serve(config, listeners, provider, shutdown)
            .await
            .map_err(anyhow::Error::from)
    })?;
    Ok(())
}
