//! `hpcvm ctl`: sends one request to a running VMM and prints the response.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::protocol::{request_line, Command};

/// How long to wait for the VMM's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `command` to the VMM at `socket`; returns the response line and whether it
/// says `"ok": true`.
pub fn call(socket: &Path, command: &Command) -> io::Result<(String, bool)> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to the API socket {}: {e}", socket.display()),
        )
    })?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    s.write_all(&request_line(1, command))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the VMM closed the connection without answering",
        ));
    }
    let ok = serde_json::from_str::<Value>(&line)
        .ok()
        .and_then(|v| v.get("ok").and_then(Value::as_bool))
        .unwrap_or(false);
    Ok((line.trim_end().to_string(), ok))
}
