//! hpcvm as the queueing system runs it: as the job's user, an ordinary account
//! whose only grant is membership of the `kvm` group. The set-up (as root) creates
//! that user and group and gives /dev/kvm to the group the way the standard udev
//! rule does (root:kvm 0660), and puts /dev/kvm back as it was afterwards.
//!
//! One test function on purpose: the scenarios share the user and the /dev/kvm
//! grant, and must not race a restore.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use hpcvm_tests::hugepages::Reservation;
use hpcvm_tests::unprivileged::{is_root, owner, Unprivileged, USER};

fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_main_paths_work_as_an_ordinary_user_in_the_kvm_group() {
    if !is_root() {
        eprintln!("skipped: the set-up creates a user and needs root");
        return;
    }
    let u = Unprivileged::set_up();
    let spin = hpcvm_tests::guest("spin");
    let spin = spin.to_str().unwrap();

    // Without the kvm group: refused, saying what the site must grant.
    let (code, _, err) = u.run(&["run", "--kernel", spin], false);
    assert_eq!(code, Some(162), "{err}");
    assert!(
        err.contains("Cannot open /dev/kvm: Permission denied") && err.contains("kvm group"),
        "{err}"
    );
    let (code, out, _) = u.run(&["doctor"], false);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("usermod -aG kvm"), "{out}");
    let (code, out, err) = u.run(&["doctor"], true);
    assert!(out.contains("/dev/kvm opens"), "{out} {err}");
    assert!(!out.contains("usermod -aG kvm"), "{out}");
    assert!(code == Some(0) || code == Some(1), "{out}");

    // A VM on prefaulted hugepages with a control socket and a status file, all
    // unprivileged, confined, and cleaned up.
    let _pool = Reservation::take(40);
    let sock = u.path("vm.sock");
    let status = u.path("status.json");
    let vm = u.spawn(
        &[
            "run",
            "--kernel",
            spin,
            "--memory",
            "64M,hugepages=2M,prefault=on",
            "--api-socket",
            sock.to_str().unwrap(),
            "--status-file",
            status.to_str().unwrap(),
        ],
        true,
    );
    wait_for(|| sock.exists(), "the API socket");
    assert_eq!(owner(&sock), u.uid, "the socket is the user's");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().mode() & 0o777,
        0o600,
        "and private"
    );
    let pid = vm.id();
    wait_for(
        || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.count() >= 4)
                .unwrap_or(false)
        },
        "the VM's threads",
    );
    let (code, out, err) = u.run(
        &["ctl", "--api-socket", sock.to_str().unwrap(), "status"],
        true,
    );
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("\"state\":\"running\""), "{out}");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let st = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(st.contains("Seccomp:\t2"), "unconfined thread: {st}");
    }
    let (code, _, err) = u.run(
        &["ctl", "--api-socket", sock.to_str().unwrap(), "destroy"],
        true,
    );
    assert_eq!(code, Some(0), "{err}");
    let out = vm.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(169), "{err}");
    assert!(!sock.exists(), "socket removed");
    assert_eq!(owner(&status), u.uid, "the status record is the user's");
    assert!(std::fs::read_to_string(&status)
        .unwrap()
        .contains("\"exit_code\":169"));

    // A job in the default guest: the working directory shared through an
    // unprivileged virtiofsd, what it writes there owned by the user.
    if !u.path("virtiofsd").exists() {
        eprintln!("virtiofsd not installed: job scenario skipped (make test installs it)");
        return;
    }
    // The job runs as the caller's uid and gid, with the caller's name; what it
    // writes in the shared directory is the user's.
    let (code, out, err) = u.run(
        &[
            "run",
            "--",
            "sh",
            "-c",
            "id -u; id -g; echo $USER $HOME; echo written-in-vm > out.txt; cat out.txt",
        ],
        true,
    );
    assert_eq!(code, Some(0), "{out} {err}");
    let dir = u.path("");
    let want = format!(
        "{}\n{}\n{USER} {}\nwritten-in-vm\n",
        u.uid,
        u.gid,
        dir.display().to_string().trim_end_matches('/')
    );
    assert_eq!(out, want, "{err}");
    let written = u.path("out.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap().trim(),
        "written-in-vm"
    );
    assert_eq!(owner(&written), u.uid, "the job's file belongs to the user");
    assert_eq!(std::fs::metadata(&written).unwrap().gid(), u.gid);
    // Asked for, the job is root in the guest (not on the host: the share still
    // writes as the user).
    let (code, out, err) = u.run(
        &["run", "--guest-root", "--", "sh", "-c", "id -u; echo $USER"],
        true,
    );
    assert_eq!(code, Some(0), "{out} {err}");
    assert_eq!(out, "0\nroot\n", "{err}");

    // Checkpointed and restored by the user, the share's unprivileged virtiofsd
    // handing over the file the job holds open: the job carries on writing it.
    let sock = u.path("ck.sock");
    let ck = u.path("ck");
    let job = hpcvm_tests::proc::open_file_job(6, "exit 5");
    let mut vm = u.spawn(
        &[
            "run",
            "--api-socket",
            sock.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &job,
        ],
        true,
    );
    let log = u.path("log");
    wait_for(
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("line 1")),
        "the job's second line",
    );
    let (code, out, err) = u.run(
        &[
            "ctl",
            "--api-socket",
            sock.to_str().unwrap(),
            "checkpoint",
            ck.to_str().unwrap(),
            "--stop",
        ],
        true,
    );
    assert_eq!(code, Some(0), "{out} {err}");
    assert_eq!(vm.wait().unwrap().code(), Some(173));
    assert_eq!(
        owner(&ck.join("vm.state")),
        u.uid,
        "the checkpoint is the user's"
    );
    let (code, _, err) = u.run(&["restore", ck.to_str().unwrap()], true);
    assert_eq!(code, Some(5), "{err}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        hpcvm_tests::proc::open_file_log(6),
        "{err}"
    );
    assert_eq!(owner(&log), u.uid);
}
