//! hpcvm as the queueing system runs it: as the job's user, an ordinary account
//! whose only grant is membership of the `kvm` group. The set-up (as root) creates
//! that user and group and gives /dev/kvm to the group the way the standard udev
//! rule does (root:kvm 0660), and puts /dev/kvm back as it was afterwards.
//!
//! One test function on purpose: the scenarios share the user and the /dev/kvm
//! grant, and must not race a restore.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hpcvm_tests::hugepages::Reservation;
use hpcvm_tests::proc::hpcvm_bin;

const USER: &str = "hpcvm-test";

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
    assert!(st.success(), "set-up failed: {cmd}");
}

fn id_of(what: &str) -> u32 {
    let out = Command::new("id").args([what, USER]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn kvm_gid() -> u32 {
    let out = Command::new("getent")
        .args(["group", "kvm"])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    line.split(':').nth(2).unwrap().parse().unwrap()
}

/// The user, its scratch directory, and /dev/kvm granted to `kvm` until dropped.
struct Unprivileged {
    uid: u32,
    gid: u32,
    kvm: u32,
    dir: PathBuf,
    saved: (u32, u32),
}

impl Unprivileged {
    fn set_up() -> Self {
        sh("getent group kvm >/dev/null || groupadd --system kvm");
        sh(&format!(
            "id {USER} >/dev/null 2>&1 || useradd --system --no-create-home \
             --shell /usr/sbin/nologin {USER}"
        ));
        let meta = std::fs::metadata("/dev/kvm").unwrap();
        let saved = (meta.mode() & 0o7777, meta.gid());
        let kvm = kvm_gid();
        std::os::unix::fs::chown("/dev/kvm", None, Some(kvm)).unwrap();
        std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o660)).unwrap();
        let (uid, gid) = (id_of("-u"), id_of("-g"));
        let dir = std::env::temp_dir().join(format!("hpcvm-unpriv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A site installs virtiofsd where every user can run it; root's cargo
        // directory is not such a place.
        if let Some(v) = vmm::virtio::fs::find_virtiofsd() {
            std::fs::copy(v, dir.join("virtiofsd")).unwrap();
        }
        Self {
            uid,
            gid,
            kvm,
            dir,
            saved,
        }
    }

    /// `hpcvm ARGS` as the user (in the kvm group if `in_kvm`), in its directory.
    fn spawn(&self, args: &[&str], in_kvm: bool) -> Child {
        let (uid, gid, kvm) = (self.uid, self.gid, self.kvm);
        let mut cmd = Command::new(hpcvm_bin());
        cmd.args(args)
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &self.dir)
            .env("HPCVM_VIRTIOFSD", self.dir.join("virtiofsd"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls, on values
        // computed before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let groups: &[libc::gid_t] = if in_kvm { &[kvm] } else { &[] };
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }

    /// Runs `hpcvm ARGS` as the user to its end: (status, stdout, stderr).
    fn run(&self, args: &[&str], in_kvm: bool) -> (Option<i32>, String, String) {
        let out = self.spawn(args, in_kvm).wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        let _ = std::os::unix::fs::chown("/dev/kvm", None, Some(self.saved.1));
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(self.saved.0));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn owner(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().uid()
}

fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_main_paths_work_as_an_ordinary_user_in_the_kvm_group() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
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
    let (code, out, err) = u.run(
        &[
            "run",
            "--",
            "sh",
            "-c",
            "echo written-in-vm > out.txt; cat out.txt",
        ],
        true,
    );
    assert_eq!(code, Some(0), "{out} {err}");
    assert_eq!(out.trim(), "written-in-vm", "{err}");
    let written = u.path("out.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap().trim(),
        "written-in-vm"
    );
    assert_eq!(owner(&written), u.uid, "the job's file belongs to the user");
    assert_eq!(std::fs::metadata(&written).unwrap().gid(), u.gid);
}
