//! A call outside a thread's filter (`--seccomp on`): the kernel skips it and sends
//! SIGSYS to the thread, whose handler records which call it was and wakes the
//! reaper, a thread of its own (under the control thread's filter) that does
//! nothing but wait for that: it ends hpcvm the documented way, a message naming
//! the call and the thread, the status record, no socket file, status 166, whatever
//! the other threads are doing (setting up, in the control loop, tearing down). A
//! panic on a thread whose filter would not let it clean up is handed to the
//! reaper the same way. The handler and the reaper's ending allocate nothing and
//! make only async-signal-safe calls: the thread that trapped may hold the
//! allocator's lock.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{filters::Thread, SeccompMode};
use crate::exit_code;

/// The reaper's thread id (0: not started).
static REAPER_TID: AtomicI32 = AtomicI32::new(0);
/// The first forbidden call: its number (-1: none yet) and its thread's name.
static CALL: AtomicI64 = AtomicI64::new(-1);
static THREAD: [AtomicU8; 16] = [const { AtomicU8::new(0) }; 16];
/// Written by a thread that trapped or panicked; the reaper blocks reading it.
static WAKE: OnceLock<EventFd> = OnceLock::new();
/// The `--status-file`, if any.
static STATUS_FILE: OnceLock<CString> = OnceLock::new();
/// A panic handed over by a thread that may not finish it itself.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// How long a thread that trapped or panicked waits for the reaper before it ends
/// the process itself (without the status record or the socket clean-up).
const REAPER_WAIT: Duration = Duration::from_secs(5);

/// Where the status record goes if a trap ends hpcvm (the `--status-file`).
pub fn set_status_file(path: &Path) {
    if let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) {
        let _ = STATUS_FILE.set(c);
    }
}

/// With `mode` on: installs the SIGSYS handler and starts the reaper (once per
/// process), before any thread is confined.
pub fn start(mode: SeccompMode) -> std::io::Result<()> {
    if mode != SeccompMode::On || WAKE.get().is_some() {
        return Ok(());
    }
    // Blocking: the reaper sleeps in read() until someone writes.
    let wake = EventFd::new(0)?;
    let reader = wake.try_clone()?;
    let _ = WAKE.set(wake);
    // SAFETY: sigaction with a zeroed struct, a handler of the SA_SIGINFO signature
    // and every signal blocked while it runs (the vCPU kick must not cut its wait
    // short); the old action is not wanted.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigfillset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel(1);
    super::spawn_confined("reaper", Thread::Control, mode, move || {
        // SAFETY: gettid has no preconditions.
        let _ = tid_tx.send(unsafe { libc::gettid() });
        loop {
            let _ = reader.read();
            reap();
        }
    })?;
    let tid = tid_rx
        .recv()
        .map_err(|_| std::io::Error::other("the reaper thread ended at start"))?;
    REAPER_TID.store(tid, Ordering::Release);
    Ok(())
}

/// The reaper woke: if a thread trapped or panicked, end hpcvm.
fn reap() {
    if CALL.load(Ordering::Acquire) >= 0 {
        die();
    }
    let handed = PANIC.lock().ok().and_then(|mut p| p.take());
    if let Some(message) = handed {
        crate::fatal::finish(&message);
    }
}

fn on_reaper() -> bool {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() == REAPER_TID.load(Ordering::Acquire) }
}

/// Whether a failing thread must leave the ending to the reaper: it runs under a
/// trapping filter, which would not let it remove files or write the record.
pub(crate) fn must_hand_off() -> bool {
    super::traps_here() && REAPER_TID.load(Ordering::Acquire) != 0 && !on_reaper()
}

/// Hands `message` to the reaper and waits for it to end the process (or ends it
/// after [`REAPER_WAIT`], without the clean-up, if it does not).
pub(crate) fn hand_off(message: String) -> ! {
    if let Ok(mut p) = PANIC.lock() {
        p.get_or_insert(message);
    }
    if let Some(e) = WAKE.get() {
        let _ = e.write(1);
    }
    std::thread::sleep(REAPER_WAIT);
    // SAFETY: ends the process; takes no pointers.
    unsafe { libc::_exit(i32::from(exit_code::INTERNAL)) }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SIGSYS's siginfo on x86_64 and aarch64: si_call_addr (a pointer) at offset 16,
    // then si_syscall (an int).
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe {
        *(info as *const u8)
            .add(16 + std::mem::size_of::<usize>())
            .cast::<i32>()
    };
    if CALL
        .compare_exchange(-1, i64::from(nr), Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        for (slot, b) in THREAD.iter().zip(super::thread_name()) {
            slot.store(b, Ordering::Release);
        }
    }
    if on_reaper() {
        die();
    }
    if let Some(e) = WAKE.get() {
        let _ = e.write(1);
    }
    // The reaper ends the process; if it does not, end it from here with what this
    // thread's filter allows.
    let mut ts = libc::timespec {
        tv_sec: REAPER_WAIT.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: nanosleep reads `ts` and writes what is left of it back into it.
    while unsafe { libc::nanosleep(&ts, &mut ts) } != 0 {}
    let mut m = Buf::default();
    m.push("hpcvm: error: ");
    message(&mut m);
    m.push(" (the reaper thread did not answer)\n");
    write_all(libc::STDERR_FILENO, m.bytes());
    // SAFETY: ends the process; takes no pointers.
    unsafe { libc::_exit(i32::from(exit_code::INTERNAL)) }
}

/// The message, the files, the status record, the exit: on the reaper.
fn die() -> ! {
    let mut m = Buf::default();
    m.push("hpcvm: error: ");
    let start = m.n;
    message(&mut m);
    let end = m.n;
    m.push(" (a bug: please report it; --seccomp log lets the call through)\n");
    write_all(libc::STDERR_FILENO, m.bytes());
    crate::fatal::remove_registered_files();
    if let Some(path) = STATUS_FILE.get() {
        let mut j = Buf::default();
        j.push("{\"exit_code\":");
        j.push_u64(u64::from(exit_code::INTERNAL));
        j.push(",\"outcome\":\"error\",\"source\":\"vmm\",\"message\":\"");
        j.push_bytes(&m.b[start..end]);
        j.push("\"}\n");
        // SAFETY: a NUL-terminated path and constant flags.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd >= 0 {
            write_all(fd, j.bytes());
            // SAFETY: `fd` was opened above.
            unsafe { libc::close(fd) };
        }
    }
    crate::fatal::restore_terminal();
    // SAFETY: ends the process; takes no pointers.
    unsafe { libc::_exit(i32::from(exit_code::INTERNAL)) }
}

/// "internal error: thread 'vcpu0' made system call NAME (NR), which its seccomp
/// filter does not allow".
fn message(m: &mut Buf) {
    let nr = CALL.load(Ordering::Acquire);
    m.push("internal error: thread '");
    for b in &THREAD {
        match b.load(Ordering::Acquire) {
            0 => break,
            // Names are ours; anything unexpected is masked so the JSON stays valid.
            c if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => m.push_bytes(&[c]),
            _ => m.push("?"),
        }
    }
    m.push("' made system call ");
    let name = usize::try_from(nr)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or("unknown", |s| s.name());
    m.push(name);
    m.push(" (");
    m.push_u64(nr.max(0) as u64);
    m.push("), which its seccomp filter does not allow");
}

fn write_all(fd: RawFd, mut b: &[u8]) {
    while !b.is_empty() {
        // SAFETY: writes from a live slice.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n <= 0 {
            return;
        }
        b = &b[n as usize..];
    }
}

/// A message built without allocating.
struct Buf {
    b: [u8; 512],
    n: usize,
}

impl Default for Buf {
    fn default() -> Self {
        Self { b: [0; 512], n: 0 }
    }
}

impl Buf {
    fn push_bytes(&mut self, s: &[u8]) {
        let k = s.len().min(self.b.len() - self.n);
        self.b[self.n..self.n + k].copy_from_slice(&s[..k]);
        self.n += k;
    }

    fn push(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    fn push_u64(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push_bytes(&digits[i..]);
    }

    fn bytes(&self) -> &[u8] {
        &self.b[..self.n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_text_fit_without_allocating() {
        let mut b = Buf::default();
        b.push("nr ");
        b.push_u64(0);
        b.push(" ");
        b.push_u64(u64::MAX);
        assert_eq!(b.bytes(), b"nr 0 18446744073709551615");
        let long = "x".repeat(600);
        b.push(&long);
        assert_eq!(b.bytes().len(), 512, "truncated, never past the buffer");
    }
}
