//! Real /dev/kvm, real guest: a job live-migrated mid-run between hpcvm processes on
//! loopback, over a Unix socket and then over TCP, carries on in the receiver (every
//! tick of its output exactly once across the three processes, its RAM intact, guest
//! time not jumping, its exit status the last receiver's; each sender exits 175). A
//! migration that fails (nobody listening, a receiver that refuses the VM) leaves the
//! job running on the sender; a receiver fed garbage or stopped while waiting says so
//! and leaves nothing behind. A hugepage guest moves onto the receiver's hugepages and
//! every page goes back to the pool. A job writing to its shared working directory
//! moves with its open files.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use hpcvm_tests::hugepages::{free_2m, Reservation};
use hpcvm_tests::proc::{
    assert_ticks_once, ctl, open_file_job, open_file_log, run_hpcvm, signal, socket_path, ticks,
    RunningVm,
};

/// Boot, job and exit together; generous for software KVM.
const TIMEOUT: Duration = Duration::from_secs(240);

/// Writes a file into the guest's RAM-backed root, prints `tick 0 UPTIME` ..
/// `tick 13 UPTIME` a second apart, then checks the file and exits 7.
const COUNTING_JOB: &str = "mkdir -p /tmp; seq 1 40000 > /tmp/blob; a=$(md5sum < /tmp/blob); \
     i=0; while [ $i -lt 14 ]; do echo tick $i $(cut -d' ' -f1 /proc/uptime); \
     i=$((i+1)); sleep 1; done; [ \"$(md5sum < /tmp/blob)\" = \"$a\" ] && echo blob intact; \
     exit 7";

/// Waits for a Unix socket (a receiver listening) to appear.
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port nothing listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// True if a TCP socket listens on `port` (/proc/net/tcp, state 0A).
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
    })
}

/// `ctl migrate` through `api` to `to`; its JSON answer, checked ok.
fn migrate(api: &Path, to: &str) -> serde_json::Value {
    let r = ctl(api, &["migrate", to]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    v
}

#[test]
fn a_job_migrates_twice_and_every_tick_appears_once() {
    let (api_a, api_b, api_c) = (
        socket_path("mig-a"),
        socket_path("mig-b"),
        socket_path("mig-c"),
    );
    let listen_b = socket_path("mig-listen-b");
    let port = free_port();
    let mut a = RunningVm::start(&[
        "run",
        "--cpus",
        "2",
        "--no-share-cwd",
        "--api-socket",
        api_a.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        COUNTING_JOB,
    ]);
    let listen_b_arg = format!("unix:{}", listen_b.display());
    let mut b = RunningVm::start(&[
        "receive",
        "--listen",
        &listen_b_arg,
        "--api-socket",
        api_b.to_str().unwrap(),
    ]);
    let mut lines = Vec::new();
    a.read_until(&mut lines, "tick 2 ", TIMEOUT);
    wait_for(&listen_b);
    let first = migrate(&api_a, &listen_b_arg);
    assert_eq!(first["ram"], 256 << 20, "{first}");
    assert!(first["passes"].as_u64().unwrap() >= 1, "{first}");
    // The running guest wrote RAM after the first pass: KVM's dirty log found it.
    assert!(first["sent_paused"].as_u64().unwrap() > 0, "{first}");
    assert!(first["downtime_s"].as_f64().unwrap() < first["total_s"].as_f64().unwrap());
    let (code, err, _) = a.wait_exit(Duration::from_secs(30));
    a.drain(&mut lines);
    assert_eq!(code, Some(175), "{err}");
    assert!(
        err.contains(&format!("Migrated to {listen_b_arg}")),
        "{err}"
    );
    assert!(!api_a.exists(), "the sender's API socket is gone");
    let moved_at = ticks(&lines).len();

    // From B onwards over TCP, to a receiver pinned to host CPUs of its own choosing.
    let tcp = format!("tcp:127.0.0.1:{port}");
    let mut c = RunningVm::start(&[
        "receive",
        "--listen",
        &tcp,
        "--affinity",
        "0-1",
        "--api-socket",
        api_c.to_str().unwrap(),
    ]);
    b.read_until(&mut lines, "tick 7 ", TIMEOUT);
    assert!(
        !listen_b.exists(),
        "B's listening socket is gone once it accepted"
    );
    // C takes one connection, so look for its listening socket without connecting.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listening(port) {
        assert!(Instant::now() < deadline, "C never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = migrate(&api_b, &tcp);
    assert_eq!(second["to"], tcp.as_str(), "{second}");
    let (code, err, _) = b.wait_exit(Duration::from_secs(30));
    b.drain(&mut lines);
    assert_eq!(code, Some(175), "{err}");
    assert!(!api_b.exists());
    let moved_again_at = ticks(&lines).len();

    let (code, err, _) = c.wait_exit(TIMEOUT);
    c.drain(&mut lines);
    assert_eq!(code, Some(7), "the job's status: {err}");
    assert!(!api_c.exists());
    assert_ticks_once(&lines, 14);
    let ticks = ticks(&lines);
    assert!(
        lines.iter().any(|l| l == "blob intact"),
        "the job's RAM came through whole: {lines:?}"
    );
    // Guest time carries on across each move (a tick is ~3 s of guest time here).
    for at in [moved_at, moved_again_at] {
        let step = ticks[at].1 - ticks[at - 1].1;
        assert!(
            (0.0..15.0).contains(&step),
            "uptime moved {step:.2} s: {lines:?}"
        );
    }
}

#[test]
fn a_hugepage_guest_migrates_onto_hugepages_and_gives_them_back() {
    // 256 MiB of 2M pages on each side while both hold the VM.
    let _pool = Reservation::take(2 * 128);
    let before = free_2m();
    let api = socket_path("mig-huge");
    let listen = socket_path("mig-huge-listen");
    let to = format!("unix:{}", listen.display());
    let mut a = RunningVm::start(&[
        "run",
        "--memory",
        "256M,hugepages=2M,prefault=on",
        "--no-share-cwd",
        "--api-socket",
        api.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        COUNTING_JOB,
    ]);
    let mut b = RunningVm::start(&["receive", "--listen", &to]);
    let mut lines = Vec::new();
    a.read_until(&mut lines, "tick 1 ", TIMEOUT);
    assert_eq!(free_2m(), before - 128, "the sender holds its 128 pages");
    wait_for(&listen);
    migrate(&api, &to);
    let (code, err, _) = a.wait_exit(Duration::from_secs(30));
    a.drain(&mut lines);
    assert_eq!(code, Some(175), "{err}");
    b.read_until(&mut lines, "tick 3 ", TIMEOUT);
    assert_eq!(
        free_2m(),
        before - 128,
        "the receiver holds 128, the sender none"
    );
    let (code, err, _) = b.wait_exit(TIMEOUT);
    b.drain(&mut lines);
    assert_eq!(code, Some(7), "{err}");
    assert_ticks_once(&lines, 14);
    assert!(lines.iter().any(|l| l == "blob intact"), "{lines:?}");
    assert_eq!(free_2m(), before, "every hugepage is back in the pool");
}

#[test]
fn a_failed_migration_leaves_the_job_running_on_the_sender() {
    let api = socket_path("mig-fail");
    let listen = socket_path("mig-fail-listen");
    let mut vm = RunningVm::start(&[
        "run",
        "--cpus",
        "2",
        "--no-share-cwd",
        "--api-socket",
        api.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 8 ]; do echo tick $i; i=$((i+1)); sleep 1; done; exit 3",
    ]);
    vm.wait_for_line("tick 1", TIMEOUT);
    let nobody = format!("unix:{}", socket_path("mig-nobody").display());
    let r = ctl(&api, &["migrate", &nobody]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!(
            "migration to {nobody} failed, the VM runs on here: Cannot connect to {nobody}"
        )),
        "{}",
        r.stdout
    );
    let r = ctl(&api, &["migrate", "node7:4444"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("Invalid migration address 'node7:4444': use unix:PATH or tcp:HOST:PORT"),
        "{}",
        r.stderr
    );
    // A host name is looked up by ctl (the VMM makes no lookups).
    let r = ctl(&api, &["migrate", "tcp:localhost:9"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        ["tcp:127.0.0.1:9", "tcp:[::1]:9"]
            .iter()
            .any(|a| r.stdout.contains(&format!("Cannot connect to {a}"))),
        "{}",
        r.stdout
    );

    // A receiver that cannot run the VM (one host CPU for two vCPUs) refuses it
    // after the sender started copying; the sender hears why.
    let to = format!("unix:{}", listen.display());
    let mut refusing = RunningVm::start(&["receive", "--listen", &to, "--affinity", "0"]);
    wait_for(&listen);
    let r = ctl(&api, &["migrate", &to]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        r.stdout.contains(
            "The receiving hpcvm failed: Cannot restore: the checkpointed VM has 2 vCPUs and \
             this run has 1 host CPUs"
        ),
        "{}",
        r.stdout
    );
    let (code, err, _) = refusing.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(174), "{err}");
    assert!(
        err.contains("has 2 vCPUs and this run has 1 host CPUs"),
        "{err}"
    );
    assert!(!listen.exists());

    // The job ran on here all along.
    let (code, err, _) = vm.wait_exit(TIMEOUT);
    assert_eq!(code, Some(3), "{err}");
    assert!(!api.exists());
}

/// A job in its shared working directory (`run`'s default share) writing a file it
/// holds open: a migration refused by the receiver leaves the share serving on the
/// sender, and a migration that succeeds hands virtiofsd's state to the receiver's,
/// where the job carries on through the same open file and sees files made since.
#[test]
fn a_job_writing_to_its_shared_working_directory_migrates() {
    let scratch = hpcvm_tests::scratch::Scratch::new("migration", "share");
    let work = scratch.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let api = socket_path("mig-share");
    let refuse_at = socket_path("mig-share-refuse");
    let listen = socket_path("mig-share-listen");
    let job = open_file_job(12, "cat late.txt; exit 5");
    let mut a = RunningVm::start_in(
        &work,
        &[
            "run",
            "--cpus",
            "2",
            "--api-socket",
            api.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &job,
        ],
    );
    let mut lines = Vec::new();
    a.read_until(&mut lines, "tick 1 ", TIMEOUT);
    // Refused after the share's rings stopped: they start again on the sender.
    let to = format!("unix:{}", refuse_at.display());
    let mut refusing = RunningVm::start(&["receive", "--listen", &to, "--affinity", "0"]);
    wait_for(&refuse_at);
    let r = ctl(&api, &["migrate", &to]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stdout.contains("the VM runs on here"), "{}", r.stdout);
    let (code, err, _) = refusing.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(174), "{err}");
    a.read_until(&mut lines, "tick 4 ", TIMEOUT);

    let to = format!("unix:{}", listen.display());
    let mut b = RunningVm::start(&["receive", "--listen", &to]);
    wait_for(&listen);
    migrate(&api, &to);
    let (code, err, _) = a.wait_exit(Duration::from_secs(30));
    a.drain(&mut lines);
    assert_eq!(code, Some(175), "{err}");
    std::fs::write(
        work.join("late.txt"),
        "written on the host after the move\n",
    )
    .unwrap();
    let (code, err, _) = b.wait_exit(TIMEOUT);
    b.drain(&mut lines);
    assert_eq!(code, Some(5), "the job's status: {err}");
    assert_ticks_once(&lines, 12);
    assert!(
        lines
            .iter()
            .any(|l| l == "written on the host after the move"),
        "{lines:?}"
    );
    let log = std::fs::read_to_string(work.join("log")).unwrap();
    assert_eq!(
        log,
        open_file_log(12),
        "every line once, through the one open file"
    );
    hpcvm_tests::proc::assert_no_virtiofsd(&work);
}

/// Waits for the receiver `r` to exit with 176 saying `why`, its socket `listen` gone.
fn ends_with_176(r: &mut RunningVm, listen: &Path, why: &str) {
    let (code, err, _) = r.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(176), "{err}");
    assert!(err.contains(why), "{err}");
    assert!(!listen.exists(), "the listening socket is removed");
}

#[test]
fn a_receiver_fed_garbage_or_stopped_while_waiting_leaves_nothing_behind() {
    // Garbage where the greeting belongs.
    let listen = socket_path("mig-garbage");
    let to = format!("unix:{}", listen.display());
    let mut r = RunningVm::start(&["receive", "--listen", &to]);
    wait_for(&listen);
    let mut s = std::os::unix::net::UnixStream::connect(&listen).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    ends_with_176(
        &mut r,
        &listen,
        "The peer is not an hpcvm migration sender (bad magic)",
    );

    // The right greeting, then a configuration cut short.
    let mut r = RunningVm::start(&["receive", "--listen", &to]);
    wait_for(&listen);
    let mut s = std::os::unix::net::UnixStream::connect(&listen).unwrap();
    let mut msg = b"HPCVMMIG".to_vec();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.push(1);
    msg.extend_from_slice(&100u64.to_le_bytes());
    msg.extend_from_slice(b"{\"kernel\"");
    s.write_all(&msg).unwrap();
    drop(s);
    ends_with_176(
        &mut r,
        &listen,
        "The migration stream failed while reading the configuration",
    );

    // SIGTERM while waiting.
    let mut r = RunningVm::start(&["receive", "--listen", &to]);
    wait_for(&listen);
    signal(r.pid(), libc::SIGTERM);
    ends_with_176(
        &mut r,
        &listen,
        "Stopped by SIGTERM while waiting for a migration",
    );

    // An address that is not one, and one already taken (nothing of it removed).
    let bad = run_hpcvm(&["receive", "--listen", "node7:4444"], TIMEOUT);
    assert_eq!(bad.code, Some(160), "{}", bad.stderr);
    assert!(
        bad.stderr
            .contains("Invalid migration address 'node7:4444': use unix:PATH or tcp:HOST:PORT"),
        "{}",
        bad.stderr
    );
    std::fs::write(&listen, b"not a socket").unwrap();
    let taken = run_hpcvm(&["receive", "--listen", &to], TIMEOUT);
    assert_eq!(taken.code, Some(176), "{}", taken.stderr);
    assert!(
        taken.stderr.contains(&format!("Cannot listen on {to}")),
        "{}",
        taken.stderr
    );
    assert_eq!(std::fs::read(&listen).unwrap(), b"not a socket");
    std::fs::remove_file(&listen).unwrap();
}
