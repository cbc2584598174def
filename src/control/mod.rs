//! The control socket: how an operator (through `cryptnbd ctl`) asks a running `serve` what it
//! serves and tells it to detach, attach or reload. This module owns the protocol (below), the
//! listener ([`listener`]: owner-only socket, peer uid checked), the operations over the
//! composed server ([`service`]) and the client ([`client`]).
//!
//! # Protocol (version 1)
//!
//! A Unix stream socket carrying JSON lines: the client writes one request object per line and
//! reads one response object per line, in order; it may send several requests on one
//! connection. Every request has `"v": 1` and an `"op"`:
//!
//! | request | does |
//! |---|---|
//! | `{"v":1,"op":"status"}` | exports (volume, key, attached or detached, counters), connections (peer identity, bytes, requests, uptime), buffer budget, server pid and uptime |
//! | `{"v":1,"op":"detach","export":"NAME"}` | refuse new connections to NAME, let its requests in flight reply, close its clients, flush it and drop the volume (its unwrapped data key is zeroized) |
//! | `{"v":1,"op":"attach","export":"NAME"}` | attach NAME now (created after `serve` started, or detached) |
//! | `{"v":1,"op":"reload"}` | what SIGHUP does (TLS certificate, key and client CA) |
//! | `{"v":1,"op":"snapshot","export":"NAME","snapshot":"SNAP"}` | take snapshot `NAME@SNAP`: online if NAME is attached (writes in flight drained, new ones held, flushed, a new top layer switched in, writes released), else as `volume snapshot` does offline; the result says which and how long writes were held |
//!
//! A response is `{"v":1,"ok":true,"result":{…}}` or
//! `{"v":1,"ok":false,"error":{"kind":KIND,"message":TEXT}}` with KIND one of `bad_request`
//! (not JSON, not an object, a missing or unknown field, line too long), `unsupported_version`,
//! `unknown_op`, `not_found` (no such export) and `failed` (the operation ran and failed, e.g.
//! the key store refused the attach). A request that gets an error changed nothing (except a
//! `failed` attach, which leaves the export detached as it was). New operations get new `op`
//! names; an incompatible change of an existing one bumps `v`, and the server keeps answering
//! the versions it knows. Requests are at most [`MAX_LINE`] bytes.

pub mod client;
pub mod listener;
pub mod service;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The protocol version this build speaks.
pub const VERSION: u64 = 1;
/// Longest request line accepted; a longer one gets `bad_request` and the connection is closed.
pub const MAX_LINE: usize = 64 * 1024;
/// The control socket's file name in the data directory.
pub const SOCKET_NAME: &str = "ctl.sock";

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Detach { export: String },
    Attach { export: String },
    Reload,
    Snapshot { export: String, snapshot: String },
}

impl Request {
    /// The request as one protocol line (without the newline).
    pub fn to_line(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("v".into(), VERSION.into());
        }
        v.to_string()
    }
}

/// Why a request got no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    UnsupportedVersion,
    UnknownOp,
    NotFound,
    Failed,
}

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ControlError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The operations a control socket serves (implemented over the composed server by
/// [`service::Service`]; tests use doubles).
pub trait Ops: Send + Sync {
    fn handle(&self, req: Request) -> Result<Value, ControlError>;
}

const OPS: [&str; 5] = ["status", "detach", "attach", "reload", "snapshot"];

/// Parses one request line, checking the version before the operation.
pub fn parse(line: &[u8]) -> Result<Request, ControlError> {
    let bad = |m: String| ControlError::new(ErrorKind::BadRequest, m);
    let v: Value =
        serde_json::from_slice(line).map_err(|e| bad(format!("not a JSON object: {e}")))?;
    let Value::Object(mut m) = v else {
        return Err(bad("a request is a JSON object".into()));
    };
    match m.remove("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(Value::Number(n)) => {
            return Err(ControlError::new(
                ErrorKind::UnsupportedVersion,
                format!("protocol version {n} is not supported (this server speaks {VERSION})"),
            ))
        }
        _ => return Err(bad("missing \"v\": the protocol version (1)".into())),
    }
    let fields: &[&str] = match m.get("op") {
        Some(Value::String(op)) if op == "detach" || op == "attach" => &["op", "export"],
        Some(Value::String(op)) if op == "snapshot" => &["op", "export", "snapshot"],
        Some(Value::String(op)) if OPS.contains(&op.as_str()) => &["op"],
        Some(Value::String(op)) => {
            return Err(ControlError::new(
                ErrorKind::UnknownOp,
                format!("unknown op {op:?} (known: {})", OPS.join(", ")),
            ))
        }
        _ => return Err(bad("missing \"op\"".into())),
    };
    // Serde ignores extra fields beside a unit variant's tag: a field this op does not know
    // is refused here, so a request never half-applies.
    if let Some(k) = m.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(bad(format!("unknown field {k:?} for this op")));
    }
    serde_json::from_value(Value::Object(m)).map_err(|e| bad(format!("bad request: {e}")))
}

/// The response line for a result.
pub fn response(r: Result<Value, ControlError>) -> String {
    match r {
        Ok(result) => json!({"v": VERSION, "ok": true, "result": result}),
        Err(e) => {
            json!({"v": VERSION, "ok": false, "error": {"kind": e.kind, "message": e.message}})
        }
    }
    .to_string()
}

/// Reads a response line back into a result (the client side).
pub fn parse_response(line: &[u8]) -> Result<Result<Value, ControlError>, String> {
    #[derive(Deserialize)]
    struct Resp {
        v: u64,
        ok: bool,
        #[serde(default)]
        result: Value,
        error: Option<ControlError0>,
    }
    #[derive(Deserialize)]
    struct ControlError0 {
        kind: ErrorKind,
        message: String,
    }
    let r: Resp = serde_json::from_slice(line).map_err(|e| format!("bad response: {e}"))?;
    if r.v != VERSION {
        return Err(format!("the server answered protocol version {}", r.v));
    }
    Ok(if r.ok {
        Ok(r.result)
    } else {
        let e = r.error.ok_or("an error response without \"error\"")?;
        Err(ControlError::new(e.kind, e.message))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Status,
            Request::Reload,
            Request::Detach { export: "d".into() },
            Request::Attach { export: "d".into() },
            Request::Snapshot {
                export: "d".into(),
                snapshot: "mon".into(),
            },
        ] {
            assert_eq!(parse(r.to_line().as_bytes()).unwrap(), r);
        }
        assert_eq!(
            parse(br#"{"v":1,"op":"detach","export":"disk0"}"#).unwrap(),
            Request::Detach {
                export: "disk0".into()
            }
        );
    }

    #[test]
    fn malformed_requests_get_their_kind_of_error() {
        let kind = |l: &[u8]| parse(l).unwrap_err().kind;
        assert_eq!(kind(b"not json"), ErrorKind::BadRequest);
        assert_eq!(kind(b"[1,2]"), ErrorKind::BadRequest);
        assert_eq!(kind(br#"{"op":"status"}"#), ErrorKind::BadRequest);
        assert_eq!(kind(br#"{"v":"1","op":"status"}"#), ErrorKind::BadRequest);
        assert_eq!(
            kind(br#"{"v":2,"op":"status"}"#),
            ErrorKind::UnsupportedVersion
        );
        assert_eq!(kind(br#"{"v":1}"#), ErrorKind::BadRequest);
        assert_eq!(kind(br#"{"v":1,"op":"format"}"#), ErrorKind::UnknownOp);
        assert_eq!(kind(br#"{"v":1,"op":"detach"}"#), ErrorKind::BadRequest);
        assert_eq!(
            kind(br#"{"v":1,"op":"detach","export":7}"#),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(br#"{"v":1,"op":"status","extra":true}"#),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(br#"{"v":1,"op":"snapshot","export":"d"}"#),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(br#"{"v":1,"op":"snapshot","export":"d","snapshot":"s","at":1}"#),
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn responses_round_trip() {
        let ok = response(Ok(json!({"a": 1})));
        assert_eq!(
            parse_response(ok.as_bytes()).unwrap().unwrap(),
            json!({"a": 1})
        );
        let err = response(Err(ControlError::new(ErrorKind::NotFound, "no export")));
        let e = parse_response(err.as_bytes()).unwrap().unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "no export");
    }
}
