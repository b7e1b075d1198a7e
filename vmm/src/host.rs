//! Facts about the host hpcvm runs on: its KVM flavour and the CPUs this process may use.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::path::Path;

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

/// An anonymous in-memory file (memfd), closed on exec.
pub fn memfd(name: &CStr) -> io::Result<File> {
    // SAFETY: a valid NUL-terminated name; MFD_CLOEXEC keeps it out of children.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
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
}
