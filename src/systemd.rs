//! Running under systemd (or anything that speaks its protocols, such as libnbd's
//! `nbd_connect_systemd_socket_activation`): inherited listening sockets (`LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`; taken with the `listenfd` crate, which checks each socket's
//! family and type), readiness and watchdog notifications (`sd_notify` through the `sd-notify`
//! crate: `READY=1`, `STOPPING=1`, `WATCHDOG=1` every half `WATCHDOG_USEC`), and ending with the
//! parent (`PR_SET_PDEATHSIG`). Every function is a no-op when the variables are absent.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::Duration;

/// One inherited listening socket and the name the socket unit gave it (`FileDescriptorName=`;
/// systemd's default is the unit name, libnbd's `nbd`).
#[derive(Debug)]
pub struct Inherited {
    pub socket: InheritedSocket,
    pub name: Option<String>,
}

#[derive(Debug)]
pub enum InheritedSocket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Why an inherited socket cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("inherited socket {index} (fd {fd}) is neither a TCP nor a Unix stream listener")]
pub struct InheritError {
    pub index: usize,
    pub fd: usize,
    #[source]
    pub source: io::Error,
}

/// Takes the sockets passed by socket activation (once: the variables are cleared, so children
/// do not inherit them).
pub fn inherited_sockets() -> Result<Vec<Inherited>, InheritError> {
    let names = std::env::var("LISTEN_FDNAMES").ok();
    std::env::remove_var("LISTEN_FDNAMES");
    let mut fds = listenfd::ListenFd::from_env();
    let names: Vec<Option<String>> = match names {
        Some(n) => n
            .split(':')
            .map(|s| (!s.is_empty() && s != "unknown").then(|| s.to_string()))
            .collect(),
        None => Vec::new(),
    };
    let mut out = Vec::with_capacity(fds.len());
    for i in 0..fds.len() {
        let name = names.get(i).cloned().flatten();
        let socket = match fds.take_unix_listener(i) {
            Ok(Some(u)) => InheritedSocket::Unix(u),
            Ok(None) => continue,
            Err(_) => match fds.take_tcp_listener(i) {
                Ok(Some(t)) => InheritedSocket::Tcp(t),
                Ok(None) => continue,
                Err(source) => {
                    return Err(InheritError {
                        index: i,
                        fd: 3 + i,
                        source,
                    })
                }
            },
        };
        out.push(Inherited { socket, name });
    }
    Ok(out)
}

/// `READY=1`: the listeners are open (connections queue from here on).
pub fn notify_ready() {
    notify(&[sd_notify::NotifyState::Ready]);
}

/// `STOPPING=1`: shutting down (no new connections; requests in flight finish).
pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

/// `STATUS=…`: one line for `systemctl status`.
pub fn notify_status(s: &str) {
    notify(&[sd_notify::NotifyState::Status(s)]);
}

/// `WATCHDOG=1`.
pub fn notify_watchdog() {
    notify(&[sd_notify::NotifyState::Watchdog]);
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), when the service manager asks.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// Asks the kernel to send SIGTERM when the parent process exits (`--exit-with-parent`, as
/// nbdkit has), so a server started by a client tool (libnbd socket activation, a test) never
/// outlives it. Returns an error if the parent is already gone.
pub fn exit_with_parent() -> io::Result<()> {
    let parent = nix::unistd::getppid();
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(io::Error::from)?;
    // The parent may have exited before the request took effect.
    if nix::unistd::getppid() != parent {
        return Err(io::Error::other("the parent process has already exited"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_inherited_without_the_variables() {
        // The test harness is not socket-activated.
        if std::env::var_os("LISTEN_FDS").is_none() {
            assert!(inherited_sockets().unwrap().is_empty());
        }
        assert_eq!(
            watchdog_interval().is_some(),
            std::env::var_os("WATCHDOG_USEC").is_some()
        );
    }
}
