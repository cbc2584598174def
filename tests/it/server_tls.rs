//! NBD over TLS with real clients against `cryptnbd serve --tls-cert --tls-key --tls-client-ca`:
//! nbdinfo and nbdcopy over `nbds+unix://` and `nbds://` (libnbd reads `ca-cert.pem`,
//! `client-cert.pem`, `client-key.pem` from `tls-certificates=DIR`), qemu-img/qemu-io with
//! `tls-creds-x509`, and the refusals: no TLS (NBD_REP_ERR_TLS_REQD, checked byte for byte), a
//! client certificate from another CA, an expired one, an export the client is not allowed, and
//! `--listen` without TLS. Also SIGHUP certificate reload, good and bad.

use crate::clients_common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::clients_common::certs::{client_dir, Ca};
use clients_common::*;

const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;

/// A TLS-serving data directory: CA, server files, and client directories.
pub(crate) struct TlsSetup {
    pub(crate) data: DataDir,
    pub(crate) certs: tempfile::TempDir,
    pub(crate) ca: Ca,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    pub(crate) client_ca: PathBuf,
}

impl TlsSetup {
    pub(crate) fn new() -> TlsSetup {
        let data = DataDir::new();
        data.create_volume("disk0", 64 * MIB, 4096);
        data.create_volume("disk1", 64 * MIB, 4096);
        let certs = tempfile::tempdir().expect("cert dir");
        let ca = Ca::new("cryptnbd test CA");
        let (server_cert, server_key) = ca.server_files(certs.path(), "server");
        let client_ca = ca.ca_file(certs.path(), "client-ca");
        TlsSetup {
            data,
            certs,
            ca,
            server_cert,
            server_key,
            client_ca,
        }
    }

    /// `--tls-cert … --tls-key … --tls-client-ca …` plus `extra`, on a Unix socket and TCP.
    pub(crate) fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec![
            "--tls-cert",
            self.server_cert.to_str().unwrap(),
            "--tls-key",
            self.server_key.to_str().unwrap(),
            "--tls-client-ca",
            self.client_ca.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.data.serve_with(true, &args)
    }

    /// A client directory with a certificate for `cn` from our CA.
    pub(crate) fn client(&self, cn: &str) -> PathBuf {
        client_dir(self.certs.path(), cn, &self.ca, Some((&self.ca, cn, false)))
    }
}

pub(crate) fn tls_tcp_uri(s: &Server, export: &str, dir: &Path) -> String {
    let addr = s.tcp.expect("tcp listener");
    format!("nbds://{addr}/{export}?tls-certificates={}", dir.display())
}

pub(crate) fn tls_unix_uri(s: &Server, export: &str, dir: &Path) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        s.socket.display(),
        dir.display()
    )
}

/// Runs a command that must fail; returns its stderr and stdout.
pub(crate) fn run_fails(cmd: &mut Command) -> String {
    let out = run_bounded(cmd, TOOL_TIMEOUT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded but must fail:\n{text}"
    );
    text
}

/// Reads one option reply header (magic, option, type, length) and its payload.
pub(crate) fn opt_reply(s: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply header");
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        0x3e889045565a9
    );
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).expect("option reply payload");
    (opt, ty, p)
}

pub(crate) fn send_option(s: &mut impl Write, option: u32, payload: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x49484156454F5054u64.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).expect("send option");
}

#[test]
fn libnbd_clients_over_tls_unix_and_tcp() {
    if !have_tools("libnbd_clients_over_tls", &["nbdinfo", "nbdcopy"]) {
        return;
    }
    let t = TlsSetup::new();
    let s = t.serve(&["--allow", "host-a=disk0", "--allow", "admin=*"]);
    let admin = t.client("admin");
    let host_a = t.client("host-a");

    // Write through TCP+TLS as admin, read back through Unix+TLS as host-a.
    let src = t.certs.path().join("src.bin");
    let back = t.certs.path().join("back.bin");
    let data = pseudo_random(8 * MIB as usize, 9);
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg(&src)
            .arg(tls_tcp_uri(&s, "disk0", &admin)),
    );
    run_ok(
        Command::new("nbdcopy")
            .arg(tls_unix_uri(&s, "disk0", &host_a))
            .arg(&back),
    );
    let got = std::fs::read(&back).unwrap();
    assert_eq!(
        &got[..data.len()],
        &data[..],
        "data read back over TLS differs"
    );
    assert!(got[data.len()..].iter().all(|&b| b == 0));

    // Listing shows only what the client may open.
    let list_a = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(tls_tcp_uri(&s, "", &host_a)),
    );
    assert!(
        list_a.contains("disk0") && !list_a.contains("disk1"),
        "{list_a}"
    );
    let list_admin = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(tls_unix_uri(&s, "", &admin)),
    );
    assert!(
        list_admin.contains("disk0") && list_admin.contains("disk1"),
        "{list_admin}"
    );

    // host-a may not open disk1, and learns only that it is not available to it.
    let err = run_fails(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk1", &host_a)));
    assert!(err.contains("disk1"), "{err}");
    let log = s.log_text();
    assert!(log.contains("TLS established"), "{log}");
    assert!(
        log.contains("export refused: no --allow rule gives it to this client")
            && log.contains("host-a"),
        "{log}"
    );
    s.stop();
}

#[test]
fn refusals_without_tls_with_foreign_or_expired_certificates() {
    if !have_tools("tls_refusals", &["nbdinfo"]) {
        return;
    }
    let t = TlsSetup::new();
    let s = t.serve(&[]);
    let addr = s.tcp.unwrap();

    // A plain client gets NBD_REP_ERR_TLS_REQD for LIST and GO, and no export.
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    send_option(&mut c, OPT_LIST, &[]);
    let (opt, ty, _) = opt_reply(&mut c);
    assert_eq!((opt, ty), (OPT_LIST, REP_ERR_TLS_REQD));
    let mut go = Vec::new();
    go.extend_from_slice(&5u32.to_be_bytes());
    go.extend_from_slice(b"disk0");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut c, OPT_GO, &go);
    let (opt, ty, msg) = opt_reply(&mut c);
    assert_eq!((opt, ty), (OPT_GO, REP_ERR_TLS_REQD));
    assert!(String::from_utf8_lossy(&msg).contains("requires TLS"));
    drop(c);

    // libnbd without TLS says so too.
    let plain = format!("nbd://{addr}/disk0");
    let err = run_fails(Command::new("nbdinfo").arg(&plain));
    assert!(err.to_lowercase().contains("tls"), "{err}");

    // A certificate from another CA, an expired one, and none at all are refused.
    let other = Ca::new("some other CA");
    let foreign = client_dir(
        t.certs.path(),
        "foreign",
        &t.ca,
        Some((&other, "admin", false)),
    );
    run_fails(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &foreign)));
    let expired = client_dir(
        t.certs.path(),
        "expired",
        &t.ca,
        Some((&t.ca, "admin", true)),
    );
    run_fails(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &expired)));
    let anonymous = client_dir(t.certs.path(), "anonymous", &t.ca, None);
    run_fails(Command::new("nbdinfo").arg(tls_unix_uri(&s, "disk0", &anonymous)));

    // The good client still gets in (no --allow: every export).
    let good = t.client("host-b");
    let info = run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk1", &good)));
    assert!(info.contains("export-size"), "{info}");
    let log = s.log_text();
    assert!(log.contains("TLS handshake failed"), "{log}");
    s.stop();
}

#[test]
fn qemu_over_tls_with_tls_creds_x509() {
    if !have_tools("qemu_over_tls", &["qemu-io", "qemu-img"]) {
        return;
    }
    let t = TlsSetup::new();
    let s = t.serve(&[]);
    let dir = t.client("qemu-client");
    let addr = s.tcp.unwrap();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        dir.display()
    );
    let tcp_opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=disk0,tls-creds=tls0",
        addr.port()
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args(["--object", &object, "--image-opts", &tcp_opts])
            .args(["-c", "write -P 0x5a 4096 1M", "-c", "read -P 0x5a 4096 1M"]),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // qemu's TLS client over the Unix socket (hostname check off: no host on a socket).
    let unix_opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk0,tls-creds=tls0,tls-hostname=localhost",
        s.socket.display()
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args(["--object", &object, "--image-opts", &unix_opts])
            .args(["-r", "-c", "read -P 0x5a 4096 1M"]),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let info = run_ok(Command::new("qemu-img").args([
        "info",
        "--object",
        &object,
        "--image-opts",
        &tcp_opts,
    ]));
    assert!(info.contains("64 MiB"), "{info}");
    s.stop();
}

#[test]
fn sighup_reloads_certificates_and_keeps_them_when_broken() {
    if !have_tools("tls_sighup", &["nbdinfo"]) {
        return;
    }
    let t = TlsSetup::new();
    let s = t.serve(&[]);
    let old_client = t.client("host-old");
    run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &old_client)));

    // Rotate the server certificate to one from a new CA; clients trusting it get in after HUP.
    let new_ca = Ca::new("rotated server CA");
    let (cert, key) = new_ca.leaf("rotated server", &["127.0.0.1", "localhost"], true, false);
    std::fs::write(&t.server_cert, cert).unwrap();
    std::fs::write(&t.server_key, key).unwrap();
    let new_client = client_dir(
        t.certs.path(),
        "host-new",
        &new_ca,
        Some((&t.ca, "host-new", false)),
    );
    hup(&s);
    wait_for_log(&s, "reloaded", 1);
    run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &new_client)));
    run_fails(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &old_client)));

    // A broken certificate file keeps the previous settings and says why.
    std::fs::write(&t.server_cert, "not a certificate").unwrap();
    hup(&s);
    wait_for_log(&s, "keeping the previous settings", 1);
    run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &new_client)));
    let log = s.log_text();
    assert!(log.contains(t.server_cert.to_str().unwrap()), "{log}");
    s.stop();
}

pub(crate) fn hup(s: &Server) {
    let pid = libc::pid_t::try_from(s.pid()).unwrap();
    // SAFETY: kill(2) on the pid of the server child this test started and has not reaped.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(rc, 0);
}

pub(crate) fn wait_for_log(s: &Server, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.log_text().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "the server never logged {needle:?}:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tcp_without_tls_needs_an_explicit_opt_out() {
    let d = DataDir::new();
    let out = Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
        .arg("--data-dir")
        .arg(d.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("CRYPTNBD_PASSPHRASE")
        .env_remove("CRYPTNBD_DATA_DIR")
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure-no-tls") && err.contains("--tls-cert"),
        "{err}"
    );
}

/// A session ends with TLS close_notify, after NBD_OPT_ABORT and after NBD_CMD_DISC: without it a
/// client cannot tell the server's end of the stream from an attacker cutting the connection.
#[test]
fn sessions_end_with_close_notify() {
    let t = TlsSetup::new();
    let s = t.serve(&[]);
    let addr = s.tcp.unwrap();
    let (cert, key) = t.ca.leaf("host-a", &[], false, false);

    for disc in [false, true] {
        let mut c = tls_client(addr, &t.ca, &cert, &key);
        if disc {
            // NBD_OPT_GO for disk0, then NBD_CMD_DISC in the transmission phase.
            let mut go = Vec::new();
            go.extend_from_slice(&5u32.to_be_bytes());
            go.extend_from_slice(b"disk0");
            go.extend_from_slice(&0u16.to_be_bytes());
            send_option(&mut c, OPT_GO, &go);
            loop {
                let (opt, ty, _) = opt_reply(&mut c);
                assert_eq!(opt, OPT_GO);
                if ty == 1 {
                    break; // NBD_REP_ACK
                }
                assert_eq!(ty, 3, "NBD_REP_INFO before the ACK");
            }
            let mut disc_req = Vec::new();
            disc_req.extend_from_slice(&0x25609513u32.to_be_bytes());
            disc_req.extend_from_slice(&0u16.to_be_bytes()); // flags
            disc_req.extend_from_slice(&2u16.to_be_bytes()); // NBD_CMD_DISC
            disc_req.extend_from_slice(&7u64.to_be_bytes()); // cookie
            disc_req.extend_from_slice(&0u64.to_be_bytes()); // offset
            disc_req.extend_from_slice(&0u32.to_be_bytes()); // length
            c.write_all(&disc_req).unwrap();
        } else {
            send_option(&mut c, 2, &[]); // NBD_OPT_ABORT
            let (opt, ty, _) = opt_reply(&mut c);
            assert_eq!((opt, ty), (2, 1), "NBD_OPT_ABORT is acknowledged");
        }
        c.flush().unwrap();
        // rustls reports a peer that closed without close_notify as UnexpectedEof; a clean
        // close_notify reads as the end of the stream.
        let mut rest = Vec::new();
        match c.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "nothing after the end: {rest:?}"),
            Err(e) => panic!("no close_notify (disc={disc}): {e}"),
        }
    }
    s.stop();
}

/// Greets the server on `addr`, negotiates NBD_OPT_STARTTLS and completes a rustls handshake with
/// a client certificate.
pub(crate) fn tls_client(
    addr: std::net::SocketAddr,
    ca: &Ca,
    cert_pem: &str,
    key_pem: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    const OPT_STARTTLS: u32 = 5;

    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    send_option(&mut c, OPT_STARTTLS, &[]);
    let (opt, ty, _) = opt_reply(&mut c);
    assert_eq!((opt, ty), (OPT_STARTTLS, 1));

    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, c);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}
