//! The filters themselves, on threads of the test process: each builds for every
//! mode, and an installed one lets its thread's work through and stops the rest.

use super::*;
use std::io::Write;

const ALL: [Thread; 4] = [
    Thread::Vcpu,
    Thread::Device,
    Thread::Output,
    Thread::Control,
];

#[test]
fn every_thread_has_a_filter_in_on_and_log_mode_and_none_when_off() {
    for t in ALL {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            let p = build(t, mode).unwrap().expect("a filter");
            assert!(p.len() > 10, "{t:?} {mode:?}: {} instructions", p.len());
        }
        assert!(build(t, SeccompMode::Off).unwrap().is_none());
    }
}

#[test]
fn modes_parse_and_a_bad_one_is_named() {
    assert_eq!("on".parse::<SeccompMode>().unwrap(), SeccompMode::On);
    assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
    assert_eq!("off".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
    let e = "strict".parse::<SeccompMode>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "Invalid --seccomp 'strict': must be on, log or off"
    );
}

/// Runs `f` on a thread confined as `t`, with EPERM for what the filter forbids.
fn confined<R: Send + 'static>(t: Thread, f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::spawn(move || {
        let p = filters::program(t, seccompiler::SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        seccompiler::apply_filter(&p).unwrap();
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn an_output_thread_may_write_but_not_open_files_or_sockets() {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are new descriptors owned here.
    let (r, w) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let (wrote, opened, socket) = confined(Thread::Output, move || {
        let wrote = (&w).write_all(b"ok").map_err(|e| e.to_string());
        let opened = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
        // SAFETY: a plain syscall with constant arguments.
        let socket = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        (wrote, opened.err(), (socket, errno))
    });
    drop(r);
    assert_eq!(wrote, Ok(()));
    assert_eq!(opened, Some(Some(libc::EPERM)));
    assert_eq!(socket, (-1, Some(libc::EPERM)));
}

#[test]
fn a_vcpu_thread_may_make_only_the_ioctls_it_needs() {
    let (tty, kvm_run) = confined(Thread::Vcpu, || {
        // SAFETY: ioctl on fd 0 with a request the filter refuses; no memory is
        // passed for TIOCGPGRP's result because the call is stopped first.
        let mut pgrp: libc::pid_t = 0;
        let tty = unsafe { libc::ioctl(0, libc::TIOCGPGRP, &mut pgrp) };
        let tty_errno = std::io::Error::last_os_error().raw_os_error();
        // KVM_RUN on a descriptor that is no vCPU: allowed by the filter, refused
        // by the kernel with EBADF.
        // SAFETY: as above; -1 is never a descriptor.
        let run = unsafe { libc::ioctl(-1, filters_kvm_run()) };
        let run_errno = std::io::Error::last_os_error().raw_os_error();
        ((tty, tty_errno), (run, run_errno))
    });
    assert_eq!(tty, (-1, Some(libc::EPERM)));
    assert_eq!(kvm_run, (-1, Some(libc::EBADF)));
}

fn filters_kvm_run() -> libc::c_ulong {
    filters::KVM_RUN()
}

#[test]
fn the_control_thread_may_accept_and_remove_its_socket_but_not_exec() {
    let dir = std::env::temp_dir().join(format!("hpcvm-seccomp-{}", std::process::id()));
    let _ = std::fs::create_dir(&dir);
    let file = dir.join("f");
    std::fs::write(&file, b"x").unwrap();
    let f2 = file.clone();
    let (removed, exec) = confined(Thread::Control, move || {
        let removed = std::fs::remove_file(&f2).is_ok();
        let exec = std::process::Command::new("/bin/true")
            .status()
            .map_err(|e| e.raw_os_error());
        (removed, exec.err())
    });
    let _ = std::fs::remove_dir(&dir);
    assert!(removed);
    assert_eq!(
        exec,
        Some(Some(libc::EPERM)),
        "no new processes from the control thread"
    );
}
