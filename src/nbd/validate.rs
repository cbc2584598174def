//! Request validation: whether a transmission request may run on the negotiated export, and the
//! errno of a refusal. Pure functions of the request and the negotiated [`Limits`]: no socket, no
//! volume. The server runs [`check`] once per request, before reading any WRITE payload into its
//! buffer; the volume then only sees requests that are in range, allowed and not empty.

use super::consts::*;
use super::request::Request;

/// What was negotiated for the export being served (fixed for the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    pub read_only: bool,
    /// Structured replies were negotiated (so NBD_FLAG_SEND_DF was advertised).
    pub structured: bool,
    /// A metadata context (`base:allocation`) was selected: BLOCK_STATUS is allowed.
    pub meta_context: bool,
    /// The largest READ/WRITE payload advertised.
    pub max_payload: u32,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Run,
    /// Answer with this errno and message; the connection goes on.
    Refuse {
        errno: u32,
        message: String,
    },
    /// NBD_CMD_DISC: stop reading requests.
    Disconnect,
}

impl Verdict {
    fn refuse(errno: u32, message: String) -> Self {
        Verdict::Refuse { errno, message }
    }
}

/// The errno for a request that reaches past the end of the export: the protocol asks for
/// ENOSPC from the commands that write, EINVAL from the others.
pub fn out_of_range_errno(command: u16) -> u32 {
    if matches!(command, CMD_WRITE | CMD_WRITE_ZEROES) {
        ENOSPC
    } else {
        EINVAL
    }
}

/// Whether `command` changes the export (refused on a read-only export).
pub fn writes(command: u16) -> bool {
    matches!(command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
}

/// Validates `req` against the negotiated limits. Every refusal names the command and the
/// condition; the errno is chosen here and nowhere else.
pub fn check(req: &Request, lim: &Limits) -> Verdict {
    let cmd = req.command;
    let name = command_name(cmd);
    if cmd > CMD_BLOCK_STATUS {
        return Verdict::refuse(EINVAL, format!("unknown command {cmd}"));
    }
    if cmd == CMD_DISC {
        return Verdict::Disconnect;
    }
    if !req.flags_valid(lim.structured) {
        return Verdict::refuse(
            EINVAL,
            format!("flags {:#x} are not valid for {name}", req.flags),
        );
    }
    if cmd == CMD_FLUSH {
        return Verdict::Run;
    }
    if writes(cmd) && lim.read_only {
        return Verdict::refuse(EPERM, format!("{name} on a read-only export"));
    }
    if matches!(cmd, CMD_READ | CMD_WRITE) && req.len > lim.max_payload {
        return Verdict::refuse(
            EINVAL,
            format!(
                "{name} of {} bytes is over the maximum of {}",
                req.len, lim.max_payload
            ),
        );
    }
    if req.len == 0 {
        return Verdict::refuse(EINVAL, format!("{name} of zero bytes"));
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= lim.size);
    if !in_range {
        return Verdict::refuse(
            out_of_range_errno(cmd),
            format!(
                "{name} at {}+{} is beyond the end of the export ({} bytes)",
                req.offset, req.len, lim.size
            ),
        );
    }
    if cmd == CMD_BLOCK_STATUS && !lim.meta_context {
        return Verdict::refuse(
            EINVAL,
            "BLOCK_STATUS without a metadata context selected (SET_META_CONTEXT base:allocation)"
                .into(),
        );
    }
    Verdict::Run
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        structured: true,
        meta_context: true,
        max_payload: 32 << 20,
    };

    fn req(command: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            len,
        }
    }

    fn errno(v: Verdict) -> u32 {
        match v {
            Verdict::Refuse { errno, message } => {
                assert!(!message.is_empty());
                errno
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn valid_requests_run() {
        for cmd in [
            CMD_READ,
            CMD_WRITE,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_CACHE,
            CMD_WRITE_ZEROES,
            CMD_BLOCK_STATUS,
        ] {
            assert_eq!(check(&req(cmd, 0, 0, 4096), &LIM), Verdict::Run, "{cmd}");
        }
        // The last byte of the export.
        assert_eq!(
            check(&req(CMD_READ, 0, (1 << 20) - 1, 1), &LIM),
            Verdict::Run
        );
        // FLUSH ignores offset and length.
        assert_eq!(check(&req(CMD_FLUSH, 0, u64::MAX, 0), &LIM), Verdict::Run);
        assert_eq!(check(&req(CMD_DISC, 0, 0, 0), &LIM), Verdict::Disconnect);
    }

    #[test]
    fn unknown_commands_and_flags() {
        assert_eq!(errno(check(&req(99, 0, 0, 1), &LIM)), EINVAL);
        assert_eq!(errno(check(&req(CMD_READ, 1 << 9, 0, 1), &LIM)), EINVAL);
        // DF only with structured replies.
        assert_eq!(check(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &LIM), Verdict::Run);
        let simple = Limits {
            structured: false,
            ..LIM
        };
        assert_eq!(
            errno(check(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple)),
            EINVAL
        );
        assert_eq!(
            errno(check(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &LIM)),
            EINVAL
        );
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let ro = Limits {
            read_only: true,
            ..LIM
        };
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(errno(check(&req(cmd, 0, 0, 512), &ro)), EPERM);
        }
        // Even out of range: read-only is reported first.
        assert_eq!(errno(check(&req(CMD_WRITE, 0, 1 << 30, 512), &ro)), EPERM);
        assert_eq!(check(&req(CMD_READ, 0, 0, 512), &ro), Verdict::Run);
        assert_eq!(check(&req(CMD_FLUSH, 0, 0, 0), &ro), Verdict::Run);
    }

    #[test]
    fn lengths() {
        assert_eq!(errno(check(&req(CMD_READ, 0, 0, 0), &LIM)), EINVAL);
        assert_eq!(errno(check(&req(CMD_TRIM, 0, 0, 0), &LIM)), EINVAL);
        let small = Limits {
            max_payload: 4096,
            size: 1 << 30,
            ..LIM
        };
        assert_eq!(errno(check(&req(CMD_READ, 0, 0, 4097), &small)), EINVAL);
        assert_eq!(errno(check(&req(CMD_WRITE, 0, 0, 4097), &small)), EINVAL);
        // Only READ and WRITE carry data: a long TRIM is fine.
        assert_eq!(check(&req(CMD_TRIM, 0, 0, 1 << 20), &small), Verdict::Run);
    }

    #[test]
    fn range_errno_depends_on_the_command() {
        let end = 1u64 << 20;
        assert_eq!(errno(check(&req(CMD_READ, 0, end, 1), &LIM)), EINVAL);
        assert_eq!(errno(check(&req(CMD_WRITE, 0, end - 1, 2), &LIM)), ENOSPC);
        assert_eq!(
            errno(check(&req(CMD_WRITE_ZEROES, 0, end, 1), &LIM)),
            ENOSPC
        );
        assert_eq!(errno(check(&req(CMD_TRIM, 0, end, 1), &LIM)), EINVAL);
        assert_eq!(errno(check(&req(CMD_CACHE, 0, end, 1), &LIM)), EINVAL);
        // offset + len overflows u64.
        assert_eq!(errno(check(&req(CMD_READ, 0, u64::MAX, 1), &LIM)), EINVAL);
        assert_eq!(errno(check(&req(CMD_WRITE, 0, u64::MAX, 1), &LIM)), ENOSPC);
    }

    #[test]
    fn block_status_needs_a_context() {
        let none = Limits {
            meta_context: false,
            ..LIM
        };
        assert_eq!(errno(check(&req(CMD_BLOCK_STATUS, 0, 0, 1), &none)), EINVAL);
        assert_eq!(
            check(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1), &LIM),
            Verdict::Run
        );
    }
}
