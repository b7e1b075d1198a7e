//! Where a migration goes: `unix:PATH` (the same host, or a socket a tunnel
//! forwards) or `tcp:HOST:PORT`. Either way the stream is a plain file descriptor,
//! so that guest RAM is read and written with vm-memory's volatile copies.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::MigrationError;
use crate::control::signals::StopSignals;

/// A migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp(String),
}

/// How long a stalled peer is waited for before the migration fails.
pub const STALL: Duration = Duration::from_secs(120);

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl Address {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, MigrationError> {
        let bad = || MigrationError::BadAddress(s.to_string());
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(bad());
            }
            return Ok(Address::Unix(PathBuf::from(p)));
        }
        let hp = s.strip_prefix("tcp:").ok_or_else(bad)?;
        let (host, port) = hp.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(Address::Tcp(hp.to_string()))
    }

    fn socket_err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
        let address = self.to_string();
        move |source| MigrationError::Socket {
            what,
            address,
            source,
        }
    }

    /// The same address with a TCP host name looked up (the first of its addresses).
    pub fn resolve(&self) -> Result<Self, MigrationError> {
        match self {
            Address::Unix(_) => Ok(self.clone()),
            Address::Tcp(a) => a
                .to_socket_addrs()
                .map_err(self.socket_err("look up"))?
                .next()
                .map(|s| Address::Tcp(s.to_string()))
                .ok_or_else(|| {
                    self.socket_err("look up")(std::io::Error::other("the name has no address"))
                }),
        }
    }

    /// Connects to a listening receiver (a TCP one by numeric address); the stream
    /// times out after [`STALL`].
    pub fn connect(&self) -> Result<File, MigrationError> {
        let fd: OwnedFd = match self {
            Address::Unix(p) => {
                let s = UnixStream::connect(p).map_err(self.socket_err("connect to"))?;
                s.set_read_timeout(Some(STALL))
                    .and_then(|()| s.set_write_timeout(Some(STALL)))
                    .map_err(self.socket_err("connect to"))?;
                s.into()
            }
            Address::Tcp(a) => {
                // No name lookups in the VMM (its filter has no room for a resolver's
                // calls): `hpcvm ctl` resolves names first (Address::resolve).
                let addr: SocketAddr = a.parse().map_err(|_| {
                    self.socket_err("connect to")(std::io::Error::other(
                        "give the receiver as a numeric address (hpcvm ctl resolves host \
                         names)",
                    ))
                })?;
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .map_err(self.socket_err("connect to"))?;
                s.set_nodelay(true)
                    .and_then(|()| s.set_read_timeout(Some(STALL)))
                    .and_then(|()| s.set_write_timeout(Some(STALL)))
                    .map_err(self.socket_err("connect to"))?;
                s.into()
            }
        };
        Ok(File::from(fd))
    }

    /// Starts listening (a Unix socket file is created here and removed when the
    /// listener goes).
    pub fn listen(&self) -> Result<Listener, MigrationError> {
        let inner = match self {
            Address::Unix(p) => Inner::Unix(
                UnixListener::bind(p).map_err(self.socket_err("listen on"))?,
                p.clone(),
            ),
            Address::Tcp(a) => {
                Inner::Tcp(TcpListener::bind(a).map_err(self.socket_err("listen on"))?)
            }
        };
        Ok(Listener {
            inner,
            address: self.clone(),
        })
    }
}

enum Inner {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A listening receiver, for one sender.
pub struct Listener {
    inner: Inner,
    address: Address,
}

impl Listener {
    /// The address it listens on (with the port the system chose for `tcp:H:0`).
    pub fn local(&self) -> String {
        match &self.inner {
            Inner::Unix(_, p) => format!("unix:{}", p.display()),
            Inner::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| self.address.to_string(), |a| format!("tcp:{a}")),
        }
    }

    /// Waits for the sender; SIGTERM, SIGINT or SIGHUP (when `signals` watches
    /// them) ends the wait. The stream times out after [`STALL`].
    pub fn accept(&self, signals: Option<&StopSignals>) -> Result<File, MigrationError> {
        let err = self.address.socket_err("accept on");
        let lfd = match &self.inner {
            Inner::Unix(l, _) => l.as_fd().as_raw_fd(),
            Inner::Tcp(l) => l.as_fd().as_raw_fd(),
        };
        loop {
            let mut fds = vec![libc::pollfd {
                fd: lfd,
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(s) = signals {
                fds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a live array of `fds.len()` pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err(e));
            }
            if fds.get(1).is_some_and(|f| f.revents != 0) {
                if let Some(sig) = signals.and_then(StopSignals::next) {
                    if crate::control::signals::STOP_SIGNALS.contains(&sig) {
                        return Err(MigrationError::Interrupted(crate::control::signals::name(
                            sig,
                        )));
                    }
                }
                continue;
            }
            if fds[0].revents != 0 {
                break;
            }
        }
        let fd: OwnedFd = match &self.inner {
            Inner::Unix(l, _) => {
                let (s, _) = l.accept().map_err(err)?;
                s.set_read_timeout(Some(STALL))
                    .and_then(|()| s.set_write_timeout(Some(STALL)))
                    .map_err(self.address.socket_err("accept on"))?;
                s.into()
            }
            Inner::Tcp(l) => {
                let (s, _) = l.accept().map_err(err)?;
                s.set_nodelay(true)
                    .and_then(|()| s.set_read_timeout(Some(STALL)))
                    .and_then(|()| s.set_write_timeout(Some(STALL)))
                    .map_err(self.address.socket_err("accept on"))?;
                s.into()
            }
        };
        Ok(File::from(fd))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Inner::Unix(_, p) = &self.inner {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_are_named() {
        assert_eq!(
            Address::parse("unix:/run/m.sock").unwrap(),
            Address::Unix("/run/m.sock".into())
        );
        assert_eq!(
            Address::parse("tcp:node7:4444").unwrap(),
            Address::Tcp("node7:4444".into())
        );
        assert_eq!(
            Address::parse("tcp:[::1]:4444").unwrap(),
            Address::Tcp("[::1]:4444".into())
        );
        let resolved = Address::parse("tcp:localhost:4444")
            .unwrap()
            .resolve()
            .unwrap()
            .to_string();
        assert!(
            ["tcp:127.0.0.1:4444", "tcp:[::1]:4444"].contains(&resolved.as_str()),
            "{resolved}"
        );
        let e = Address::parse("tcp:localhost:4444")
            .unwrap()
            .connect()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("give the receiver as a numeric address"),
            "{e}"
        );
        for bad in [
            "",
            "unix:",
            "node7:4444",
            "tcp:node7",
            "tcp::4444",
            "tcp:h:99999",
        ] {
            let e = Address::parse(bad).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("Invalid migration address '{bad}': use unix:PATH or tcp:HOST:PORT")
            );
        }
    }
}
