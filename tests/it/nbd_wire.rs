//! The wire encodings pinned byte for byte, written out by hand from the NBD protocol document
//! (doc/proto.md) rather than from our encoders: a change to any of them must be a visible act.

use cryptnbd::nbd::option::{self, InfoRequest, MetaContextRequest, OptionHeader};
use cryptnbd::nbd::reply::{self, ReplyHeader};
use cryptnbd::nbd::request::Request;
use cryptnbd::nbd::*;
use hex_literal::hex;

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
    assert_eq!(
        option::greeting(),
        hex!("4e42444d41474943 49484156454f5054 0003")
    );
}

#[test]
fn option_request_and_go_payload() {
    let go = InfoRequest {
        name: "disk0".into(),
        requests: vec![INFO_BLOCK_SIZE],
    };
    let bytes = OptionHeader::encode_with(OPT_GO, &go.encode());
    assert_eq!(
        bytes,
        hex!("49484156454f5054 00000007 0000000d 00000005 6469736b30 0001 0003")
    );
    let meta = MetaContextRequest {
        name: "".into(),
        queries: vec!["base:allocation".into()],
    };
    assert_eq!(
        meta.encode(),
        hex!("00000000 00000001 0000000f 626173653a616c6c6f636174696f6e")
    );
}

#[test]
fn option_replies() {
    let mut out = Vec::new();
    option::encode_info_export(&mut out, OPT_GO, 1 << 30, 0x0d6d);
    assert_eq!(
        out,
        hex!("0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 0d6d")
    );
    out.clear();
    option::encode_info_block_size(&mut out, OPT_INFO, 4096, 4096, 32 << 20);
    assert_eq!(
        out,
        hex!("0003e889045565a9 00000006 00000003 0000000e 0003 00001000 00001000 02000000")
    );
    out.clear();
    option::encode_rep_server(&mut out, "d0", "x");
    assert_eq!(
        out,
        hex!("0003e889045565a9 00000003 00000002 00000007 00000002 6430 78")
    );
    out.clear();
    option::encode_meta_context(&mut out, OPT_SET_META_CONTEXT, 1, "base:allocation");
    assert_eq!(
        out,
        hex!("0003e889045565a9 0000000a 00000004 00000013 00000001 626173653a616c6c6f636174696f6e")
    );
    out.clear();
    option::encode_error(&mut out, OPT_STARTTLS, REP_ERR_UNSUP, "no");
    assert_eq!(
        out,
        hex!("0003e889045565a9 00000005 80000001 00000002 6e6f")
    );
    out.clear();
    option::encode_export_name_reply(&mut out, 512, 0x0003, true);
    assert_eq!(out, hex!("0000000000000200 0003"));
}

#[test]
fn request_header() {
    let r = Request {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        cookie: 0x0102030405060708,
        offset: 0x1000,
        len: 0x200,
    };
    assert_eq!(
        r.encode(),
        hex!("25609513 0001 0001 0102030405060708 0000000000001000 00000200")
    );
}

#[test]
fn transmission_replies() {
    assert_eq!(
        reply::simple(EPERM, 9),
        hex!("67446698 00000001 0000000000000009")
    );
    assert_eq!(
        reply::offset_data_header(9, 0x2000, 4096),
        hex!("668e33ef 0001 0001 0000000000000009 00001008 0000000000002000")
    );
    assert_eq!(
        reply::offset_hole(9, 0x2000, 4096),
        hex!("668e33ef 0001 0002 0000000000000009 0000000c 0000000000002000 00001000")
    );
    assert_eq!(
        reply::none(9),
        hex!("668e33ef 0001 0000 0000000000000009 00000000")
    );
    let mut out = Vec::new();
    reply::encode_block_status(&mut out, 9, 1, &[(4096, STATE_HOLE | STATE_ZERO), (512, 0)]);
    assert_eq!(
        out,
        hex!("668e33ef 0001 0005 0000000000000009 00000014 00000001 00001000 00000003 00000200 00000000")
    );
    out.clear();
    reply::encode_error_chunk(&mut out, 9, EINVAL, "bad");
    assert_eq!(
        out,
        hex!("668e33ef 0001 8001 0000000000000009 00000009 00000016 0003 626164")
    );
    assert_eq!(
        ReplyHeader::parse(&hex!("67446698 00000000 0000000000000009")).unwrap(),
        ReplyHeader::Simple {
            error: 0,
            cookie: 9
        }
    );
}

#[test]
fn constants_match_the_protocol_document() {
    assert_eq!(REPLY_TYPE_BLOCK_STATUS, 5);
    assert_eq!(REPLY_TYPE_ERROR, 32769);
    assert_eq!(REPLY_TYPE_ERROR_OFFSET, 32770);
    assert_eq!(REP_ERR_UNKNOWN, (1 << 31) + 6);
    assert_eq!(REP_ERR_TOO_BIG, (1 << 31) + 9);
    assert_eq!(
        (
            OPT_STRUCTURED_REPLY,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT
        ),
        (8, 9, 10)
    );
    assert_eq!((CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS), (5, 6, 7));
    assert_eq!(
        (
            FLAG_SEND_DF,
            FLAG_CAN_MULTI_CONN,
            FLAG_SEND_CACHE,
            FLAG_SEND_FAST_ZERO
        ),
        (1 << 7, 1 << 8, 1 << 10, 1 << 11)
    );
    assert_eq!(
        (CMD_FLAG_DF, CMD_FLAG_REQ_ONE, CMD_FLAG_FAST_ZERO),
        (4, 8, 16)
    );
    assert_eq!((EOVERFLOW, ENOTSUP, ESHUTDOWN), (75, 95, 108));
}
