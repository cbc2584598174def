//! `serve --vhost-user-blk PATH=EXPORT`: parses the option, attaches each export through the
//! same provider (keys, read-only selection, refusals) as the NBD listeners, and starts one
//! vhost-user-blk socket per pair with the `--socket-mode`/`--socket-group` permissions; at
//! shutdown stops them (the VM is disconnected, requests in flight finish, the volume is
//! flushed).

use std::path::PathBuf;

use anyhow::{bail, Context};
use tracing::info;

use cryptnbd::server::peer::set_socket_permissions;
use cryptnbd::server::ExportProvider;
use cryptnbd::vhost::{self, VhostAccess, VhostBlkExport, VhostBlkServer};

/// Splits `PATH=EXPORT` at its last `=` (a socket path may contain one, an export name not).
pub fn parse_spec(s: &str) -> Result<(PathBuf, String), String> {
    match s.rsplit_once('=') {
        Some((p, n)) if !p.is_empty() && !n.is_empty() => Ok((PathBuf::from(p), n.to_string())),
        _ => Err(format!("{s:?} is not PATH=EXPORT (e.g. /run/vm1.sock=vm1)")),
    }
}

/// Starts a vhost-user-blk socket for each `(path, export)`.
pub fn start_all(
    specs: &[(PathBuf, String)],
    provider: &dyn ExportProvider,
    access: &VhostAccess,
    socket_mode: Option<u32>,
    socket_gid: Option<u32>,
) -> anyhow::Result<Vec<VhostBlkServer>> {
    let mut servers = Vec::new();
    for (i, (path, name)) in specs.iter().enumerate() {
        if specs[..i].iter().any(|(p, _)| p == path) {
            bail!(
                "--vhost-user-blk: the socket {} is given twice (one VM per socket)",
                path.display()
            );
        }
        if !provider.exists(name) {
            bail!("--vhost-user-blk {}={name}: no exported volume named {name:?} (is it selected with --export?)", path.display());
        }
        let volume = provider.attach(name).with_context(|| {
            format!(
                "--vhost-user-blk {}={name}: attaching the volume",
                path.display()
            )
        })?;
        let server = vhost::start(VhostBlkExport {
            socket: path.clone(),
            name: name.clone(),
            volume,
            access: access.clone(),
        })?;
        set_socket_permissions(path, socket_mode, socket_gid)?;
        super::say(&format!(
            "VM disk {name} (vhost-user-blk) on {}:\n  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=RAM,share=on -numa node,memdev=mem \\\n    -chardev socket,id={name},path={},reconnect=1 -device vhost-user-blk-pci,chardev={name},num-queues=2",
            path.display(),
            path.display()
        ));
        servers.push(server);
    }
    Ok(servers)
}

/// Stops every socket (blocking: call from a blocking context).
pub fn stop_all(servers: Vec<VhostBlkServer>) {
    for s in servers {
        let p = s.socket().display().to_string();
        s.shutdown();
        info!(socket = %p, "vhost-user-blk socket stopped, volume flushed");
    }
}
