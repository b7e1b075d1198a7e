//! Real /dev/kvm: shutdown asks and then destroys after the grace period, destroy stops
//! a busy guest at once and returns every hugepage, SIGTERM/SIGINT map onto them, and
//! the API socket file never outlives the VMM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hpcvm_tests::guest;
use hpcvm_tests::hugepages::{free_2m, Reservation};
use hpcvm_tests::proc::{
    ctl, run_guest, run_hpcvm, signal, socket_path, start_guest, RunningVm, DEFAULT_TIMEOUT,
};

const BOOT: Duration = Duration::from_secs(60);

fn start(guest_name: &str, extra: &[&str]) -> RunningVm {
    start_guest(guest_name, extra)
}

fn spin(extra: &[&str]) -> RunningVm {
    let mut vm = start("spin", extra);
    vm.wait_for_line("spin: start", BOOT);
    vm
}

#[test]
fn ignored_shutdown_is_destroyed_when_the_grace_period_ends() {
    let sock = socket_path("grace");
    let mut vm = spin(&["--memory", "32M", "--api-socket", sock.to_str().unwrap()]);
    let asked = Instant::now();
    let r = ctl(&sock, &["shutdown", "--timeout", "1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains(r#""state":"shutting-down""#),
        "{}",
        r.stdout
    );
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    let took = asked.elapsed();
    assert_eq!(code, Some(168), "{err}");
    assert!(
        err.contains("did not stop within the 1.000 s grace period"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(!sock.exists(), "socket file removed");
}

#[test]
fn sigterm_asks_then_grace_destroys() {
    let mut vm = spin(&["--memory", "32M", "--grace-period", "0.5"]);
    let sent = Instant::now();
    signal(vm.pid(), libc::SIGTERM);
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    let took = sent.elapsed();
    assert_eq!(code, Some(168), "{err}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
        "{took:?}"
    );
}

#[test]
fn second_sigterm_destroys_at_once() {
    let mut vm = spin(&["--cpus", "2", "--memory", "32M", "--grace-period", "60"]);
    signal(vm.pid(), libc::SIGTERM);
    // Past the 1 s in which a repeat counts as the same request.
    std::thread::sleep(Duration::from_millis(1200));
    let sent = Instant::now();
    signal(vm.pid(), libc::SIGTERM);
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(169), "{err}");
    assert!(
        err.contains("Destroyed on request (second SIGTERM)"),
        "{err}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn a_repeat_sigterm_within_a_second_is_the_same_request() {
    // Slurm signals an srun step twice, ~20 ms apart, when its time limit expires.
    let mut vm = spin(&["--memory", "32M", "--grace-period", "1"]);
    signal(vm.pid(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(20));
    signal(vm.pid(), libc::SIGTERM);
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(168),
        "shut down, then destroyed after grace: {err}"
    );
}

#[test]
fn sigusr1_and_sighup_do_not_kill_hpcvm() {
    let sock = socket_path("usr1");
    let mut vm = spin(&["--memory", "32M", "--api-socket", sock.to_str().unwrap()]);
    signal(vm.pid(), libc::SIGUSR1);
    signal(vm.pid(), libc::SIGUSR2);
    let r = ctl(&sock, &["status"]);
    assert!(r.stdout.contains(r#""state":"running""#), "{}", r.stdout);
    signal(vm.pid(), libc::SIGHUP);
    let r = ctl(&sock, &["status"]);
    assert!(
        r.stdout.contains(r#""state":"shutting-down""#),
        "SIGHUP is a shutdown: {}",
        r.stdout
    );
    ctl(&sock, &["destroy"]);
    let (code, _, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(169));
}

#[test]
fn sigint_behaves_like_sigterm_and_sigcont_is_harmless() {
    let sock = socket_path("sigint");
    let mut vm = spin(&["--memory", "32M", "--api-socket", sock.to_str().unwrap()]);
    signal(vm.pid(), libc::SIGCONT);
    let r = ctl(&sock, &["status"]);
    assert!(
        r.stdout.contains(r#""state":"running""#),
        "SIGCONT changed nothing: {}",
        r.stdout
    );
    signal(vm.pid(), libc::SIGINT);
    let r = ctl(&sock, &["status"]);
    assert!(
        r.stdout.contains(r#""state":"shutting-down""#),
        "{}",
        r.stdout
    );
    std::thread::sleep(Duration::from_millis(1200));
    signal(vm.pid(), libc::SIGINT);
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(169), "{err}");
    assert!(err.contains("second SIGINT"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn destroy_stops_a_busy_two_vcpu_hugepage_guest_and_frees_everything() {
    let pool = Reservation::take(512);
    let before = free_2m();
    let sock = socket_path("destroy");
    let mut vm = spin(&[
        "--cpus",
        "2",
        "--memory",
        "1G,hugepages=2M,prefault=on",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(before - free_2m(), 512, "1 GiB of 2M pages in use");
    let pid = vm.pid();
    let asked = Instant::now();
    let r = ctl(&sock, &["destroy"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    let took = asked.elapsed();
    let after = free_2m();
    drop(pool);
    assert_eq!(code, Some(169), "{err}");
    assert!(err.contains("Destroyed on request (API)"), "{err}");
    assert!(took < Duration::from_secs(3), "destroy took {took:?}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process gone");
    assert_eq!(after, before, "every hugepage back in the pool");
    assert!(!sock.exists(), "socket file removed");
}

#[test]
fn destroy_works_while_paused() {
    let sock = socket_path("pdestroy");
    let mut vm = spin(&[
        "--cpus",
        "2",
        "--memory",
        "32M",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    let r = ctl(&sock, &["pause"]);
    assert!(r.stdout.contains(r#""state":"paused""#), "{}", r.stdout);
    let r = ctl(&sock, &["status"]);
    assert!(r.stdout.contains(r#""state":"paused""#), "{}", r.stdout);
    ctl(&sock, &["destroy"]);
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(169), "{err}");
}

#[test]
fn status_reports_vcpus_pinning_threads_and_memory() {
    let sock = socket_path("status");
    let cpus = hpcvm_tests::proc::allowed_cpus();
    let host = cpus[cpus.len() - 1];
    let mut vm = spin(&[
        "--cpus",
        &format!("1,affinity={host}"),
        "--memory",
        "48M",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    let r = ctl(&sock, &["status"]);
    let pid = vm.pid();
    vm.kill();
    // SIGKILL leaves the socket file behind (by design); the test cleans it up.
    std::fs::remove_file(&sock).unwrap();
    assert_eq!(r.code, Some(0));
    for needle in [
        format!(r#""pid":{pid}"#),
        format!(r#""host_cpu":{host}"#),
        r#""size":50331648"#.to_string(),
        r#""backing":"none""#.to_string(),
        r#""apic_id":0"#.to_string(),
    ] {
        assert!(
            r.stdout.contains(&needle),
            "{needle} missing from {}",
            r.stdout
        );
    }
    assert!(
        !r.stdout.contains(r#""tid":0"#),
        "thread id known: {}",
        r.stdout
    );
}

#[test]
fn socket_is_private_and_removed_on_normal_and_error_exits() {
    let sock = socket_path("perm");
    let mut vm = spin(&["--memory", "32M", "--api-socket", sock.to_str().unwrap()]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    vm.kill();
    assert_eq!(mode, 0o600);
    // SIGKILL leaves the file; the next run replaces it because nobody listens.
    assert!(sock.exists());
    let r = run_guest(
        "hello",
        &["--memory", "16M", "--api-socket", sock.to_str().unwrap()],
    );
    assert_eq!(r.code, Some(0), "stale socket replaced: {}", r.stderr);
    assert!(!sock.exists(), "removed after a normal exit");
    let r = run_hpcvm(
        &[
            "run",
            "--kernel",
            "/nonexistent",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        DEFAULT_TIMEOUT,
    );
    assert_eq!(r.code, Some(161), "{}", r.stderr);
    assert!(!sock.exists(), "removed after an error exit");
}

#[test]
fn a_live_socket_is_never_taken_over() {
    let sock = socket_path("live");
    let mut vm = spin(&["--memory", "32M", "--api-socket", sock.to_str().unwrap()]);
    let r = run_guest(
        "hello",
        &["--memory", "16M", "--api-socket", sock.to_str().unwrap()],
    );
    let still = ctl(&sock, &["status"]);
    vm.kill();
    let _ = std::fs::remove_file(&sock);
    assert_eq!(r.code, Some(160), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("Another process is listening on the API socket"),
        "{}",
        r.stderr
    );
    assert_eq!(still.code, Some(0), "the first VMM keeps its socket");
}

#[test]
fn a_non_socket_file_is_never_replaced() {
    let path = socket_path("regular");
    std::fs::write(&path, b"precious").unwrap();
    let hello = guest("hello");
    let r = run_hpcvm(
        &[
            "run",
            "--kernel",
            hello.to_str().unwrap(),
            "--api-socket",
            path.to_str().unwrap(),
        ],
        DEFAULT_TIMEOUT,
    );
    let kept = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(r.code, Some(160), "{}", r.stderr);
    assert!(
        r.stderr.contains("exists and is not a socket"),
        "{}",
        r.stderr
    );
    assert_eq!(kept, b"precious");
}

#[test]
fn a_guest_that_honours_shutdown_stops_within_the_grace_period() {
    let sock = socket_path("honour");
    let mut vm = start(
        "shutdown-aware",
        &[
            "--memory",
            "32M",
            "--api-socket",
            sock.to_str().unwrap(),
            "--grace-period",
            "30",
        ],
    );
    vm.wait_for_line("shutdown-aware: ready", BOOT);
    let asked = Instant::now();
    let r = ctl(&sock, &["shutdown"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    vm.wait_for_line("shutdown-aware: got ctrl-alt-del", Duration::from_secs(30));
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(167), "{err}");
    assert!(err.contains("Guest shut down on request"), "{err}");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "inside the grace period"
    );
    assert!(!sock.exists());
}

#[test]
fn sigterm_reaches_a_guest_that_listens() {
    let mut vm = start("shutdown-aware", &["--memory", "32M"]);
    vm.wait_for_line("shutdown-aware: ready", BOOT);
    signal(vm.pid(), libc::SIGTERM);
    vm.wait_for_line("got ctrl-alt-del", Duration::from_secs(30));
    let (code, err, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(167), "{err}");
}

/// Ticks printed by the ticker guest within `window`.
fn ticks_within(vm: &mut RunningVm, window: Duration) -> usize {
    let until = Instant::now() + window;
    let mut n = 0;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if vm.next_line(left).is_some_and(|l| l.starts_with("tick ")) {
            n += 1;
        }
    }
    n
}

#[test]
fn a_paused_guest_makes_no_progress_until_resumed() {
    let sock = socket_path("pause");
    let mut vm = start(
        "ticker",
        &["--memory", "32M", "--api-socket", sock.to_str().unwrap()],
    );
    vm.wait_for_line("tick 2", BOOT);
    let r = ctl(&sock, &["pause"]);
    assert!(r.stdout.contains(r#""state":"paused""#), "{}", r.stdout);
    // Lines already in the pipe may still arrive; then nothing while paused.
    ticks_within(&mut vm, Duration::from_millis(300));
    let paused = ticks_within(&mut vm, Duration::from_secs(1));
    let r = ctl(&sock, &["resume"]);
    assert!(r.stdout.contains(r#""state":"running""#), "{}", r.stdout);
    let resumed = ticks_within(&mut vm, Duration::from_secs(1));
    ctl(&sock, &["destroy"]);
    let (code, _, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(paused, 0, "guest ticked while paused");
    assert!(
        resumed >= 3,
        "guest ticked {resumed} times in 1 s after resume"
    );
    assert_eq!(code, Some(169));
}

/// Sends one raw request line to `sock`; the reply line, or None within 5 s.
fn raw_request(sock: &Path, line: &str) -> Option<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(line.as_bytes()).ok()?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).ok()?;
    Some(reply)
}

#[test]
fn a_zero_grace_period_destroys_at_once_and_never_wedges() {
    // --grace-period 0 and SIGTERM.
    let mut vm = spin(&["--memory", "32M", "--grace-period", "0"]);
    signal(vm.pid(), libc::SIGTERM);
    let (code, err, took) = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(168), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A request with a zero (or vanishing) timeout gets its reply, then the VM ends.
    for timeout in ["0", "1e-10"] {
        let sock = socket_path(&format!("grace0-{timeout}"));
        let mut vm = spin(&["--memory", "32M", "--api-socket", sock.to_str().unwrap()]);
        let reply = raw_request(
            &sock,
            &format!("{{\"id\":1,\"cmd\":\"shutdown\",\"timeout_s\":{timeout}}}\n"),
        );
        let reply = reply.unwrap_or_else(|| panic!("no reply to a {timeout} s shutdown"));
        assert!(reply.contains(r#""ok":true"#), "{reply}");
        let (code, err, took) = vm.wait_exit(Duration::from_secs(20));
        assert_eq!(code, Some(168), "timeout {timeout}: {err}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(!sock.exists(), "socket file removed");
    }
}

#[test]
fn alarm_and_other_stray_signals_do_not_end_hpcvm() {
    let sock = socket_path("alrm");
    let mut vm = spin(&["--memory", "32M", "--api-socket", sock.to_str().unwrap()]);
    for sig in [
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
    ] {
        signal(vm.pid(), sig);
    }
    std::thread::sleep(Duration::from_millis(200));
    let r = ctl(&sock, &["status"]);
    assert!(
        r.stdout.contains(r#""state":"running""#),
        "{} {}",
        r.stdout,
        r.stderr
    );
    ctl(&sock, &["destroy"]);
    let (code, _, _) = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(169));
    assert!(!sock.exists(), "socket file removed");
}

#[test]
fn a_sigterm_while_hpcvm_starts_is_a_shutdown_not_a_bare_143() {
    let status = std::env::temp_dir().join(format!("hpcvm-early-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&status);
    let spin = guest("spin");
    let mut vm = RunningVm::start(&[
        "run",
        "--kernel",
        spin.to_str().unwrap(),
        "--memory",
        "64M,prefault=on",
        "--grace-period",
        "0.5",
        "--status-file",
        status.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_millis(3));
    signal(vm.pid(), libc::SIGTERM);
    let (code, err, _) = vm.wait_exit(Duration::from_secs(60));
    let record = std::fs::read_to_string(&status).unwrap_or_default();
    let _ = std::fs::remove_file(&status);
    assert!(matches!(code, Some(167 | 168)), "{code:?}: {err}");
    assert!(record.contains("\"exit_code\""), "status file: {record:?}");
}

/// Starts `hpcvm run --kernel flood.elf EXTRA` with its stdout on a pipe that nobody
/// reads; returns the child, its stderr and the unread pipe (kept open).
/// A child killed (and reaped) when dropped, so that a failed assertion leaves no
/// flooding VM behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn flood_into_unread_pipe(extra: &[&str]) -> (Reaped, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors it is given room for.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned here.
    let (r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let flood = guest("flood");
    let child = std::process::Command::new(hpcvm_tests::proc::hpcvm_bin())
        .args([
            "run",
            "--kernel",
            flood.to_str().unwrap(),
            "--memory",
            "32M",
        ])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(w))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    (Reaped(child), r)
}

/// Waits until the pipe `r` reads from is about full (60 of its 64 KiB: pages fill
/// partly).
fn wait_pipe_full(r: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `n`.
        assert_eq!(
            unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut n) },
            0
        );
        if n >= 60 << 10 {
            return;
        }
        assert!(Instant::now() < deadline, "the pipe holds only {n} bytes");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `limit` for `child` to exit; its code and stderr.
fn exit_within(child: &mut Reaped, limit: Duration) -> (Option<i32>, String) {
    let child = &mut child.0;
    use std::io::Read;
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return (st.code(), err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hpcvm did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_stdout_nobody_reads_never_wedges_pause_destroy_or_sigterm() {
    let sock = socket_path("flood");
    let (mut child, unread) = flood_into_unread_pipe(&["--api-socket", sock.to_str().unwrap()]);
    // Until the pipe is full (how long depends on the host's load), then a little
    // more, so that hpcvm's own writer is stuck in write(2).
    wait_pipe_full(&unread);
    std::thread::sleep(Duration::from_millis(300));
    for cmd in ["pause", "resume", "status"] {
        let r = ctl(&sock, &[cmd]);
        assert_eq!(r.code, Some(0), "{cmd}: {} {}", r.stdout, r.stderr);
    }
    let r = ctl(&sock, &["destroy"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (code, err) = exit_within(&mut child, Duration::from_secs(10));
    assert_eq!(code, Some(169), "{err}");
    assert!(err.contains("bytes of guest output were dropped"), "{err}");
    assert!(!sock.exists(), "socket file removed");
    // SIGTERM: the flood ignores Ctrl-Alt-Del, so the grace period ends it.
    let (mut child, _unread) = flood_into_unread_pipe(&["--grace-period", "1"]);
    std::thread::sleep(Duration::from_secs(1));
    signal(child.0.id(), libc::SIGTERM);
    let (code, err) = exit_within(&mut child, Duration::from_secs(10));
    assert_eq!(code, Some(168), "{err}");
}
