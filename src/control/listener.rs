//! The control socket's listener: a Unix socket made owner-only (0600) right after it is bound,
//! and every peer checked with SO_PEERCRED (only the server's own uid and root may use it, even if
//! the file's mode were widened). Each client gets a thread that reads request lines (at most
//! [`MAX_LINE`] bytes, at most [`MAX_CLIENTS`] clients at once, idle ones dropped after
//! [`IDLE`]) and answers each through [`Ops`]; malformed lines get an error and change nothing.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tracing::{debug, info, warn};

use super::{parse, response, ControlError, ErrorKind, Ops, MAX_LINE};

/// Control clients served at once; more are closed at once.
pub const MAX_CLIENTS: usize = 16;
/// A client that sends nothing for this long is disconnected.
pub const IDLE: Duration = Duration::from_secs(60);

/// A bound control socket; [`ControlListener::spawn`] serves it on a thread of its own.
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

/// Stops the listener (and removes its socket file) when dropped.
pub struct ControlGuard {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Drop for ControlGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` so that it never exists with a wider mode than 0600: the socket is bound under a
/// short temporary name in the same directory, made owner-only, then renamed into place (a
/// bound socket keeps listening across a rename). Where even the temporary name cannot be bound
/// (a path near the 108-byte limit), binds in place and narrows the mode right after.
fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let owner_only = || std::fs::Permissions::from_mode(0o600);
    let temp = path.with_file_name(format!(".ctl.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    match UnixListener::bind(&temp) {
        Ok(listener) => {
            let placed = std::fs::set_permissions(&temp, owner_only())
                .and_then(|()| std::fs::rename(&temp, path));
            if let Err(e) = placed {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
            Ok(listener)
        }
        Err(_) => {
            let listener = UnixListener::bind(path)?;
            std::fs::set_permissions(path, owner_only())?;
            Ok(listener)
        }
    }
}

impl ControlListener {
    /// Binds `path` (replacing a stale socket nobody listens on) and makes it owner-only.
    pub fn bind(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                if UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another server answers on {}", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
        }
        let listener = bind_owner_only(path)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests through `ops` until the returned guard is dropped.
    pub fn spawn(self, ops: Arc<dyn Ops>) -> io::Result<ControlGuard> {
        let stop = Arc::new(AtomicBool::new(false));
        let guard = ControlGuard {
            path: self.path.clone(),
            stop: stop.clone(),
        };
        let own_uid = nix::unistd::geteuid().as_raw();
        let clients = Arc::new(AtomicUsize::new(0));
        info!("control socket on {}", self.path.display());
        std::thread::Builder::new()
            .name("cryptnbd-ctl".into())
            .spawn(move || {
                for s in self.listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let s = match s {
                        Ok(s) => s,
                        Err(e) => {
                            warn!("control socket: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    if let Err(why) = check_peer(&s, own_uid) {
                        warn!("control socket: refusing a client: {why}");
                        continue;
                    }
                    if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                        clients.fetch_sub(1, Ordering::SeqCst);
                        warn!("control socket: {MAX_CLIENTS} clients already connected");
                        continue;
                    }
                    let (ops, clients) = (ops.clone(), clients.clone());
                    let spawned = std::thread::Builder::new()
                        .name("cryptnbd-ctl-client".into())
                        .spawn(move || {
                            if let Err(e) = serve_client(s, &*ops) {
                                debug!("control client: {e}");
                            }
                            clients.fetch_sub(1, Ordering::SeqCst);
                        });
                    if let Err(e) = spawned {
                        warn!("control socket: cannot start a client thread: {e}");
                    }
                }
            })?;
        Ok(guard)
    }
}

/// Only the server's own user and root may drive it.
fn check_peer(s: &UnixStream, own_uid: u32) -> Result<(), String> {
    let c = getsockopt(s, PeerCredentials).map_err(|e| format!("no peer credentials: {e}"))?;
    if c.uid() == own_uid || c.uid() == 0 {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {}) is neither the server's uid {own_uid} nor root",
            c.uid(),
            c.pid()
        ))
    }
}

/// Answers request lines until the client closes, idles out, or sends an overlong line.
pub fn serve_client(s: UnixStream, ops: &dyn Ops) -> io::Result<()> {
    s.set_read_timeout(Some(IDLE))?;
    s.set_write_timeout(Some(IDLE))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte more than allowed tells an overlong line from a maximal one.
        let n = (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_LINE {
            let e = ControlError::new(
                ErrorKind::BadRequest,
                format!("request longer than {MAX_LINE} bytes"),
            );
            writeln!(w, "{}", response(Err(e)))?;
            return Ok(());
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let result = parse(body).and_then(|req| ops.handle(req));
        writeln!(w, "{}", response(result))?;
        if !complete {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{client, Request};
    use serde_json::{json, Value};
    use std::sync::Mutex;

    /// Records what it was asked; `detach` of "busy" fails.
    #[derive(Default)]
    struct Double(Mutex<Vec<Request>>);

    impl Ops for Double {
        fn handle(&self, req: Request) -> Result<Value, ControlError> {
            if let Request::Detach { export } = &req {
                if export == "busy" {
                    return Err(ControlError::new(ErrorKind::Failed, "busy"));
                }
            }
            self.0.lock().unwrap().push(req);
            Ok(json!({"done": true}))
        }
    }

    #[test]
    fn socket_is_owner_only_and_answers_lines_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let l = ControlListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let ops = Arc::new(Double::default());
        let guard = l.spawn(ops.clone()).unwrap();

        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"garbage\n{\"v\":1,\"op\":\"status\"}\n\n{\"v\":9,\"op\":\"status\"}\n")
            .unwrap();
        s.write_all(b"{\"v\":1,\"op\":\"detach\",\"export\":\"busy\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut kinds = Vec::new();
        for _ in 0..4 {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            kinds.push(
                match crate::control::parse_response(l.as_bytes()).unwrap() {
                    Ok(_) => None,
                    Err(e) => Some(e.kind),
                },
            );
        }
        assert_eq!(
            kinds,
            [
                Some(ErrorKind::BadRequest),
                None,
                Some(ErrorKind::UnsupportedVersion),
                Some(ErrorKind::Failed)
            ]
        );
        assert_eq!(
            *ops.0.lock().unwrap(),
            [Request::Status],
            "only the valid one ran"
        );

        // The client helper speaks the same protocol.
        let v = client::call(&path, &Request::Reload).unwrap();
        assert_eq!(v, json!({"done": true}));

        // An overlong line is refused and the connection closed; nothing ran.
        let mut s = UnixStream::connect(&path).unwrap();
        let long = vec![b'x'; MAX_LINE + 10];
        let _ = s.write_all(&long);
        let mut l = String::new();
        BufReader::new(s).read_line(&mut l).unwrap();
        assert!(l.contains("longer than"), "{l}");
        assert_eq!(ops.0.lock().unwrap().len(), 2);

        drop(guard);
        assert!(!path.exists(), "the socket file is removed at stop");
    }

    #[test]
    fn own_uid_and_root_pass_others_do_not() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert!(check_peer(&a, me).is_ok());
        if me != 0 {
            assert!(check_peer(&a, me + 1).is_err());
        } else {
            // Root always passes; another uid than the peer's and root's is refused only
            // when the peer is not root, which this test cannot arrange as root.
            assert!(check_peer(&a, 12345).is_ok());
        }
    }
}
