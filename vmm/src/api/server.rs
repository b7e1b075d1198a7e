//! The control socket's listening side: creating the socket file safely, accepting
//! clients of the right uid, and serving their requests from the control loop.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::Value;
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use super::protocol::{error_line, ok_line, parse_request, Command, MAX_LINE};

/// Most clients connected at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 64;
/// Most response bytes kept for a client that does not read them; past this it is
/// disconnected.
const MAX_PENDING_OUTPUT: usize = 1 << 20;

/// Errors creating the control socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// Another process answers on the path.
    #[error("Another process is listening on the API socket {0}; pick another path or stop it")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// bind/listen/chmod failed.
    #[error("Cannot create the API socket {path}: {source}")]
    Create {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Something that answers control requests (the VMM's controller).
pub trait Handler {
    /// Carries out `command`; the value (an object) becomes the response's fields.
    fn handle(&mut self, command: &Command) -> Result<Value, String>;
}

/// The socket file: created 0600, removed on drop if it is still ours.
pub struct ApiSocket {
    path: PathBuf,
    listener: UnixListener,
    ino: (u64, u64),
}

impl ApiSocket {
    /// Creates the socket at `path`, replacing a stale socket file nobody listens on.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let create = |source| ApiError::Create {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::NotASocket(path.to_path_buf()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(create)?;
                }
                Err(e) => return Err(create(e)),
            }
        }
        // The file must never exist with looser permissions, even for an instant:
        // narrow the umask around bind (the VMM is single-threaded here).
        // SAFETY: umask has no memory-safety preconditions.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above; restores the caller's umask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(create)?;
        let cleanup = |e| {
            let _ = std::fs::remove_file(path);
            create(e)
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(cleanup)?;
        listener.set_nonblocking(true).map_err(cleanup)?;
        let meta = std::fs::metadata(path).map_err(cleanup)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            ino: (meta.dev(), meta.ino()),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A server answering on this socket with `handler`.
    pub fn server(&self, handler: Rc<RefCell<dyn Handler>>) -> io::Result<ApiServer> {
        Ok(ApiServer {
            listener: self.listener.try_clone()?,
            clients: HashMap::new(),
            handler,
            // SAFETY: getuid cannot fail.
            uid: unsafe { libc::getuid() },
        })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        // Remove the file only if it is still the one we created.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    closing: bool,
}

/// Accepts clients and serves their requests; an event-manager subscriber.
pub struct ApiServer {
    listener: UnixListener,
    clients: HashMap<RawFd, Client>,
    handler: Rc<RefCell<dyn Handler>>,
    uid: u32,
}

/// The uid of the process at the other end of `s`.
fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

impl ApiServer {
    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // EMFILE and friends: leave the rest queued for the next wake-up.
                Err(_) => return,
            };
            let refuse = |mut s: UnixStream, why: &str| {
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(&error_line(&Value::Null, why));
            };
            match peer_uid(&stream) {
                Ok(uid) if uid == self.uid || uid == 0 => {}
                Ok(uid) => {
                    refuse(
                        stream,
                        &format!("refused: uid {uid} may not control this VM"),
                    );
                    continue;
                }
                Err(_) => continue,
            }
            if self.clients.len() >= MAX_CLIENTS {
                refuse(
                    stream,
                    &format!("refused: {MAX_CLIENTS} clients already connected"),
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err()
                || ops
                    .add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP))
                    .is_err()
            {
                continue;
            }
            self.clients.insert(
                stream.as_raw_fd(),
                Client {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    closing: false,
                },
            );
        }
    }

    /// Reads what the client sent, answers complete lines, flushes; false to drop it.
    fn serve(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) -> bool {
        let handler = self.handler.clone();
        let Some(c) = self.clients.get_mut(&fd) else {
            return true;
        };
        if events.contains(EventSet::IN) && !c.closing {
            let mut buf = [0u8; 4096];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.closing = true;
                        break;
                    }
                    Ok(n) => c.input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
                if c.input.len() > MAX_LINE && !c.input[..=MAX_LINE].contains(&b'\n') {
                    break;
                }
            }
            while let Some(nl) = c.input.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = c.input.drain(..=nl).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let reply = match parse_request(line) {
                    Ok(req) => match handler.borrow_mut().handle(&req.command) {
                        Ok(fields) => ok_line(&req.id, fields),
                        Err(e) => error_line(&req.id, &e),
                    },
                    Err(bad) => error_line(&bad.id, &bad.error),
                };
                c.output.extend_from_slice(&reply);
            }
            if c.input.len() > MAX_LINE {
                c.output.extend_from_slice(&error_line(
                    &Value::Null,
                    &format!("request line longer than {MAX_LINE} bytes; closing"),
                ));
                c.input.clear();
                c.closing = true;
            }
        }
        if events.contains(EventSet::ERROR) {
            return false;
        }
        // Flush what we can; keep the rest for EPOLLOUT.
        while !c.output.is_empty() {
            match c.stream.write(&c.output) {
                Ok(n) => {
                    c.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if c.output.len() > MAX_PENDING_OUTPUT {
            return false;
        }
        if c.output.is_empty() && (c.closing || events.contains(EventSet::READ_HANG_UP)) {
            return false;
        }
        let want = if c.output.is_empty() {
            EventSet::IN | EventSet::READ_HANG_UP
        } else {
            EventSet::OUT
        };
        ops.modify(Events::new(&c.stream, want)).is_ok()
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.listener, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_all(ops);
        } else if !self.serve(fd, events.event_set(), ops) {
            if let Some(c) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::empty(&c.stream));
            }
        }
    }
}
