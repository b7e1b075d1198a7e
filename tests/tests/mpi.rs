//! Real /dev/kvm, real guest kernel, the MPI image (`make image`): several MPI ranks
//! in one VM, talking over shared memory. A program built on the host with `mpicc`
//! and found in the shared working directory runs under the image's `mpirun`, as the
//! calling user (an ordinary account: no run-as-root override), one rank per vCPU;
//! a message of several MiB crosses Open MPI's vader BTL with CMA single copy, and
//! the verdict lands in the working directory, owned by the user.
//!
//! One test function: the account's /dev/kvm grant must not race its restore.

use hpcvm_tests::mpi::{mpi_image, mpicc};
use hpcvm_tests::unprivileged::{is_root, owner, Unprivileged};

#[test]
fn ranks_of_a_host_built_program_share_memory_inside_one_vm() {
    if !is_root() {
        eprintln!("skipped: the set-up creates a user and needs root");
        return;
    }
    let image = mpi_image();
    let u = Unprivileged::set_up();
    assert!(
        u.path("virtiofsd").exists(),
        "virtiofsd is missing (make test installs it)"
    );
    let program = u.path("shm_check");
    mpicc("shm_check", &program);
    std::os::unix::fs::chown(&program, Some(u.uid), Some(u.gid)).unwrap();

    // hwloc in the guest sees the two cores hpcvm presents; mpirun binds rank i to
    // vCPU i and moves the 8 MiB messages with CMA (forced: a guest without it fails
    // instead of falling back to copies through a shared buffer).
    let script = "hwloc-calc --number-of core machine:0; \
        exec mpirun -np 2 --map-by core --bind-to core --mca btl self,vader \
        --mca btl_vader_single_copy_mechanism cma ./shm_check";
    let (code, out, err) = u.run(
        &[
            "run",
            "--image",
            image.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--",
            "sh",
            "-c",
            script,
        ],
        true,
    );
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let want = format!(
        "2\nrank 0 of 2 on cpu 0 uid {uid}\nrank 1 of 2 on cpu 1 uid {uid}\n",
        uid = u.uid
    );
    assert_eq!(out, want, "stderr: {err}");
    let result = u.path("mpi-result.txt");
    assert_eq!(
        std::fs::read_to_string(&result).unwrap(),
        "2 ranks, 8 MiB messages intact\n"
    );
    assert_eq!(owner(&result), u.uid, "the job's output is the user's");
}
