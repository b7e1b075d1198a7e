//! hpcvm-agent: PID 1 of an hpcvm guest. Mounts the usual filesystems, takes the job
//! from the host over COM2, runs it, streams its output, forwards the host's signals
//! to it, reaps every orphan, reports how the job ended, then syncs and resets the VM.
//!
//! With `JobSpec::stdio` the job writes its stdout and stderr straight to
//! virtio-console ports (see `stdio`); with `JobSpec::root` it runs inside a disk image
//! (see `rootfs`), or the image's own init replaces the agent.
//!
//! Outside a VM (for tests) `hpcvm-agent --channel-fd N` speaks the protocol on fd N
//! and skips mounting and rebooting (and refuses image roots).

mod rootfs;
mod stdio;

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hpcvm_agent::{frame, kind, Decoder, JobError, JobExit, JobSpec};

/// The guest's second serial port, the host channel.
const CHANNEL_TTY: &str = "/dev/ttyS1";
/// How long the final sync may take before the VM resets anyway.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to keep draining output after the job exited while something else (a
/// background child) still holds its pipes open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);
/// How often to look again for a device that has not shown up yet.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let test_fd = match args.get(1).map(String::as_str) {
        Some("--channel-fd") => args.get(2).and_then(|s| s.parse::<RawFd>().ok()),
        _ => None,
    };
    let in_vm = test_fd.is_none();
    if in_vm {
        if std::process::id() != 1 {
            eprintln!("hpcvm-agent: runs as PID 1 inside an hpcvm guest (or with --channel-fd N)");
            std::process::exit(2);
        }
        mount_filesystems();
        bring_up_host_identity();
    }
    let result = match test_fd {
        // SAFETY: the caller handed us this descriptor to own.
        Some(fd) => serve(unsafe { File::from_raw_fd(fd) }, false),
        None => open_channel().and_then(|ch| serve(ch, true)),
    };
    if let Err(e) = &result {
        eprintln!("hpcvm-agent: {e}");
    }
    if in_vm {
        power_off();
    }
    std::process::exit(i32::from(result.is_err()));
}

/// Mounts proc, sys, dev, pts, shm, tmp, run and a hugetlbfs; what exists is kept.
fn mount_filesystems() {
    let mounts: [(&str, &str, &str, &str); 8] = [
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", ""),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
        ("tmpfs", "/run", "tmpfs", "mode=755"),
        ("hugetlbfs", "/dev/hugepages", "hugetlbfs", "mode=1777"),
    ];
    for (src, target, fstype, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
        let (src, tgt, fs, data) = (c(src), c(target), c(fstype), c(data));
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                fs.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                eprintln!("hpcvm-agent: mount {target} ({fstype}): {e}");
            }
        }
    }
}

/// Names the guest and brings up the loopback interface (the kernel gives it
/// 127.0.0.1 as it comes up), as any Linux init does: Open MPI's PMIx server, for
/// one, listens on loopback even when every rank is in this guest.
fn bring_up_host_identity() {
    let name = hpcvm_agent::GUEST_HOSTNAME;
    // SAFETY: the name is a valid buffer of the given length.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        eprintln!("hpcvm-agent: sethostname: {}", io::Error::last_os_error());
    }
    if let Err(e) = loopback_up() {
        eprintln!("hpcvm-agent: bringing up lo: {e}");
    }
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; an all-zero one is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq passed, which
    // lives across both calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Opens COM2 in raw mode: every byte of a frame must pass untouched.
fn open_channel() -> io::Result<File> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(CHANNEL_TTY)
        .map_err(|e| io::Error::new(e.kind(), format!("{CHANNEL_TTY}: {e}")))?;
    // SAFETY: termios is plain data, filled by tcgetattr before use.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and termios pointer.
    if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: valid termios pointer. (No baud rate: the UART is emulated, and the
    // versioned cfsetspeed symbol does not link statically.)
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    // SAFETY: valid fd and termios pointer.
    if unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tty)
}

fn send(ch: &mut File, k: u8, payload: &[u8]) -> io::Result<()> {
    ch.write_all(&frame(k, payload))
}

fn log(ch: &mut File, msg: &str) {
    let _ = send(ch, kind::LOG, msg.as_bytes());
}

/// Calls `probe` every 10 ms until it finds something or `deadline` has passed.
fn wait_until<T>(deadline: Instant, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::sleep(left.min(PROBE_INTERVAL));
    }
}

/// Speaks the protocol on `ch` until the job has been run and reported (or the
/// image's init has taken over). `in_vm`: the agent is PID 1 of a guest.
fn serve(mut ch: File, in_vm: bool) -> io::Result<()> {
    send(&mut ch, kind::READY, env!("CARGO_PKG_VERSION").as_bytes())?;
    let mut dec = Decoder::default();
    let spec = receive_spec(&mut ch, &mut dec)?;
    if in_vm && !Path::new(hpcvm_agent::UNPACKED_MARKER).exists() {
        return report(
            &mut ch,
            Err(JobError {
                error: "the job's files did not all unpack into guest RAM (the kernel said \
                        \"Initramfs unpacking failed\"): give the guest more --memory, or \
                        pass big files with --share or --disk"
                    .into(),
                status: hpcvm_agent::INCOMPLETE_INITRAMFS_STATUS,
            }),
        );
    }
    if let Some(root) = &spec.root {
        if let Err(err) = rootfs::enter_image(root, in_vm) {
            return report(&mut ch, Err(err));
        }
    }
    // Shares go into whichever root the job (or the image's init) will see.
    if let Err(err) = rootfs::mount_shares(&spec.mounts, in_vm) {
        return report(&mut ch, Err(err));
    }
    if spec.root.as_ref().is_some_and(|r| r.boot_init) {
        rootfs::hand_over(ch, &spec.env);
    }
    let ports = spec
        .stdio
        .as_ref()
        .and_then(|p| stdio::open_ports(&mut ch, p));
    // Before the fork, so that a job that exits at once cannot slip its SIGCHLD past us.
    let sigchld = sigchld_fd()?;
    let stdin = spec
        .stdio
        .as_ref()
        .and_then(|p| stdio::open_stdin(&mut ch, p));
    let outcome = match start_job(&spec, ports, stdin) {
        Ok(job) => Ok(supervise(&mut ch, &mut dec, job, sigchld)?),
        Err(err) => Err(err),
    };
    report(&mut ch, outcome)
}

/// Reads frames until the host's JOB arrives.
fn receive_spec(ch: &mut File, dec: &mut Decoder) -> io::Result<JobSpec> {
    loop {
        let mut buf = [0u8; 4096];
        let n = ch.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "host channel closed",
            ));
        }
        dec.push(&buf[..n]);
        if let Some((k, payload)) = dec.next_frame().map_err(|e| io::Error::other(e.0))? {
            if k == kind::JOB {
                return serde_json::from_slice(&payload)
                    .map_err(|e| io::Error::other(format!("bad job spec: {e}")));
            }
        }
    }
}

/// Sends how the job ended (EXIT) or why it did not start (ERROR), and waits until
/// the bytes have left.
fn report(ch: &mut File, outcome: Result<JobExit, JobError>) -> io::Result<()> {
    match outcome {
        Ok(exit) => {
            let json = serde_json::to_vec(&exit).expect("JobExit serializes");
            send(ch, kind::EXIT, &json)?;
        }
        Err(err) => {
            let json = serde_json::to_vec(&err).expect("JobError serializes");
            send(ch, kind::ERROR, &json)?;
        }
    }
    ch.flush()?;
    // Wait until the UART has sent the last byte: the reset comes right after.
    // SAFETY: valid fd; tcdrain on a non-tty just fails.
    unsafe { libc::tcdrain(ch.as_raw_fd()) };
    Ok(())
}

struct Job {
    pid: libc::pid_t,
    /// The read ends of the job's stdout and stderr pipes; `None` on ports.
    relay: Option<(OwnedFd, OwnedFd)>,
}

/// The job's stdout and stderr, and the agent's ends of them when it relays them.
struct Outputs {
    stdout: OwnedFd,
    stderr: OwnedFd,
    relay: Option<(OwnedFd, OwnedFd)>,
}

/// The given ports as the job's stdout and stderr, or else fresh pipes to relay.
fn outputs(ports: Option<(OwnedFd, OwnedFd)>) -> io::Result<Outputs> {
    if let Some((stdout, stderr)) = ports {
        return Ok(Outputs {
            stdout,
            stderr,
            relay: None,
        });
    }
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok(Outputs {
        stdout: out_w,
        stderr: err_w,
        relay: Some((out_r, err_r)),
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `argv[0]` resolved against the job's PATH, as a shell would.
fn resolve(argv0: &str, env: &[(String, String)]) -> Result<PathBuf, JobError> {
    let not_found = |what: String| JobError {
        error: what,
        status: 127,
    };
    if argv0.contains('/') {
        return Ok(PathBuf::from(argv0));
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", |(_, v)| {
            v.as_str()
        });
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(argv0);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(not_found(format!(
        "{argv0}: command not found in PATH={path}"
    )))
}

fn cstrings<I: IntoIterator<Item = String>>(items: I) -> Result<Vec<CString>, JobError> {
    items
        .into_iter()
        .map(|s| {
            CString::new(s).map_err(|_| JobError {
                error: "an argument or environment entry contains a NUL byte".into(),
                status: 126,
            })
        })
        .collect()
}

/// Forks and execs the job in its own session with stdin from the stdin port (else
/// /dev/null) and its output on `ports` (else on pipes). Exec failures come back through a close-on-exec
/// pipe.
fn start_job(
    spec: &JobSpec,
    ports: Option<(OwnedFd, OwnedFd)>,
    stdin: Option<OwnedFd>,
) -> Result<Job, JobError> {
    let io_err = |what: &str, e: io::Error| JobError {
        error: format!("{what}: {e}"),
        status: 126,
    };
    let argv0 = spec.argv.first().ok_or_else(|| JobError {
        error: "empty command".into(),
        status: 127,
    })?;
    let program = resolve(argv0, &spec.env)?;
    let program_c = cstrings([program.display().to_string()])?.remove(0);
    let argv = cstrings(spec.argv.iter().cloned())?;
    let envp = cstrings(spec.env.iter().map(|(k, v)| format!("{k}={v}")))?;
    let cwd = cstrings([spec.cwd.clone()])?.remove(0);
    let user = spec.user;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let devnull: OwnedFd = match stdin {
        Some(fd) => fd,
        None => File::open("/dev/null")
            .map_err(|e| io_err("/dev/null", e))?
            .into(),
    };
    let out = outputs(ports).map_err(|e| io_err("pipe", e))?;
    let (st_r, st_w) = pipe().map_err(|e| io_err("pipe", e))?;

    // SAFETY: the agent is single-threaded; the child only calls async-signal-safe
    // functions on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io_err("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: child side: plain syscalls on valid descriptors and pointers.
        unsafe {
            libc::setsid();
            libc::dup2(devnull.as_raw_fd(), 0);
            libc::dup2(out.stdout.as_raw_fd(), 1);
            libc::dup2(out.stderr.as_raw_fd(), 2);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Rust ignores SIGPIPE in the agent; a job (`yes | head`) expects the default.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            // [stage, errno]: stage 0 the chdir failed, 1 the exec, 2 the change of
            // identity. Identity first: the working directory and the program must
            // be reachable by the job's user, not just by root.
            let mut report = [0i32; 2];
            let became = match user {
                Some(u) => {
                    libc::setgroups(0, std::ptr::null()) == 0
                        && libc::setgid(u.gid) == 0
                        && libc::setuid(u.uid) == 0
                }
                None => true,
            };
            if !became {
                report[0] = 2;
            } else if libc::chdir(cwd.as_ptr()) == 0 {
                libc::execve(program_c.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
                report[0] = 1;
            }
            report[1] = *libc::__errno_location();
            libc::write(st_w.as_raw_fd(), report.as_ptr().cast(), 8);
            libc::_exit(127);
        }
    }
    drop((out.stdout, out.stderr, st_w, devnull));
    let mut st = File::from(st_r);
    let mut report = [0u8; 8];
    if st.read_exact(&mut report).is_ok() {
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let word = |i: usize| i32::from_ne_bytes(report[i..i + 4].try_into().unwrap_or([0; 4]));
        let e = io::Error::from_raw_os_error(word(4));
        if let (2, Some(u)) = (word(0), user) {
            return Err(JobError {
                error: format!("cannot run the job as uid {} gid {}: {e}", u.uid, u.gid),
                status: 126,
            });
        }
        if word(0) == 0 {
            return Err(JobError {
                error: format!(
                    "cannot enter the working directory {} in the guest: {e}",
                    spec.cwd
                ),
                status: hpcvm_agent::BAD_WORKDIR_STATUS,
            });
        }
        let status = if e.kind() == io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        return Err(JobError {
            error: format!("cannot run {} (in {}): {e}", program.display(), spec.cwd),
            status,
        });
    }
    Ok(Job {
        pid,
        relay: out.relay,
    })
}

/// Streams the job's output to the host (unless it is on ports), forwards signals,
/// reaps children; returns how the job ended.
fn supervise(ch: &mut File, dec: &mut Decoder, job: Job, sigchld: OwnedFd) -> io::Result<JobExit> {
    let mut open = match job.relay {
        Some((stdout, stderr)) => [Some(stdout), Some(stderr)],
        None => [None, None],
    };
    let mut exit: Option<JobExit> = None;
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(t) = exited_at {
            if open.iter().all(Option::is_none) || t.elapsed() > DRAIN_AFTER_EXIT {
                break;
            }
        }
        let mut fds = vec![
            libc::pollfd {
                fd: ch.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigchld.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        for p in open.iter().flatten() {
            fds.push(libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = if exited_at.is_some() { 20 } else { -1 };
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // Job output first: it must reach the host before the exit report.
        for (i, slot) in open.iter_mut().enumerate() {
            let Some(p) = slot.as_ref() else { continue };
            let ready = fds.iter().any(|f| f.fd == p.as_raw_fd() && f.revents != 0);
            if !ready {
                continue;
            }
            // SAFETY: reading into buf from a descriptor we own.
            let got = unsafe { libc::read(p.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if got > 0 {
                let k = if i == 0 { kind::STDOUT } else { kind::STDERR };
                send(ch, k, &buf[..got as usize])?;
            } else if got == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                *slot = None;
            }
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
            let got = ch.read(&mut buf)?;
            if got == 0 {
                // The host is gone: nobody will read the result; stop the job.
                // SAFETY: signalling the job's process group.
                unsafe { libc::kill(-job.pid, libc::SIGKILL) };
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "host channel closed",
                ));
            }
            dec.push(&buf[..got]);
            while let Some((k, payload)) = dec.next_frame().map_err(|e| io::Error::other(e.0))? {
                if k == kind::SIGNAL {
                    if let Some(&sig) = payload.first() {
                        log(ch, &format!("delivering signal {sig} to the job"));
                        // SAFETY: signalling the job's process group.
                        unsafe { libc::kill(-job.pid, i32::from(sig)) };
                    }
                }
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut info = [0u8; 128];
            // SAFETY: draining the signalfd into a buffer of its record size.
            unsafe { libc::read(sigchld.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
            // Reap everything: the job and any orphan that was re-parented to us.
            loop {
                let mut status = 0;
                // SAFETY: waitpid with a valid status pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if pid == job.pid {
                    exit = Some(if libc::WIFSIGNALED(status) {
                        JobExit::Signal(libc::WTERMSIG(status))
                    } else {
                        JobExit::Code(libc::WEXITSTATUS(status))
                    });
                    exited_at = Some(Instant::now());
                }
            }
        }
    }
    Ok(exit.expect("loop ends only after the job exited"))
}

fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointer; SIGCHLD is a valid signal.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // SAFETY: valid sigset; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `syncfs` on every mounted filesystem that lives on a block device (`/dev/...`).
fn sync_disks() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(src), Some(target)) = (f.next(), f.next()) else {
            continue;
        };
        if !src.starts_with("/dev/") {
            continue;
        }
        // Mount points with spaces come octal-escaped; such a disk is skipped.
        if let Ok(dir) = File::open(target) {
            // SAFETY: syncfs on a descriptor we own.
            unsafe { libc::syncfs(dir.as_raw_fd()) };
        }
    }
}

/// Kills what is left, writes back file data and resets the VM (the host sees the
/// i8042 reset: `reboot=k`).
fn power_off() -> ! {
    // SAFETY: as PID 1, kill(-1) spares us.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // Only disks need writing back: virtio-fs writes went to the host already, and a
    // share whose virtiofsd is gone would never answer a sync. The VM ends anyway.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let synced = std::thread::Builder::new().spawn(move || {
        sync_disks();
        let _ = done_tx.send(());
    });
    if synced.is_ok() {
        let _ = done_rx.recv_timeout(SYNC_TIMEOUT);
    }
    // SAFETY: reboot(2) with a valid command.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // reboot only returns on failure; PID 1 must never exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
