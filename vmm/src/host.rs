//! Facts about the host hpcvm runs on: its KVM flavour and the CPUs this process may use.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::time::Duration;

/// True when the host's KVM is software virtualization (kvm_pvm: no VMX/SVM). Guest
/// ring-0 code is then instruction-emulated and some instructions are missing, which
/// the CPUID filter works around. `HPCVM_SOFTWARE_KVM=0|1` overrides the detection.
pub fn is_software_kvm() -> bool {
    match std::env::var("HPCVM_SOFTWARE_KVM").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => kvm_pvm_loaded(Path::new("/sys")),
    }
}

/// Whether the software-KVM module (kvm_pvm) is loaded, in the sysfs at `sys`.
pub fn kvm_pvm_loaded(sys: &Path) -> bool {
    sys.join("module/kvm_pvm").exists()
}

/// A timerfd whose read never blocks (CLOCK_MONOTONIC, close-on-exec): epoll may
/// report it just before it is re-armed, and a read must never block the thread
/// that serves destroy.
pub fn nonblocking_timer() -> io::Result<vmm_sys_util::timerfd::TimerFd> {
    // SAFETY: timerfd_create takes no pointers; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new timerfd that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// An anonymous in-memory file (memfd), closed on exec.
pub fn memfd(name: &CStr) -> io::Result<File> {
    memfd_with(name, 0)
}

/// [`memfd`] with extra `memfd_create` flags (`MFD_HUGETLB | MFD_HUGE_2MB`, ...).
pub fn memfd_with(name: &CStr, flags: libc::c_uint) -> io::Result<File> {
    // SAFETY: a valid NUL-terminated name; MFD_CLOEXEC keeps it out of children.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Host CPUs this process may run on (its cpuset / affinity mask), ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE, the size of `set`.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// Pins the calling thread to host CPU `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::other(format!("host CPU {cpu} is out of range")));
    }
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 means this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct sched_attr` of sched_setattr(2) (the libc crate does not define it).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// The time slice the control thread asks for: the shortest the kernel accepts.
pub const CONTROL_SLICE: Duration = Duration::from_micros(100);

/// Asks the scheduler for a `slice`-long time slice for the calling thread, keeping
/// its policy, nice value and other attributes (no privilege needed). Under EEVDF
/// (Linux >= 6.12) a short slice means an early deadline, so the thread preempts a
/// busy vCPU thread on its core as soon as it wakes (a control-socket request, a
/// signal) instead of queueing behind that thread's slice; older kernels ignore the
/// value. A thread under a real-time policy (set by whoever launched hpcvm) is left as
/// it is.
pub fn request_slice(slice: Duration) -> io::Result<()> {
    let mut attr = sched_getattr()?;
    if !matches!(attr.policy as i32, libc::SCHED_OTHER | libc::SCHED_BATCH) {
        return Ok(());
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a valid sched_attr of the size it declares; 0 = this thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's scheduling attributes.
fn sched_getattr() -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is writable and `size` bytes long; 0 = this thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Formats CPU numbers the way the kernel does (`0-3,8`).
pub fn fmt_cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_cpus_match_proc_status() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(fmt_cpu_list(&allowed_cpus().unwrap()), list);
    }

    #[test]
    fn cpu_list_formatting() {
        assert_eq!(fmt_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(fmt_cpu_list(&[5]), "5");
        assert_eq!(fmt_cpu_list(&[]), "");
    }

    #[test]
    fn pinning_moves_the_thread() {
        let cpus = allowed_cpus().unwrap();
        let last = *cpus.last().unwrap();
        std::thread::spawn(move || {
            pin_current_thread(last).unwrap();
            assert_eq!(allowed_cpus().unwrap(), vec![last]);
        })
        .join()
        .unwrap();
        assert!(pin_current_thread(1 << 20).is_err());
    }

    /// The calling thread's time slice as the kernel reports it (0 on kernels without
    /// custom slices).
    fn current_slice() -> io::Result<Duration> {
        Ok(Duration::from_nanos(sched_getattr()?.runtime))
    }

    /// (major, minor) of the running kernel.
    fn kernel_version() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut it = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }

    #[test]
    fn a_short_slice_is_granted_to_the_calling_thread_only() {
        std::thread::spawn(|| {
            let before = current_slice().unwrap();
            // Whoever launched hpcvm chose the nice value; the slice must not undo it.
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as libc::id_t;
            // SAFETY: a plain syscall on this thread (PRIO_PROCESS with a tid).
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 5) }, 0);
            request_slice(CONTROL_SLICE).unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }, 5);
            if kernel_version() >= (6, 12) {
                assert_ne!(before, CONTROL_SLICE, "the default slice is longer");
                assert_eq!(current_slice().unwrap(), CONTROL_SLICE);
            }
        })
        .join()
        .unwrap();
        // Other threads keep theirs.
        if kernel_version() >= (6, 12) {
            assert_ne!(current_slice().unwrap(), CONTROL_SLICE);
        }
    }
}
