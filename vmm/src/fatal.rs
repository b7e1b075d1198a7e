//! The end of the process when hpcvm itself fails: a panic on any thread becomes the
//! documented internal-error status (166) with a message, the status record, the
//! terminal restored and no socket file left behind, instead of an abort (SIGABRT,
//! 134) that leaves all of them.
//!
//! Opt-in: [`on_panic`] installs the hook (the `hpcvm` binary does; an embedder may
//! keep its own). Files to remove are registered by whoever creates them
//! ([`remove_at_exit`], [`keep`]).
//!
//! Debug builds also carry test-only faults ([`inject`]), so that tests can check
//! what a panic or a forbidden system call does to a running VMM.

use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::exit_code;

/// Files removed when the process dies of a panic or a seccomp trap, as C strings so
/// that a signal handler can remove them without allocating.
static TO_REMOVE: Mutex<Vec<CString>> = Mutex::new(Vec::new());

fn c_path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).ok()
}

/// Set while hpcvm holds the terminal in raw mode, for the hook to undo.
pub static TERMINAL_RAW: AtomicBool = AtomicBool::new(false);

/// Removes `path` if the process dies of a panic (until [`keep`] is called for it).
pub fn remove_at_exit(path: &Path) {
    if let (Ok(mut files), Some(c)) = (TO_REMOVE.lock(), c_path(path)) {
        files.push(c);
    }
}

/// Forgets `path`: its owner removed it, or it must stay.
pub fn keep(path: &Path) {
    if let (Ok(mut files), Some(c)) = (TO_REMOVE.lock(), c_path(path)) {
        files.retain(|p| *p != c);
    }
}

/// Removes the registered files; async-signal-safe (try_lock: the thread that
/// failed may hold the lock itself).
pub(crate) fn remove_registered_files() {
    if let Ok(files) = TO_REMOVE.try_lock() {
        for f in files.iter() {
            // SAFETY: a NUL-terminated path that lives as long as the lock is held.
            unsafe { libc::unlink(f.as_ptr()) };
        }
    }
}

/// What the hook calls with the message to record it (the binary's status file).
type Report = Box<dyn Fn(&str) + Send + Sync>;
static REPORT: OnceLock<Report> = OnceLock::new();

/// Installs a panic hook that ends the process with [`exit_code::INTERNAL`]: it says
/// what panicked where, removes the registered files, puts a terminal back in
/// canonical mode, calls `report` with the message (to write a status record), and
/// exits without unwinding, whatever thread panicked. Never returns to the panicking
/// code, so `panic = "abort"` and unwinding builds end the same way.
///
/// A thread whose seccomp filter does not let it remove files or write the record
/// (a vCPU, the device thread) hands the message to the control thread, which
/// finishes the job.
pub fn on_panic(report: impl Fn(&str) + Send + Sync + 'static) {
    let _ = REPORT.set(Box::new(report));
    std::panic::set_hook(Box::new(move |info| {
        let what = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(no message)".to_string()
        };
        let thread = std::thread::current();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = format!(
            "internal error: thread '{}' panicked{at}: {what}",
            thread.name().unwrap_or("unnamed")
        );
        eprintln!("hpcvm: error: {message} (please report this as a bug)");
        if crate::seccomp::trap::must_hand_off() {
            crate::seccomp::trap::hand_off(message);
        }
        finish(&message)
    }));
}

/// The end of a process that failed: registered files removed, terminal restored,
/// `message` recorded, status 166.
pub(crate) fn finish(message: &str) -> ! {
    remove_registered_files();
    restore_terminal();
    if let Some(report) = REPORT.get() {
        report(message);
    }
    // SAFETY: _exit takes no pointers and does not return; it skips atexit
    // handlers and destructors, which may be what failed.
    unsafe { libc::_exit(i32::from(exit_code::INTERNAL)) }
}

/// Canonical mode and echo back on a terminal stdin (raw while a console is attached),
/// on fd 0 directly: the panicking thread may hold the stdin lock.
pub(crate) fn restore_terminal() {
    if !TERMINAL_RAW.load(Ordering::Acquire) {
        return;
    }
    // SAFETY: termios is plain data that tcgetattr fills; both calls only read or
    // write that struct and fd 0, and fail harmlessly if fd 0 is not a terminal.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(libc::STDIN_FILENO, &mut t) == 0 {
            t.c_lflag |= libc::ICANON | libc::ECHO | libc::ISIG;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
        }
    }
}

/// The fault a test asked for at `place` (`HPCVM_TEST_FAULT=KIND:PLACE`), in debug
/// builds only: `panic` panics there, `syscall` makes a system call that no thread's
/// seccomp filter allows (getppid(2)).
#[cfg(debug_assertions)]
pub fn inject(place: &str) {
    let Ok(spec) = std::env::var("HPCVM_TEST_FAULT") else {
        return;
    };
    match spec.split_once(':') {
        Some(("panic", at)) if at == place => {
            panic!("test fault injected at {place} (HPCVM_TEST_FAULT)")
        }
        Some(("syscall", at)) if at == place => {
            // SAFETY: getppid takes no arguments and changes nothing.
            unsafe {
                libc::getppid();
            }
        }
        _ => {}
    }
}

/// Release builds carry no test faults.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn inject(_place: &str) {}
