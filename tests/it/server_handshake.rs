//! Handshake tests against our raw client: fixed newstyle only, every option, the caps (option
//! length, option count, handshake time, connections) and refused attaches with their reason.

use crate::common;

use std::time::{Duration, Instant};

use common::fixture::*;
use common::raw::RawClient;
use common::TestServer;
use cryptnbd::config::ServerConfig;
use cryptnbd::nbd::option::MetaContextRequest;
use cryptnbd::nbd::*;

#[test]
fn garbage_instead_of_the_handshake_closes() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.greeting();
    c.send(&(FLAG_C_FIXED_NEWSTYLE).to_be_bytes());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.is_closed());
}

#[test]
fn oldstyle_and_unknown_client_flags_are_refused() {
    let (srv, _, _) = server();
    for flags in [
        0u32,
        FLAG_C_NO_ZEROES,
        FLAG_C_FIXED_NEWSTYLE | 1 << 5,
        u32::MAX,
    ] {
        let mut c = RawClient::unix(&srv.socket);
        c.greeting();
        c.send(&flags.to_be_bytes());
        assert!(c.is_closed(), "client flags {flags:#x} must be refused");
    }
}

#[test]
fn unknown_option_and_starttls_get_unsup_and_negotiation_continues() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    let r = c.option(4242, b"whatever");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].h.reply_type, REP_ERR_UNSUP);
    let r = c.option(OPT_STARTTLS, &[]);
    assert_eq!(r[0].h.reply_type, REP_ERR_UNSUP);
    assert!(r[0].message().contains("TLS"), "{}", r[0].message());
    let r = c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(r[0].h.reply_type, REP_ERR_UNSUP);
    let r = c.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(r[0].h.reply_type, REP_ERR_INVALID);
    let r = c.option(OPT_LIST, b"x");
    assert_eq!(r[0].h.reply_type, REP_ERR_INVALID);
    // Malformed GO payload (name length beyond the data).
    let r = c.option(OPT_GO, &[0, 0, 0, 50, b'a']);
    assert_eq!(r[0].h.reply_type, REP_ERR_INVALID);
    let r = c.info_go(OPT_GO, "disk0", &[]);
    assert_eq!(r.last().unwrap().h.reply_type, REP_ACK);
    assert_still_works(&mut c);
}

#[test]
fn list_shows_exports_with_descriptions() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    let r = c.option(OPT_LIST, &[]);
    let servers: Vec<(String, String)> = r
        .iter()
        .filter(|x| x.h.reply_type == REP_SERVER)
        .map(|x| {
            let n = u32::from_be_bytes(x.data[0..4].try_into().unwrap()) as usize;
            (
                String::from_utf8(x.data[4..4 + n].to_vec()).unwrap(),
                String::from_utf8(x.data[4 + n..].to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(servers.len(), 3);
    assert_eq!(servers[0], ("disk0".into(), "test disk zero".into()));
    assert_eq!(servers[1].0, "ro");
    assert_eq!(r.last().unwrap().h.reply_type, REP_ACK);
    let r = c.option(OPT_ABORT, &[]);
    assert_eq!(r[0].h.reply_type, REP_ACK);
    assert!(c.is_closed());
}

#[test]
fn info_reports_size_block_sizes_name_and_description() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    // The empty name is the default export (the first one).
    let r = c.info_go(
        OPT_INFO,
        "",
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    );
    assert_eq!(r.last().unwrap().h.reply_type, REP_ACK);
    let info = |t: u16| {
        r.iter()
            .find(|x| x.h.reply_type == REP_INFO && x.data[0..2] == t.to_be_bytes())
            .unwrap_or_else(|| panic!("info {t} missing"))
    };
    assert_eq!(&info(INFO_NAME).data[2..], b"disk0");
    assert_eq!(&info(INFO_DESCRIPTION).data[2..], b"test disk zero");
    let bs = &info(INFO_BLOCK_SIZE).data;
    let u = |i: usize| u32::from_be_bytes(bs[i..i + 4].try_into().unwrap());
    assert_eq!((u(2), u(6), u(10)), (4096, 4096, 32 << 20));
    let r = c.info_go(OPT_INFO, "ro", &[INFO_BLOCK_SIZE]);
    let bs = &r.iter().find(|x| x.data[0..2] == [0, 3]).unwrap().data;
    assert_eq!(u32::from_be_bytes(bs[2..6].try_into().unwrap()), 512);
}

#[test]
fn refused_attach_reports_the_reason_and_others_keep_working() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    let r = c.info_go(OPT_GO, "locked", &[]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].h.reply_type, REP_ERR_POLICY);
    assert!(
        r[0].message().contains("CMK alias/locked is disabled"),
        "{}",
        r[0].message()
    );
    let r = c.info_go(OPT_GO, "nope", &[]);
    assert_eq!(r[0].h.reply_type, REP_ERR_UNKNOWN);
    assert!(r[0].message().contains("nope"));
    let r = c.info_go(OPT_GO, "disk0", &[]);
    assert_eq!(r.last().unwrap().h.reply_type, REP_ACK);
    assert_still_works(&mut c);
    // EXPORT_NAME cannot carry an error: the server must close.
    let mut d = RawClient::unix(&srv.socket);
    d.start();
    d.send_option(OPT_EXPORT_NAME, b"locked");
    assert!(d.is_closed());
}

#[test]
fn export_name_with_and_without_zeroes() {
    let (srv, _, _) = server();
    for no_zeroes in [true, false] {
        let mut c = RawClient::unix(&srv.socket);
        c.greeting();
        let f = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.send(&f.to_be_bytes());
        c.send_option(OPT_EXPORT_NAME, b"disk0");
        let b = c.recv(10);
        assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), SIZE);
        if !no_zeroes {
            assert_eq!(c.recv(124), vec![0u8; 124]);
        }
        assert_still_works(&mut c);
    }
}

#[test]
fn meta_context_list_and_set() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    // SET before structured replies is invalid.
    let req = MetaContextRequest {
        name: "disk0".into(),
        queries: vec![CONTEXT_BASE_ALLOCATION.into()],
    };
    let r = c.option(OPT_SET_META_CONTEXT, &req.encode());
    assert_eq!(r[0].h.reply_type, REP_ERR_INVALID);
    c.structured();
    for queries in [
        vec![],
        vec!["base:".to_string()],
        vec!["qemu:dirty-bitmap:x".into(), CONTEXT_BASE_ALLOCATION.into()],
    ] {
        let req = MetaContextRequest {
            name: "disk0".into(),
            queries,
        };
        let r = c.option(OPT_LIST_META_CONTEXT, &req.encode());
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(&r[0].data[4..], CONTEXT_BASE_ALLOCATION.as_bytes());
    }
    let req = MetaContextRequest {
        name: "disk0".into(),
        queries: vec!["other:thing".into()],
    };
    let r = c.option(OPT_SET_META_CONTEXT, &req.encode());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].h.reply_type, REP_ACK);
    let req = MetaContextRequest {
        name: "nope".into(),
        queries: vec![],
    };
    let r = c.option(OPT_LIST_META_CONTEXT, &req.encode());
    assert_eq!(r[0].h.reply_type, REP_ERR_UNKNOWN);
}

#[test]
fn option_length_over_the_cap_is_refused() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    // Header only: the server must not wait for (or allocate) 1 GiB.
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&h);
    let r = c.opt_reply();
    assert_eq!(r.h.reply_type, REP_ERR_TOO_BIG);
    assert!(c.is_closed());
}

#[test]
fn too_many_options_closes_the_connection() {
    let (_, _, p) = provider();
    let srv = TestServer::start_with(
        ServerConfig {
            max_options: 5,
            ..Default::default()
        },
        p,
    );
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    for _ in 0..5 {
        let r = c.option(OPT_LIST, &[]);
        assert_eq!(r.last().unwrap().h.reply_type, REP_ACK);
    }
    let _ = c.try_send(&OptionHeaderBytes::list());
    assert!(c.is_closed());
}

struct OptionHeaderBytes;
impl OptionHeaderBytes {
    fn list() -> Vec<u8> {
        option::OptionHeader::encode_with(OPT_LIST, &[])
    }
}

#[test]
fn handshake_timeout_closes_a_silent_client() {
    let (_, _, p) = provider();
    let srv = TestServer::start_with(
        ServerConfig {
            handshake_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        p,
    );
    let t = Instant::now();
    let mut c = RawClient::unix(&srv.socket);
    c.greeting();
    // Send flags, then one byte of an option, then go silent.
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send(b"I");
    assert!(c.is_closed());
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // A slow but complete handshake within the limit still works.
    let mut d = RawClient::unix(&srv.socket);
    d.connect_export("disk0", false);
    std::thread::sleep(Duration::from_millis(400));
    assert_still_works(&mut d);
}

#[test]
fn connection_limit_is_fair_to_a_reconnecting_client() {
    let (_, _, p) = provider();
    let srv = TestServer::start_with(
        ServerConfig {
            max_connections: 2,
            ..Default::default()
        },
        p,
    );
    let mut a = RawClient::unix(&srv.socket);
    a.connect_export("disk0", false);
    let mut b = RawClient::tcp(srv.tcp);
    b.connect_export("disk0", false);
    // Serving is full. Handshakes have their own allowance of the same size...
    let mut h1 = RawClient::tcp(srv.tcp);
    h1.greeting();
    let mut h2 = RawClient::tcp(srv.tcp);
    h2.greeting();
    let mut c = RawClient::tcp(srv.tcp);
    assert!(
        c.is_closed(),
        "a third connection in the handshake must be closed at once"
    );
    drop((h1, h2));
    // ...and the same client (uid of the Unix peer) reconnecting after, say, a network drop
    // gets in: its own oldest connection is closed for it, nobody else's.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut d = loop {
        let mut d = RawClient::unix(&srv.socket);
        let mut g = [0u8; 18];
        use std::io::Read;
        if d.s.read_exact(&mut g).is_ok() {
            break d;
        }
        assert!(Instant::now() < deadline, "handshake slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    };
    d.send(&3u32.to_be_bytes());
    let r = d.info_go(cryptnbd::nbd::consts::OPT_GO, "disk0", &[]);
    assert_eq!(
        r.last().unwrap().h.reply_type,
        cryptnbd::nbd::consts::REP_ACK
    );
    assert!(a.is_closed(), "the client's old connection was replaced");
    assert_still_works(&mut d);
    assert_still_works(&mut b);
}
