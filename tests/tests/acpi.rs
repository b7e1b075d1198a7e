//! Real /dev/kvm, real guest kernel: the machine as ACPI describes it. `--numa 2` gives
//! the guest two nodes, each with its vCPU and half the RAM, and hpcvm binds each half
//! to its host node (`/proc/PID/numa_maps`); a bad `--numa` is refused before boot.
//! An image's own init gets the ACPI power button on `shutdown` (SIGRTMIN+4, as systemd
//! expects) and powers off through the FADT's sleep register.

use std::time::Duration;

use hpcvm_tests::proc::{run_hpcvm, signal, RunningVm};
use hpcvm_tests::scratch::Scratch;

/// Boot, job and exit together; generous for software KVM, where a boot takes 20-60 s.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// hpcvm's exit status for a configuration error.
const CONFIG: i32 = 160;
/// hpcvm's exit status after a shutdown request the guest honoured.
const SHUT_DOWN: i32 = 167;

/// `(start address, line)` of each guest RAM mapping in `pid`'s numa_maps (the RAM is
/// the `hpcvm-guest-ram` memfd when the working directory is shared).
fn guest_ram_policies(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/numa_maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:hpcvm-guest-ram"))
        .map(str::to_string)
        .collect()
}

#[test]
fn two_numa_nodes_reach_the_guest_and_their_ram_is_bound_on_the_host() {
    let job = "cd /sys/devices/system/node && cat online node0/cpulist node1/cpulist \
               && grep MemTotal node0/meminfo node1/meminfo && echo READY && sleep 600";
    let mut vm = RunningVm::start(&[
        "run", "--cpus", "2", "--numa", "2", "--memory", "512M", "--", "sh", "-c", job,
    ]);
    let mut out = Vec::new();
    loop {
        let line = vm
            .next_line(JOB_TIMEOUT)
            .expect("the job's output before READY");
        if line == "READY" {
            break;
        }
        out.push(line);
    }
    let policies = guest_ram_policies(vm.pid());
    signal(vm.pid(), libc::SIGTERM);
    let (code, stderr, _) = vm.wait_exit(JOB_TIMEOUT);

    assert_eq!(&out[..3], ["0-1", "0", "1"], "{out:?}");
    // Each node has about half of the 512 MiB (less what the kernel keeps).
    for (node, line) in out[3..].iter().enumerate() {
        let kb: u64 = line
            .split_whitespace()
            .rev()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MemTotal in {line:?}"));
        assert!(
            (200 << 10..=256 << 10).contains(&kb),
            "node {node} has {kb} kB: {out:?}"
        );
    }
    // Both halves are bound to host node 0, the only one here (two mappings with the
    // same policy merge back into one line).
    assert!(!policies.is_empty(), "no guest RAM in numa_maps");
    for p in &policies {
        assert!(p.contains(" bind:0 "), "{p}");
    }
    // The job got the SIGTERM hpcvm forwards on shutdown.
    assert_eq!(code, Some(128 + libc::SIGTERM), "stderr: {stderr}");
}

#[test]
fn a_numa_layout_that_cannot_be_built_is_refused_before_boot() {
    let r = run_hpcvm(
        &["run", "--cpus", "2", "--numa", "3", "--", "true"],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(CONFIG), "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains("--numa 3 needs at least 3 vCPUs (one per node); the guest has 2"),
        "{}",
        r.stderr
    );
    let r = run_hpcvm(
        &["run", "--numa", "many", "--", "true"],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(CONFIG), "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains("Invalid --numa 'many': expected auto, off or a node count"),
        "{}",
        r.stderr
    );
}

#[test]
fn shutdown_presses_the_power_button_and_the_guest_powers_off_through_acpi() {
    let s = Scratch::new("acpi", "button");
    // What systemd does on SIGRTMIN+4 (signal 38), in three lines.
    let image = s.image_with_init(
        "init.ext4",
        "#!/bin/sh\n\
         trap '/bin/busybox echo \"init: power button\"; /bin/busybox poweroff -f' 38\n\
         /bin/busybox echo \"init: waiting\"\n\
         while :; do /bin/busybox sleep 1; done\n",
    );
    let mut vm = RunningVm::start(&[
        "run",
        "--memory",
        "256M",
        "--no-share-cwd",
        "--image",
        image.to_str().unwrap(),
    ]);
    vm.wait_for_line("init: waiting", JOB_TIMEOUT);
    signal(vm.pid(), libc::SIGTERM);
    vm.wait_for_line("init: power button", JOB_TIMEOUT);
    let (code, stderr, _) = vm.wait_exit(JOB_TIMEOUT);
    // A poweroff after the request: shut down, not destroyed after the grace period.
    assert_eq!(code, Some(SHUT_DOWN), "stderr: {stderr}");
}
