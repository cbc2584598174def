//! Transmission-phase tests against our raw client: every command, structured and simple replies,
//! out-of-order replies, shutdown, and every malformed request (each must end in an error reply or
//! in closing that one connection, never a crash).

use crate::common;

use std::time::{Duration, Instant};

use common::fixture::*;
use common::raw::{decode_read, RawClient, Reply};
use common::TestServer;
use cryptnbd::config::ServerConfig;
use cryptnbd::nbd::*;

#[test]
fn simple_replies_write_then_read_unaligned() {
    let (srv, rw, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    let (size, flags) = c.connect_export("disk0", false);
    assert_eq!(size, SIZE);
    for f in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_FAST_ZERO,
        FLAG_SEND_CACHE,
        FLAG_CAN_MULTI_CONN,
    ] {
        assert_eq!(flags & f, f, "flag {f:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & (FLAG_READ_ONLY | FLAG_SEND_DF), 0);
    let data = pattern(10_000, 1);
    assert_eq!(c.write(1, 777, &data, CMD_FLAG_FUA).error(), 0);
    assert_eq!(c.read(2, 777, 10_000).unwrap(), data);
    assert_eq!(rw.read(777, 10_000), data);
    // FLUSH, CACHE: simple success.
    c.request(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(c.reply(0).error(), 0);
    c.request(CMD_CACHE, 0, 4, 0, 4096);
    assert_eq!(c.reply(0).error(), 0);
    c.request(CMD_DISC, 0, 5, 0, 0);
    assert!(c.is_closed());
    srv.stop().unwrap();
    assert!(rw.flush_count() >= 2, "FLUSH plus the shutdown flush");
}

#[test]
fn structured_reads_send_holes_and_data() {
    let (srv, _, _) = server();
    let mut c = RawClient::tcp(srv.tcp);
    let (_, flags) = c.connect_export("disk0", true);
    assert_eq!(flags & FLAG_SEND_DF, FLAG_SEND_DF);
    c.request(CMD_READ, CMD_FLAG_DF, 1, 8192, 4096);
    match c.reply(0) {
        Reply::Chunk { ty, flags, .. } => {
            assert_eq!(ty, REPLY_TYPE_OFFSET_HOLE);
            assert_eq!(flags, REPLY_FLAG_DONE);
        }
        r => panic!("expected a hole chunk, got {r:?}"),
    }
    let data = pattern(4096, 3);
    assert_eq!(c.write(2, 8192, &data, 0).error(), 0);
    c.request(CMD_READ, 0, 3, 8192, 4096);
    let r = c.reply(0);
    assert!(matches!(
        r,
        Reply::Chunk {
            ty: REPLY_TYPE_OFFSET_DATA,
            ..
        }
    ));
    assert_eq!(decode_read(r, 8192, 4096).unwrap(), data);
}

#[test]
fn block_status_reports_holes_and_data_with_context_id() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", true);
    assert_eq!(c.write(1, 4096, &pattern(4096, 5), 0).error(), 0);
    c.request(CMD_BLOCK_STATUS, 0, 2, 0, 3 * 4096);
    let Reply::Chunk {
        ty, payload, flags, ..
    } = c.reply(0)
    else {
        panic!("block status must be a chunk")
    };
    assert_eq!(ty, 5, "NBD_REPLY_TYPE_BLOCK_STATUS is 5");
    assert_eq!(flags, REPLY_FLAG_DONE);
    let ctx = u32::from_be_bytes(payload[0..4].try_into().unwrap());
    assert_ne!(ctx, 0);
    let ext: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[0..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..8].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        ext,
        vec![
            (4096, STATE_HOLE | STATE_ZERO),
            (4096, 0),
            (4096, STATE_HOLE | STATE_ZERO)
        ]
    );
    // REQ_ONE: exactly one extent, not beyond the request.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 0, 2 * 4096);
    let Reply::Chunk { payload, .. } = c.reply(0) else {
        panic!()
    };
    assert_eq!(payload.len(), 12);
    // TRIM punches the hole back.
    c.request(CMD_TRIM, 0, 4, 4096, 4096);
    assert_eq!(c.reply(0).error(), 0);
    c.request(CMD_BLOCK_STATUS, 0, 5, 0, 3 * 4096);
    let Reply::Chunk { payload, .. } = c.reply(0) else {
        panic!()
    };
    assert_eq!(payload.len(), 12, "one hole extent after trim");
}

/// With structured replies negotiated, successes without data still come as 16-byte simple
/// replies (allowed for everything but READ; one `recv` less per request for libnbd), while an
/// error keeps its structured chunk so the message reaches the user.
#[test]
fn structured_session_answers_data_less_successes_with_simple_replies() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", true);
    let is_simple_ok = |r: &Reply, cookie: u64| match r {
        Reply::Simple {
            error, cookie: c, ..
        } => *error == 0 && *c == cookie,
        Reply::Chunk { .. } => false,
    };
    let r = c.write(1, 0, &pattern(4096, 3), 0);
    assert!(is_simple_ok(&r, 1), "WRITE: {r:?}");
    let r = c.write(2, 4096, &pattern(4096, 4), CMD_FLAG_FUA);
    assert!(is_simple_ok(&r, 2), "WRITE+FUA: {r:?}");
    for (cookie, cmd, len) in [
        (3, CMD_FLUSH, 0),
        (4, CMD_TRIM, 4096),
        (5, CMD_WRITE_ZEROES, 4096),
        (6, CMD_CACHE, 4096),
    ] {
        c.request(cmd, 0, cookie, 0, len);
        let r = c.reply(0);
        assert!(is_simple_ok(&r, cookie), "command {cmd}: {r:?}");
    }
    // READ stays structured (the spec's MUST), and an error stays a chunk with its message.
    c.request(CMD_READ, 0, 7, 4096, 4096);
    assert!(matches!(c.reply(4096), Reply::Chunk { .. }));
    c.request(CMD_WRITE_ZEROES, 0, 8, SIZE, 4096);
    let r = c.reply(0);
    assert!(matches!(r, Reply::Chunk { .. }), "{r:?}");
    assert_ne!(r.error(), 0);
    assert!(!r.message().is_empty());
}

#[test]
fn block_status_without_meta_context_is_einval() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.start();
    c.structured();
    let r = c.info_go(OPT_GO, "disk0", &[]);
    assert_eq!(r.last().unwrap().h.reply_type, REP_ACK);
    c.structured = true;
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 4096);
    let r = c.reply(0);
    assert_eq!(r.error(), EINVAL);
    assert!(r.message().contains("metadata context"), "{}", r.message());
}

#[test]
fn write_zeroes_fast_zero_and_no_hole() {
    let (srv, rw, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", false);
    assert_eq!(c.write(1, 0, &pattern(8192, 7), 0).error(), 0);
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 2, 0, 4096);
    assert_eq!(c.reply(0).error(), 0);
    // NO_HOLE + FAST_ZERO: the model export cannot do that fast.
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        3,
        4096,
        4096,
    );
    assert_eq!(c.reply(0).error(), ENOTSUP);
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        4,
        4096,
        4096,
    );
    assert_eq!(c.reply(0).error(), 0);
    assert!(rw.read(0, 8192).iter().all(|b| *b == 0));
}

#[test]
fn out_of_range_requests_get_einval_or_enospc() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", false);
    assert_eq!(c.read(1, SIZE - 512, 4096), Err(EINVAL));
    assert_eq!(c.read(2, u64::MAX - 10, 4096), Err(EINVAL));
    assert_eq!(c.write(3, SIZE, &[1u8; 512], 0).error(), ENOSPC);
    c.request(CMD_WRITE_ZEROES, 0, 4, SIZE - 1, 2);
    assert_eq!(c.reply(0).error(), ENOSPC);
    c.request(CMD_TRIM, 0, 5, SIZE, 1);
    assert_eq!(c.reply(0).error(), EINVAL);
    c.request(CMD_CACHE, 0, 6, SIZE, 1);
    assert_eq!(c.reply(0).error(), EINVAL);
    assert_still_works(&mut c);
}

#[test]
fn unknown_command_and_unknown_flag_are_einval() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", true);
    c.request(99, 0, 1, 0, 0);
    let r = c.reply(0);
    assert_eq!(r.error(), EINVAL);
    assert!(r.message().contains("unknown command"));
    c.request(CMD_READ, 1 << 9, 2, 0, 512);
    assert_eq!(decode_read(c.reply(0), 0, 512), Err(EINVAL));
    c.request(CMD_TRIM, CMD_FLAG_REQ_ONE, 3, 0, 512);
    assert_eq!(c.reply(0).error(), EINVAL);
    // A WRITE with a bad flag still has its payload consumed.
    c.request(CMD_WRITE, CMD_FLAG_DF, 4, 0, 4096);
    c.send(&[0xAA; 4096]);
    assert_eq!(c.reply(0).error(), EINVAL);
    assert_still_works(&mut c);
}

#[test]
fn write_on_read_only_is_eperm_and_payload_is_consumed() {
    let (srv, _, ro) = server();
    let mut c = RawClient::unix(&srv.socket);
    let (_, flags) = c.connect_export("ro", false);
    assert_eq!(flags & FLAG_READ_ONLY, FLAG_READ_ONLY);
    assert_eq!(flags & FLAG_SEND_TRIM, 0);
    // The payload looks like request headers: if it were not consumed, it would be parsed.
    let mut evil = Vec::new();
    for i in 0..200u64 {
        evil.extend_from_slice(
            &request::Request {
                flags: 0,
                command: CMD_DISC,
                cookie: i,
                offset: 0,
                len: 0,
            }
            .encode(),
        );
    }
    evil.resize(8192, 0);
    assert_eq!(c.write(1, 0, &evil, 0).error(), EPERM);
    c.request(CMD_TRIM, 0, 2, 0, 512);
    assert_eq!(c.reply(0).error(), EPERM);
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 512);
    assert_eq!(c.reply(0).error(), EPERM);
    assert_eq!(c.read(4, 0, 512).unwrap(), vec![0u8; 512]);
    assert!(ro.read(0, 8192).iter().all(|b| *b == 0));
}

#[test]
fn oversized_read_is_refused_without_allocating() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", true);
    // 4 GiB - 1: allocating it would be visible (and would fail on this machine).
    c.request(CMD_READ, 0, 1, 0, u32::MAX);
    let r = c.reply(0);
    assert_eq!(r.error(), EINVAL);
    assert!(r.message().contains("maximum"), "{}", r.message());
    c.request(CMD_READ, 0, 2, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.reply(0).error(), EINVAL);
    assert_still_works(&mut c);
}

#[test]
fn oversized_write_within_discard_limit_keeps_the_stream_in_sync() {
    let (srv, rw, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", false);
    let len = MAX_PAYLOAD + 4096;
    c.request(CMD_WRITE, 0, 1, 0, len);
    let payload = vec![0x5Au8; len as usize];
    c.send(&payload);
    assert_eq!(c.reply(0).error(), EINVAL);
    assert!(rw.read(0, 4096).iter().all(|b| *b == 0));
    assert_still_works(&mut c);
}

#[test]
fn huge_write_is_refused_and_the_connection_closed() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", false);
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX);
    assert_eq!(c.reply(0).error(), EINVAL);
    assert!(c.is_closed());
    // Other clients are unaffected.
    let mut d = RawClient::unix(&srv.socket);
    d.connect_export("disk0", false);
    assert_still_works(&mut d);
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (srv, _, _) = server();
    let mut other = RawClient::unix(&srv.socket);
    other.connect_export("disk0", false);
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", false);
    c.send(&[0xde, 0xad, 0xbe, 0xef].repeat(7));
    assert!(c.is_closed());
    assert_still_works(&mut other);
}

#[test]
fn truncated_request_header_closes_the_connection() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", false);
    let h = request::Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        len: 512,
    }
    .encode();
    c.send(&h[..13]);
    c.s.shutdown_write();
    assert!(c.is_closed());
    // Truncated WRITE payload as well.
    let mut d = RawClient::unix(&srv.socket);
    d.connect_export("disk0", false);
    d.request(CMD_WRITE, 0, 1, 0, 4096);
    d.send(&[1u8; 100]);
    d.s.shutdown_write();
    assert!(d.is_closed());
    srv.stop().unwrap();
}

#[test]
fn replies_go_out_of_order() {
    let (srv, rw, _) = server();
    rw.set_slow_read(1 << 20, Duration::from_millis(500));
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", true);
    c.request(CMD_READ, 0, 1, 1 << 20, 4096);
    c.request(CMD_READ, 0, 2, 0, 4096);
    let first = c.reply(0);
    let second = c.reply(0);
    assert_eq!(
        first.cookie(),
        2,
        "the fast read must overtake the slow one"
    );
    assert_eq!(second.cookie(), 1);
}

fn graceful_shutdown_finishes_in_flight_requests_and_flushes(tcp: bool) {
    let (rw, _, p) = provider();
    rw.set_slow_read(1 << 20, Duration::from_millis(700));
    let mut srv = TestServer::start(p);
    let mut c = if tcp {
        RawClient::tcp(srv.tcp)
    } else {
        RawClient::unix(&srv.socket)
    };
    c.connect_export("disk0", false);
    assert_eq!(c.write(1, 1 << 20, &pattern(4096, 4), 0).error(), 0);
    c.request(CMD_READ, 0, 2, 1 << 20, 4096);
    std::thread::sleep(Duration::from_millis(100));
    let flushes = rw.flush_count();
    srv.trigger_stop();
    // The in-flight read completes with its data.
    assert_eq!(
        decode_read(c.reply(4096), 1 << 20, 4096).unwrap(),
        pattern(4096, 4)
    );
    assert!(c.is_closed());
    srv.join().unwrap();
    assert!(
        rw.flush_count() > flushes,
        "exports are flushed at shutdown"
    );
}

#[test]
fn graceful_shutdown_over_unix_finishes_in_flight_requests_and_flushes() {
    graceful_shutdown_finishes_in_flight_requests_and_flushes(false);
}

#[test]
fn graceful_shutdown_over_tcp_finishes_in_flight_requests_and_flushes() {
    graceful_shutdown_finishes_in_flight_requests_and_flushes(true);
}

#[test]
fn many_concurrent_requests_on_one_connection() {
    let (srv, _, _) = server();
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", true);
    let n = 64u64;
    for i in 0..n {
        let data = pattern(4096, i as u8);
        c.request(CMD_WRITE, 0, i, i * 4096, 4096);
        c.send(&data);
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let r = c.reply(0);
        assert_eq!(r.error(), 0);
        seen[r.cookie() as usize] = true;
    }
    assert!(seen.iter().all(|s| *s));
    for i in 0..n {
        c.request(CMD_READ, 0, 1000 + i, i * 4096, 4096);
    }
    for _ in 0..n {
        let r = c.reply(0);
        let i = r.cookie() - 1000;
        assert_eq!(
            decode_read(r, i * 4096, 4096).unwrap(),
            pattern(4096, i as u8)
        );
    }
}

#[test]
fn shutdown_is_bounded_when_a_client_stops_reading_replies() {
    let (_, _, p) = provider();
    let mut srv = TestServer::start_with(
        ServerConfig {
            shutdown_grace: Duration::from_millis(300),
            ..Default::default()
        },
        p,
    );
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", false);
    // 64 MiB of replies that are never read: the server's writers block on a full socket.
    for i in 0..64 {
        c.request(CMD_READ, 0, i, 0, 1 << 20);
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    srv.trigger_stop();
    srv.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn bytes_after_an_unskippable_write_are_never_run_as_requests() {
    let (srv, rw, _) = server();
    for _ in 0..20 {
        let mut c = RawClient::unix(&srv.socket);
        c.connect_export("disk0", false);
        // One send: the refused header and, right behind it, what looks like valid writes.
        let mut bytes = request::Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            len: u32::MAX,
        }
        .encode()
        .to_vec();
        for i in 0..8 {
            bytes.extend_from_slice(
                &request::Request {
                    flags: 0,
                    command: CMD_WRITE,
                    cookie: 100 + i,
                    offset: 0,
                    len: 4096,
                }
                .encode(),
            );
            bytes.extend_from_slice(&[0xEE; 4096]);
        }
        c.send(&bytes);
        let r = c.reply(0);
        assert_eq!((r.cookie(), r.error()), (1, EINVAL));
        assert!(c.is_closed());
    }
    assert!(
        rw.read(0, 4096).iter().all(|b| *b == 0),
        "payload bytes were executed as requests"
    );
}

#[test]
fn serve_refuses_a_bad_config_or_no_listeners() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_, _, p) = provider();
    let r = rt.block_on(cryptnbd::server::serve(
        ServerConfig::default(),
        vec![],
        p.clone(),
        async {},
    ));
    assert!(r.unwrap_err().to_string().contains("no listeners"));
    let l = cryptnbd::server::Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let bad = ServerConfig {
        workers_per_connection: 0,
        ..Default::default()
    };
    let r = rt.block_on(cryptnbd::server::serve(bad, vec![l], p, async {}));
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("workers_per_connection"));
}

/// Replies are batched while more requests wait in the read buffer. A reply must never be held
/// back while the server waits for the client: lone request/reply round trips (a client at queue
/// depth 1) must each complete, with one worker or several (a worker holding replies while another
/// one blocks on the socket would deadlock), and a burst must get every reply.
#[test]
fn batched_replies_are_never_held_back() {
    for workers in [1, 2, 4] {
        let (_, _, prov) = provider();
        let config = ServerConfig {
            workers_per_connection: workers,
            ..ServerConfig::default()
        };
        let srv = TestServer::start_with(config, prov);
        let mut c = RawClient::unix(&srv.socket);
        c.connect_export("disk0", false);
        // Queue depth 1: every reply must arrive on its own (the client's read times out otherwise).
        let started = Instant::now();
        for i in 0..200u64 {
            assert_eq!(c.write(i, i * 512, &pattern(512, i as u8), 0).error(), 0);
        }
        // A burst of 64 small writes sent as one buffer, then 64 reads: all replies arrive.
        let mut burst = Vec::new();
        for i in 0..64u64 {
            burst.extend_from_slice(&request_bytes(CMD_WRITE, 0, 1000 + i, i * 4096, 4096));
            burst.extend_from_slice(&pattern(4096, i as u8));
        }
        c.send(&burst);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let r = c.reply(0);
            assert_eq!(r.error(), 0);
            seen.insert(r.cookie());
        }
        assert_eq!(seen.len(), 64, "one reply per request");
        // A burst that ends in a WRITE whose payload is still missing: the replies before it must
        // arrive before the rest of the payload is sent.
        let mut part = Vec::new();
        part.extend_from_slice(&request_bytes(CMD_FLUSH, 0, 2000, 0, 0));
        part.extend_from_slice(&request_bytes(CMD_WRITE, 0, 2001, 64 * 4096, 4096));
        part.extend_from_slice(&pattern(100, 9));
        c.send(&part);
        assert_eq!(
            c.reply(0).cookie(),
            2000,
            "FLUSH answered while the WRITE is incomplete"
        );
        c.send(&pattern(4096, 9)[100..]);
        assert_eq!(c.reply(0).cookie(), 2001);
        for i in 0..64u64 {
            let got = c.read(3000 + i, i * 4096, 4096).unwrap();
            assert!(got == pattern(4096, i as u8), "sector {i} after the burst");
        }
        let got = c.read(4000, 64 * 4096, 4096).unwrap();
        assert!(got == pattern(4096, 9), "the WRITE sent in two parts");
        assert!(started.elapsed() < Duration::from_secs(20));
        srv.stop().unwrap();
    }
}

/// The 28 bytes of a request header.
fn request_bytes(command: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&command.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}
