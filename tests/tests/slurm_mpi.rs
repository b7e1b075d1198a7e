//! The MPI image under a real Slurm (the cluster of tests/src/slurm.rs), in the two
//! ways a site runs a VM job:
//! - one VM sized to the step's slots (`srun -N1 -n1 -c 2 hpcvm run --from-allocation
//!   --image mpi.ext4 -- mpirun -np 2 ...`): both ranks inside it, pinned through
//!   their vCPUs to the step's cores, talking over shared memory;
//! - one 1-vCPU VM per task (`srun -n 2 hpcvm run --from-allocation --per-task ...`):
//!   each on its own core, each with its own SLURM_PROCID.
//!
//! Slurm runs these jobs as root, as the test binary is: the guest job is root too,
//! and asks Open MPI for that explicitly (OMPI_ALLOW_RUN_AS_ROOT).

use std::collections::BTreeMap;
use std::time::Duration;

use hpcvm_tests::mpi::{mpi_image, mpicc};
use hpcvm_tests::proc::hpcvm_bin;
use hpcvm_tests::slurm::*;

/// Boot, mpirun's start (about 60 s of guest time on software KVM) and the job.
const MPI_JOB: Duration = Duration::from_secs(420);

const AS_ROOT: [&str; 4] = [
    "--env",
    "OMPI_ALLOW_RUN_AS_ROOT=1",
    "--env",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
];

/// A working directory for one test under the cluster's job dir, emptied first.
fn work_dir(c: &Cluster, name: &str) -> std::path::PathBuf {
    let dir = job_file(c, name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn one_vm_sized_to_the_step_runs_the_ranks_inside_it() {
    let (c, _serial) = cluster();
    require_real_guest();
    let image = mpi_image();
    let dir = work_dir(c, "mpi-one-vm");
    mpicc("shm_check", &dir.join("shm_check"));

    let step_cpus = step_cpus(c, 2);
    assert_eq!(step_cpus.len(), 2, "srun -c 2 gave {step_cpus:?}");

    // The host side says which job this is; the guest job must see the same id, and
    // none of the step's launcher variables (mpirun would look for srun).
    let hpcvm = format!(
        "exec {} run --from-allocation --verbose --image {} {} -- sh -c \
         'echo job $SLURM_JOB_ID; echo nodelist ${{SLURM_NODELIST:-unset}}; \
          exec mpirun -np 2 --map-by core --bind-to core ./shm_check'",
        hpcvm_bin().display(),
        image.display(),
        AS_ROOT.join(" ")
    );
    let mut cmd = slurm_cmd(c, "srun");
    cmd.current_dir(&dir)
        .args([
            "-N1",
            "-n1",
            "-c",
            "2",
            "--mem=1G",
            "--job-name",
            &job_name(),
        ])
        .args(["sh", "-c", &format!("echo job $SLURM_JOB_ID; {hpcvm}")]);
    let (code, out, err) = Client::spawn(cmd).finish(MPI_JOB);
    assert_eq!(code, Some(0), "stdout {out:?}\nstderr {err}");
    // With --verbose the guest's console comes out on stdout too.
    let out: Vec<&str> = out
        .iter()
        .map(String::as_str)
        .filter(|l| {
            ["job ", "nodelist ", "rank "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    let host_job = out.first().copied().unwrap_or_default();
    assert!(host_job.len() > "job ".len(), "{out:?}");
    assert_eq!(
        out[1..],
        [
            host_job,
            "nodelist unset",
            "rank 0 of 2 on cpu 0 uid 0",
            "rank 1 of 2 on cpu 1 uid 0"
        ],
        "stderr {err}"
    );
    assert_eq!(verbose_cpus(&err), step_cpus, "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("mpi-result.txt")).unwrap(),
        "2 ranks, 8 MiB messages intact\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_hpcvm_left(&marker());
}

#[test]
fn one_vm_per_task_each_on_its_own_core_with_its_own_rank() {
    let (c, _serial) = cluster();
    require_real_guest();
    let image = mpi_image();
    let dir = work_dir(c, "mpi-per-task");

    let mut cmd = slurm_cmd(c, "srun");
    cmd.current_dir(&dir)
        .args(["-n", "2", "--mem=1G", "--job-name", &job_name(), "--label"])
        .arg(hpcvm_bin())
        .args(["run", "--from-allocation", "--per-task", "--verbose"])
        .arg("--image")
        .arg(&image)
        .args([
            "--",
            "sh",
            "-c",
            "echo task $SLURM_PROCID of $SLURM_NTASKS nproc $(nproc)",
        ]);
    let (code, out, err) = Client::spawn(cmd).finish(MPI_JOB);
    assert_eq!(code, Some(0), "stdout {out:?}\nstderr {err}");
    // `--label` prefixes every line with its task: "0: ...". With --verbose the
    // guest's console comes out on stdout too.
    let mut lines: Vec<&str> = out
        .iter()
        .map(String::as_str)
        .filter(|l| l.contains(": task "))
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        ["0: task 0 of 2 nproc 1", "1: task 1 of 2 nproc 1"],
        "stderr {err}"
    );
    // Each task's VM was pinned to a core of its own.
    let mut cpus = BTreeMap::new();
    for l in err.lines() {
        let Some((task, rest)) = l.split_once(": ") else {
            continue;
        };
        if rest.starts_with("hpcvm: from allocation:") {
            cpus.insert(task.trim().to_string(), verbose_cpus(rest));
        }
    }
    assert_eq!(cpus.len(), 2, "one verbose line per task: {err}");
    let all: Vec<usize> = cpus.values().flatten().copied().collect();
    assert!(
        cpus.values().all(|c| c.len() == 1) && all[0] != all[1],
        "tasks' VMs share or lack a core: {cpus:?}"
    );
    assert!(
        err.contains("448 MiB guest RAM") && err.contains("/ 2 tasks"),
        "each task gets half the step's memory: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_hpcvm_left(&marker());
}
