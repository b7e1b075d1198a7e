//! Real /dev/kvm, real guest kernel: the virtio data path. Disks made here with
//! `mkfs.ext4 -d` are read by the guest, a read-only one refuses writes and stays
//! byte-identical, a writable one takes them; an `--image` with nothing of hpcvm in it
//! is the job's root, shared read-only by two VMs at once; megabytes of job output
//! arrive intact with stdout and stderr apart. Bad disks are refused before boot.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hpcvm_tests::hugepages;
use hpcvm_tests::mkfs;
use hpcvm_tests::proc::{assert_no_virtiofsd, run_hpcvm, virtiofsds_for};
use hpcvm_tests::scratch::Scratch;

/// Boot, job and exit together; generous for software KVM, where a boot takes 20-60 s.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// The exit status for an unusable disk or image.
const DISK: i32 = 171;

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Bytes that differ on every run, so a stale file cannot pass for a fresh one.
fn noise(len: usize) -> Vec<u8> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn disks_are_read_and_written_and_job_output_arrives_intact() {
    let s = Scratch::new("virtio", "disks");
    let tree = s.path("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("input.dat"), "input deck 42\n").unwrap();
    let blob = noise(1 << 20);
    std::fs::write(tree.join("sub/blob"), &blob).unwrap();
    let data = s.path("data.ext4");
    mkfs(&tree, &data, "8M");
    let before = std::fs::read(&data).unwrap();
    let scratch = s.path("scratch.img");
    std::fs::write(&scratch, vec![0u8; 4 << 20]).unwrap();
    let script = "cat /sys/block/vda/serial; echo; \
        mkdir /m && mount -t ext4 -o ro /dev/vda /m && cat /m/input.dat && sha256sum /m/sub/blob; \
        if dd if=/dev/zero of=/dev/vda bs=512 count=1 2>/dev/null; then echo ro-write-accepted; \
        else echo ro-write-refused; fi; \
        cat /m/sub/blob > /dev/vdb && sync && echo scratch-written; \
        echo first-err >&2; seq 1 300000; echo last-err >&2";
    let data_arg = format!("{},readonly=on,serial=deck-7", data.display());
    let scratch_arg = scratch.display().to_string();
    let r = run_hpcvm(
        &[
            "run",
            "--memory",
            "256M",
            "--disk",
            &data_arg,
            "--disk",
            &scratch_arg,
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
        JOB_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let mut lines = r.stdout.lines();
    assert_eq!(
        lines.next(),
        Some("deck-7"),
        "{}",
        &r.stdout[..r.stdout.len().min(400)]
    );
    assert_eq!(lines.next(), Some("input deck 42"));
    let sum = lines.next().unwrap_or_default();
    assert!(sum.starts_with(&sha256(&blob)), "guest sha256 line: {sum}");
    assert_eq!(lines.next(), Some("ro-write-refused"));
    assert_eq!(lines.next(), Some("scratch-written"));
    // Megabytes of stdout, every line in order, nothing of stderr among them.
    let seq: String = (1..=300_000).map(|i| format!("{i}\n")).collect();
    let rest: Vec<&str> = lines.collect();
    assert_eq!(rest.len(), 300_000, "stdout lines after the checks");
    assert_eq!(
        sha256((rest.join("\n") + "\n").as_bytes()),
        sha256(seq.as_bytes())
    );
    assert_eq!(r.stderr, "first-err\nlast-err\n");
    // The read-only disk is untouched; the writable one holds what the guest wrote.
    assert!(
        std::fs::read(&data).unwrap() == before,
        "the read-only disk changed"
    );
    let written = std::fs::read(&scratch).unwrap();
    assert!(
        written[..blob.len()] == blob[..],
        "the scratch disk lacks the guest's write"
    );
}

#[test]
fn an_image_is_the_root_of_jobs_in_two_vms_at_once_and_stays_unchanged() {
    let s = Scratch::new("virtio", "image");
    let root = s.path("root");
    for d in ["bin", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for t in ["sh", "cat", "echo", "test"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(t)).unwrap();
    }
    std::fs::write(root.join("etc/motd"), "from the image\n").unwrap();
    let image = s.path("image.ext4");
    mkfs(&root, &image, "16M");
    let before = std::fs::read(&image).unwrap();
    let image_arg = image.display().to_string();
    let job = move |n: u32| {
        let image_arg = image_arg.clone();
        std::thread::spawn(move || {
            let script = format!(
                "cat /etc/motd; echo vm-{n} > /etc/written && cat /etc/written; \
                 test -e /init && echo agent-visible || echo image-root"
            );
            run_hpcvm(
                &[
                    "run", "--memory", "256M", "--image", &image_arg, "--", "sh", "-c", &script,
                ],
                JOB_TIMEOUT,
            )
        })
    };
    let runs = [job(1), job(2)].map(|h| h.join().unwrap());
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r.code, Some(0), "vm {}: {}", i + 1, r.stderr);
        assert_eq!(
            r.stdout,
            format!("from the image\nvm-{}\nimage-root\n", i + 1),
            "vm {}",
            i + 1
        );
    }
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
}

#[test]
fn unusable_disks_and_images_are_refused_before_boot() {
    let s = Scratch::new("virtio", "refused");
    let run = |args: &[&str]| run_hpcvm(args, Duration::from_secs(30));
    let expect = |args: &[&str], code: i32, needle: &str| {
        let r = run(args);
        assert_eq!(r.code, Some(code), "{args:?}: {}", r.stderr);
        let last = r.stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("hpcvm:") && last.contains(needle),
            "{args:?}: {}",
            r.stderr
        );
    };
    let missing = s.path("missing.ext4");
    expect(
        &["run", "--image", missing.to_str().unwrap(), "--", "true"],
        DISK,
        &format!("Cannot open disk {}: No such file", missing.display()),
    );
    let zeros = s.path("zeros.img");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    expect(
        &["run", "--image", zeros.to_str().unwrap(), "--", "true"],
        DISK,
        "is not an ext4 filesystem",
    );
    let tree = s.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let cut = s.path("cut.ext4");
    mkfs(&tree, &cut, "16M");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    expect(
        &["run", "--image", cut.to_str().unwrap(), "--", "true"],
        DISK,
        "is truncated: its ext4 filesystem needs 16777216 bytes, the file has 8388608",
    );
    // Another writer holds the disk: neither a writer nor a reader may attach it.
    let held = s.path("held.img");
    std::fs::write(&held, vec![0u8; 1 << 20]).unwrap();
    let holder = std::fs::File::open(&held).unwrap();
    // SAFETY: flock on a file we own.
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    let kernel = hpcvm_tests::guest("hello").display().to_string();
    for spec in [
        held.display().to_string(),
        format!("{},readonly=on", held.display()),
    ] {
        expect(
            &["run", "--kernel", &kernel, "--disk", &spec],
            DISK,
            &format!("Disk {} is in use", held.display()),
        );
    }
    drop(holder);
    expect(
        &["run", "--kernel", &kernel, "--disk", "x.img,cache=none"],
        160,
        "Invalid --disk 'x.img,cache=none': unknown key 'cache'",
    );
    expect(
        &[
            "run",
            "--kernel",
            &kernel,
            "--disk",
            &s.dir().display().to_string(),
        ],
        DISK,
        "is not a regular file or block device",
    );
}

#[test]
fn the_working_directory_is_shared_and_results_land_there() {
    let s = Scratch::new("virtio", "cwd");
    let work = s.path("job");
    let inputs = s.path("inputs");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::write(work.join("input.txt"), "host input\n").unwrap();
    let blob = noise(3 << 20);
    std::fs::write(inputs.join("blob"), &blob).unwrap();
    let script = "pwd; cat input.txt; cat /inputs/blob > result.bin && echo copied; \
        if echo x > /inputs/new 2>/dev/null; then echo ro-write-accepted; else echo ro-write-refused; fi";
    let shell = format!(
        "cd '{}' && exec '{}' run --memory 256M --share '{}:/inputs,readonly=on' -- /bin/sh -c '{script}'",
        work.display(),
        hpcvm_tests::proc::hpcvm_bin().display(),
        inputs.display()
    );
    let r = hpcvm_tests::proc::run_program(Path::new("/bin/sh"), &["-c", &shell], JOB_TIMEOUT);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(
        r.stdout,
        format!("{}\nhost input\ncopied\nro-write-refused\n", work.display())
    );
    let result = work.join("result.bin");
    let got = std::fs::read(&result).unwrap();
    assert_eq!(sha256(&got), sha256(&blob), "result.bin differs");
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    assert_eq!(std::fs::metadata(&result).unwrap().uid(), me, "owner");
    assert!(!inputs.join("new").exists());
    assert_no_virtiofsd(&work);
    assert_no_virtiofsd(&inputs);
}

#[test]
fn sigkill_and_destroy_during_file_io_leave_no_virtiofsd() {
    let s = Scratch::new("virtio", "kill");
    let dir = s.path("share");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = s.path("api.sock");
    let share = format!("{}:/out", dir.display());
    let job = "while true; do seq 1 20000 > /out/spin.txt; echo wrote; done";
    // Guest RAM on 2M hugepages (a shared hugetlb memfd, since a share is given):
    // every page must be back in the pool after each end.
    let _pool = hugepages::Reservation::take(130);
    let free_before = hugepages::free_2m();
    let start = |api: bool| {
        let mut args = vec![
            "run",
            "--memory",
            "256M,hugepages=2M",
            "--no-share-cwd",
            "--share",
            &share,
        ];
        if api {
            args.extend(["--api-socket", sock.to_str().unwrap()]);
        }
        args.extend(["--", "/bin/sh", "-c", job]);
        hpcvm_tests::proc::RunningVm::start(&args)
    };
    // SIGKILL: the kernel ends virtiofsd with hpcvm (PR_SET_PDEATHSIG).
    let mut vm = start(false);
    vm.wait_for_line("wrote", JOB_TIMEOUT);
    // (As root it runs sandboxed: a parent and the sandboxed child that serves.)
    assert!(
        !virtiofsds_for(&dir).is_empty(),
        "no virtiofsd serves the share"
    );
    vm.kill();
    assert_no_virtiofsd(&dir);
    assert_eq!(hugepages::free_2m(), free_before, "hugepages after SIGKILL");
    // destroy through the API: exit 169, no virtiofsd, no socket file.
    let mut vm = start(true);
    vm.wait_for_line("wrote", JOB_TIMEOUT);
    let r = hpcvm_tests::proc::ctl(&sock, &["destroy"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(169));
    assert_no_virtiofsd(&dir);
    assert!(!sock.exists(), "the API socket was left behind");
    assert_eq!(hugepages::free_2m(), free_before, "hugepages after destroy");
}

#[test]
fn a_virtiofsd_that_dies_mid_job_gives_the_job_io_errors_not_a_hang() {
    let s = Scratch::new("virtio", "fsdeath");
    let dir = s.path("share");
    std::fs::create_dir_all(&dir).unwrap();
    let share = format!("{}:/out", dir.display());
    // Each tick rewrites a file on the share (open, truncate and write all go to
    // virtiofsd); the loop ends at the first error.
    let job = "i=0; while echo $i > /out/tick.txt; do echo tick $i; i=$((i+1)); sleep 1; done; \
        echo io-failed; ls /out > /dev/null 2>&1 || echo ls-failed; exit 7";
    let mut vm = hpcvm_tests::proc::RunningVm::start(&[
        "run",
        "--memory",
        "256M",
        "--no-share-cwd",
        "--share",
        &share,
        "--",
        "/bin/sh",
        "-c",
        job,
    ]);
    vm.wait_for_line("tick 1", JOB_TIMEOUT);
    let served = virtiofsds_for(&dir);
    assert!(!served.is_empty(), "no virtiofsd serves the share");
    for pid in served {
        hpcvm_tests::proc::signal(pid, libc::SIGKILL);
    }
    vm.wait_for_line("io-failed", JOB_TIMEOUT);
    assert_eq!(vm.wait_for_line("ls-failed", JOB_TIMEOUT), "ls-failed");
    let (code, stderr, _) = vm.wait_exit(JOB_TIMEOUT);
    assert_eq!(code, Some(7), "the job's own status; stderr: {stderr}");
    let said = format!("virtiofsd for {} ended during the run", dir.display());
    assert_eq!(stderr.matches(&said).count(), 1, "stderr: {stderr}");
    assert!(stderr.contains("fails with EIO"), "stderr: {stderr}");
    let ticks: u32 = std::fs::read_to_string(dir.join("tick.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(ticks >= 1, "tick.txt holds {ticks}");
    assert_no_virtiofsd(&dir);
}

#[test]
fn a_missing_share_or_virtiofsd_is_refused_before_boot() {
    let s = Scratch::new("virtio", "noshare");
    let gone = s.path("gone");
    let r = run_hpcvm(
        &[
            "run",
            "--no-share-cwd",
            "--share",
            gone.to_str().unwrap(),
            "--",
            "true",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(172), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("Cannot share {}: No such file", gone.display())),
        "{}",
        r.stderr
    );
    // `hpcvm run --share DIR -- true` under `env ENV...`.
    let share_under = |env: &[&str]| {
        let bin = hpcvm_tests::proc::hpcvm_bin();
        let mut args = env.to_vec();
        args.extend([
            bin.to_str().unwrap(),
            "run",
            "--share",
            s.dir().to_str().unwrap(),
        ]);
        args.extend(["--", "true"]);
        hpcvm_tests::proc::run_program(Path::new("/usr/bin/env"), &args, Duration::from_secs(30))
    };
    let r = share_under(&["HPCVM_VIRTIOFSD=/nonexistent/virtiofsd"]);
    assert_eq!(r.code, Some(172), "{}", r.stderr);
    assert!(r.stderr.contains("Cannot start virtiofsd"), "{}", r.stderr);
    if Path::new("/usr/libexec/virtiofsd").exists() {
        return;
    }
    let r = share_under(&[
        "-u",
        "HPCVM_VIRTIOFSD",
        "PATH=/nonexistent",
        "HOME=/nonexistent",
    ]);
    assert_eq!(r.code, Some(172), "{}", r.stderr);
    assert!(
        r.stderr.contains("--share needs virtiofsd, which is not installed: install it with `cargo install virtiofsd`"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_image_without_a_command_boots_its_own_init() {
    let s = Scratch::new("virtio", "init");
    let image = s.image_with_init(
        "init.ext4",
        "#!/bin/sh\n/bin/busybox echo \"image init is PID $$\"\n/bin/busybox reboot -f\n",
    );
    let r = run_hpcvm(
        &[
            "run",
            "--memory",
            "256M",
            "--no-share-cwd",
            "--image",
            image.to_str().unwrap(),
        ],
        JOB_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(r.stdout.contains("image init is PID 1"), "{}", r.stdout);
}
