//! hpcvm's own failures: a panic on any thread ends the process with the documented
//! internal-error status (166), a status record and no socket file, never a bare
//! SIGABRT. The faults are injected through `HPCVM_TEST_FAULT`, which only debug
//! builds (the ones tests run) read.

use std::time::Duration;

use hpcvm_tests::proc::{ctl, guest_args, socket_path, RunningVm};

struct Case {
    vm: RunningVm,
    sock: std::path::PathBuf,
    status: std::path::PathBuf,
}

/// Starts the spin guest with `fault` injected; waits for its first line if `booted`.
fn start(name: &str, fault: &str, booted: bool) -> Case {
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
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = RunningVm::start_env(&args, &[("HPCVM_TEST_FAULT", fault)]);
    if booted {
        vm.wait_for_line("spin: start", Duration::from_secs(30));
    }
    Case { vm, sock, status }
}

fn assert_internal_error(c: &mut Case, thread: &str) {
    let (code, err, _) = c.vm.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(166), "exit status: {err}");
    assert!(
        err.contains(&format!(
            "hpcvm: error: internal error: thread '{thread}' panicked"
        )) && err.contains("test fault injected"),
        "{err}"
    );
    assert!(!c.sock.exists(), "socket file left behind");
    let record = std::fs::read_to_string(&c.status).expect("status file written");
    let v: serde_json::Value = serde_json::from_str(&record).expect(&record);
    assert_eq!(v["exit_code"], 166, "{record}");
    assert_eq!(v["source"], "vmm", "{record}");
    assert!(
        v["message"].as_str().unwrap().contains("panicked"),
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
