//! Accepting connections: who each peer is (TCP address; Unix uid, groups and whether it is the
//! server's own user), the per-source handshake limit, and the connection thread that runs the
//! handshake and then the session.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::access::Principal;
use super::policy::Peer;
use super::stream::Stream;
use super::{
    conns, error_chain, handshake, peer, session, stats, transport, AsyncListener, HandshakeError,
    ListenerPolicy, ServerState, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_RETRIES,
    UNIX_SEND_BUFFER,
};

/// Who a freshly accepted peer is, before any option.
struct Who {
    identity: String,
    authenticated: bool,
    source: conns::Source,
    peer: Peer,
}

pub(super) async fn accept_loop(
    l: AsyncListener,
    policy: Arc<ListenerPolicy>,
    state: Arc<ServerState>,
) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let accepted = match &l {
            AsyncListener::Tcp(t) => t.accept().await.and_then(|(s, peer)| {
                s.set_nodelay(true)?;
                let s = s.into_std()?;
                // Dead peers (a host that vanished) are noticed within minutes, not hours,
                // and their connection slot is freed.
                let ka = socket2::TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL)
                    .with_retries(KEEPALIVE_RETRIES);
                socket2::SockRef::from(&s).set_tcp_keepalive(&ka)?;
                let who = Who {
                    identity: format!("ip:{}", peer.ip()),
                    authenticated: false,
                    source: conns::Source::Ip(peer.ip()),
                    peer: Peer::default(),
                };
                Ok((Stream::Tcp(s), peer.to_string(), None, who))
            }),
            AsyncListener::Unix(u, path) => u.accept().await.and_then(|(s, _)| {
                // Without the list only the primary group can match.
                let groups = peer::peer_groups(&s).unwrap_or_default();
                let refused = match s.peer_cred() {
                    Ok(c) => policy
                        .peers
                        .check(
                            Some(peer::PeerCred {
                                uid: c.uid(),
                                gid: c.gid(),
                                pid: c.pid(),
                                groups: groups.clone(),
                            }),
                            own_uid,
                        )
                        .err()
                        .map(|why| {
                            warn!(
                                socket = %path.display(),
                                uid = c.uid(),
                                gid = c.gid(),
                                pid = c.pid().unwrap_or(0),
                                "refusing a Unix peer: {why}"
                            );
                            why
                        }),
                    Err(e) => policy.peers.check(None, own_uid).err().map(|why| {
                        warn!(socket = %path.display(), "refusing a Unix peer: {why}: {e}");
                        why
                    }),
                };
                let (peer, who) = match s.peer_cred() {
                    Ok(c) => {
                        let mut principals = vec![Principal::Uid(c.uid()), Principal::Gid(c.gid())];
                        principals.extend(
                            groups
                                .iter()
                                .filter(|g| **g != c.gid())
                                .map(|g| Principal::Gid(*g)),
                        );
                        let who = Who {
                            identity: format!("uid:{}", c.uid()),
                            authenticated: true,
                            // The server's own user (the operator) has no per-source share:
                            // it can read the data directory anyway.
                            source: if c.uid() == own_uid {
                                conns::Source::Unknown
                            } else {
                                conns::Source::Uid(c.uid())
                            },
                            peer: Peer {
                                principals,
                                own_user: c.uid() == own_uid,
                                ..Peer::default()
                            },
                        };
                        let peer = format!(
                            "unix:{} uid={} pid={}",
                            path.display(),
                            c.uid(),
                            c.pid().unwrap_or(0)
                        );
                        (peer, who)
                    }
                    Err(_) => (
                        format!("unix:{}", path.display()),
                        Who {
                            identity: "unix".into(),
                            authenticated: false,
                            source: conns::Source::Unknown,
                            peer: Peer::default(),
                        },
                    ),
                };
                Ok((Stream::Unix(s.into_std()?), peer, refused, who))
            }),
        };
        let (stream, peer, refused, who) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if state.shutting_down.load(Ordering::SeqCst) {
            continue;
        }
        if let Stream::Unix(_) = stream {
            if let Err(e) = stream.set_send_buffer(UNIX_SEND_BUFFER) {
                // Only speed depends on it: serve with the default buffer.
                debug!(peer = %peer, "could not enlarge the socket send buffer: {e}");
            }
        }
        if refused.is_some() {
            state.handle.stats().refused(stats::RefusalReason::Peer);
        }
        let mut access = peer::Access::new(policy.tls, policy.policy.clone(), refused);
        access.identity = Some(who.identity);
        access.authenticated = who.authenticated;
        access.peer = who.peer;
        if let Err(e) = start_connection(&state, stream, peer.clone(), access, who.source) {
            warn!(peer = %peer, "could not start serving a connection: {e}");
        }
    }
}

/// Removes a connection from the registry when its thread ends, even by a panic.
struct ConnGuard {
    state: Arc<ServerState>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.state.conns.remove(self.id);
    }
}

fn start_connection(
    state: &Arc<ServerState>,
    stream: Stream,
    peer: String,
    access: peer::Access,
    source: conns::Source,
) -> io::Result<()> {
    // The async side hands over a non-blocking socket; the session uses blocking I/O.
    match &stream {
        Stream::Tcp(s) => s.set_nonblocking(false)?,
        Stream::Unix(s) => s.set_nonblocking(false)?,
    }
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let handle = stream.try_clone()?;
    state
        .handle
        .stats()
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    if let Err(why) = state.conns.register(id, handle, source, &peer) {
        state.handle.stats().refused(stats::RefusalReason::Limit);
        warn!(peer = %peer, "refusing connection: {why}");
        let _ = stream.shutdown(Shutdown::Both);
        return Ok(());
    }
    let guard = ConnGuard {
        state: state.clone(),
        id,
    };
    std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            let _guard = guard;
            connection(&_guard.state, stream, &peer, id, access);
        })
        .map(|_| ())
}

fn connection(state: &ServerState, stream: Stream, peer: &str, id: u64, mut access: peer::Access) {
    info!(conn = id, peer = %peer, "client connected");
    let mut conn = transport::Conn::Plain(stream);
    let admit = |a: &peer::Access, export: &str| {
        state.conns.admit(
            id,
            conns::Candidate {
                identity: a.identity.as_deref(),
                authenticated: a.authenticated,
                exempt: a.peer.own_user,
                peer: a.peer.clone(),
                export,
            },
        )
    };
    let neg = match handshake::run(
        &mut conn,
        &state.config,
        &*state.provider,
        peer,
        &mut access,
        &admit,
    ) {
        Ok(handshake::HandshakeEnd::Transmission(n)) => n,
        Ok(handshake::HandshakeEnd::Aborted) => {
            info!(conn = id, peer = %peer, "client ended the handshake (NBD_OPT_ABORT)");
            // The handshake's socket timeouts still apply, so this cannot hang.
            if let Err(e) = conn.close_notify() {
                debug!(conn = id, "could not send TLS close_notify: {e}");
            }
            return;
        }
        Err(HandshakeError::ClientClosed) => {
            info!(conn = id, peer = %peer, "client closed the connection during the handshake");
            return;
        }
        Err(e) => {
            // A refused Unix peer was counted when it was accepted.
            if access.refused.is_none() {
                state
                    .handle
                    .stats()
                    .refused(stats::RefusalReason::Handshake);
            }
            warn!(conn = id, peer = %peer, "handshake failed: {}", error_chain(&e));
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
    };
    let export = neg.name.clone();
    let conn_stats = Arc::new(stats::ConnStats::default());
    state.conns.set_export(id, &export, conn_stats.clone());
    if state.handle.is_detached(&export) {
        // Detached while this handshake attached it: the operator's detach wins.
        info!(conn = id, peer = %peer, export = %export, "export detached: closing");
        let _ = conn.shutdown(Shutdown::Both);
        return;
    }
    state.remember(&neg.name, &neg.export);
    info!(
        conn = id,
        peer = %peer,
        export = %export,
        structured = neg.structured,
        tls = conn.is_tls(),
        client = %access.peer.label(),
        flags = format_args!("{:#x}", neg.flags),
        "serving export"
    );
    let counters = (state.handle.stats().export(&export), conn_stats);
    match session::run(conn, neg, &state.config, state.budget.clone(), counters) {
        Ok(()) => info!(conn = id, peer = %peer, export = %export, "client disconnected"),
        Err(e) => {
            warn!(conn = id, peer = %peer, export = %export, "connection closed: {}", error_chain(&e))
        }
    }
}
