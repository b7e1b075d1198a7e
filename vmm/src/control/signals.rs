//! Signals as control-loop events (signalfd), blocked in every thread before any is
//! started so they only ever arrive here:
//! - SIGTERM, SIGINT, SIGHUP: the first asks the guest to shut down, a later one
//!   destroys it. A repeat within [`REPEAT_WINDOW`] counts as the same request: on a
//!   time limit slurmd sends the step SIGTERM twice, ~20 ms apart.
//! - SIGUSR1, SIGUSR2: passed on to the guest job (`sbatch --signal=USR1@T` warns a
//!   job before its time limit); without a job they are ignored.
//! - SIGALRM, SIGVTALRM, SIGPROF, SIGIO and SIGPWR, whose default would end hpcvm
//!   without a status file and leave the API socket behind, are taken and ignored.
//! - SIGCONT keeps its harmless default.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The signals that mean "stop the job".
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
/// The signals passed on to the guest job.
pub const FORWARDED_SIGNALS: [libc::c_int; 2] = [libc::SIGUSR1, libc::SIGUSR2];
/// Signals taken only so that they cannot end hpcvm.
pub const IGNORED_SIGNALS: [libc::c_int; 5] = [
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
];
/// Every signal the control loop takes.
const HANDLED: [libc::c_int; 10] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
];
/// A stop signal this soon after the first one is the same request, not a second.
pub const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Blocks the handled signals in the calling thread (and every thread it starts).
/// The `hpcvm` binary does this first thing, so that a SIGTERM that comes while
/// hpcvm is still starting waits for the control loop instead of killing it.
pub fn block_stop_signals() -> io::Result<()> {
    mask(libc::SIG_BLOCK)
}

/// Undoes [`block_stop_signals`] (for commands that do not run a VM).
pub fn unblock_stop_signals() -> io::Result<()> {
    mask(libc::SIG_UNBLOCK)
}

fn mask(how: libc::c_int) -> io::Result<()> {
    let set = sigset(&HANDLED);
    // SAFETY: `set` is an initialised sigset; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// A non-blocking signalfd for the stop signals.
pub struct StopSignals(OwnedFd);

impl StopSignals {
    /// Opens the signalfd (the signals must already be blocked).
    pub fn new() -> io::Result<Self> {
        let set = sigset(&HANDLED);
        // SAFETY: `set` is a valid sigset; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The next pending signal's number, if any.
    pub fn next(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// A signal's name for messages.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}
