//! Real /dev/kvm, real guest kernel (`make guest`): `hpcvm run -- CMD` behaves like
//! running CMD directly: its output on stdout/stderr, its exit status (or 128+signal)
//! as hpcvm's, SIGTERM reaching it. Guest boots take tens of seconds on a software-KVM
//! host, so each test packs several checks into one boot.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hpcvm_tests::proc::{run_hpcvm, signal, RunningVm};
use vmm::agent::{job_frame, job_spec};
use vmm::config::JobConfig;

/// Boot, job and exit together; generous for software KVM, where a boot takes 20-60 s.
const JOB_TIMEOUT: Duration = Duration::from_secs(240);

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hpcvm-job-{}-{name}", std::process::id()))
}

/// A `PAD` value that makes the job's frame to the agent end `tail` bytes past a
/// multiple of 256, for a job run as `hpcvm run --env` `env` `--workdir cwd -- argv`.
fn pad_job_frame(argv: &[&str], env: &[(&str, &str)], cwd: &str, tail: usize) -> String {
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let frame_len = |pad: &str| {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("PAD".into(), pad.into()));
        let job = JobConfig {
            argv: owned(argv),
            env,
            cwd: cwd.into(),
            files: Vec::new(),
            agent: PathBuf::new(),
            busybox: None,
            console_stdio: true,
            stdin: false,
            user: Some(vmm::config::caller_identity()),
            image: false,
        };
        job_frame(&job_spec(&job, &[], vmm::host::is_software_kvm())).len()
    };
    let mut pad = String::from("x");
    while frame_len(&pad) % 256 != tail {
        pad.push('x');
    }
    pad
}

#[test]
fn job_output_status_cpus_memory_hugetlbfs_and_files() {
    let script = temp("job.sh");
    std::fs::write(
        &script,
        "echo hi\n\
         echo cpus=$(nproc)\n\
         grep MemTotal /proc/meminfo\n\
         mkdir -p /mnt/huge && mount -t hugetlbfs none /mnt/huge && echo hugetlbfs-ok\n\
         echo env=$JOB_COLOR cwd=$(pwd) pad=${#PAD}\n\
         echo to-stderr >&2\n\
         exit 3\n",
    )
    .unwrap();
    let status = temp("status.json");
    // Linux's 8250 driver takes at most 256 bytes per interrupt pass, then asks IIR
    // whether more is waiting. The job's frame ends 32 bytes past such a pass, so a
    // UART that answers "nothing" there leaves them in the FIFO and the job never starts.
    let argv = ["/bin/sh", "/opt/job.sh"];
    let pad = pad_job_frame(&argv, &[("JOB_COLOR", "blue")], "/opt", 32);
    let pad_env = format!("PAD={pad}");
    let r = run_hpcvm(
        &[
            "run",
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--file",
            &format!("{}:/opt/job.sh", script.display()),
            "--env",
            "JOB_COLOR=blue",
            "--env",
            &pad_env,
            "--workdir",
            "/opt",
            "--status-file",
            status.to_str().unwrap(),
            "--",
            argv[0],
            argv[1],
        ],
        JOB_TIMEOUT,
    );
    let status_json = std::fs::read_to_string(&status).unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&status);
    assert_eq!(
        r.code,
        Some(3),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "hi", "{}", r.stdout);
    assert!(lines.contains(&"cpus=2"), "{}", r.stdout);
    assert!(lines.contains(&"hugetlbfs-ok"), "{}", r.stdout);
    let env_line = format!("env=blue cwd=/opt pad={}", pad.len());
    assert!(lines.contains(&env_line.as_str()), "{}", r.stdout);
    let mem_kb: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {}", r.stdout));
    assert!(
        (200 * 1024..=256 * 1024).contains(&mem_kb),
        "guest sees {mem_kb} kB of 256 MiB"
    );
    assert_eq!(r.stderr, "to-stderr\n", "only the job's stderr");
    assert!(status_json.contains(r#""source":"job""#), "{status_json}");
    assert!(status_json.contains(r#""exit_code":3"#), "{status_json}");
}

#[test]
fn a_job_killed_by_sigkill_exits_137() {
    let r = run_hpcvm(
        &[
            "run",
            "--memory",
            "128M",
            "--",
            "/bin/sh",
            "-c",
            "kill -9 $$",
        ],
        JOB_TIMEOUT,
    );
    assert_eq!(
        r.code,
        Some(137),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stderr.is_empty(),
        "a signal death is the job's status: {}",
        r.stderr
    );
}

#[test]
fn a_missing_program_is_named_and_exits_127() {
    let status = temp("missing.json");
    let r = run_hpcvm(
        &[
            "run",
            "--memory",
            "128M",
            "--status-file",
            status.to_str().unwrap(),
            "--",
            "no-such-program",
            "x",
        ],
        JOB_TIMEOUT,
    );
    let status_json = std::fs::read_to_string(&status).unwrap_or_default();
    let _ = std::fs::remove_file(&status);
    assert_eq!(
        r.code,
        Some(127),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stderr
            .contains("hpcvm: Job could not start: no-such-program: command not found"),
        "{}",
        r.stderr
    );
    assert!(
        status_json.contains(r#""outcome":"job-failed""#),
        "{status_json}"
    );
}

#[test]
fn a_missing_working_directory_is_a_config_error_not_cannot_run() {
    let r = run_hpcvm(
        &[
            "run",
            "--memory",
            "128M",
            "--no-share-cwd",
            "--workdir",
            "/nonexistent",
            "--",
            "/bin/true",
        ],
        JOB_TIMEOUT,
    );
    assert_eq!(r.code, Some(160), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains(
            "cannot enter the working directory /nonexistent in the guest: No such file or directory"
        ),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("cannot run"), "{}", r.stderr);
}

#[test]
fn sigterm_reaches_the_job_and_its_status_is_hpcvms() {
    let mut vm = RunningVm::start(&[
        "run",
        "--memory",
        "128M",
        "--grace-period",
        "60",
        "--",
        "/bin/sh",
        "-c",
        "trap 'echo got-term; exit 7' TERM; echo ready; sleep 1000",
    ]);
    vm.wait_for_line("ready", JOB_TIMEOUT);
    // busybox sh loses a SIGTERM that lands between its fork and exec of `sleep`, and
    // fork+exec takes ~0.5 s in an emulated guest kernel: let the job reach its sleep.
    std::thread::sleep(Duration::from_secs(2));
    let sent = Instant::now();
    signal(vm.pid(), libc::SIGTERM);
    vm.wait_for_line("got-term", Duration::from_secs(60));
    let (code, err, _) = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(7), "{err}");
    assert!(
        sent.elapsed() < Duration::from_secs(60),
        "within the grace period"
    );
}

/// The sha256 of `path`, by the host's `sha256sum`.
fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `len` bytes that do not compress or repeat (xorshift).
fn write_noise(path: &std::path::Path, len: usize) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    std::fs::write(path, v).unwrap();
}

#[test]
fn job_files_that_cannot_unpack_are_refused_and_those_that_can_arrive_whole() {
    // The archive stays in guest RAM while the kernel unpacks it into a tmpfs of
    // half the RAM left: 100 MiB cannot fit in 256 MiB; refused before boot.
    let big = temp("big.dat");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let spec = format!("{}:/big.dat", big.display());
    let r = run_hpcvm(
        &[
            "run",
            "--memory",
            "256M",
            "--file",
            &spec,
            "--",
            "sha256sum",
            "/big.dat",
        ],
        JOB_TIMEOUT,
    );
    std::fs::remove_file(&big).unwrap();
    assert_eq!(r.code, Some(161), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("MiB initramfs, which needs at least")
            && r.stderr.contains("(the guest has 256 MiB)"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "no job ran: {}", r.stdout);
    // 40 MiB fits: every byte arrives (hpcvm once ran the job on a file that was
    // zeros past ~25 MiB). The guest kernel unpacks it in emulated ring 0 on a
    // software-KVM host (minutes beside the other job tests): a longer limit.
    let fits = temp("fits.dat");
    write_noise(&fits, 40 << 20);
    let want = sha256_of(&fits);
    let spec = format!("{}:/fits.dat", fits.display());
    let r = run_hpcvm(
        &[
            "run",
            "--memory",
            "256M",
            "--file",
            &spec,
            "--",
            "sha256sum",
            "/fits.dat",
        ],
        JOB_TIMEOUT * 2,
    );
    std::fs::remove_file(&fits).unwrap();
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout, format!("{want}  /fits.dat\n"));
}

#[test]
fn stdin_reaches_the_job_from_a_pipe_or_a_file() {
    let deck = temp("deck.dat");
    write_noise(&deck, 3 << 20);
    let want = sha256_of(&deck);
    let bin = hpcvm_tests::proc::hpcvm_bin();
    // A pipe (polled by the device thread), 3 MiB through it, then its end.
    let piped = format!(
        "cat '{}' | '{}' run --memory 128M --no-share-cwd -- sha256sum",
        deck.display(),
        bin.display()
    );
    let r = hpcvm_tests::proc::run_program(
        std::path::Path::new("/bin/sh"),
        &["-c", &piped],
        JOB_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout, format!("{want}  -\n"));
    // A file, as a batch script's `< input.dat` gives it.
    let redirected = format!(
        "'{}' run --memory 128M --no-share-cwd -- sh -c 'wc -c; echo done' < '{}'",
        bin.display(),
        deck.display()
    );
    let r = hpcvm_tests::proc::run_program(
        std::path::Path::new("/bin/sh"),
        &["-c", &redirected],
        JOB_TIMEOUT,
    );
    std::fs::remove_file(&deck).unwrap();
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout, format!("{}\ndone\n", 3 << 20));
}
