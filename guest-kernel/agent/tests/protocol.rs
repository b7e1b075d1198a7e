//! The agent outside a VM: `--channel-fd` on a socketpair, spoken to as hpcvm would.
//! Job start, output streams, exit codes, signals and exec failures, all for real.
//! (Virtio-console ports and image roots need a guest: here only their fallbacks.)

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::Duration;

use hpcvm_agent::{frame, kind, Decoder, JobError, JobExit, JobSpec, RootImage, StdioPorts};

struct Agent {
    child: Child,
    ch: UnixStream,
    dec: Decoder,
    /// The LOG frames `finish` has seen.
    logs: Vec<String>,
}

impl Agent {
    fn start() -> Self {
        Self::start_with_env(&[])
    }

    fn start_with_env(env: &[(&str, &str)]) -> Self {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two descriptors; no CLOEXEC on purpose (the agent's end
        // must survive exec).
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
            0
        );
        // SAFETY: fresh descriptors we own.
        let (ours, theirs) = unsafe {
            (
                UnixStream::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        };
        // SAFETY: setting CLOEXEC on our own end.
        unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let child = Command::new(env!("CARGO_BIN_EXE_hpcvm-agent"))
            .args(["--channel-fd", &theirs.as_raw_fd().to_string()])
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self {
            child,
            ch: ours,
            dec: Decoder::default(),
            logs: Vec::new(),
        }
    }

    fn next(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return f;
            }
            let mut buf = [0u8; 4096];
            let n = self.ch.read(&mut buf).unwrap();
            assert!(n > 0, "agent closed the channel");
            self.dec.push(&buf[..n]);
        }
    }

    fn run(&mut self, argv: &[&str]) {
        self.run_spec(spec(argv));
    }

    fn run_spec(&mut self, spec: JobSpec) {
        let (k, _) = self.next();
        assert_eq!(k, kind::READY);
        self.ch
            .write_all(&frame(kind::JOB, &serde_json::to_vec(&spec).unwrap()))
            .unwrap();
    }

    /// Collects stdout, stderr and the final frame.
    fn finish(&mut self) -> (String, String, u8, Vec<u8>) {
        let (mut out, mut err) = (String::new(), String::new());
        loop {
            let (k, p) = self.next();
            match k {
                kind::STDOUT => out.push_str(&String::from_utf8_lossy(&p)),
                kind::STDERR => err.push_str(&String::from_utf8_lossy(&p)),
                kind::LOG => self.logs.push(String::from_utf8_lossy(&p).into_owned()),
                _ => {
                    let _ = self.child.wait();
                    return (out, err, k, p);
                }
            }
        }
    }
}

fn spec(argv: &[&str]) -> JobSpec {
    JobSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        stdio: None,
        root: None,
        mounts: Vec::new(),
        user: None,
    }
}

#[test]
fn runs_the_job_and_reports_output_and_exit_code() {
    let mut a = Agent::start();
    a.run(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]);
    let (out, err, k, p) = a.finish();
    assert_eq!((out.as_str(), err.as_str()), ("hi\n", "oops\n"));
    assert_eq!(k, kind::EXIT);
    assert_eq!(
        serde_json::from_slice::<JobExit>(&p).unwrap(),
        JobExit::Code(3)
    );
}

#[test]
fn a_job_killed_by_a_signal_is_reported_as_such() {
    let mut a = Agent::start();
    a.run(&["sh", "-c", "kill -9 $$"]);
    let (_, _, k, p) = a.finish();
    assert_eq!(k, kind::EXIT);
    assert_eq!(
        serde_json::from_slice::<JobExit>(&p).unwrap(),
        JobExit::Signal(9)
    );
}

#[test]
fn host_signals_reach_the_job_process_group() {
    let mut a = Agent::start();
    a.run(&[
        "sh",
        "-c",
        "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done",
    ]);
    let (k, p) = a.next();
    assert_eq!((k, p.as_slice()), (kind::STDOUT, b"ready\n".as_slice()));
    a.ch.write_all(&frame(kind::SIGNAL, &[libc::SIGTERM as u8]))
        .unwrap();
    let (out, _, k, p) = a.finish();
    assert_eq!(out, "got-term\n");
    assert_eq!(k, kind::EXIT);
    assert_eq!(
        serde_json::from_slice::<JobExit>(&p).unwrap(),
        JobExit::Code(7)
    );
}

#[test]
fn a_missing_command_is_an_error_with_status_127() {
    let mut a = Agent::start();
    a.run(&["no-such-command-xyz"]);
    let (_, _, k, p) = a.finish();
    assert_eq!(k, kind::ERROR);
    let e: JobError = serde_json::from_slice(&p).unwrap();
    assert_eq!(e.status, 127);
    assert!(
        e.error.contains("no-such-command-xyz: command not found"),
        "{}",
        e.error
    );
}

#[test]
fn a_non_executable_file_is_an_error_with_status_126() {
    let file = std::env::temp_dir().join(format!("agent-not-exec-{}", std::process::id()));
    std::fs::write(&file, "echo should not run\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut a = Agent::start();
    a.run(&[file.to_str().unwrap()]);
    let (_, _, k, p) = a.finish();
    assert_eq!(k, kind::ERROR);
    let e: JobError = serde_json::from_slice(&p).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(e.status, 126, "{}", e.error);
    assert!(e.error.contains("Permission denied"), "{}", e.error);
}

#[test]
fn the_job_is_killed_when_the_host_goes_away() {
    let mut a = Agent::start();
    a.run(&["sh", "-c", "echo up; exec sleep 60"]);
    let (k, _) = a.next();
    assert_eq!(k, kind::STDOUT);
    let t = std::time::Instant::now();
    drop(a.ch);
    let status = a.child.wait().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "agent lingered {:?}",
        t.elapsed()
    );
    assert!(!status.success(), "agent reports the lost host");
}

#[test]
fn output_from_a_background_child_does_not_hold_up_the_report() {
    let mut a = Agent::start();
    a.run(&["sh", "-c", "sleep 30 & echo main-done; exit 0"]);
    let t = std::time::Instant::now();
    let (out, _, k, _) = a.finish();
    assert_eq!(out, "main-done\n");
    assert_eq!(k, kind::EXIT);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn missing_stdio_ports_fall_back_to_the_channel() {
    let mut a = Agent::start_with_env(&[("HPCVM_AGENT_PORT_WAIT_MS", "50")]);
    let mut job = spec(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]);
    job.stdio = Some(StdioPorts {
        stdout: "hpcvm.test.no-such-stdout".into(),
        stderr: "hpcvm.test.no-such-stderr".into(),
        stdin: None,
    });
    let t = std::time::Instant::now();
    a.run_spec(job);
    let (out, err, k, p) = a.finish();
    assert_eq!((out.as_str(), err.as_str()), ("hi\n", "oops\n"));
    assert_eq!(k, kind::EXIT);
    assert_eq!(
        serde_json::from_slice::<JobExit>(&p).unwrap(),
        JobExit::Code(3)
    );
    assert!(
        a.logs
            .iter()
            .any(|l| l.contains("hpcvm.test.no-such-stdout") && l.contains("relaying")),
        "{:?}",
        a.logs
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[test]
fn an_image_root_is_refused_outside_a_guest() {
    let mut a = Agent::start();
    let mut job = spec(&["sh", "-c", "echo should not run"]);
    job.root = Some(RootImage {
        serial: "hpcvm-root".into(),
        fstype: "ext4".into(),
        boot_init: false,
    });
    a.run_spec(job);
    let (out, _, k, p) = a.finish();
    assert_eq!(out, "");
    assert_eq!(k, kind::ERROR);
    let e: JobError = serde_json::from_slice(&p).unwrap();
    assert_eq!(e.status, 126);
    assert!(e.error.contains("image root"), "{}", e.error);
}
