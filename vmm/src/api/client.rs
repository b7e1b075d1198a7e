//! `hpcvm ctl`: sends one request to a running VMM and prints the response.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::protocol::{request_line, Command};

/// How long to wait for the VMM's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the answer to `migrate`.
pub const MIGRATE_REPLY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Sends `command` to the VMM at `socket`; returns the response line and whether it
/// says `"ok": true`.
pub fn call(socket: &Path, command: &Command) -> io::Result<(String, bool)> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to the API socket {}: {e}", socket.display()),
        )
    })?;
    // A migration answers when it is done: each of its steps times out itself.
    let timeout = match command {
        Command::Migrate { .. } => MIGRATE_REPLY_TIMEOUT,
        _ => REPLY_TIMEOUT,
    };
    s.set_read_timeout(Some(timeout))?;
    exchange(&mut s, command)
}

/// Writes `command` on a connected stream and reads the one-line answer.
fn exchange(s: &mut UnixStream, command: &Command) -> io::Result<(String, bool)> {
    // A VMM that refuses the client (wrong uid, too many clients) answers and closes
    // at once, possibly before the request is written: the write then fails with
    // EPIPE while the refusal already waits in the receive queue. Read it anyway.
    let mut write_error = None;
    if let Err(e) = s.write_all(&request_line(1, command)) {
        match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => write_error = Some(e),
            _ => return Err(e),
        }
    }
    let mut line = String::new();
    let read = BufReader::new(&*s).read_line(&mut line);
    if line.is_empty() {
        // Nothing came back: the write error, if any, is the better explanation.
        if let Some(e) = write_error {
            return Err(e);
        }
        read?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_sent_before_the_request_is_still_read() {
        let (mut client, mut vmm) = UnixStream::pair().unwrap();
        vmm.write_all(b"{\"ok\":false,\"error\":\"refused\"}\n")
            .unwrap();
        drop(vmm);
        let (line, ok) = exchange(&mut client, &Command::Status).unwrap();
        assert!(!ok);
        assert_eq!(line, r#"{"ok":false,"error":"refused"}"#);
    }

    #[test]
    fn a_vmm_that_hangs_up_silently_is_an_error() {
        let (mut client, vmm) = UnixStream::pair().unwrap();
        drop(vmm);
        let e = exchange(&mut client, &Command::Status).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
}
