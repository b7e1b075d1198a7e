//! hpcvm under a real Slurm: a single-node cluster on loopback (`tests/slurm/cluster.sh`,
//! started once for this test binary and stopped when it exits), jobs launched with
//! `srun` and `sbatch` exactly as a site would, and Slurm's own stop sequences
//! (`scancel`, an expired time limit: SIGCONT+SIGTERM, KillWait, SIGKILL) reaching the
//! guest job as hpcvm's shutdown -> grace period -> destroy.
//!
//! Real guest boots take 20-40 s on a software-KVM host, so only four tests boot the
//! real guest (`make guest`); the others use the tiny test guests. The tests share one
//! cluster with two cores, so they run one at a time (a mutex), whatever
//! `--test-threads` says. See tests/slurm/README.md; the harness is in
//! tests/src/slurm.rs, MPI in the MPI image under Slurm in slurm_mpi.rs.

use std::path::Path;
use std::time::{Duration, Instant};

use hpcvm_tests::guest;
use hpcvm_tests::hugepages::{free_2m, Reservation};
use hpcvm_tests::proc::{hpcvm_bin, thread_affinities};
use hpcvm_tests::slurm::*;

// ---------------------------------------------------------------------------------
// Tests

/// The cluster gives each step the CPUs it asked for, as its affinity mask: what
/// `--from-allocation` reads.
#[test]
fn cluster_binds_steps_to_their_cpus() {
    let (c, _serial) = cluster();
    let all = hpcvm_tests::proc::allowed_cpus();
    let one = step_cpus(c, 1);
    assert_eq!(one.len(), 1, "srun -c 1 gave CPUs {one:?}");
    assert!(all.contains(&one[0]), "{one:?} not in {all:?}");

    assert_eq!(step_cpus(c, all.len()), all);
}

/// Two one-CPU steps side by side get different cores, and each VM's vCPU is pinned to
/// its own step's core; then scancel is a shutdown: a guest that honours it ends at once
/// (167), one that ignores it is destroyed after --grace-period (168), both before
/// Slurm's KillWait runs out and SIGKILLs them. Tiny test guests: no real boot.
#[test]
fn one_cpu_steps_pin_to_their_own_core_and_scancel_is_shutdown_then_destroy() {
    let (c, _serial) = cluster();
    let grace = 2;
    let launch = |guest_name: &str, tag: &str| {
        let status = job_file(c, &format!("{tag}.status"));
        let _ = std::fs::remove_file(&status);
        let mut cmd = slurm_cmd(c, "srun");
        cmd.env("HPCVM_SLURM_TEST", format!("{}-{tag}", marker()))
            .args(["-c", "1", "--mem=256M", "--job-name", &job_name()])
            .arg(hpcvm_bin())
            .args(["run", "--from-allocation", "--verbose", "--memory", "32M"])
            .args(["--grace-period", &grace.to_string()])
            .arg("--status-file")
            .arg(&status)
            .arg("--kernel")
            .arg(guest(guest_name));
        (Client::spawn(cmd), status)
    };
    let (mut spin, spin_status) = launch("spin", "spin");
    spin.wait_line("spin: start", false, Duration::from_secs(60));
    let (mut aware, aware_status) = launch("shutdown-aware", "aware");
    aware.wait_line("shutdown-aware: ready", false, Duration::from_secs(60));

    let spin_pid = find_hpcvm(&format!("{}-spin", marker()), Duration::from_secs(5));
    let aware_pid = find_hpcvm(&format!("{}-aware", marker()), Duration::from_secs(5));
    let mut cores = Vec::new();
    for pid in [spin_pid, aware_pid] {
        // The process's own mask is the step's cpuset (task/affinity set it).
        let step: Vec<usize> = thread_affinities(pid)
            .into_iter()
            .find(|(name, _)| name == "hpcvm")
            .map(|(_, l)| parse_cpu_list(&l))
            .unwrap_or_else(|| panic!("no main thread in {:?}", thread_affinities(pid)));
        assert_eq!(step.len(), 1, "a -c 1 step has one CPU, got {step:?}");
        assert_eq!(vcpu_cpus(pid), vec![("vcpu0".to_string(), step.clone())]);
        cores.push(step[0]);
    }
    assert_ne!(cores[0], cores[1], "both steps on the same core");

    let mut cmd = slurm_cmd(c, "scancel");
    cmd.args(["--name", &job_name()]);
    let t0 = Instant::now();
    run(cmd);
    let (_, aware_out, aware_err) = aware.finish(KILL_WAIT + SLACK);
    let aware_took = t0.elapsed();
    let (_, spin_out, spin_err) = spin.finish(KILL_WAIT + SLACK);
    let spin_took = t0.elapsed();

    let aware_json = read(&aware_status);
    let spin_json = read(&spin_status);
    assert!(
        aware_out
            .iter()
            .any(|l| l == "shutdown-aware: got ctrl-alt-del"),
        "{aware_out:?}\n{aware_err}"
    );
    assert!(
        aware_json.contains(r#""exit_code":167"#),
        "{aware_json}\n{aware_err}"
    );
    assert!(aware_took < KILL_WAIT, "shutdown-aware took {aware_took:?}");
    assert_eq!(verbose_cpus(&aware_err), vec![cores[1]], "{aware_err}");

    assert!(
        spin_json.contains(r#""exit_code":168"#),
        "{spin_json}\n{spin_err}\n{spin_out:?}"
    );
    assert!(
        spin_took >= Duration::from_secs(grace) && spin_took < KILL_WAIT + SLACK,
        "spin destroyed after {spin_took:?} (grace {grace} s, KillWait {KILL_WAIT:?})"
    );
    assert_eq!(verbose_cpus(&spin_err), vec![cores[0]], "{spin_err}");
    assert_no_hpcvm_left(&marker());
}

/// `srun -c 2 --mem=512M hpcvm run --from-allocation -- nproc`: 2 vCPUs, pinned 1:1
/// to the two host CPUs of the step. Real guest.
///
/// A plain `srun` exports no SLURM_MEM_PER_NODE (only sbatch/salloc do) and
/// proctrack/linuxproc sets no memory cgroup limit: the size comes from scontrol.
#[test]
fn srun_from_allocation_nproc_and_vcpu_pinning() {
    let (c, _serial) = cluster();
    require_real_guest();
    let step_cpus = step_cpus(c, 2);
    assert_eq!(step_cpus.len(), 2, "srun -c 2 gave {step_cpus:?}");

    let tag = format!("{}-nproc", marker());
    let mut cmd = slurm_cmd(c, "srun");
    cmd.env("HPCVM_SLURM_TEST", &tag)
        .args(["-c", "2", "--mem=512M", "--job-name", &job_name()])
        .arg(hpcvm_bin())
        .args(["run", "--from-allocation", "--verbose"])
        .args(["--", "/bin/sh", "-c", "nproc; sleep 3"]);
    let mut vm = Client::spawn(cmd);
    vm.wait_line("2", false, BOOT);
    // The job sleeps 3 s after nproc: look at the vCPU threads meanwhile.
    let pid = find_hpcvm(&tag, Duration::from_secs(2));
    let vcpus = vcpu_cpus(pid);
    let (code, out, err) = vm.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "stdout {out:?}\nstderr {err}");
    assert_eq!(verbose_cpus(&err), step_cpus, "{err}");
    assert!(
        err.contains("from allocation: 2 vCPUs"),
        "verbose line: {err}"
    );
    assert!(
        err.contains("448 MiB guest RAM (Slurm's 512 MiB (scontrol show step ")
            && err.contains("TRES mem=512M) - 64 MiB reserve)"),
        "memory from scontrol: {err}"
    );
    assert_eq!(
        vcpus,
        vec![
            ("vcpu0".to_string(), vec![step_cpus[0]]),
            ("vcpu1".to_string(), vec![step_cpus[1]]),
        ],
        "vCPU threads not pinned 1:1 to the step's CPUs {step_cpus:?}"
    );
    assert_no_hpcvm_left(&marker());
}

/// The guest job of every stop test: says it started, answers SIGTERM with a line and
/// status 7.
const TRAP_JOB: &str =
    r#"/bin/sh -c "trap 'echo got-term; exit 7' TERM; echo started; sleep 1000""#;

/// Checks common to the stop tests once the job has gone.
fn assert_job_got_term(out: &Path, status: &Path, huge_before: Option<u64>) {
    let text = read(out);
    let json = read(status);
    let hint = if json.contains("second SIGTERM") {
        "\n(hpcvm took Slurm's repeated SIGTERM for a destroy request: on a time limit \
         slurmd signals each step twice; with SlurmdDebug=debug2 its log shows \
         `container signal 15` to the step twice)"
    } else {
        ""
    };
    assert!(
        text.lines().any(|l| l == "got-term"),
        "no got-term in the job output; hpcvm status: {json}{hint}\noutput:\n{text}"
    );
    assert!(
        json.contains(r#""exit_code":7"#) && json.contains(r#""source":"job""#),
        "hpcvm status: {json}\noutput:\n{text}"
    );
    assert_no_hpcvm_left(&marker());
    if let Some(before) = huge_before {
        assert_eq!(free_2m(), before, "HugePages_Free changed");
    }
}

/// `scancel` of a batch job: the guest job gets SIGTERM (`got-term`), hpcvm exits with
/// its status 7 and the job is gone well within KillWait. Memory from the allocation
/// (sbatch exports SLURM_MEM_PER_NODE). Real guest.
#[test]
fn scancel_reaches_the_guest_job_as_sigterm() {
    let (c, _serial) = cluster();
    require_real_guest();
    let huge_before = free_2m();
    let status = job_file(c, "scancel.status");
    let _ = std::fs::remove_file(&status);
    let body = format!(
        "exec srun {} run --from-allocation --verbose --grace-period 3 --status-file {} -- {TRAP_JOB}",
        hpcvm_bin().display(),
        status.display()
    );
    let (id, out) = sbatch(c, &["-c", "2", "--mem=320M"], "scancel", &body);
    wait_file_line(&out, "started", false, BOOT);
    // Let the guest's shell exec `sleep` first: a SIGTERM between its fork and exec is
    // lost for the child, and the shell runs its trap only once `sleep 1000` ends.
    // Guest system calls are emulated on software KVM, so that window is long.
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    scancel(c, &id);
    let gone = wait_gone(c, &id, KILL_WAIT + SLACK + Duration::from_secs(10));
    let took = gone - t0;
    let info = job_info(c, &id);
    assert_job_got_term(&out, &status, Some(huge_before));
    assert!(
        read(&out)
            .contains("256 MiB guest RAM (Slurm's 320 MiB (SLURM_MEM_PER_NODE) - 64 MiB reserve)"),
        "{}",
        read(&out)
    );
    assert_eq!(
        info.get("JobState").map(String::as_str),
        Some("CANCELLED"),
        "{info:?}"
    );
    assert!(
        took < KILL_WAIT,
        "job took {took:?} to end after scancel (KillWait {KILL_WAIT:?})"
    );
}

/// A job whose time limit runs out: Slurm's SIGTERM reaches the guest job (`got-term`),
/// the job ends within KillWait of it, hugepage-backed guest RAM goes back to the pool.
/// Slurm's time limits have a one-minute resolution and are checked every 30 s, so this
/// test takes 60-95 s (the guest boots meanwhile). Real guest.
#[test]
fn time_limit_reaches_the_guest_job_as_sigterm() {
    let (c, _serial) = cluster();
    require_real_guest();
    let pool = Reservation::take(160);
    let huge_before = free_2m();
    let status = job_file(c, "timeout.status");
    let _ = std::fs::remove_file(&status);
    let body = format!(
        "exec srun {} run --from-allocation --memory 256M,hugepages=2M --grace-period 3 \
         --status-file {} -- {TRAP_JOB}",
        hpcvm_bin().display(),
        status.display()
    );
    let (id, out) = sbatch(c, &["-c", "2", "--mem=512M", "--time=1"], "timeout", &body);
    wait_file_line(&out, "started", false, BOOT);
    assert!(
        free_2m() < huge_before,
        "guest RAM is not on hugepages:\n{}",
        read(&out)
    );
    // Limit 60 s, enforced at slurmctld's next 30 s check.
    let hit = wait_file_line(&out, "DUE TO TIME LIMIT", true, Duration::from_secs(120));
    let gone = wait_gone(c, &id, KILL_WAIT + SLACK + Duration::from_secs(10));
    let info = job_info(c, &id);
    assert_eq!(
        info.get("JobState").map(String::as_str),
        Some("TIMEOUT"),
        "{info:?}"
    );
    assert_job_got_term(&out, &status, Some(huge_before));
    drop(pool);
    let took = gone.saturating_duration_since(hit);
    assert!(
        took < KILL_WAIT,
        "job took {took:?} to end after its time limit (KillWait {KILL_WAIT:?})"
    );
}

/// Checkpoint/restart under Slurm the way a site wires it (docs/checkpoint.md): a
/// requeueable batch job runs `srun hpcvm run --checkpoint-on SIGUSR1 --checkpoint-dir D
/// --resume-from D`, Slurm signals the step with SIGUSR1 once the guest's counter has
/// reached 2 (`scancel --signal=USR1`, the delivery `sbatch --signal=USR1@T` uses),
/// hpcvm checkpoints and stops with 173, the script requeues the job, and the requeued
/// run resumes the VM from D: every tick appears exactly once in the (appended) job
/// output, and the job ends with the guest job's status 7 after one restart. The VM
/// shares the job's working directory (the default), whose virtiofsd hands its state
/// across the requeue. Real guest.
#[test]
fn sigusr1_checkpoints_and_the_requeued_job_resumes_the_vm() {
    let (c, _serial) = cluster();
    require_real_guest();
    let ck = job_file(c, "requeue.ckpt");
    let status = job_file(c, "requeue.status");
    let work = job_file(c, "requeue.work");
    let _ = std::fs::remove_dir_all(&ck);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let _ = std::fs::remove_file(&status);
    let body = format!(
        "srun {hpcvm} run --from-allocation --status-file {status} \
         --checkpoint-on SIGUSR1 --checkpoint-dir {ck} --resume-from {ck} -- \
         /bin/sh -c 'exec 3>>ticks.txt; i=0; while [ $i -lt 6 ]; do i=$((i+1)); echo tick $i; \
         echo tick $i >&3; sleep 1; done; exit 7'\n\
         rc=$?\n\
         echo \"hpcvm exited $rc (restart ${{SLURM_RESTART_COUNT:-0}})\"\n\
         if [ $rc = 173 ]; then scontrol requeue $SLURM_JOB_ID; fi\n\
         exit $rc",
        hpcvm = hpcvm_bin().display(),
        status = status.display(),
        ck = ck.display(),
    );
    let (id, out) = sbatch(
        c,
        &[
            "-c",
            "2",
            "--mem=320M",
            "--requeue",
            "--open-mode=append",
            &format!("--chdir={}", work.display()),
        ],
        "requeue",
        &body,
    );
    wait_file_line(&out, "tick 2", false, BOOT);
    let mut cmd = slurm_cmd(c, "scancel");
    cmd.args(["--signal=USR1", &id]);
    run(cmd);
    wait_file_line(
        &out,
        "hpcvm exited 173 (restart 0)",
        false,
        Duration::from_secs(60),
    );
    // A requeued job waits for its old credential to expire (Reason=BeginTime, about
    // 2 minutes) before it may start again; starting it sooner (`scontrol update
    // StartTime=now`) makes slurmd kill it ("Job credential revoked").
    wait_file_line(
        &out,
        "hpcvm exited 7 (restart 1)",
        false,
        Duration::from_secs(200) + BOOT,
    );
    wait_gone(c, &id, Duration::from_secs(30));

    let text = read(&out);
    for n in 1..=6 {
        let seen = text.lines().filter(|l| *l == format!("tick {n}")).count();
        assert_eq!(seen, 1, "tick {n} appears {seen} times:\n{text}");
    }
    assert!(
        text.contains("hpcvm: resuming the VM checkpointed in"),
        "{text}"
    );
    // Written through one open file in the shared working directory, across the requeue.
    let shared = read(&work.join("ticks.txt"));
    let expected: String = (1..=6).map(|n| format!("tick {n}\n")).collect();
    assert_eq!(
        shared, expected,
        "ticks.txt in the shared working directory"
    );
    let json = read(&status);
    assert!(
        json.contains(r#""exit_code":7"#) && json.contains(r#""source":"job""#),
        "hpcvm status: {json}\noutput:\n{text}"
    );
    let info = job_info(c, &id);
    assert_eq!(
        info.get("Restarts").map(String::as_str),
        Some("1"),
        "{info:?}"
    );
    assert_eq!(
        info.get("ExitCode").map(String::as_str),
        Some("7:0"),
        "{info:?}"
    );
    assert_no_hpcvm_left(&marker());
    let _ = std::fs::remove_dir_all(&ck);
    let _ = std::fs::remove_dir_all(&work);
}
