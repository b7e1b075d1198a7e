//! The job's stdout and stderr on virtio-console ports, found by the names the host
//! gave them; the job writes to them directly, with no relay through the agent.
//! Its stdin, when the host forwards one, is a port too, read directly.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hpcvm_agent::StdioPorts;

/// Where the virtio_console driver lists its ports, one directory each.
const PORTS_DIR: &str = "/sys/class/virtio-ports";
/// Overrides how long to wait for the ports to appear, in milliseconds.
const WAIT_VAR: &str = "HPCVM_AGENT_PORT_WAIT_MS";
/// How long to wait for the ports to appear unless `WAIT_VAR` says otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// The `/dev` node of the port called `name` in `sys_dir` (a `virtio-ports` class dir).
pub fn find_port(sys_dir: &Path, name: &str) -> Option<PathBuf> {
    if name.is_empty() {
        return None;
    }
    std::fs::read_dir(sys_dir)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let got = std::fs::read_to_string(entry.path().join("name")).ok()?;
            (got.trim_end_matches('\n') == name).then(|| Path::new("/dev").join(entry.file_name()))
        })
}

/// How long to wait for the ports: `HPCVM_AGENT_PORT_WAIT_MS`, else 5 s.
fn port_wait() -> Duration {
    std::env::var(WAIT_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(DEFAULT_WAIT, Duration::from_millis)
}

/// Opens the port called `name` for writing once it shows up, until `deadline`.
fn open_port(name: &str, deadline: Instant, wait: Duration) -> Result<OwnedFd, String> {
    open_port_for(name, deadline, wait, true)
}

/// The job's stdin port, if the host forwards one and it shows up (else the job
/// gets /dev/null, logged).
pub fn open_stdin(ch: &mut File, ports: &StdioPorts) -> Option<OwnedFd> {
    let name = ports.stdin.as_deref()?;
    let wait = port_wait();
    match open_port_for(name, Instant::now() + wait, wait, false) {
        Ok(fd) => Some(fd),
        Err(why) => {
            crate::log(ch, &format!("{why}: the job's stdin is /dev/null"));
            None
        }
    }
}

fn open_port_for(
    name: &str,
    deadline: Instant,
    wait: Duration,
    write: bool,
) -> Result<OwnedFd, String> {
    let dev =
        crate::wait_until(deadline, || find_port(Path::new(PORTS_DIR), name)).ok_or_else(|| {
            format!("no virtio-console port named {name:?} in {PORTS_DIR} after {wait:?}")
        })?;
    let port = OpenOptions::new()
        .write(write)
        .read(!write)
        .custom_flags(libc::O_CLOEXEC)
        .open(&dev)
        .map_err(|e| format!("port {name:?}: {}: {e}", dev.display()))?;
    Ok(port.into())
}

/// Opens both ports; the same name twice gives one port for both streams.
fn open_both(ports: &StdioPorts, wait: Duration) -> Result<(OwnedFd, OwnedFd), String> {
    let deadline = Instant::now() + wait;
    let stdout = open_port(&ports.stdout, deadline, wait)?;
    let stderr = if ports.stderr == ports.stdout {
        stdout
            .try_clone()
            .map_err(|e| format!("port {:?}: dup: {e}", ports.stdout))?
    } else {
        open_port(&ports.stderr, deadline, wait)?
    };
    Ok((stdout, stderr))
}

/// The job's stdout and stderr ports, or `None` (logged) to relay both over pipes.
pub fn open_ports(ch: &mut File, ports: &StdioPorts) -> Option<(OwnedFd, OwnedFd)> {
    match open_both(ports, port_wait()) {
        Ok(fds) => {
            crate::log(
                ch,
                &format!(
                    "job stdout on port {:?}, stderr on port {:?}",
                    ports.stdout, ports.stderr
                ),
            );
            Some(fds)
        }
        Err(why) => {
            crate::log(
                ch,
                &format!("{why}: relaying stdout and stderr over the channel instead"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hpcvm-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn ports_are_found_by_name() {
        let sys = scratch("ports");
        for (port, name) in [
            ("vport0p0", ""),
            ("vport0p1", "hpcvm.stdout\n"),
            ("vport0p2", "hpcvm.stderr\n"),
            ("vport0p3", "hpcvm.stderr.old\n"),
        ] {
            std::fs::create_dir(sys.join(port)).unwrap();
            std::fs::write(sys.join(port).join("name"), name).unwrap();
        }
        std::fs::create_dir(sys.join("vport0p4")).unwrap();
        assert_eq!(
            find_port(&sys, "hpcvm.stdout"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(
            find_port(&sys, "hpcvm.stderr"),
            Some(PathBuf::from("/dev/vport0p2"))
        );
        assert_eq!(find_port(&sys, "hpcvm"), None);
        assert_eq!(find_port(&sys, ""), None);
        assert_eq!(find_port(&sys.join("missing"), "hpcvm.stdout"), None);
        std::fs::remove_dir_all(&sys).unwrap();
    }
}
