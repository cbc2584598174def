//! Random input against a live server: garbage during the handshake and random (mostly
//! well-framed) requests during transmission. Whatever arrives, the server answers or closes that
//! connection; it never crashes, hangs or stops serving other clients.

use crate::common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::fixture::*;
use common::raw::RawClient;
use cryptnbd::nbd::option::{InfoRequest, OptionHeader};
use cryptnbd::nbd::request::Request;
use cryptnbd::nbd::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Closes our side and drains whatever the server still sends, until it closes (bounded).
fn drain(mut c: RawClient) {
    c.s.shutdown_write();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match c.s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("server neither answered nor closed: {e}"),
        }
        assert!(Instant::now() < deadline, "server kept the connection open");
    }
}

fn random_option(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..4) {
        // Pure garbage.
        0 => (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect(),
        // A framed option with a random code and random payload.
        1 => {
            let payload: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
            OptionHeader::encode_with(rng.gen_range(0..16), &payload)
        }
        // A framed option whose length lies about the payload.
        2 => {
            let mut v = OptionHeader::encode_with(rng.gen_range(0..16), &[]);
            v[12..16].copy_from_slice(&rng.gen::<u32>().to_be_bytes());
            v.extend((0..rng.gen_range(0..32)).map(|_| rng.gen::<u8>()));
            v
        }
        // A GO with a random (mostly wrong) name and info list.
        _ => {
            let r = InfoRequest {
                name: ["disk0", "", "nope", "locked", "ro"][rng.gen_range(0..5)].into(),
                requests: (0..rng.gen_range(0..5))
                    .map(|_| rng.gen_range(0..6))
                    .collect(),
            };
            OptionHeader::encode_with(OPT_GO, &r.encode())
        }
    }
}

fn random_request(rng: &mut StdRng) -> Vec<u8> {
    let command = if rng.gen_bool(0.9) {
        rng.gen_range(0..9)
    } else {
        rng.gen()
    };
    // Small lengths keep all replies of one round within the socket buffers (this client only
    // reads once it has sent everything); huge ones are refused without a payload.
    let len: u32 = match rng.gen_range(0..10) {
        0 => rng.gen(),
        1 => 0,
        _ => rng.gen_range(1..4096),
    };
    let offset: u64 = match rng.gen_range(0..10) {
        0 => rng.gen(),
        1 => SIZE - u64::from(rng.gen_range(0..4096u32)),
        _ => rng.gen_range(0..SIZE),
    };
    let flags: u16 = if rng.gen_bool(0.7) {
        0
    } else {
        rng.gen::<u16>() & 0x3f
    };
    let mut v = Request {
        flags,
        command,
        cookie: rng.gen(),
        offset,
        len,
    }
    .encode()
    .to_vec();
    if command == CMD_WRITE && len < 4096 {
        v.extend((0..len).map(|_| rng.gen::<u8>()));
    }
    if rng.gen_bool(0.05) {
        v[rng.gen_range(0..4)] ^= 0xff; // bad magic
    }
    if rng.gen_bool(0.05) {
        v.truncate(rng.gen_range(0..v.len()));
    }
    v
}

#[test]
fn random_handshake_bytes_never_break_the_server() {
    let (srv, _, _) = server();
    let mut rng = StdRng::seed_from_u64(0x6e6264);
    for _ in 0..150 {
        let mut c = RawClient::unix(&srv.socket);
        c.greeting();
        let flags: u32 = if rng.gen_bool(0.8) { 3 } else { rng.gen() };
        let _ = c.try_send(&flags.to_be_bytes());
        for _ in 0..rng.gen_range(1..6) {
            if c.try_send(&random_option(&mut rng)).is_err() {
                break;
            }
        }
        drain(c);
    }
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", true);
    assert_still_works(&mut c);
}

#[test]
fn random_requests_never_break_the_server() {
    let (srv, _, _) = server();
    let mut rng = StdRng::seed_from_u64(0x7265_7173);
    for round in 0..60 {
        let structured = round % 2 == 0;
        let mut c = if round % 3 == 0 {
            RawClient::tcp(srv.tcp)
        } else {
            RawClient::unix(&srv.socket)
        };
        c.connect_export(if round % 5 == 0 { "ro" } else { "disk0" }, structured);
        for _ in 0..rng.gen_range(1..20) {
            if c.try_send(&random_request(&mut rng)).is_err() {
                break;
            }
        }
        drain(c);
    }
    let mut c = RawClient::unix(&srv.socket);
    c.connect_export("disk0", false);
    assert_still_works(&mut c);
    srv.stop().unwrap();
}
