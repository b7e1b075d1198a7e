//! The control socket's listening side: creating the socket file safely, accepting
//! clients of the right uid, and serving their requests from the control loop.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::Value;
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::protocol::{error_line, ok_line, parse_request, Command, MAX_LINE};
pub use limits::REQUEST_TIMEOUT;
use limits::{longest_idle, Clock, Progress};

mod limits;
#[cfg(test)]
mod tests;

/// Most clients connected at once; at the cap the one idle longest is closed to
/// make room, so a new connection (the controller's `destroy`) is always served.
pub const MAX_CLIENTS: usize = 64;
/// Most response bytes kept for a client that does not read them; past this it is
/// disconnected.
const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Most connections accepted in one wake-up, and most bytes read from one client:
/// epoll is level-triggered, so the rest waits for the next turn of the loop and no
/// client can hold the control thread.
const ACCEPT_BUDGET: usize = 2 * MAX_CLIENTS;
const READ_BUDGET: usize = 16 * 4096;
/// How long accepting pauses when the process is out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

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
        // Nobody may connect with looser permissions than 0600: the socket is
        // bound, made 0600, and only then listens (a connect before that is
        // refused), so no process-wide umask is touched.
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .map_err(create)?;
        socket
            .bind(&socket2::SockAddr::unix(path).map_err(create)?)
            .map_err(create)?;
        let cleanup = |e| {
            let _ = std::fs::remove_file(path);
            create(e)
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(cleanup)?;
        socket.listen(128).map_err(cleanup)?;
        let listener = UnixListener::from(OwnedFd::from(socket));
        listener.set_nonblocking(true).map_err(cleanup)?;
        let meta = std::fs::metadata(path).map_err(cleanup)?;
        crate::fatal::remove_at_exit(path);
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
            timer: crate::host::nonblocking_timer()?,
            armed: None,
            request_timeout: REQUEST_TIMEOUT,
            accept_paused_until: None,
        })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        crate::fatal::keep(&self.path);
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
    /// Complete lines wait in `input` for a later turn.
    pending: bool,
    clock: Clock,
}

impl Client {
    /// Lines wait for a turn and no unread replies hold them back.
    fn can_go_on(&self) -> bool {
        self.pending && self.output.is_empty()
    }
}

/// Accepts clients and serves their requests; an event-manager subscriber.
pub struct ApiServer {
    listener: UnixListener,
    clients: HashMap<RawFd, Client>,
    handler: Rc<RefCell<dyn Handler>>,
    uid: u32,
    /// Wakes the loop at the earliest client deadline or accept retry.
    timer: TimerFd,
    /// What `timer` is set for.
    armed: Option<Instant>,
    request_timeout: Duration,
    /// Accepting paused (out of descriptors) until then.
    accept_paused_until: Option<Instant>,
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
    /// The same server with another request timeout (tests use a short one).
    #[cfg(test)]
    fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        let mut freed_a_descriptor = false;
        // At the cap one connection per turn, so that one just accepted (the
        // controller's destroy) is read before a newer one could evict it.
        let room = MAX_CLIENTS.saturating_sub(self.clients.len()).max(1);
        for _ in 0..room.min(ACCEPT_BUDGET) {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE and friends): close the longest-idle
                    // client once to make room, else stop accepting for a moment
                    // rather than spin on a listener that stays readable.
                    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    if out_of_fds && !freed_a_descriptor && self.evict_longest_idle(ops) {
                        freed_a_descriptor = true;
                        continue;
                    }
                    self.pause_accepting(ops);
                    return;
                }
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
                self.evict_longest_idle(ops);
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
                    pending: false,
                    clock: Clock::new(Instant::now()),
                },
            );
        }
    }

    /// Closes the client that has gone longest without a complete request; false if
    /// there is none.
    fn evict_longest_idle(&mut self, ops: &mut EventOps) -> bool {
        let idle = self
            .clients
            .iter()
            .map(|(&fd, c)| (fd, c.clock.last_active()));
        let Some(fd) = longest_idle(idle) else {
            return false;
        };
        let why = "closed to make room for a new client: this one was idle longest";
        self.close(fd, ops, Some(why));
        true
    }

    /// Forgets client `fd`, telling it `why` if nothing else waits to be written.
    fn close(&mut self, fd: RawFd, ops: &mut EventOps, why: Option<&str>) {
        let Some(mut c) = self.clients.remove(&fd) else {
            return;
        };
        let _ = ops.remove(Events::empty(&c.stream));
        if let Some(why) = why.filter(|_| c.output.is_empty()) {
            // Best effort and non-blocking: a full socket just misses the reason.
            let _ = c.stream.write(&error_line(&Value::Null, why));
        }
    }

    fn pause_accepting(&mut self, ops: &mut EventOps) {
        if self.accept_paused_until.is_none()
            && ops
                .remove(Events::new(&self.listener, EventSet::IN))
                .is_ok()
        {
            self.accept_paused_until = Some(Instant::now() + ACCEPT_RETRY);
        }
    }

    /// The timer fired: closes clients past their deadline, resumes accepting.
    fn timer_fired(&mut self, ops: &mut EventOps) {
        // Non-blocking: a timer re-armed since epoll saw it just says EAGAIN.
        let _ = self.timer.wait();
        self.armed = None;
        let now = Instant::now();
        let timeout = self.request_timeout;
        let late: Vec<(RawFd, bool)> = self
            .clients
            .iter()
            .filter(|(_, c)| c.clock.deadline(timeout).is_some_and(|d| d <= now))
            .map(|(&fd, c)| (fd, c.clock.owes_rest_of_line()))
            .collect();
        let why = format!(
            "request line not completed within {} s; closing",
            timeout.as_secs_f64()
        );
        for (fd, partial) in late {
            self.close(fd, ops, partial.then_some(why.as_str()));
        }
        if self.accept_paused_until.is_some_and(|t| t <= now)
            && ops.add(Events::new(&self.listener, EventSet::IN)).is_ok()
        {
            self.accept_paused_until = None;
        }
        let waiting: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| c.can_go_on())
            .map(|(&fd, _)| fd)
            .collect();
        for fd in waiting {
            if !self.serve(fd, EventSet::empty(), ops) {
                self.close(fd, ops, None);
            }
        }
    }

    /// Sets the timer for the earliest deadline, if it changed.
    fn rearm(&mut self) {
        let timeout = self.request_timeout;
        let next = self
            .clients
            .values()
            .filter_map(|c| c.clock.deadline(timeout))
            .chain(self.accept_paused_until)
            // Lines waiting for their turn: at once (the timer's 1 ms).
            .chain(
                self.clients
                    .values()
                    .any(Client::can_go_on)
                    .then(Instant::now),
            )
            .min();
        if next == self.armed {
            return;
        }
        let set = match next {
            // Never zero, which would disarm it; the deadline's clients go at once.
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                self.timer.reset(left.max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        // A timer that cannot be set leaves `armed` stale so the next event retries.
        if set.is_ok() {
            self.armed = next;
        }
    }

    /// Reads what the client sent, answers complete lines, flushes; false to drop it.
    fn serve(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) -> bool {
        let handler = self.handler.clone();
        let Some(c) = self.clients.get_mut(&fd) else {
            return true;
        };
        let mut progress = Progress::default();
        let mut turn = Turn::new();
        // Lines left from an earlier turn first, and nothing new read until they
        // are answered: the socket's own buffer holds the client back.
        if c.pending && c.output.is_empty() {
            c.pending = answer_lines(c, 0, &handler, &mut turn, &mut progress);
        }
        if events.contains(EventSet::IN) && !c.closing && !c.pending {
            let mut buf = [0u8; 4096];
            let mut budget = READ_BUDGET;
            while budget > 0 {
                let n = match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.closing = true;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                };
                budget = budget.saturating_sub(n);
                // What the input held has no newline (or it would still be
                // pending), so only the new bytes are searched: a line trickled in
                // small pieces is not rescanned.
                let old = c.input.len();
                c.input.extend_from_slice(&buf[..n]);
                if answer_lines(c, old, &handler, &mut turn, &mut progress) {
                    c.pending = true;
                    break;
                }
                if c.input.len() > MAX_LINE {
                    c.output.extend_from_slice(&error_line(
                        &Value::Null,
                        &format!("request line longer than {MAX_LINE} bytes; closing"),
                    ));
                    c.input.clear();
                    c.closing = true;
                    break;
                }
                if c.output.len() > MAX_PENDING_OUTPUT {
                    return false;
                }
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
                    progress.wrote |= n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if c.output.len() > MAX_PENDING_OUTPUT {
            return false;
        }
        if c.output.is_empty()
            && !c.pending
            && (c.closing || events.contains(EventSet::READ_HANG_UP))
        {
            return false;
        }
        progress.partial = !c.input.is_empty() && !c.closing && !c.pending;
        progress.backlog = !c.output.is_empty();
        c.clock.update(Instant::now(), progress);
        let want = if c.output.is_empty() {
            EventSet::IN | EventSet::READ_HANG_UP
        } else {
            EventSet::OUT
        };
        ops.modify(Events::new(&c.stream, want)).is_ok()
    }
}

/// How much of the control thread one client may take per turn of the loop: a few
/// requests, or a few milliseconds once one was answered (a `pause` may wait for
/// the vCPUs), so that other clients, signals and `destroy` are served in between.
const REQUESTS_PER_TURN: usize = 16;
const TIME_PER_TURN: Duration = Duration::from_millis(20);

/// One client's share of a turn.
struct Turn {
    started: Instant,
    answered: usize,
}

impl Turn {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            answered: 0,
        }
    }

    fn spent(&self) -> bool {
        self.answered >= REQUESTS_PER_TURN
            || (self.answered > 0 && self.started.elapsed() >= TIME_PER_TURN)
    }
}

/// Answers the complete lines in `c.input` (the first newline at or after `from`)
/// while `turn` lasts; true if complete lines are left for a later turn.
fn answer_lines(
    c: &mut Client,
    from: usize,
    handler: &Rc<RefCell<dyn Handler>>,
    turn: &mut Turn,
    progress: &mut Progress,
) -> bool {
    let newline = |b: &u8| *b == b'\n';
    let mut end = c.input[from..].iter().position(newline).map(|i| from + i);
    while let Some(nl) = end {
        if turn.spent() {
            return true;
        }
        let line: Vec<u8> = c.input.drain(..=nl).collect();
        end = c.input.iter().position(newline);
        let line = &line[..nl];
        progress.lines += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        progress.requests += 1;
        turn.answered += 1;
        let reply = match parse_request(line) {
            Ok(req) => match handler.borrow_mut().handle(&req.command) {
                Ok(fields) => ok_line(&req.id, fields),
                Err(e) => error_line(&req.id, &e),
            },
            Err(bad) => error_line(&bad.id, &bad.error),
        };
        c.output.extend_from_slice(&reply);
    }
    false
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.listener, EventSet::IN));
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_all(ops);
        } else if fd == self.timer.as_raw_fd() {
            self.timer_fired(ops);
        } else if !self.serve(fd, events.event_set(), ops) {
            self.close(fd, ops, None);
        }
        self.rearm();
    }
}
