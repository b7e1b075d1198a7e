//! The embedding example (`vmm/examples/embed.rs`, built by `cargo test`) on a real
//! guest: build, handle, run on a thread, status, pause, resume, destroy, outcome,
//! and nothing process-wide touched.

use hpcvm_tests::proc::{hpcvm_bin, run_program, DEFAULT_TIMEOUT};

#[test]
fn an_embedding_program_controls_a_vm_through_its_handle() {
    let example = hpcvm_bin().with_file_name("examples").join("embed");
    assert!(
        example.exists(),
        "{} not built (cargo test builds the examples)",
        example.display()
    );
    let kernel = hpcvm_tests::guest("spin");
    let r = run_program(&example, &[kernel.to_str().unwrap()], DEFAULT_TIMEOUT);
    assert_eq!(r.code, Some(0), "{} {}", r.stdout, r.stderr);
    let want = [
        "guest: spin: start",
        "status: Running, 1 vCPU(s), 128 MiB",
        "pause: Paused",
        "resume: Running",
        "destroy: Stopping",
        "outcome: Destroyed on request (API)",
        "after the end: the VM has ended",
        "signals blocked here: 0000000000000000",
    ];
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines, want, "stderr: {}", r.stderr);
}
