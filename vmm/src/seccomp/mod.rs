//! Confinement: each thread of a running VMM installs the seccomp filter for its own
//! work (rust-vmm `seccompiler`), with no_new_privs set, as Firecracker and Cloud
//! Hypervisor do. The filters are in [`filters`]; what happens on a call outside
//! them is in [`trap`].
//!
//! Modes (`--seccomp`): `on` (default) traps a forbidden call and ends hpcvm with
//! 166 and a message that names the call and the thread; `log` lets it through and
//! has the kernel log it (dmesg or the audit log: `type=1326 ... comm="vcpu0" ...
//! syscall=N`), to find what a filter misses; `off` installs nothing.

use std::cell::Cell;
use std::str::FromStr;

use seccompiler::{BpfProgram, SeccompAction};
use thiserror::Error;

pub mod filters;
pub mod trap;

pub use filters::Thread;

/// What the filters do with a call they do not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum SeccompMode {
    /// Trap it: hpcvm ends with the internal-error status, naming the call.
    #[default]
    On,
    /// Allow it and let the kernel log it.
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(SeccompError::BadMode(s.to_string())),
        }
    }
}

impl SeccompMode {
    /// The `--seccomp` value of virtiofsd that matches (it filters itself).
    pub fn virtiofsd_arg(self) -> &'static str {
        match self {
            Self::On => "kill",
            Self::Log => "log",
            Self::Off => "none",
        }
    }

    fn mismatch_action(self) -> Option<SeccompAction> {
        match self {
            Self::On => Some(SeccompAction::Trap),
            Self::Log => Some(SeccompAction::Log),
            Self::Off => None,
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// Not on|log|off.
    #[error("Invalid --seccomp '{0}': must be on, log or off")]
    BadMode(String),
    /// seccompiler refused the rules (a bug in [`filters`]).
    #[error("Cannot build the seccomp filter of the {thread} thread: {reason}")]
    Build {
        /// Which thread's filter.
        thread: &'static str,
        /// seccompiler's error.
        reason: String,
    },
    /// The kernel refused the filter (no seccomp, or no_new_privs refused).
    #[error(
        "Cannot install the seccomp filter of the {thread} thread: {reason} (run with \
         --seccomp off on a kernel without seccomp filters)"
    )]
    Install {
        /// Which thread's filter.
        thread: &'static str,
        /// seccompiler's error.
        reason: String,
    },
}

thread_local! {
    /// This thread's name, kept for the trap handler (which must not allocate).
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    /// This thread runs under a filter that traps (`--seccomp on`).
    static TRAPS: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread's filter traps calls it does not allow.
pub(crate) fn traps_here() -> bool {
    TRAPS.with(Cell::get)
}

/// The calling thread's name as the trap handler reports it.
pub(crate) fn thread_name() -> [u8; 16] {
    NAME.with(Cell::get)
}

/// A thread's compiled filter.
pub struct Filter {
    program: BpfProgram,
    traps: bool,
}

impl Filter {
    /// BPF instructions.
    pub fn len(&self) -> usize {
        self.program.len()
    }

    /// Never true for a built filter.
    pub fn is_empty(&self) -> bool {
        self.program.is_empty()
    }
}

/// Builds `thread`'s filter for `mode` (None when `mode` is off).
pub fn build(thread: Thread, mode: SeccompMode) -> Result<Option<Filter>, SeccompError> {
    let Some(mismatch) = mode.mismatch_action() else {
        return Ok(None);
    };
    filters::program(thread, mismatch)
        .map(|program| {
            Some(Filter {
                program,
                traps: mode == SeccompMode::On,
            })
        })
        .map_err(|e| SeccompError::Build {
            thread: thread.name(),
            reason: e.to_string(),
        })
}

/// Confines the calling thread: sets no_new_privs and installs `filter`, built
/// beforehand with [`build`] (building allocates; installing does not need to).
pub fn apply(thread: Thread, filter: Option<&Filter>) -> Result<(), SeccompError> {
    let Some(filter) = filter else {
        return Ok(());
    };
    seccompiler::apply_filter(&filter.program).map_err(|e| SeccompError::Install {
        thread: thread.name(),
        reason: e.to_string(),
    })?;
    remember(thread, filter.traps);
    Ok(())
}

/// Keeps what the trap handler and the panic hook need to know of the calling
/// thread, now confined: its name, and whether its filter traps.
fn remember(thread: Thread, traps: bool) {
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let own = current.name().unwrap_or(thread.name()).as_bytes();
    let n = own.len().min(15);
    name[..n].copy_from_slice(&own[..n]);
    NAME.with(|c| c.set(name));
    TRAPS.with(|c| c.set(traps));
}

/// For a thread started by a confined one (which inherits its filter): what the
/// trap handler and the panic hook need to know of it.
pub fn inherited(thread: Thread, mode: SeccompMode) {
    if mode != SeccompMode::Off {
        remember(thread, mode == SeccompMode::On);
    }
}

/// Builds and installs `thread`'s filter on the calling thread.
pub fn confine(thread: Thread, mode: SeccompMode) -> Result<(), SeccompError> {
    let program = build(thread, mode)?;
    apply(thread, program.as_ref())
}

/// Starts a thread named `name` that confines itself as `thread` with `mode` before
/// it runs `f`; returns once the filter is in place, or with why it could not be
/// (the thread then ends without running `f`).
pub fn spawn_confined<F>(
    name: &str,
    thread: Thread,
    mode: SeccompMode,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let program = build(thread, mode).map_err(std::io::Error::other)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), SeccompError>>(1);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let confined = apply(thread, program.as_ref());
            let ok = confined.is_ok();
            let _ = tx.send(confined);
            if ok {
                f();
            }
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(std::io::Error::other(e))
        }
        Err(_) => Err(std::io::Error::other(format!(
            "the {name} thread ended before it was confined"
        ))),
    }
}

#[cfg(test)]
mod tests;
