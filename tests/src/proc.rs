//! Running the `hpcvm` binary as a child process, the way a queueing system would:
//! every VM lives in its own process, so KVM state is always released, and every run
//! has a deadline so a hung guest fails the test instead of hanging CI.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Deadline for one guest run. Guest ring-0 code is emulated on software-KVM hosts, but
/// the tiny guests finish in well under a second.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the `hpcvm` binary: `$HPCVM_BIN`, else the one cargo built beside this test.
pub fn hpcvm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HPCVM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/hpcvm
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("hpcvm"))
        .expect("target directory layout");
    assert!(
        bin.is_file(),
        "{} not found: build it first with `cargo build -p vmm --bin hpcvm` \
         (`make test` does), or point HPCVM_BIN at it",
        bin.display()
    );
    bin
}

/// What a finished run left behind.
#[derive(Debug)]
pub struct Finished {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `hpcvm ARGS` to completion; kills it and panics past `timeout`.
pub fn run_hpcvm(args: &[&str], timeout: Duration) -> Finished {
    run_program(&hpcvm_bin(), args, timeout)
}

/// Runs `program ARGS` to completion (stdin empty); kills it and panics past `timeout`.
pub fn run_program(program: &std::path::Path, args: &[&str], timeout: Duration) -> Finished {
    let start = Instant::now();
    let mut child = spawn_program(program, args);
    let (out_rx, err_rx) = drain(&mut child);
    loop {
        if let Some(status) = child.try_wait().expect("wait for hpcvm") {
            return Finished {
                code: status.code(),
                stdout: out_rx.recv().unwrap_or_default(),
                stderr: err_rx.recv().unwrap_or_default(),
                elapsed: start.elapsed(),
            };
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} still running after {timeout:?}; stdout so far: {:?}",
                program.display(),
                out_rx
                    .recv_timeout(Duration::from_secs(1))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `run --kernel <test guest NAME> EXTRA...` as hpcvm arguments.
pub fn guest_args(name: &str, extra: &[&str]) -> Vec<String> {
    let kernel = crate::guest(name);
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Boots test guest `name` with `extra` arguments and waits for hpcvm to exit.
pub fn run_guest(name: &str, extra: &[&str]) -> Finished {
    let args = guest_args(name, extra);
    run_hpcvm(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        DEFAULT_TIMEOUT,
    )
}

/// Boots test guest `name` with `extra` arguments and leaves it running.
pub fn start_guest(name: &str, extra: &[&str]) -> RunningVm {
    let args = guest_args(name, extra);
    RunningVm::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Path of another binary of this workspace, built beside `hpcvm`.
pub fn sibling_bin(name: &str) -> PathBuf {
    hpcvm_bin().with_file_name(name)
}

/// Starts `hpcvm ARGS` with piped stdout/stderr and no stdin.
pub fn spawn(args: &[&str]) -> Child {
    spawn_program(&hpcvm_bin(), args)
}

/// Starts `program ARGS` with piped stdout/stderr and no stdin.
fn spawn_program(program: &std::path::Path, args: &[&str]) -> Child {
    spawn_program_env(program, args, &[])
}

/// Starts `program ARGS` with `env` added, piped stdout/stderr and no stdin.
fn spawn_program_env(program: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    spawn_in(program, args, env, None)
}

/// Starts `program ARGS` with `env` added, in `cwd` if given, piped stdout/stderr
/// and no stdin.
fn spawn_in(
    program: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    cwd: Option<&std::path::Path>,
) -> Child {
    let mut cmd = Command::new(program);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()))
}

fn drain(child: &mut Child) -> (mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let collect = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        rx
    };
    (
        collect(Box::new(child.stdout.take().expect("piped stdout"))),
        collect(Box::new(child.stderr.take().expect("piped stderr"))),
    )
}

/// A running hpcvm whose stdout is read line by line; killed (SIGKILL) on drop.
pub struct RunningVm {
    /// The child process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl RunningVm {
    /// Starts `hpcvm ARGS`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_env(args, &[])
    }

    /// Starts `hpcvm ARGS` with `env` added to its environment.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(args, env, None)
    }

    /// Starts `hpcvm ARGS` in the working directory `dir` (which `run` shares with
    /// the guest by default).
    pub fn start_in(dir: &std::path::Path, args: &[&str]) -> Self {
        Self::start_with(args, &[], Some(dir))
    }

    fn start_with(args: &[&str], env: &[(&str, &str)], cwd: Option<&std::path::Path>) -> Self {
        let mut child = spawn_in(&hpcvm_bin(), args, env, cwd);
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits until the guest prints a line containing `needle`; panics past `timeout`.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    let mut err = String::new();
                    if let Some(e) = self.child.stderr.as_mut() {
                        if status.is_some() {
                            let _ = e.read_to_string(&mut err);
                        }
                    }
                    panic!("no line containing {needle:?} within {timeout:?} (exit: {status:?}, stderr: {err})");
                }
            }
        }
    }

    /// The next line of guest output, if one arrives within `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Reads lines into `lines` until one starts with `prefix`; panics past `timeout`.
    pub fn read_until(&mut self, lines: &mut Vec<String>, prefix: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !lines.iter().any(|l| l.starts_with(prefix)) {
            assert!(Instant::now() < deadline, "no {prefix:?}: {lines:?}");
            if let Some(l) = self.next_line(Duration::from_secs(1)) {
                lines.push(l);
            }
        }
    }

    /// Reads every line into `lines` until the output ends (the process exited).
    pub fn drain(&mut self, lines: &mut Vec<String>) {
        while let Some(l) = self.next_line(Duration::from_millis(500)) {
            lines.push(l);
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the VMM with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The tick numbers and guest uptimes (seconds) of `tick N UPTIME` lines in `lines`.
pub fn ticks(lines: &[String]) -> Vec<(u32, f64)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.strip_prefix("tick ")?.split(' ');
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect()
}

/// Asserts that `lines` hold `tick 0 ..` to `tick N-1 ..`, each exactly once, in order.
pub fn assert_ticks_once(lines: &[String], n: u32) {
    assert_eq!(
        ticks(lines).iter().map(|t| t.0).collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>(),
        "every tick exactly once, in order: {lines:?}"
    );
}

/// A job that opens `log` in its working directory once and, through that one
/// descriptor, writes `line I` while it prints `tick I UPTIME`, for I in 0..n a
/// second apart; then it runs `then`.
pub fn open_file_job(n: u32, then: &str) -> String {
    format!(
        "exec 3>>log; i=0; while [ $i -lt {n} ]; do echo line $i >&3; \
         echo tick $i $(cut -d' ' -f1 /proc/uptime); i=$((i+1)); sleep 1; done; {then}"
    )
}

/// What [`open_file_job`] has written to `log` after `n` ticks.
pub fn open_file_log(n: usize) -> String {
    (0..n).map(|i| format!("line {i}\n")).collect()
}

/// (thread name, Cpus_allowed_list) of every thread of process `pid`.
pub fn thread_affinities(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir)
        .expect("read /proc/PID/task")
        .flatten()
    {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), allowed));
    }
    out.sort();
    out
}

/// CPUs this (test) process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_string();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// True when the host's KVM is software virtualization (kvm_pvm).
pub fn software_kvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `hpcvm ctl --api-socket SOCKET ARGS...`.
pub fn ctl(socket: &std::path::Path, args: &[&str]) -> Finished {
    let mut all = vec!["ctl", "--api-socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    run_hpcvm(&all, Duration::from_secs(30))
}

/// A unique socket path under the temp dir for one test.
pub fn socket_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hpcvm-{test}-{}.sock", std::process::id()))
}

impl RunningVm {
    /// Waits for the VMM to exit; returns (exit code, stderr, time waited). Panics
    /// past `timeout` (after killing it).
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for hpcvm") {
                let mut err = String::new();
                if let Some(e) = self.child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err, start.elapsed());
            }
            if start.elapsed() > timeout {
                self.kill();
                panic!("hpcvm did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// virtiofsd processes serving `dir`.
pub fn virtiofsds_for(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie waiting for init to reap it holds nothing.
            cmd.contains("virtiofsd") && cmd.contains(&needle) && !state.contains(") Z ")
        })
        .collect()
}

/// Waits up to 5 s for every virtiofsd of `dir` to be gone.
pub fn assert_no_virtiofsd(dir: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !virtiofsds_for(dir).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "virtiofsd still serving {}: {:?}",
            dir.display(),
            virtiofsds_for(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
