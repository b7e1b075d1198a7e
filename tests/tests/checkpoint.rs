//! Real /dev/kvm, real guest: a job checkpointed mid-run with `hpcvm ctl checkpoint
//! --stop` carries on under `hpcvm restore` (every tick of its output exactly once
//! across the two processes, its exit status the restored one's, guest time not
//! jumping by the time it was stopped), and damaged checkpoints are refused with a
//! clear message and exit status 174.

use std::time::Duration;

use hpcvm_tests::proc::{
    assert_no_virtiofsd, assert_ticks_once, ctl, open_file_job, open_file_log, run_hpcvm,
    socket_path, ticks, RunningVm,
};
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
    assert_ticks_once(&lines, 12);
    let ticks = ticks(&lines);
    // Guest time carries on: the uptime step across the restore is a tick's, not the
    // 30 s the VM was stopped (a tick takes about 3 s of guest time on software KVM).
    let step = ticks[before].1 - ticks[before - 1].1;
    assert!(
        (0.0..STOPPED.as_secs_f64() / 2.0).contains(&step),
        "guest uptime moved {step:.2} s across a {STOPPED:?} stop: {lines:?}"
    );
}

/// A job in its shared working directory (`run`'s default share) writing a file it
/// holds open, checkpointed once going on and once to stop: virtiofsd hands over
/// what the guest has open and the job carries on under `hpcvm restore` through the
/// same open file; a restore whose file was moved away meanwhile is refused (the new
/// virtiofsd cannot reopen it) with no virtiofsd left behind.
#[test]
fn a_job_in_its_shared_working_directory_keeps_its_open_files_across_checkpoints() {
    let scratch = Scratch::new("checkpoint", "share");
    let work = scratch.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let dir = scratch.path("ck");
    let going_on = scratch.path("ck-on");
    let sock = socket_path("checkpoint-share");
    let job = open_file_job(10, "cat late.txt; exit 5");
    let mut first = RunningVm::start_in(
        &work,
        &[
            "run",
            "--api-socket",
            sock.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &job,
        ],
    );
    let mut lines = Vec::new();
    first.read_until(&mut lines, "tick 1 ", TIMEOUT);
    // Going on: virtiofsd's rings stop for the checkpoint and start again.
    let on = ctl(&sock, &["checkpoint", going_on.to_str().unwrap()]);
    assert_eq!(on.code, Some(0), "{}{}", on.stdout, on.stderr);
    assert!(on.stdout.contains("\"stopped\":false"), "{}", on.stdout);
    first.read_until(&mut lines, "tick 4 ", TIMEOUT);
    let stop = ctl(&sock, &["checkpoint", dir.to_str().unwrap(), "--stop"]);
    assert_eq!(stop.code, Some(0), "{}{}", stop.stdout, stop.stderr);
    let (code, err, _) = first.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(173), "{err}");
    first.drain(&mut lines);
    assert_no_virtiofsd(&work);
    let before = ticks(&lines).len();
    let log = std::fs::read_to_string(work.join("log")).unwrap();
    assert_eq!(
        log,
        open_file_log(before),
        "what the job wrote before the stop"
    );

    // The file the job holds open is gone: the new virtiofsd cannot take the state.
    std::fs::rename(work.join("log"), work.join("log.away")).unwrap();
    let r = run_hpcvm(&["restore", dir.to_str().unwrap()], TIMEOUT);
    assert_eq!(r.code, Some(174), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("handing over the checkpoint's state with virtiofsd for"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_no_virtiofsd(&work);
    std::fs::rename(work.join("log.away"), work.join("log")).unwrap();

    std::fs::write(work.join("late.txt"), "written on the host while stopped\n").unwrap();
    let mut second = RunningVm::start(&["restore", dir.to_str().unwrap()]);
    let (code, err, _) = second.wait_exit(TIMEOUT);
    second.drain(&mut lines);
    assert_eq!(code, Some(5), "the job's status: {err}");
    assert_ticks_once(&lines, 10);
    assert!(
        lines
            .iter()
            .any(|l| l == "written on the host while stopped"),
        "the restored job sees a file made while it was stopped: {lines:?}"
    );
    let log = std::fs::read_to_string(work.join("log")).unwrap();
    assert_eq!(
        log,
        open_file_log(10),
        "every line once, through the one open file"
    );
    assert_no_virtiofsd(&work);
}

/// `--checkpoint-on` that could not work is refused before anything starts: an unknown
/// signal, a missing --checkpoint-dir.
#[test]
fn checkpoint_on_that_cannot_work_is_refused_up_front() {
    let scratch = Scratch::new("checkpoint", "on-refused");
    let dir = scratch.path("ck");
    let d = dir.to_str().unwrap();
    let cases: [(&[&str], u8, &str); 2] = [
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
