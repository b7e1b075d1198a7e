//! A single-node Slurm cluster on loopback for the tests that run hpcvm under a real
//! Slurm (tests/tests/slurm*.rs): `tests/slurm/cluster.sh` starts it on first use in
//! a test binary and stops it when that binary exits (if it was not up before);
//! clients (`srun`) whose output arrives line by line; the hpcvm processes a test
//! launched, found by a marker in their environment. The tests of one binary share
//! the cluster's two cores, so [`cluster`] hands it to one test at a time.
//! See tests/slurm/README.md.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::proc::{hpcvm_bin, thread_affinities};

/// Slurm's KillWait in tests/slurm/slurm.conf.in: seconds between SIGTERM and SIGKILL.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// Boot of the real guest plus the job's first line; software KVM takes 20-60 s.
pub const BOOT: Duration = Duration::from_secs(240);
/// Slack for Slurm's own bookkeeping on top of the times under test (RPCs, epilog,
/// squeue polling) on a loaded 2-core machine.
pub const SLACK: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------
// The cluster

pub struct Cluster {
    /// `$HPCVM_SLURM_DIR`.
    pub dir: PathBuf,
    /// Its slurm.conf.
    pub conf: PathBuf,
}

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm/cluster.sh")
}

pub fn slurm_dir() -> PathBuf {
    std::env::var_os("HPCVM_SLURM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/hpcvm-slurm"))
}

/// Marker in the environment of everything this test binary launches through Slurm
/// (srun and sbatch pass the environment on), to find our hpcvm processes among
/// anyone else's.
pub fn marker() -> String {
    format!("hpcvm-slurm-test-{}", std::process::id())
}

/// Job name of every job this binary submits.
pub fn job_name() -> String {
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
pub fn cluster() -> (&'static Cluster, MutexGuard<'static, ()>) {
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

pub fn slurm_cmd(c: &Cluster, program: &str) -> Command {
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

/// The host CPUs a step of `srun -c N` gets (its affinity, what
/// `--from-allocation` reads).
pub fn step_cpus(c: &Cluster, cpus: usize) -> Vec<usize> {
    let mut cmd = slurm_cmd(c, "srun");
    cmd.args([
        "-c",
        &cpus.to_string(),
        "grep",
        "Cpus_allowed_list",
        "/proc/self/status",
    ]);
    parse_cpu_list(stdout_of(cmd).split(':').nth(1).unwrap_or(""))
}

pub fn run(mut cmd: Command) -> Output {
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

pub fn stdout_of(cmd: Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// A file under the cluster's job dir, unique to this binary.
pub fn job_file(c: &Cluster, name: &str) -> PathBuf {
    c.dir
        .join("jobs")
        .join(format!("{}-{name}", std::process::id()))
}

/// The real guest must be built; say how if it is not.
pub fn require_real_guest() {
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
pub struct Client {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: mpsc::Receiver<String>,
}

impl Client {
    pub fn spawn(mut cmd: Command) -> Self {
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
    pub fn wait_line(&mut self, want: &str, contains: bool, timeout: Duration) {
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
    pub fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>, String) {
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
pub fn our_hpcvm_pids(marker: &str) -> Vec<u32> {
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
pub fn find_hpcvm(marker: &str, timeout: Duration) -> u32 {
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

pub fn parse_cpu_list(list: &str) -> Vec<usize> {
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
pub fn vcpu_cpus(pid: u32) -> Vec<(String, Vec<usize>)> {
    thread_affinities(pid)
        .into_iter()
        .filter(|(name, _)| name.starts_with("vcpu"))
        .map(|(name, list)| (name, parse_cpu_list(&list)))
        .collect()
}

/// Host CPUs of the "hpcvm: from allocation: ... pinned to host CPUs LIST; ..." line.
pub fn verbose_cpus(stderr: &str) -> Vec<usize> {
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
pub fn sbatch(c: &Cluster, args: &[&str], name: &str, body: &str) -> (String, PathBuf) {
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

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the file has a line equal to `line` (or containing it, if `contains`).
pub fn wait_file_line(path: &Path, needle: &str, contains: bool, timeout: Duration) -> Instant {
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
pub fn in_queue(c: &Cluster, id: &str) -> bool {
    let mut cmd = slurm_cmd(c, "squeue");
    cmd.args(["-h", "-o", "%i %T", "-j", id]);
    // squeue -j on a job that has left the queue may exit 1 ("Invalid job id").
    let out = cmd.output().expect("squeue");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// Waits until the job has left the queue; returns when that was seen.
pub fn wait_gone(c: &Cluster, id: &str, timeout: Duration) -> Instant {
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
pub fn job_info(c: &Cluster, id: &str) -> HashMap<String, String> {
    let mut cmd = slurm_cmd(c, "scontrol");
    cmd.args(["show", "job", "-o", id]);
    let out = cmd.output().expect("scontrol");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn scancel(c: &Cluster, id: &str) {
    let mut cmd = slurm_cmd(c, "scancel");
    cmd.arg(id);
    run(cmd);
}

/// Asserts that no hpcvm of ours runs any more (waiting briefly for exits in flight).
pub fn assert_no_hpcvm_left(marker: &str) {
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
