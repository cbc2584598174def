//! The handshake driver: runs fixed-newstyle option haggling on a blocking socket until the client
//! picks an export (GO or EXPORT_NAME), aborts, or breaks a rule. Parsing and encoding live in
//! [`crate::nbd::option`]; this file decides what to answer.
//!
//! Security (see [`super::peer`]): on a listener that requires TLS every option but STARTTLS
//! (and ABORT) gets NBD_REP_ERR_TLS_REQD until TLS is up, so no export is listed or opened in
//! the clear; STARTTLS upgrades the connection in place and forgets what was negotiated before
//! it (as the protocol demands). After TLS the client's certificate names decide which exports
//! it may list and open (`--allow`). A refused Unix peer gets NBD_REP_ERR_POLICY to every option.
//!
//! Caps (a client must not hold a thread or memory hostage): one deadline for the whole
//! handshake (each read and write gets the remaining time as its socket timeout), a maximum
//! number of options, and a maximum option payload that is checked before it is read.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use super::export::{error_chain, AttachError, ExportInfo, ExportProvider};
use super::peer::{Access, TlsMode};
use super::tls::certificate_principals;
use super::transport::Conn;
use crate::config::ServerConfig;
use crate::nbd::option::{self as opt, InfoRequest, MetaContextRequest, OptionHeader};
use crate::nbd::{consts::*, WireError};
use crate::volume::Volume;

/// The minimum block size advertised for every export: 1, i.e. any byte offset and length.
/// Exports serve unaligned I/O themselves (the encrypted volume by read-modify-write of the edge
/// sectors under a per-sector lock), so a larger minimum would only make strict clients (libnbd:
/// nbdfuse, nbdcopy, fio) refuse the 512-byte or odd-sized requests that the kernel's loop device,
/// ext4's journal or an image's tail send, while the kernel's own client, which never asks,
/// sends 512-byte I/O anyway. With a minimum of 1 there is no smaller request to refuse.
pub(crate) const MIN_BLOCK_SIZE: u32 = 1;

/// The id of `base:allocation` when selected with SET_META_CONTEXT.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the transmission phase needs from a successful handshake.
pub(crate) struct Negotiated {
    pub export: Arc<Volume>,
    pub name: String,
    pub structured: bool,
    /// Set when `base:allocation` was selected for this export.
    pub meta_context: Option<u32>,
    pub flags: u16,
}

pub(crate) enum HandshakeEnd {
    Transmission(Negotiated),
    /// The client sent NBD_OPT_ABORT (a soft disconnect).
    Aborted,
}

/// Why a handshake ended without an export being served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("the client closed the connection during the handshake")]
    ClientClosed,
    #[error("the handshake did not finish within {0:?}")]
    Timeout(std::time::Duration),
    #[error("socket error during the handshake while {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("protocol violation during the handshake")]
    Wire(#[from] WireError),
    #[error("the client sent more than {0} options")]
    TooManyOptions(usize),
    #[error("option {option} carries {len} bytes, over the limit of {max}")]
    OptionTooLong {
        option: &'static str,
        len: u32,
        max: u32,
    },
    #[error("NBD_OPT_EXPORT_NAME failed (the protocol can only close the connection)")]
    ExportName(#[source] AttachError),
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    Refused(String),
    #[error("the TLS handshake failed")]
    Tls(#[source] io::Error),
}

/// A short id tying a refusal the client sees to its log line.
fn request_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Transmission flags for `export`.
pub(crate) fn transmission_flags(export: &Volume, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    // Every connection to an export shares one open volume, so a FLUSH on one covers all.
    f |= FLAG_CAN_MULTI_CONN;
    if export.is_read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        // Reads are always answered with a single content chunk.
        f |= FLAG_SEND_DF;
    }
    f
}

/// Asks the connection limits for a serving slot for this client and export (`Err`: why not).
pub(crate) type Admit<'a> = &'a dyn Fn(&Access, &str) -> Result<(), String>;

struct Driver<'a> {
    stream: &'a mut Conn,
    access: &'a mut Access,
    admit: Admit<'a>,
    deadline: Instant,
    cfg: &'a ServerConfig,
    provider: &'a dyn ExportProvider,
    /// Who is connected, for log lines.
    peer: &'a str,
    no_zeroes: bool,
    structured: bool,
    /// Export name for which `base:allocation` is selected.
    meta_for: Option<String>,
    out: Vec<u8>,
}

/// Runs the handshake on `stream`.
pub(crate) fn run(
    stream: &mut Conn,
    cfg: &ServerConfig,
    provider: &dyn ExportProvider,
    peer: &str,
    access: &mut Access,
    admit: Admit<'_>,
) -> Result<HandshakeEnd, HandshakeError> {
    let mut d = Driver {
        stream,
        access,
        admit,
        deadline: Instant::now() + cfg.handshake_timeout,
        cfg,
        provider,
        peer,
        no_zeroes: false,
        structured: false,
        meta_for: None,
        out: Vec::new(),
    };
    d.out.extend_from_slice(&opt::greeting());
    d.send("sending the greeting")?;
    let mut flags = [0u8; 4];
    d.read(&mut flags, "reading the client flags")?;
    let cf = opt::parse_client_flags(u32::from_be_bytes(flags))?;
    d.no_zeroes = cf.no_zeroes;
    let mut count = 0usize;
    loop {
        count += 1;
        if count > cfg.max_options {
            return Err(HandshakeError::TooManyOptions(cfg.max_options));
        }
        let mut hdr = [0u8; opt::OPTION_HEADER_LEN];
        d.read(&mut hdr, "reading an option header")?;
        let h = OptionHeader::parse(&hdr)?;
        if h.len > cfg.max_option_len {
            // Tell the client why, then hang up: reading the payload would let it stall us.
            opt::encode_error(
                &mut d.out,
                h.option,
                REP_ERR_TOO_BIG,
                &format!(
                    "option data of {} bytes is over the limit of {}",
                    h.len, cfg.max_option_len
                ),
            );
            let _ = d.send("refusing an oversized option");
            return Err(HandshakeError::OptionTooLong {
                option: option_name(h.option),
                len: h.len,
                max: cfg.max_option_len,
            });
        }
        // Bounded by max_option_len, checked above.
        let mut payload = vec![0u8; h.len as usize];
        d.read(&mut payload, "reading option data")?;
        debug!(option = option_name(h.option), len = h.len, "option");
        if let Some(end) = d.option(h.option, &payload)? {
            return Ok(end);
        }
    }
}

impl Driver<'_> {
    fn remaining(&self) -> Result<std::time::Duration, HandshakeError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(HandshakeError::Timeout(self.cfg.handshake_timeout))
        } else {
            Ok(left)
        }
    }

    fn io_err(&self, what: &'static str, e: io::Error) -> HandshakeError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                HandshakeError::Timeout(self.cfg.handshake_timeout)
            }
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => HandshakeError::ClientClosed,
            _ => HandshakeError::Io { what, source: e },
        }
    }

    fn read(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), HandshakeError> {
        let left = self.remaining()?;
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| HandshakeError::Io { what, source: e })?;
        self.stream
            .read_exact(buf)
            .map_err(|e| self.io_err(what, e))
    }

    fn send(&mut self, what: &'static str) -> Result<(), HandshakeError> {
        let left = self.remaining()?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| HandshakeError::Io { what, source: e })?;
        let r = self
            .stream
            .write_all(&self.out)
            .and_then(|()| self.stream.flush());
        self.out.clear();
        r.map_err(|e| self.io_err(what, e))
    }

    fn error(&mut self, option: u32, ty: u32, msg: &str) -> Result<(), HandshakeError> {
        debug!(option = option_name(option), "option refused: {msg}");
        opt::encode_error(&mut self.out, option, ty, msg);
        self.send("sending an option error")
    }

    fn ack(&mut self, option: u32) -> Result<(), HandshakeError> {
        opt::encode_reply(&mut self.out, option, REP_ACK, &[]);
        self.send("sending an option reply")
    }

    fn resolve(&self, name: &str) -> Option<String> {
        if !name.is_empty() {
            return Some(name.to_string());
        }
        let default = self.provider.default_export();
        match default {
            Some(d) if self.access.exports().permits(&d) => Some(d),
            // The default export is not this client's: its first permitted one stands in.
            _ => self.visible().into_iter().next().map(|e| e.name),
        }
    }

    /// The exports this client may see.
    fn visible(&self) -> Vec<ExportInfo> {
        let mut v = self.provider.list();
        let access = self.access.exports();
        v.retain(|e| access.permits(&e.name));
        v
    }

    /// `Some(message)` when this client may not use `name` (whether or not it exists: a
    /// refused client learns nothing about other clients' exports). The message names the rule
    /// that decides, and what the client proved.
    fn forbidden(&self, name: &str) -> Option<String> {
        if self.access.exports().permits(name) {
            return None;
        }
        let who = self.access.peer.label();
        tracing::warn!(
            peer = %self.peer,
            client = %who,
            export = %name,
            "export refused: no --allow rule gives it to this client"
        );
        let hint = if self.access.peer.tls || self.access.tls == TlsMode::Off {
            ""
        } else {
            "; without TLS only uid:/gid: rules apply"
        };
        Some(format!(
            "export {name:?} is not available to this client ({who}): no --allow rule gives it{hint}"
        ))
    }

    /// Refusals that come before what the option asks: a refused peer, or TLS still missing.
    fn gate(&self, option: u32) -> Option<(u32, String)> {
        if option == OPT_ABORT {
            return None;
        }
        if let Some(why) = &self.access.refused {
            return Some((REP_ERR_POLICY, why.clone()));
        }
        if option != OPT_STARTTLS && self.access.tls.is_required() && !self.stream.is_tls() {
            return Some((
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first".into(),
            ));
        }
        None
    }

    fn starttls(&mut self, option: u32, payload: &[u8]) -> Result<(), HandshakeError> {
        if !payload.is_empty() {
            return self.error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        }
        if self.stream.is_tls() {
            return self.error(option, REP_ERR_INVALID, "TLS is already running");
        }
        let tls = self.access.policy.current().tls().cloned();
        let Some(tls) = tls.filter(|_| self.access.tls != TlsMode::Off) else {
            return self.error(
                option,
                REP_ERR_UNSUP,
                "TLS is not configured on this server",
            );
        };
        self.ack(option)?;
        let left = self.remaining()?;
        let timeouts = self
            .stream
            .set_read_timeout(Some(left))
            .and_then(|()| self.stream.set_write_timeout(Some(left)));
        timeouts.map_err(|e| HandshakeError::Io {
            what: "starting TLS",
            source: e,
        })?;
        self.stream
            .start_tls(tls.current())
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    HandshakeError::Timeout(self.cfg.handshake_timeout)
                }
                _ => HandshakeError::Tls(e),
            })?;
        // What was negotiated in the clear does not carry over (NBD protocol, STARTTLS).
        self.structured = false;
        self.meta_for = None;
        let chain = self.stream.peer_chain();
        let p = &mut self.access.peer;
        p.tls = true;
        if let Some(leaf) = chain.first() {
            let names = certificate_principals(leaf);
            // The certificate, not the address or uid it came from, is who this client is.
            self.access.identity = Some(format!(
                "cert:{}",
                names.first().map(|n| n.to_string()).unwrap_or_default()
            ));
            self.access.authenticated = true;
            p.principals.extend(names);
        }
        p.cert_chain = chain;
        tracing::info!(
            peer = %self.peer,
            client = %self.access.peer.label(),
            "TLS established"
        );
        Ok(())
    }

    /// Handles one option; `Some` ends the handshake.
    fn option(
        &mut self,
        option: u32,
        payload: &[u8],
    ) -> Result<Option<HandshakeEnd>, HandshakeError> {
        if let Some((ty, why)) = self.gate(option) {
            if option == OPT_EXPORT_NAME {
                // No error reply exists for EXPORT_NAME: the protocol can only hang up.
                return Err(HandshakeError::Refused(why));
            }
            self.error(option, ty, &why)?;
            return Ok(None);
        }
        match option {
            OPT_ABORT => {
                // The client may already be gone; a failed ACK changes nothing.
                let _ = self.ack(option);
                Ok(Some(HandshakeEnd::Aborted))
            }
            OPT_LIST => {
                if !payload.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    return Ok(None);
                }
                for e in self.visible() {
                    opt::encode_rep_server(&mut self.out, &e.name, &e.description);
                }
                self.ack(option)?;
                Ok(None)
            }
            OPT_STARTTLS => {
                self.starttls(option, payload)?;
                Ok(None)
            }
            OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    self.structured = true;
                    self.ack(option)?;
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, payload)?;
                Ok(None)
            }
            OPT_INFO | OPT_GO => self.info_go(option, payload),
            OPT_EXPORT_NAME => self.export_name(payload).map(Some),
            _ => {
                self.error(
                    option,
                    REP_ERR_UNSUP,
                    &format!("option {option} ({}) is not supported", option_name(option)),
                )?;
                Ok(None)
            }
        }
    }

    fn meta_context(&mut self, option: u32, payload: &[u8]) -> Result<(), HandshakeError> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_for = None;
            if !self.structured {
                return self.error(
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_SET_META_CONTEXT needs structured replies first",
                );
            }
        }
        let req = match MetaContextRequest::parse(payload) {
            Ok(r) => r,
            Err(e) => return self.error(option, REP_ERR_INVALID, &e.to_string()),
        };
        let Some(name) = self.resolve(&req.name) else {
            return self.error(option, REP_ERR_UNKNOWN, "there is no default export");
        };
        if let Some(why) = self.forbidden(&name) {
            return self.error(option, REP_ERR_POLICY, &why);
        }
        if !self.provider.exists(&name) {
            return self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            );
        }
        let selected = if set {
            req.queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION)
        } else {
            // LIST: no query = everything; "base:" is the namespace wildcard.
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == "base:" || q == CONTEXT_BASE_ALLOCATION)
        };
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            opt::encode_meta_context(&mut self.out, option, id, CONTEXT_BASE_ALLOCATION);
            if set {
                self.meta_for = Some(name);
            }
        }
        self.ack(option)
    }

    fn attach(&self, name: &str) -> Result<Arc<Volume>, AttachError> {
        self.provider.attach(name)
    }

    fn info_go(
        &mut self,
        option: u32,
        payload: &[u8],
    ) -> Result<Option<HandshakeEnd>, HandshakeError> {
        let req = match InfoRequest::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                self.error(option, REP_ERR_INVALID, &e.to_string())?;
                return Ok(None);
            }
        };
        let Some(name) = self.resolve(&req.name) else {
            self.error(option, REP_ERR_UNKNOWN, "there is no default export")?;
            return Ok(None);
        };
        if let Some(why) = self.forbidden(&name) {
            self.error(option, REP_ERR_POLICY, &why)?;
            return Ok(None);
        }
        let export = match self.attach(&name) {
            Ok(e) => e,
            Err(e) => {
                let ty = match e {
                    AttachError::NotFound(_) => REP_ERR_UNKNOWN,
                    _ => REP_ERR_POLICY,
                };
                // The client gets what it can act on and a request id; the log has the whole
                // typed chain (paths, KMS URL, key id) under the same id.
                let rid = request_id();
                let detail = error_chain(&e);
                let message = match e {
                    AttachError::NotFound(_) => self.provider.refusal_message(&e),
                    _ => format!(
                        "{} (request {rid}; the server log has the details)",
                        self.provider.refusal_message(&e)
                    ),
                };
                match e {
                    AttachError::Refused { .. } => {
                        tracing::warn!(peer = %self.peer, export = %name, request = %rid, "attach refused: {detail}")
                    }
                    // Warned about recently; one line per request still ties the id the
                    // client sees to the cause (as "client connected" does per connection).
                    AttachError::RefusedQuietly { .. } => {
                        tracing::info!(peer = %self.peer, export = %name, request = %rid, "attach refused again: {detail}")
                    }
                    _ => {}
                }
                self.error(option, ty, &message)?;
                return Ok(None);
            }
        };
        if option == OPT_GO {
            if let Err(why) = (self.admit)(self.access, &name) {
                tracing::warn!(peer = %self.peer, export = %name, "refusing GO: {why}");
                self.error(option, REP_ERR_POLICY, &why)?;
                return Ok(None);
            }
        }
        let flags = transmission_flags(&export, self.structured);
        opt::encode_info_export(&mut self.out, option, export.size(), flags);
        // Preferred: the encryption sector (or the configured size if larger), the size that
        // needs no read-modify-write. Minimum: see `MIN_BLOCK_SIZE`.
        let pref = self.cfg.preferred_block_size.max(export.sector_size());
        opt::encode_info_block_size(
            &mut self.out,
            option,
            MIN_BLOCK_SIZE,
            pref,
            self.cfg.max_payload,
        );
        if req.requests.contains(&INFO_NAME) {
            opt::encode_info_string(&mut self.out, option, INFO_NAME, &name);
        }
        if req.requests.contains(&INFO_DESCRIPTION) {
            opt::encode_info_string(
                &mut self.out,
                option,
                INFO_DESCRIPTION,
                &self.provider.description(&name, &export),
            );
        }
        self.ack(option)?;
        if option == OPT_INFO {
            return Ok(None);
        }
        Ok(Some(self.negotiated(export, name, flags)))
    }

    fn negotiated(&self, export: Arc<Volume>, name: String, flags: u16) -> HandshakeEnd {
        let meta_context = match &self.meta_for {
            Some(n) if *n == name && self.structured => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        HandshakeEnd::Transmission(Negotiated {
            export,
            name,
            structured: self.structured,
            meta_context,
            flags,
        })
    }

    fn export_name(&mut self, payload: &[u8]) -> Result<HandshakeEnd, HandshakeError> {
        if payload.len() > MAX_STRING {
            return Err(WireError::TooLong {
                what: "export name",
                len: payload.len() as u64,
                max: MAX_STRING as u64,
            }
            .into());
        }
        let raw = std::str::from_utf8(payload).map_err(|_| WireError::NotUtf8 {
            what: "export name",
        })?;
        let name = self
            .resolve(raw)
            .ok_or_else(|| HandshakeError::ExportName(AttachError::NotFound(String::new())))?;
        if let Some(why) = self.forbidden(&name) {
            return Err(HandshakeError::Refused(why));
        }
        let export = self.attach(&name).map_err(HandshakeError::ExportName)?;
        (self.admit)(self.access, &name).map_err(HandshakeError::Refused)?;
        let flags = transmission_flags(&export, self.structured);
        opt::encode_export_name_reply(&mut self.out, export.size(), flags, self.no_zeroes);
        self.send("sending the export information")?;
        Ok(self.negotiated(export, name, flags))
    }
}
