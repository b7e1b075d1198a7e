//! `hpcvm run --image`: the job's root becomes a read-only virtio-blk disk, found by
//! its serial, under an overlay whose writable layer is a tmpfs in guest RAM; with
//! `boot_init` the image's own `/sbin/init` then replaces the agent as PID 1.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hpcvm_agent::{kind, JobError, RootImage, ShareMount};

/// Where the kernel lists block devices.
const SYS_BLOCK: &str = "/sys/block";
/// How long to wait for the disk to be probed.
const DISK_WAIT: Duration = Duration::from_secs(5);
/// The image disk, mounted read-only.
const LOWER: &str = "/.hpcvm/lower";
/// The tmpfs holding the overlay's writable layer.
const RW: &str = "/.hpcvm/rw";
/// The overlay's upper layer.
const UPPER: &str = "/.hpcvm/rw/upper";
/// The overlay's work directory.
const WORK: &str = "/.hpcvm/rw/work";
/// The overlay: the new root.
const NEW_ROOT: &str = "/.hpcvm/root";
/// Mounts carried into the new root (each with what is mounted below it).
const MOVED: [&str; 5] = ["/proc", "/sys", "/dev", "/tmp", "/run"];
/// The image's own init, for `RootImage::boot_init`.
const INIT: &CStr = c"/sbin/init";

/// The `/dev` node of the `vd*` disk in `sys_block` whose serial is `serial`.
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    if serial.trim().is_empty() {
        return None;
    }
    std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .filter(|entry| entry.file_name().as_bytes().starts_with(b"vd"))
        .find_map(|entry| {
            let got = std::fs::read_to_string(entry.path().join("serial")).ok()?;
            (got.trim() == serial.trim()).then(|| Path::new("/dev").join(entry.file_name()))
        })
}

/// Switches root into the image (only inside a VM) and, for `boot_init`, checks that
/// its init can run.
pub fn enter_image(root: &RootImage, in_vm: bool) -> Result<(), JobError> {
    if !in_vm {
        return Err(JobError {
            error: "an image root needs the guest (not --channel-fd)".into(),
            status: 126,
        });
    }
    switch_root(root)?;
    if root.boot_init {
        check_init()?;
    }
    Ok(())
}

/// Mounts each virtio-fs share at its path (made if missing).
pub fn mount_shares(mounts: &[ShareMount], in_vm: bool) -> Result<(), JobError> {
    if mounts.is_empty() {
        return Ok(());
    }
    if !in_vm {
        return Err(JobError {
            error: "shared directories need the guest (not --channel-fd)".into(),
            status: 126,
        });
    }
    for m in mounts {
        let fail = |e: String| JobError {
            error: format!("shared directory {} (tag {:?}): {e}", m.path, m.tag),
            status: 126,
        };
        mkdirs(&[m.path.as_str()]).map_err(fail)?;
        let flags = if m.read_only { libc::MS_RDONLY } else { 0 };
        mount(&m.tag, &m.path, Some("virtiofs"), flags, None).map_err(fail)?;
    }
    Ok(())
}

/// Tells the host that the image's init takes over, then execs it as PID 1.
pub fn hand_over(mut ch: File, env: &[(String, String)]) -> ! {
    let _ = crate::send(&mut ch, kind::HANDOVER, b"");
    let _ = ch.flush();
    // SAFETY: valid fd; tcdrain on a non-tty just fails.
    unsafe { libc::tcdrain(ch.as_raw_fd()) };
    drop(ch);
    let err = exec_init(env);
    let reported =
        crate::open_channel().and_then(|mut ch| crate::report(&mut ch, Err(err.clone())));
    if reported.is_err() {
        eprintln!("hpcvm-agent: {}", err.error);
    }
    crate::power_off()
}

/// Makes the image disk (under an in-RAM overlay) the root; /proc, /sys, /dev, /tmp
/// and /run move along.
fn switch_root(root: &RootImage) -> Result<(), JobError> {
    let dev = crate::wait_until(Instant::now() + DISK_WAIT, || {
        find_disk(Path::new(SYS_BLOCK), &root.serial)
    })
    .ok_or_else(|| JobError {
        error: format!(
            "image root: no virtio-blk disk with serial {:?} in {SYS_BLOCK} after {DISK_WAIT:?}",
            root.serial
        ),
        status: 126,
    })?;
    build_root(&dev, &root.fstype)
        .and_then(|()| enter_root())
        .map_err(|step| JobError {
            error: format!(
                "image root {} (serial {:?}): {step}",
                dev.display(),
                root.serial
            ),
            status: 126,
        })
}

/// Mounts `dev` read-only under a tmpfs-backed overlay at `NEW_ROOT`.
fn build_root(dev: &Path, fstype: &str) -> Result<(), String> {
    mkdirs(&[LOWER, RW, NEW_ROOT])?;
    mount(dev, LOWER, Some(fstype), libc::MS_RDONLY, None)?;
    mount("tmpfs", RW, Some("tmpfs"), 0, Some("mode=755"))?;
    mkdirs(&[UPPER, WORK])?;
    let layers = format!("lowerdir={LOWER},upperdir={UPPER},workdir={WORK}");
    mount("overlay", NEW_ROOT, Some("overlay"), 0, Some(&layers))
}

/// Moves the kernel filesystems into `NEW_ROOT`, then makes it `/`.
fn enter_root() -> Result<(), String> {
    for src in MOVED {
        let target = format!("{NEW_ROOT}{src}");
        mkdirs(&[&target])?;
        mount(src, &target, None, libc::MS_MOVE, None)?;
    }
    chdir(NEW_ROOT)?;
    mount(".", "/", None, libc::MS_MOVE, None)?;
    let dot = c".";
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::chroot(dot.as_ptr()) }, || {
        format!("chroot {NEW_ROOT}")
    })?;
    chdir("/")
}

/// Checks that the image has an executable `/sbin/init` before handing over to it.
fn check_init() -> Result<(), JobError> {
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::access(INIT.as_ptr(), libc::X_OK) } == 0 {
        return Ok(());
    }
    Err(init_error(io::Error::last_os_error()))
}

/// Execs the image's `/sbin/init` with `env`; returns only if that failed.
fn exec_init(env: &[(String, String)]) -> JobError {
    let envp = match crate::cstrings(env.iter().map(|(k, v)| format!("{k}={v}"))) {
        Ok(envp) => envp,
        Err(e) => return e,
    };
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let argv_p = [INIT.as_ptr(), std::ptr::null()];
    // SAFETY: sigset_t is plain data initialised by sigemptyset; the other calls get
    // valid NUL-terminated strings and NULL-terminated arrays that outlive them.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::execve(INIT.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
    }
    init_error(io::Error::last_os_error())
}

/// Why `/sbin/init` cannot run: 127 if it is missing, else 126.
fn init_error(e: io::Error) -> JobError {
    let status = if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    JobError {
        error: format!("cannot run {} in the image: {e}", INIT.to_string_lossy()),
        status,
    }
}

/// Creates each directory (and its parents) with mode 755.
fn mkdirs(dirs: &[&str]) -> Result<(), String> {
    for dir in dirs {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| format!("mkdir {dir}: {e}"))?;
    }
    Ok(())
}

/// A path or mount argument as a C string; a NUL in it is refused.
fn cstr(s: &OsStr) -> Result<CString, String> {
    CString::new(s.as_bytes()).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// `mount(2)`, naming what it did in the error; `None` passes NULL.
fn mount(
    src: impl AsRef<Path>,
    target: impl AsRef<Path>,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let (src, target) = (src.as_ref(), target.as_ref());
    let what = match fstype {
        Some(fs) => format!("mount {} ({fs}) on {}", src.display(), target.display()),
        None => format!("move mount {} to {}", src.display(), target.display()),
    };
    let src_c = cstr(src.as_os_str())?;
    let target_c = cstr(target.as_os_str())?;
    let fstype_c = fstype.map(|s| cstr(OsStr::new(s))).transpose()?;
    let data_c = data.map(|s| cstr(OsStr::new(s))).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a valid NUL-terminated string for the call.
    let rc = unsafe {
        libc::mount(
            src_c.as_ptr(),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    check(rc, || what)
}

/// `chdir(2)`, naming the directory in the error.
fn chdir(dir: &str) -> Result<(), String> {
    let c = cstr(OsStr::new(dir))?;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::chdir(c.as_ptr()) }, || {
        format!("chdir {dir}")
    })
}

/// A syscall's return code as a result: `what` and the errno text on failure.
fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(format!("{}: {e}", what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_found_by_serial() {
        let sys = std::env::temp_dir().join(format!("hpcvm-agent-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sys);
        for (disk, serial) in [
            ("sda", Some("hpcvm-root\n")),
            ("vda", Some("data0\n")),
            ("vdb", None),
            ("vdc", Some("  hpcvm-root\n")),
            ("vdd", Some("")),
        ] {
            std::fs::create_dir_all(sys.join(disk)).unwrap();
            if let Some(s) = serial {
                std::fs::write(sys.join(disk).join("serial"), s).unwrap();
            }
        }
        assert_eq!(
            find_disk(&sys, "hpcvm-root"),
            Some(PathBuf::from("/dev/vdc"))
        );
        assert_eq!(find_disk(&sys, "data0"), Some(PathBuf::from("/dev/vda")));
        assert_eq!(find_disk(&sys, "data"), None);
        assert_eq!(find_disk(&sys, ""), None);
        assert_eq!(find_disk(&sys.join("missing"), "data0"), None);
        std::fs::remove_dir_all(&sys).unwrap();
    }
}
