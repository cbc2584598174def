//! `cryptnbd serve`: turns arguments into a [`ServerConfig`], listeners (with their TLS and
//! peer-credential settings) and a data-directory export provider, sets up the embedded default
//! (key store, `alias/default`, 1 GiB `disk0`) on a fresh data directory, prints how to attach, and runs the server until SIGINT/SIGTERM (a second
//! signal exits at once). SIGHUP reloads the TLS certificate, key and client CA.
//!
//! Safe defaults: without listener options only the Unix socket in the 0700 data directory is
//! opened; a TCP listener requires TLS (`--tls-cert`/`--tls-key`) unless `--insecure-no-tls` says
//! otherwise, because plain NBD lets whoever can connect read the decrypted disks.

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
use cryptnbd::exports::{DataDirProvider, ExportSelection};
use cryptnbd::kms::{InitRoot, KeyProvider, KeyStore};
use cryptnbd::server::peer::{resolve_group, set_socket_permissions};
use cryptnbd::server::{
    serve_with, AllowEntry, AllowList, Listener, Policy, Rules, TlsConfig, TlsFiles, TlsMode,
    UnixPeerPolicy,
};

use super::serve_attach::attach_commands;
use super::Global;

const DEFAULT_VOLUME: &str = "disk0";
const DEFAULT_KEY: &str = "alias/default";
const DEFAULT_SIZE: u64 = 1 << 30;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Read settings from this TOML file: its keys are the long names of these options
    /// (`allow = ["cn:host-a=disk0"]`, `tls-cert = "/etc/cryptnbd/server.pem"`,
    /// `tls-no-client-auth = true`). An option given on the command line wins over the file
    /// (a list given there replaces the file's list). SIGHUP reads the file again: TLS files,
    /// CRLs and --allow rules take effect together; the rest is read at start only.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Listen on this TCP address (repeatable). Requires TLS (--tls-cert, --tls-key) unless
    /// --insecure-no-tls. Default: no TCP, only the Unix socket `nbd.sock` in the data directory;
    /// once any --listen or --socket is given, only those.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,

    /// Listen on this Unix socket path (repeatable).
    #[arg(long, value_name = "PATH")]
    socket: Vec<PathBuf>,

    /// Serve TCP listeners without TLS: anyone who reaches the port reads and writes the
    /// decrypted disks. Only for trusted networks and benchmarks.
    #[arg(long)]
    insecure_no_tls: bool,

    /// Server certificate chain (PEM) for NBD over TLS (STARTTLS). With it, TCP listeners
    /// require TLS and Unix sockets offer it.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM): clients must present a certificate signed by one (mutual TLS).
    /// Required with --listen and TLS unless --tls-no-client-auth.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Certificate revocation list (PEM) of the client CA: listed client certificates are
    /// refused, and on reload their connections closed. Repeatable; needs --tls-client-ca.
    #[arg(long, value_name = "FILE", requires = "tls_client_ca")]
    tls_crl: Vec<PathBuf>,

    /// TLS on TCP without client certificates: every host that completes STARTTLS reads and
    /// writes the exports (encrypted but not authenticated). Only with --allow rules or on
    /// trusted networks.
    #[arg(long, requires = "tls_cert", conflicts_with = "tls_client_ca")]
    tls_no_client_auth: bool,

    /// CLIENT=EXPORT[,EXPORT]: the client proving CLIENT may list and open only these exports
    /// (`*` = all). CLIENT is `cn:NAME`, `dns:NAME`, `ip:ADDR`, `uri:URI` (SPIFFE IDs),
    /// `email:ADDR` (certificate names; need --tls-client-ca), `uid:USER` or `gid:GROUP` (Unix
    /// peers, name or number), or an untyped NAME (any certificate CN or SAN). Repeatable; once
    /// TLS or any rule is configured, a peer gets only what it is given.
    #[arg(long, value_name = "CLIENT=EXPORTS")]
    pub(crate) allow: Vec<String>,

    /// Unix sockets: let only this uid connect (repeatable; the server's own uid always may).
    #[arg(long, value_name = "UID")]
    allow_uid: Vec<u32>,

    /// Unix sockets: let only peers in this group connect, as their primary or a supplementary
    /// group when they connected (name or number; repeatable).
    #[arg(long, value_name = "GROUP")]
    allow_gid: Vec<String>,

    /// Permissions of the Unix socket files given with --socket, in octal (e.g. 660). Clients
    /// need write permission to connect.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    socket_mode: Option<u32>,

    /// Group of the Unix socket files given with --socket (name or number).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,

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
    pub(crate) max_connections: usize,

    /// Connections one source (TCP address, Unix uid) may have in the handshake at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_handshakes_per_source: usize,

    /// Serving connections one client (certificate, Unix uid, else TCP address) may hold; the
    /// server's own user is exempt.
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_connections_per_client: usize,

    /// Worker threads per connection (each reads, runs and answers one request at a time, so
    /// this is also how many requests of one connection are in flight at once). Default: 2, or
    /// 16 when the data directory has RBD volumes (each request waits for the cluster's round
    /// trip, and overlapping them is what makes RBD fast).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Request buffer memory (MiB) shared by all connections beyond the first MiB per worker;
    /// large requests wait for it, so stalled clients cannot pin more.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    buffer_budget: usize,

    #[command(flatten)]
    pub(crate) remote: super::remote::RemoteKmsArgs,

    /// Time a client has to finish the whole handshake, STARTTLS included (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) handshake_timeout: Duration,

    /// PATH=EXPORT: also serve the volume EXPORT to one VM as a vhost-user-blk disk on the Unix
    /// socket PATH (repeatable; mode and group as --socket-mode/--socket-group). QEMU:
    /// `-chardev socket,id=vu,path=PATH,reconnect=1 -device vhost-user-blk-pci,chardev=vu` with
    /// the VM's RAM shared (`memory-backend-memfd,share=on`).
    #[arg(long = "vhost-user-blk", value_name = "PATH=EXPORT", value_parser = super::vhost::parse_spec)]
    vhost_user_blk: Vec<(PathBuf, String)>,

    /// At shutdown, how long clients get to finish requests in flight before being cut.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    shutdown_grace: Duration,

    #[command(flatten)]
    ops: super::serve_ops::OpsArgs,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode like 660"))
}

/// The access settings the arguments ask for: TLS files (read and checked now) and rules.
pub(super) fn access_rules(args: &ServeArgs) -> anyhow::Result<Rules> {
    let allow = args
        .allow
        .iter()
        .map(|a| a.parse::<AllowEntry>())
        .collect::<Result<Vec<_>, _>>()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
                crls: args.tls_crl.clone(),
            };
            Some(Arc::new(
                TlsConfig::load(files).context("loading the TLS files")?,
            ))
        }
        _ => None,
    };
    Ok(Rules::new(AllowList::new(allow), tls)?)
}

/// On a data directory without a key store: a key store with a generated root key, the CMK
/// `alias/default` and a 1 GiB volume `disk0`.
fn setup_default(dir: &Path) -> anyhow::Result<KeyStore> {
    // The directory holds the root key and the key store: owner only.
    let fresh = !dir.exists();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    if let Some(parent) = dir.parent().filter(|p| fresh && !p.as_os_str().is_empty()) {
        // Its entry survives a power loss only once the parent directory is synced.
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing the directory {}", parent.display()))?;
    }
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
/// Measured on the single-OSD dev cluster (`tools/bench-peers --backend rbd`, 3 rounds, against
/// this default side by side): 8 workers gave 0.98 / 0.96 / 0.84 / 0.84× (seq read, seq write,
/// random read, random write), 32 workers 0.95 / 1.21 / 1.09 / 1.06×, inside the run-to-run
/// spread of that machine; 16 keeps random I/O without spending threads for nothing.
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
    let args = match &args.config {
        Some(file) => super::serve_config::merged(file)?,
        None => args,
    };
    let workers = args.workers.unwrap_or_else(|| {
        if has_rbd_volumes(&global.data_dir) {
            DEFAULT_WORKERS_RBD
        } else {
            DEFAULT_WORKERS
        }
    });
    let config = ServerConfig {
        max_connections: args.max_connections,
        max_handshakes_per_source: args.max_handshakes_per_source,
        max_connections_per_client: args.max_connections_per_client,
        workers_per_connection: workers,
        handshake_timeout: args.handshake_timeout,
        shutdown_grace: args.shutdown_grace,
        buffer_budget: args.buffer_budget.saturating_mul(1 << 20),
        ..ServerConfig::default()
    };
    config.validate()?;
    let dir = &global.data_dir;
    let keys: Arc<dyn KeyProvider> = if args.remote.is_remote() {
        // A storage host: volumes and wrapped DEKs here, CMKs on the KMS host.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
        let p = super::remote::key_provider(global, &args.remote)?;
        super::say(&format!("Data keys come from the {}.", p.describe()));
        Arc::from(p)
    } else {
        Arc::new(local_keystore(global)?)
    };
    run_with(args, config, keys, dir)
}

/// The embedded key store, set up with defaults on a fresh data directory.
fn local_keystore(global: &Global) -> anyhow::Result<KeyStore> {
    let dir = &global.data_dir;
    let fresh = !KeyStore::exists(dir);
    Ok(if fresh {
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
        super::say(&format!(
            "Set up {}: a key store (root key in root.key), the CMK {DEFAULT_KEY} and a 1 GiB encrypted volume {DEFAULT_VOLUME}.",
            dir.display()
        ));
        ks
    } else {
        super::kms::open_keystore(global)?
    })
}

fn run_with(
    args: ServeArgs,
    config: ServerConfig,
    keys: Arc<dyn KeyProvider>,
    dir: &Path,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("cryptnbd-accept")
        .build()
        .context("starting the async runtime")?;
    // The handlers are in place before any socket exists: a signal sent as soon as the socket
    // appears (a script stopping the server it just started) is handled, not fatal. Every stream
    // exists before the first signal, so a quick second one is never missed.
    let (mut int, mut term, mut hup) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = rt.enter();
        (
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        )
    };
    let rules = access_rules(&args)?;
    let tls = rules.tls().is_some();
    if !args.listen.is_empty() && !tls && !args.insecure_no_tls {
        anyhow::bail!(
            "--listen serves disks over TCP, which needs TLS: give --tls-cert FILE --tls-key FILE \
             --tls-client-ca FILE, or --insecure-no-tls if every host that can reach the port may \
             read and write the decrypted disks"
        );
    }
    if !args.listen.is_empty() && tls && args.tls_client_ca.is_none() && !args.tls_no_client_auth {
        anyhow::bail!(
            "--listen with TLS needs client certificates: give --tls-client-ca FILE (the CA that \
             signs them), or --tls-no-client-auth if every host that completes TLS may use the \
             exports that --allow does not restrict"
        );
    }
    if args.insecure_no_tls && !tls && !args.listen.is_empty() {
        warn!(
            "--insecure-no-tls: TCP clients are neither authenticated nor encrypted; anyone who \
             reaches {:?} reads and writes the decrypted disks",
            args.listen
        );
    }
    if args.tls_no_client_auth && !args.listen.is_empty() {
        warn!(
            "--tls-no-client-auth: TCP clients are encrypted but not authenticated; any host that \
             reaches {:?} and completes TLS gets {}",
            args.listen,
            if rules.allow().is_empty() {
                "every export"
            } else {
                "what the uid:/gid: rules give it: nothing"
            }
        );
    }
    let policy = Arc::new(Policy::new(rules));
    // Socket activation: inherited sockets stand in for the listeners bound to the same address
    // (keeping their rules); the others are served like --listen (TCP) or --socket (Unix).
    let mut inherited = super::serve_ops::take_inherited(&args.ops)?;
    let (tcp, unix) = if args.listen.is_empty() && args.socket.is_empty() {
        let default = inherited.is_empty().then(|| dir.join("nbd.sock"));
        (Vec::new(), default.into_iter().collect())
    } else {
        (args.listen.clone(), args.socket.clone())
    };
    let peers = UnixPeerPolicy {
        allow_uids: args.allow_uid.clone(),
        allow_gids: args
            .allow_gid
            .iter()
            .map(|g| resolve_group(g))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let socket_gid = args
        .socket_group
        .as_deref()
        .map(resolve_group)
        .transpose()?;
    let mut listeners = Vec::new();
    let mut tcp_bound = Vec::new();
    for a in &tcp {
        let mode = if tls { TlsMode::Required } else { TlsMode::Off };
        let l = match super::serve_ops::inherited_tcp(&mut inherited, *a) {
            Some(l) => l,
            None => Listener::bind_tcp(*a)?,
        }
        .with_tls(mode)
        .with_policy(policy.clone());
        tcp_bound.push(l.tcp_addr().unwrap_or(*a));
        listeners.push(l);
    }
    for p in &unix {
        let mode = if tls { TlsMode::Optional } else { TlsMode::Off };
        let l = match super::serve_ops::inherited_unix(&mut inherited, p) {
            Some(l) => l,
            None => {
                let l = Listener::bind_unix(p)?;
                set_socket_permissions(p, args.socket_mode, socket_gid)?;
                l
            }
        };
        listeners.push(
            l.with_tls(mode)
                .with_policy(policy.clone())
                .with_peer_policy(peers.clone()),
        );
    }
    listeners.extend(super::serve_ops::other_inherited(
        inherited,
        tls,
        &policy,
        args.insecure_no_tls,
        &peers,
    )?);

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
    let provider = Arc::new(DataDirProvider::with_provider(
        DataDir::new(dir).with_rbd_shared_read_only(args.rbd_shared_read_only),
        keys,
        selection,
    ));
    // What SIGHUP and `ctl reload` do: the TLS files, CRLs and rules as they are now (from
    // --config when given), all or nothing: a broken file keeps the old settings (and says why),
    // so a botched rotation never stops the server. Serving connections the new settings refuse
    // close.
    let reload: super::serve_ops::Reload = {
        let config_file = args.config.clone();
        let args = args.clone();
        let policy = policy.clone();
        Arc::new(move || {
            let fresh = match &config_file {
                Some(f) => super::serve_config::merged(f).and_then(|a| access_rules(&a)),
                None => access_rules(&args),
            };
            fresh
                .and_then(|r| {
                    let what = if r.tls().is_some() {
                        "TLS certificate, key, client CA, CRLs and --allow rules reloaded"
                    } else {
                        "no TLS configured; --allow rules reloaded"
                    };
                    policy.replace(r).map_err(anyhow::Error::from)?;
                    Ok(what.to_string())
                })
                .map_err(|e| format!("keeping the previous settings: {e:#}"))
        })
    };
    let ops = super::serve_ops::start(
        &args.ops,
        dir,
        provider.clone(),
        reload.clone(),
        config.shutdown_grace,
    )?;
    let attached = provider.attach_all();
    let names = provider.names();
    if names.is_empty() {
        warn!("no volumes to export yet: create one with `cryptnbd volume create NAME --size 10G`");
    }
    super::say(&format!(
        "Serving {} export(s): {}",
        names.len(),
        names.join(", ")
    ));
    if let Some(first) = attached.first().or(names.first()) {
        super::say(&format!(
            "Attach {first} with:\n{}",
            attach_commands(first, &tcp_bound, &unix, tls)
        ));
    }

    let vhost = super::vhost::start_all(
        &args.vhost_user_blk,
        &*provider,
        &cryptnbd::vhost::VhostAccess {
            peers: peers.clone(),
            policy: policy.clone(),
            own_uid: nix::unistd::geteuid().as_raw(),
        },
        args.socket_mode,
        socket_gid,
    )?;

    // The control socket's thread (and the metrics endpoint) share the provider and are not
    // joined at exit: its volumes are released explicitly below, so each is closed (an RBD
    // image's exclusive lock given up) rather than left to the end of the process.
    let provider_at_exit = provider.clone();
    rt.block_on(async move {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match reload() {
                    Ok(m) => info!("SIGHUP: {m}"),
                    Err(m) => warn!("SIGHUP: {m}"),
                }
            }
        });
        let shutdown = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            info!("signal received: shutting down (send it again to exit at once)");
            cryptnbd::systemd::notify_stopping();
            tokio::spawn(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("second signal: exiting now without waiting for clients");
                std::process::exit(130);
            });
            let _ = tokio::task::spawn_blocking(move || super::vhost::stop_all(vhost)).await;
        };
        ops.spawn_metrics().await?;
        ops.ready();
        serve_with(config, listeners, provider, shutdown, ops.server.clone())
            .await
            .map_err(anyhow::Error::from)
    })?;
    let released = provider_at_exit.release_all();
    info!("{released} volume(s) closed");
    Ok(())
}
