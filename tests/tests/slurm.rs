//! hpcvm under a real Slurm: a single-node cluster on loopback (`tests/slurm/cluster.sh`,
//! started once for this test binary and stopped when it exits), jobs launched with
//! `srun` and `sbatch` exactly as a site would, and Slurm's own stop sequences
//! (`scancel`, an expired time limit: SIGCONT+SIGTERM, KillWait, SIGKILL) reaching the
//! guest job as hpcvm's shutdown -> grace period -> destroy.
//!
//! Real guest boots take 20-40 s on a software-KVM host, so only three tests boot the
//! real guest (`make guest`); the others use the tiny test guests. The tests share one
//! cluster with two cores, so they run one at a time (a mutex), whatever
//! `--test-threads` says. See tests/slurm/README.md.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hpcvm_tests::guest;
use hpcvm_tests::hugepages::{free_2m, Reservation};
use hpcvm_tests::proc::{hpcvm_bin, thread_affinities};

/// Slurm's KillWait in tests/slurm/slurm.conf.in: seconds between SIGTERM and SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Boot of the real guest plus the job's first line; software KVM takes 20-60 s.
const BOOT: Duration = Duration::from_secs(240);
/// Slack for Slurm's own bookkeeping on top of the times under test (RPCs, epilog,
/// squeue polling) on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------
// The cluster

struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm/cluster.sh")
}

fn slurm_dir() -> PathBuf {
    std::env::var_os("HPCVM_SLURM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/hpcvm-slurm"))
}

/// Marker in the environment of everything this test binary launches through Slurm
/// (srun and sbatch pass the environment on), to find our hpcvm processes among
/// anyone else's.
fn marker() -> String {
    format!("hpcvm-slurm-test-{}", std::process::id())
}

/// Job name of every job this binary submits.
fn job_name() -> String {
    marker()
}

/// Stops what this binary started, at process exit (after the last test, passed or
/// failed): our jobs, our hpcvm processes, and the cluster if it was not up before.
extern "C" fn at_exit() {
    let started_here = STARTED_HERE.get().copied().unwrap_or(false);
    if let Some(c) = CLUSTER.get() {
        let _ = slurm_cmd(c, "scancel")
            .args(["--name", &job_name()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if started_here {
        let log = std::fs::File::create(slurm_dir().join("log/stop.log")).ok();
        let mut cmd = Command::new(script());
        cmd.arg("stop").stdin(Stdio::null());
        if let Some(log) = log {
            if let Ok(l2) = log.try_clone() {
                cmd.stdout(log).stderr(l2);
            }
        }
        let _ = cmd.status();
    }
    // Anything of ours that escaped Slurm's process tracking.
    for pid in our_hpcvm_pids(&marker()) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static STARTED_HERE: OnceLock<bool> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

/// The cluster (started on first use) and exclusive use of it for one test.
fn cluster() -> (&'static Cluster, MutexGuard<'static, ()>) {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = CLUSTER.get_or_init(|| {
        let was_up = Command::new(script())
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(at_exit) };
        let _ = STARTED_HERE.set(!was_up);
        let out = Command::new(script())
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .expect("run tests/slurm/cluster.sh start");
        assert!(
            out.status.success(),
            "tests/slurm/cluster.sh start failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = slurm_dir();
        Cluster {
            conf: dir.join("etc/slurm.conf"),
            dir,
        }
    });
    (c, guard)
}

fn slurm_cmd(c: &Cluster, program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("SLURM_CONF", &c.conf)
        .env("HPCVM_SLURM_TEST", marker())
        .env("SLURM_JOB_NAME", job_name())
        .env("SBATCH_JOB_NAME", job_name())
        .env_remove("SLURM_JOB_ID")
        .env_remove("SLURM_JOBID")
        .stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Output {
    let out = cmd.output().expect("run a Slurm command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_of(cmd: Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// A file under the cluster's job dir, unique to this binary.
fn job_file(c: &Cluster, name: &str) -> PathBuf {
    c.dir
        .join("jobs")
        .join(format!("{}-{name}", std::process::id()))
}

/// The real guest must be built; say how if it is not.
fn require_real_guest() {
    let dir = std::env::var_os("HPCVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            hpcvm_bin()
                .parent()
                .and_then(|p| p.parent())
                .map(|p| p.join("guest"))
                .unwrap_or_default()
        });
    assert!(
        dir.join("vmlinux").is_file(),
        "no guest kernel in {}: run `make guest` first (the Slurm tests boot the real guest)",
        dir.display()
    );
}

// ---------------------------------------------------------------------------------
// Jobs, processes, files

/// A launched client (srun) whose stdout arrives line by line; killed on drop.
struct Client {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: mpsc::Receiver<String>,
}

impl Client {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits for a stdout line equal to `line` (or containing it, if `contains`).
    fn wait_line(&mut self, want: &str, contains: bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = if contains {
                        l.contains(want)
                    } else {
                        l == want
                    };
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    let err = if status.is_some() {
                        self.stderr
                            .recv_timeout(Duration::from_secs(1))
                            .unwrap_or_default()
                    } else {
                        String::new()
                    };
                    panic!(
                        "no line {want:?} within {timeout:?} (exit: {status:?})\nstdout: {:?}\nstderr: {err}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Waits for the client to exit: (exit code, all stdout, stderr).
    fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "client still running after {timeout:?}; stdout {:?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        let err = self
            .stderr
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_default();
        (status.code(), std::mem::take(&mut self.seen), err)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// hpcvm processes whose environment carries `HPCVM_SLURM_TEST=<marker...>`.
fn our_hpcvm_pids(marker: &str) -> Vec<u32> {
    let needle = format!("HPCVM_SLURM_TEST={marker}");
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != "hpcvm" {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env
            .split(|&b| b == 0)
            .any(|v| v.starts_with(needle.as_bytes()))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Waits for exactly one hpcvm process tagged with `marker` and returns its pid.
fn find_hpcvm(marker: &str, timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = our_hpcvm_pids(marker);
        match pids.as_slice() {
            [pid] => return *pid,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => panic!("expected one hpcvm process tagged {marker}, found {pids:?}"),
        }
    }
}

fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                cpus.extend(a.trim().parse::<usize>().unwrap()..=b.trim().parse::<usize>().unwrap())
            }
            None => cpus.push(part.trim().parse().unwrap()),
        }
    }
    cpus
}

/// `Cpus_allowed_list` of the vCPU threads of `pid`, by vCPU index.
fn vcpu_cpus(pid: u32) -> Vec<(String, Vec<usize>)> {
    thread_affinities(pid)
        .into_iter()
        .filter(|(name, _)| name.starts_with("vcpu"))
        .map(|(name, list)| (name, parse_cpu_list(&list)))
        .collect()
}

/// Host CPUs of the "hpcvm: from allocation: ... pinned to host CPUs LIST; ..." line.
fn verbose_cpus(stderr: &str) -> Vec<usize> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("hpcvm: from allocation:"))
        .unwrap_or_else(|| panic!("no `hpcvm: from allocation:` line in stderr:\n{stderr}"));
    let list = line
        .split("pinned to host CPUs ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no CPU list in {line:?}"));
    parse_cpu_list(list)
}

/// Submits `body` as a batch script; returns the job id.
fn sbatch(c: &Cluster, args: &[&str], name: &str, body: &str) -> (String, PathBuf) {
    let script = job_file(c, &format!("{name}.sh"));
    let out = job_file(c, &format!("{name}.out"));
    let _ = std::fs::remove_file(&out);
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut cmd = slurm_cmd(c, "sbatch");
    cmd.args(["--parsable", "--job-name", &job_name(), "--output"])
        .arg(&out)
        .args(args)
        .arg(&script);
    let id = stdout_of(cmd).trim().split(';').next().unwrap().to_string();
    assert!(id.parse::<u64>().is_ok(), "sbatch printed {id:?}");
    (id, out)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the file has a line equal to `line` (or containing it, if `contains`).
fn wait_file_line(path: &Path, needle: &str, contains: bool, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    let has = |text: String| {
        text.lines().any(|l| {
            if contains {
                l.contains(needle)
            } else {
                l == needle
            }
        })
    };
    while !has(read(path)) {
        assert!(
            Instant::now() < deadline,
            "{} has no {needle:?} after {timeout:?}:\n{}",
            path.display(),
            read(path)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Instant::now()
}

/// True while squeue lists the job (pending, running or completing).
fn in_queue(c: &Cluster, id: &str) -> bool {
    let mut cmd = slurm_cmd(c, "squeue");
    cmd.args(["-h", "-o", "%i %T", "-j", id]);
    // squeue -j on a job that has left the queue may exit 1 ("Invalid job id").
    let out = cmd.output().expect("squeue");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// Waits until the job has left the queue; returns when that was seen.
fn wait_gone(c: &Cluster, id: &str, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    while in_queue(c, id) {
        assert!(
            Instant::now() < deadline,
            "job {id} still in the queue after {timeout:?}: {}",
            job_info(c, id).get("JobState").cloned().unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Instant::now()
}

/// `scontrol show job -o ID` as key/value pairs (finished jobs stay MinJobAge = 300 s).
fn job_info(c: &Cluster, id: &str) -> HashMap<String, String> {
    let mut cmd = slurm_cmd(c, "scontrol");
    cmd.args(["show", "job", "-o", id]);
    let out = cmd.output().expect("scontrol");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn scancel(c: &Cluster, id: &str) {
    let mut cmd = slurm_cmd(c, "scancel");
    cmd.arg(id);
    run(cmd);
}

/// Asserts that no hpcvm of ours runs any more (waiting briefly for exits in flight).
fn assert_no_hpcvm_left(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = our_hpcvm_pids(marker);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("hpcvm processes left behind: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------
// Tests

/// The cluster gives each step the CPUs it asked for, as its affinity mask: what
/// `--from-allocation` reads.
#[test]
fn cluster_binds_steps_to_their_cpus() {
    let (c, _serial) = cluster();
    let all = hpcvm_tests::proc::allowed_cpus();
    let mut cmd = slurm_cmd(c, "srun");
    cmd.args(["-c", "1", "grep", "Cpus_allowed_list", "/proc/self/status"]);
    let one = stdout_of(cmd);
    let one = parse_cpu_list(one.split(':').nth(1).unwrap_or(""));
    assert_eq!(one.len(), 1, "srun -c 1 gave CPUs {one:?}");
    assert!(all.contains(&one[0]), "{one:?} not in {all:?}");

    let mut cmd = slurm_cmd(c, "srun");
    cmd.args([
        "-c",
        &all.len().to_string(),
        "grep",
        "Cpus_allowed_list",
        "/proc/self/status",
    ]);
    let every = stdout_of(cmd);
    assert_eq!(parse_cpu_list(every.split(':').nth(1).unwrap_or("")), all);
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
    let mut cmd = slurm_cmd(c, "srun");
    cmd.args(["-c", "2", "grep", "Cpus_allowed_list", "/proc/self/status"]);
    let step_cpus = parse_cpu_list(stdout_of(cmd).split(':').nth(1).unwrap_or(""));
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
