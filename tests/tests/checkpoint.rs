//! Real /dev/kvm, real guest: a job checkpointed mid-run with `hpcvm ctl checkpoint
//! --stop` carries on under `hpcvm restore` (every tick of its output exactly once
//! across the two processes, its exit status the restored one's, guest time not
//! jumping by the time it was stopped), and damaged checkpoints are refused with a
//! clear message and exit status 174.

use std::time::Duration;

use hpcvm_tests::proc::{ctl, run_hpcvm, socket_path, ticks, RunningVm};
use hpcvm_tests::scratch::Scratch;

/// Boot, job and exit together; generous for software KVM.
const TIMEOUT: Duration = Duration::from_secs(240);

/// A job printing `tick 0 UPTIME` .. `tick 11 UPTIME` a second apart, then exiting 7.
const COUNTING_JOB: &str = "i=0; while [ $i -lt 12 ]; do echo tick $i $(cut -d' ' -f1 \
     /proc/uptime); i=$((i+1)); sleep 1; done; exit 7";

/// How long the checkpointed VM stays stopped: longer than the guest's RCU stall
/// timeout (21 s), which a guest clock jumping by the stop would trip.
const STOPPED: Duration = Duration::from_secs(30);

#[test]
fn a_checkpointed_job_carries_on_under_restore_and_bad_checkpoints_are_refused() {
    let scratch = Scratch::new("checkpoint", "carry-on");
    let dir = scratch.path("ck");
    let sock = socket_path("checkpoint-carry-on");
    // Two vCPUs: the second one's state, and time across vCPUs, must survive too.
    let mut first = RunningVm::start(&[
        "run",
        "--cpus",
        "2",
        "--no-share-cwd",
        "--api-socket",
        sock.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        COUNTING_JOB,
    ]);
    let mut lines = Vec::new();
    first.read_until(&mut lines, "tick 2 ", TIMEOUT);
    let answer = ctl(&sock, &["checkpoint", dir.to_str().unwrap(), "--stop"]);
    assert_eq!(answer.code, Some(0), "{}{}", answer.stdout, answer.stderr);
    assert!(
        answer.stdout.contains("\"stopped\":true"),
        "{}",
        answer.stdout
    );
    let (code, err, _) = first.wait_exit(Duration::from_secs(30));
    let stopped_at = std::time::Instant::now();
    assert_eq!(code, Some(173), "{err}");
    assert!(err.contains("Checkpointed to"), "{err}");
    first.drain(&mut lines);
    assert!(!sock.exists(), "the first VMM's socket is gone");
    let ram = std::fs::metadata(dir.join("memory")).unwrap();
    assert_eq!(ram.len(), 256 << 20);

    // Damaged copies first (the good one is restored last).
    let state = std::fs::read(dir.join("vm.state")).unwrap();
    let bad = scratch.path("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(dir.join("memory"), bad.join("memory")).unwrap();
    let refuse = |bytes: &[u8], needle: &str| {
        std::fs::write(bad.join("vm.state"), bytes).unwrap();
        let r = run_hpcvm(&["restore", bad.to_str().unwrap()], TIMEOUT);
        assert_eq!(r.code, Some(174), "{needle}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    };
    let mut flipped = state.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    refuse(&flipped, "is corrupt: its checksum does not match");
    refuse(&state[..state.len() / 3], "is truncated or damaged");
    let mut v9 = state.clone();
    v9[8] = 9;
    refuse(&v9, "format version 9; this hpcvm reads version 1");
    // RAM that does not match its checksum: found before any vCPU runs.
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("memory"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&mem, b"garbage", 1 << 20).unwrap();
    refuse(&state, "guest RAM does not match its checksum");
    mem.set_len(1 << 20).unwrap();
    refuse(&state, "memory is truncated or damaged");
    let missing = run_hpcvm(
        &["restore", scratch.path("none").to_str().unwrap()],
        TIMEOUT,
    );
    assert_eq!(missing.code, Some(174), "{}", missing.stderr);
    assert!(
        missing.stderr.contains("No checkpoint at"),
        "{}",
        missing.stderr
    );

    std::thread::sleep(STOPPED.saturating_sub(stopped_at.elapsed()));
    let before = ticks(&lines).len();
    let mut second = RunningVm::start(&["restore", dir.to_str().unwrap()]);
    let (code, err, _) = second.wait_exit(TIMEOUT);
    second.drain(&mut lines);
    assert_eq!(code, Some(7), "the job's status: {err}");
    let ticks = ticks(&lines);
    assert_eq!(
        ticks.iter().map(|t| t.0).collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>(),
        "every tick exactly once, in order, across the two processes: {lines:?}"
    );
    // Guest time carries on: the uptime step across the restore is a tick's, not the
    // 30 s the VM was stopped (a tick takes about 3 s of guest time on software KVM).
    let step = ticks[before].1 - ticks[before - 1].1;
    assert!(
        (0.0..STOPPED.as_secs_f64() / 2.0).contains(&step),
        "guest uptime moved {step:.2} s across a {STOPPED:?} stop: {lines:?}"
    );
}

#[test]
fn a_vm_with_a_share_is_refused_and_runs_on() {
    let sock = socket_path("checkpoint-share");
    let scratch = Scratch::new("checkpoint", "share");
    let mut vm = RunningVm::start(&[
        "run",
        "--api-socket",
        sock.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo up; sleep 3; echo still-here; exit 3",
    ]);
    vm.wait_for_line("up", TIMEOUT);
    let dir = scratch.path("ck");
    let r = ctl(&sock, &["checkpoint", dir.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stdout.contains("virtio-fs shares"), "{}", r.stdout);
    assert!(r.stdout.contains("--no-share-cwd"), "{}", r.stdout);
    assert!(!dir.exists(), "nothing written");
    vm.wait_for_line("still-here", Duration::from_secs(60));
    let (code, err, _) = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(3), "{err}");
}

/// `--checkpoint-on` that could not work is refused before anything starts: an unknown
/// signal, a VM with the default working-directory share, a missing --checkpoint-dir.
#[test]
fn checkpoint_on_that_cannot_work_is_refused_up_front() {
    let scratch = Scratch::new("checkpoint", "on-refused");
    let dir = scratch.path("ck");
    let d = dir.to_str().unwrap();
    let cases: [(&[&str], u8, &str); 3] = [
        (
            &[
                "--no-share-cwd",
                "--checkpoint-on",
                "SIGKILL",
                "--checkpoint-dir",
                d,
            ],
            160,
            "Invalid --checkpoint-on 'SIGKILL': must be one of SIGUSR1, SIGUSR2, SIGTERM",
        ),
        (
            &["--checkpoint-on", "USR1", "--checkpoint-dir", d],
            160,
            "--checkpoint-on SIGUSR1: cannot checkpoint this VM: it has virtio-fs shares",
        ),
        (&["--checkpoint-on", "USR1"], 2, "--checkpoint-dir"),
    ];
    for (opts, code, needle) in cases {
        let mut args = vec!["run"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["--", "true"]);
        let r = run_hpcvm(&args, Duration::from_secs(30));
        assert_eq!(r.code, Some(code.into()), "{opts:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{opts:?}: {}", r.stderr);
        assert!(
            r.elapsed < Duration::from_secs(5),
            "{opts:?} booted a guest"
        );
    }
    assert!(!dir.exists(), "nothing written");
}
