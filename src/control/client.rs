//! The client side of the control protocol: one request, one response, over the socket of a
//! running `serve` (used by `cryptnbd ctl` and by the volume commands that find a volume held by
//! a server).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::{parse_response, ControlError, Request};

/// Why a call got no answer, or got an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("cannot reach the control socket {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the control socket failed")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Refused(#[from] ControlError),
}

/// How long one call may take (a detach waits for requests in flight and a flush).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends `req` to the server at `path` and returns its result.
pub fn call(path: &Path, req: &Request) -> Result<Value, CallError> {
    let s = UnixStream::connect(path).map_err(|source| CallError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(CALL_TIMEOUT))?;
    s.set_write_timeout(Some(CALL_TIMEOUT))?;
    let mut w = s.try_clone()?;
    writeln!(w, "{}", req.to_line())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(CallError::Protocol(
            "the server closed the control connection without answering".into(),
        ));
    }
    Ok(parse_response(line.as_bytes()).map_err(CallError::Protocol)??)
}
