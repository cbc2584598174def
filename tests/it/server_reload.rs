//! `serve --config FILE` and SIGHUP: rules, client CA and CRLs are reloaded together. A client
//! whose rule is withdrawn, or whose certificate is revoked, loses its connection (after its
//! requests in flight) and the log says which and why; a broken file keeps the old settings.

use crate::clients_common;
use crate::server_tls::{
    hup, opt_reply, run_fails, send_option, tls_client, tls_tcp_uri, wait_for_log, TlsSetup,
};

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::clients_common::certs::{client_dir, write_client};
use clients_common::*;

const OPT_GO: u32 = 7;

fn write_config(path: &Path, t: &TlsSetup, allow: &[&str], crl: Option<&Path>) {
    let mut s = format!(
        "tls-cert = {:?}\ntls-key = {:?}\ntls-client-ca = {:?}\nallow = {:?}\n",
        t.server_cert, t.server_key, t.client_ca, allow
    );
    if let Some(c) = crl {
        s.push_str(&format!("tls-crl = [{c:?}]\n"));
    }
    std::fs::write(path, s).unwrap();
}

/// A raw TLS client that opened `export` and now sits idle in the transmission phase.
type Held = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

fn hold(addr: std::net::SocketAddr, t: &TlsSetup, cert: &str, key: &str, export: &str) -> Held {
    let mut c = tls_client(addr, &t.ca, cert, key);
    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut c, OPT_GO, &go);
    loop {
        let (opt, ty, msg) = opt_reply(&mut c);
        assert_eq!(opt, OPT_GO);
        if ty == 1 {
            break;
        }
        assert_eq!(ty, 3, "GO refused: {}", String::from_utf8_lossy(&msg));
    }
    c.flush().unwrap();
    c
}

/// Waits until the server ends the held connection (end of stream or an error).
fn assert_closed(c: &mut Held, who: &str) {
    c.sock
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(29),
        "{who}'s connection was not closed"
    );
}

#[test]
fn sighup_reloads_rules_and_crls_and_closes_refused_connections() {
    if !have_tools("reload_rules", &["nbdinfo"]) {
        return;
    }
    let t = TlsSetup::new();
    let conf = t.certs.path().join("serve.toml");
    let crl = t.certs.path().join("crl.pem");
    let rules = ["cn:host-a=*", "cn:host-b=disk0", "cn:host-c=disk0"];
    write_config(&conf, &t, &rules, None);
    let s = t
        .data
        .serve_with(true, &["--config", conf.to_str().unwrap()]);
    let addr = s.tcp.unwrap();
    let leaf = |cn: &str, serial| t.ca.leaf_with_serial(cn, &[], false, false, Some(serial));
    let (a_cert, a_key) = leaf("host-a", 0xA1);
    let (b_cert, b_key) = leaf("host-b", 0xB2);
    let (c_cert, c_key) = leaf("host-c", 0xC3);
    let dir = |name: &str, cert: &str, key: &str| {
        let d = client_dir(t.certs.path(), name, &t.ca, None);
        write_client(&d, cert, key);
        d
    };
    let a_dir = dir("a", &a_cert, &a_key);
    let b_dir = dir("b", &b_cert, &b_key);
    let c_dir = dir("c", &c_cert, &c_key);
    run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk1", &a_dir)));
    let mut held_a = hold(addr, &t, &a_cert, &a_key, "disk1");
    let mut held_b = hold(addr, &t, &b_cert, &b_key, "disk0");

    // host-b's rule is withdrawn: its connection closes, host-a's stays.
    write_config(&conf, &t, &["cn:host-a=*", "cn:host-c=disk0"], None);
    hup(&s);
    wait_for_log(&s, "reloaded", 1);
    assert_closed(&mut held_b, "host-b");
    let log = s.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("reloaded settings refuse it") && l.contains("cn:host-b")),
        "{log}"
    );
    assert!(!log.contains("refuse it: no --allow rule gives \"disk1\" to cn:host-a"));
    run_fails(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &b_dir)));

    // host-a's certificate is revoked: its connection closes and it cannot come back.
    std::fs::write(&crl, t.ca.crl(&[0xA1])).unwrap();
    write_config(&conf, &t, &["cn:host-a=*", "cn:host-c=disk0"], Some(&crl));
    hup(&s);
    wait_for_log(&s, "reloaded", 2);
    assert_closed(&mut held_a, "host-a");
    let log = s.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("no longer verifies") && l.contains("cn:host-a")),
        "{log}"
    );
    run_fails(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk1", &a_dir)));
    run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &c_dir)));

    // A broken file keeps everything as it was.
    std::fs::write(&conf, "allow = [").unwrap();
    hup(&s);
    wait_for_log(&s, "keeping the previous settings", 1);
    assert!(s.log_text().contains(conf.to_str().unwrap()));
    run_ok(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk0", &c_dir)));
    run_fails(Command::new("nbdinfo").arg(tls_tcp_uri(&s, "disk1", &a_dir)));
    s.stop();
}
