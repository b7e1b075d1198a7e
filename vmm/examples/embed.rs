//! Embedding the `vmm` crate: boot the kernel given as the first argument with one
//! vCPU and 128 MiB, wait for the first line of its console, then read its status,
//! pause it, resume it, destroy it, and print how it ended. Nothing process-wide is
//! touched (no signal handling, no raw terminal), and the console goes to a pipe
//! this program reads.
//!
//! usage: embed KERNEL

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};

use vmm::{RunOptions, VmConfig, VmState, Vmm};

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kernel = std::env::args().nth(1).ok_or("usage: embed KERNEL")?;
    // hpcvm's warnings go through the `log` crate: here, to stderr as hpcvm prints them.
    vmm::log_to_stderr();
    let config = VmConfig {
        memory: "128M".parse()?,
        ..VmConfig::new(kernel)
    };
    let (console, console_in) = pipe()?;
    let options = RunOptions {
        stdout: Some(console_in),
        ..RunOptions::default()
    };
    let vmm = Vmm::build(&config, options)?;
    let handle = vmm.handle();
    // Its own thread: with seccomp on, `run` confines the thread it runs on.
    let vm = std::thread::spawn(move || vmm.run());

    let mut console = BufReader::new(std::fs::File::from(console));
    let mut first = String::new();
    console.read_line(&mut first)?;
    println!("guest: {}", first.trim_end());
    let status = handle.status()?;
    println!(
        "status: {:?}, {} vCPU(s), {} MiB",
        status.state,
        status.vcpus.len(),
        status.memory.size >> 20
    );
    assert_eq!(status.state, VmState::Running);
    println!("pause: {:?}", handle.pause()?.state);
    println!("resume: {:?}", handle.resume()?.state);
    println!("destroy: {:?}", handle.destroy()?.state);
    let outcome = vm.join().map_err(|_| "the VM thread panicked")??;
    println!("outcome: {outcome}");
    match handle.status() {
        Err(e) => println!("after the end: {e}"),
        Ok(s) => return Err(format!("status after the end: {s:?}").into()),
    }
    // Nothing process-wide changed: this thread still blocks no signal.
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(str::trim)
        .unwrap_or("?");
    println!("signals blocked here: {blocked}");
    Ok(())
}
