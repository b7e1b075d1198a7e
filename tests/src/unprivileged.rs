//! An ordinary account for tests of hpcvm as the queueing system runs it: a user
//! whose only grant is membership of the `kvm` group. The set-up (as root) creates
//! that user and group and gives /dev/kvm to the group the way the standard udev
//! rule does (root:kvm 0660), and puts /dev/kvm back as it was when dropped.
//!
//! Test binaries run one after another, but the tests in one binary do not: a
//! binary that uses this keeps its scenarios in one test function, so that no
//! restore of /dev/kvm races another scenario.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::proc::hpcvm_bin;

/// Whether this process may create users and hand out /dev/kvm.
pub fn is_root() -> bool {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() == 0 }
}

/// The owner of `p`.
pub fn owner(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().uid()
}

/// The test account.
pub const USER: &str = "hpcvm-test";

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
pub struct Unprivileged {
    /// The user's uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    kvm: u32,
    dir: PathBuf,
    saved: (u32, u32),
}

impl Unprivileged {
    /// Creates the user and grants /dev/kvm to the kvm group (root only).
    pub fn set_up() -> Self {
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
    pub fn spawn(&self, args: &[&str], in_kvm: bool) -> Child {
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
    pub fn run(&self, args: &[&str], in_kvm: bool) -> (Option<i32>, String, String) {
        let out = self.spawn(args, in_kvm).wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    /// `name` in the user's private directory (its working directory in `run`).
    pub fn path(&self, name: &str) -> PathBuf {
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
