//! hpcvm's own failures and its confinement: a panic on any thread, or a system call
//! outside a thread's seccomp filter, ends the process with the documented
//! internal-error status (166), a message, a status record and no socket file, never
//! a bare SIGABRT or SIGSYS; every thread of a running VM is confined. The faults are
//! injected through `HPCVM_TEST_FAULT`, which only debug builds (the ones tests
//! run) read.

use std::time::Duration;

use hpcvm_tests::proc::{ctl, guest_args, socket_path, RunningVm};

struct Case {
    vm: RunningVm,
    sock: std::path::PathBuf,
    status: std::path::PathBuf,
}

/// Starts the spin guest with `fault` injected; waits for its first line if `booted`.
fn start(name: &str, fault: &str, booted: bool) -> Case {
    start_with(name, fault, booted, &[])
}

fn start_with(name: &str, fault: &str, booted: bool, extra: &[&str]) -> Case {
    let sock = socket_path(name);
    let status = sock.with_extension("status.json");
    let _ = std::fs::remove_file(&status);
    let args = guest_args(
        "spin",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--status-file",
            status.to_str().unwrap(),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = RunningVm::start_env(&args, &[("HPCVM_TEST_FAULT", fault)]);
    if booted {
        vm.wait_for_line("spin: start", Duration::from_secs(30));
    }
    Case { vm, sock, status }
}

fn assert_internal_error(c: &mut Case, thread: &str) {
    let what = format!("hpcvm: error: internal error: thread '{thread}' panicked");
    assert_ended_166(c, &[&what, "test fault injected"], "panicked");
}

/// hpcvm ended with 166, saying each of `said`, a status record whose message
/// holds `recorded`, and no socket file.
fn assert_ended_166(c: &mut Case, said: &[&str], recorded: &str) {
    let (code, err, _) = c.vm.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(166), "exit status: {err}");
    for s in said {
        assert!(err.contains(s), "missing {s:?} in: {err}");
    }
    assert!(!c.sock.exists(), "socket file left behind");
    let record = std::fs::read_to_string(&c.status).expect("status file written");
    let v: serde_json::Value = serde_json::from_str(&record).expect(&record);
    assert_eq!(v["exit_code"], 166, "{record}");
    assert_eq!(v["source"], "vmm", "{record}");
    assert!(
        v["message"].as_str().unwrap().contains(recorded),
        "{record}"
    );
    let _ = std::fs::remove_file(&c.status);
}

#[test]
fn a_panic_on_the_control_thread_is_exit_166_with_status_and_no_socket() {
    let mut c = start("panic-control", "panic:status-request", true);
    let r = ctl(&c.sock, &["status"]);
    assert_ne!(r.code, Some(0), "no answer from a VMM that panicked");
    assert_internal_error(&mut c, "main");
}

#[test]
fn a_panic_on_a_vcpu_thread_is_exit_166_with_status_and_no_socket() {
    // The vCPU panics as it enters its run loop, before the guest prints anything.
    let mut c = start("panic-vcpu", "panic:vcpu", false);
    assert_internal_error(&mut c, "vcpu0");
}

/// (thread name, Seccomp, NoNewPrivs) of every thread of `pid`.
fn confinement(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    out.sort();
    out
}

#[test]
fn every_thread_of_a_running_vm_is_confined_by_its_own_filter() {
    // A disk gives the VM its virtio device thread too.
    let disk = socket_path("seccomp-disk").with_extension("img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let spec = format!("{},readonly=on", disk.display());
    let mut c = start_with(
        "seccomp-threads",
        "none:none",
        true,
        &["--cpus", "2", "--disk", &spec],
    );
    let threads = confinement(c.vm.pid());
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    for want in ["vcpu0", "vcpu1", "virtio", "stdout", "stderr", "hpcvm"] {
        assert!(names.contains(&want), "no {want} thread in {names:?}");
    }
    for (name, seccomp, nnp) in &threads {
        assert_eq!(seccomp, "2", "thread {name} is not filtered: {threads:?}");
        assert_eq!(nnp, "1", "thread {name} lacks no_new_privs: {threads:?}");
    }
    assert_eq!(ctl(&c.sock, &["destroy"]).code, Some(0));
    let (code, err, _) = c.vm.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(169), "{err}");
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&c.status);
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    let mut c = start_with("seccomp-off", "none:none", true, &["--seccomp", "off"]);
    for (name, seccomp, _) in confinement(c.vm.pid()) {
        assert_eq!(seccomp, "0", "thread {name}");
    }
    assert_eq!(ctl(&c.sock, &["destroy"]).code, Some(0));
    let _ = c.vm.wait_exit(Duration::from_secs(20));
    let _ = std::fs::remove_file(&c.status);
}

#[test]
fn a_forbidden_call_on_a_vcpu_ends_hpcvm_with_166_naming_call_and_thread() {
    let mut c = start("seccomp-vcpu", "syscall:vcpu", false);
    let said = "hpcvm: error: internal error: thread 'vcpu0' made system call getppid (110), \
                which its seccomp filter does not allow";
    assert_ended_166(&mut c, &[said], "made system call getppid (110)");
}

#[test]
fn a_forbidden_call_on_the_control_thread_ends_hpcvm_with_166() {
    let mut c = start("seccomp-control", "syscall:status-request", true);
    let r = ctl(&c.sock, &["status"]);
    assert_ne!(
        r.code,
        Some(0),
        "no answer from a VMM that trapped: {}",
        r.stdout
    );
    let said = "thread 'main' made system call getppid (110)";
    assert_ended_166(&mut c, &[said], "getppid (110)");
}

#[test]
fn in_log_mode_a_forbidden_call_goes_through_and_the_vm_runs_on() {
    let mut c = start_with(
        "seccomp-log",
        "syscall:status-request",
        true,
        &["--seccomp", "log"],
    );
    for _ in 0..2 {
        let r = ctl(&c.sock, &["status"]);
        assert_eq!(r.code, Some(0), "{} {}", r.stdout, r.stderr);
    }
    for (name, seccomp, _) in confinement(c.vm.pid()) {
        assert_eq!(seccomp, "2", "thread {name}");
    }
    assert_eq!(ctl(&c.sock, &["destroy"]).code, Some(0));
    let (code, err, _) = c.vm.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(169), "{err}");
    let _ = std::fs::remove_file(&c.status);
}
