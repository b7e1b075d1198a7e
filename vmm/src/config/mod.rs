//! What the user asked for: one small struct per configurable resource, parsed from the
//! command line's option strings. Parsing here is pure; checks against the host (allowed
//! CPUs, hugepage pools, KVM limits) happen where the resource is built.

pub mod checkpoint;
pub mod cpus;
pub mod device;
pub mod disk;
pub mod memory;
pub mod numa;
pub mod request;
pub mod share;

use std::path::PathBuf;
use std::time::Duration;

pub use checkpoint::CheckpointOn;
pub use cpus::{parse_cpu_list, CpusConfig, Topology};
pub use device::DeviceConfig;
pub use disk::DiskConfig;
pub use memory::{HugePageSize, MemoryConfig};
pub use numa::NumaConfig;
pub use share::ShareConfig;
use thiserror::Error;

/// Kernel command-line items every guest gets before the user's: console on COM1, reset
/// through the i8042 (what hpcvm treats as "guest exited"), and no reboot loop on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// A configuration value that cannot work, whatever the host.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--cpus` did not parse.
    #[error("Invalid --cpus '{value}': {reason}")]
    Cpus {
        /// The option string as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--memory` did not parse.
    #[error("Invalid --memory '{value}': {reason}")]
    Memory {
        /// The option string as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--disk` did not parse.
    #[error("Invalid --disk '{value}': {reason}")]
    Disk {
        /// The option string as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--share` did not parse.
    #[error("Invalid --share '{value}': {reason}")]
    Share {
        /// The option string as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--numa` did not parse.
    #[error("Invalid --numa '{value}': {reason}")]
    Numa {
        /// The option string as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--device` did not parse.
    #[error("Invalid --device '{value}': expected vfio=BDF or vfio=/sys/bus/pci/devices/BDF")]
    Device {
        /// The option string as given.
        value: String,
    },
}

/// Keys already given in one option string: a key given twice is refused, never
/// "the last one wins" (`hugepages=2M,hugepages=none` is a mistake, not a choice).
#[derive(Default)]
struct Keys(Vec<&'static str>);

impl Keys {
    /// Records `key` (aliases share one name); an error if it was given before.
    fn once(&mut self, key: &'static str) -> Result<(), String> {
        if self.0.contains(&key) {
            return Err(format!("{key} given twice"));
        }
        self.0.push(key);
        Ok(())
    }
}

/// An `on`/`off` option value (also `true`/`false`, `1`/`0`) of option `key`.
fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{key}= takes on or off, not '{v}'")),
    }
}

/// The guest kernel and what it boots with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelConfig {
    /// ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub path: PathBuf,
    /// Optional initramfs, loaded as-is (give it uncompressed for fast boots).
    pub initramfs: Option<PathBuf>,
    /// Appended to [`DEFAULT_CMDLINE`].
    pub cmdline: String,
}

impl KernelConfig {
    /// The full command line the guest sees.
    pub fn full_cmdline(&self) -> String {
        let extra = self.cmdline.trim();
        if extra.is_empty() {
            DEFAULT_CMDLINE.to_string()
        } else {
            format!("{DEFAULT_CMDLINE} {extra}")
        }
    }
}

/// How the VM is controlled from outside.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlConfig {
    /// Where to create the API socket, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// How long a shutdown waits for the guest before destroying it.
    pub grace_period: Duration,
    /// Checkpoint and stop on a signal (`--checkpoint-on`).
    #[serde(default)]
    pub checkpoint_on: Option<CheckpointOn>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            api_socket: None,
            grace_period: DEFAULT_GRACE_PERIOD,
            checkpoint_on: None,
        }
    }
}

/// Default shutdown grace period: Slurm's default KillWait, so the VM is gone before
/// Slurm's SIGKILL.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(25);

/// A command to run inside the guest through the guest agent (`hpcvm run -- CMD`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobConfig {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment (`--env K=V`), on top of the defaults.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    pub cwd: String,
    /// Host files copied into the initramfs.
    pub files: Vec<crate::boot::initramfs::FileSpec>,
    /// The guest agent binary (becomes /init).
    pub agent: PathBuf,
    /// A static busybox for the job's shell and tools, if available.
    pub busybox: Option<PathBuf>,
    /// The job's stdout and stderr travel over virtio-console ports (else over the
    /// agent's serial channel).
    pub console_stdio: bool,
    /// The job runs in the `--image` root filesystem; with an empty `argv` the
    /// image's own init boots instead.
    pub image: bool,
    /// hpcvm's stdin becomes the job's (on a virtio-console port); else the job's
    /// stdin is /dev/null. The `hpcvm` binary sets it unless stdin is a terminal.
    pub stdin: bool,
    /// The uid and gid the job runs as in the guest; root when absent.
    pub user: Option<JobUser>,
}

/// A job's identity in the guest (the agent's wire type).
pub use hpcvm_agent::JobUser;

/// The calling process's real uid and gid, as a job's identity.
pub fn caller_identity() -> JobUser {
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    JobUser { uid, gid }
}

/// The environment every job starts with; `--env` adds to or overrides it.
pub const JOB_BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("USER", "root"),
    ("LOGNAME", "root"),
    ("SHELL", "/bin/sh"),
    ("HOSTNAME", hpcvm_agent::GUEST_HOSTNAME),
];

impl JobConfig {
    /// The job's full environment: the base, then `--env` entries (later wins). A job
    /// run as another user than root gets that user's name (from the host's user
    /// database, else `uidN`) and its working directory as HOME.
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = JOB_BASE_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(user) = self.user.filter(|u| u.uid != 0) {
            let name = user_name(user.uid).unwrap_or_else(|| format!("uid{}", user.uid));
            for (k, v) in &mut env {
                match k.as_str() {
                    "HOME" => *v = self.cwd.clone(),
                    "USER" | "LOGNAME" => *v = name.clone(),
                    _ => {}
                }
            }
        }
        for (k, v) in &self.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }
}

/// The name of host user `uid`, if the user database has one.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain data filled in by getpwuid_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of pw.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points at a NUL-terminated string in buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Guest kernel, initramfs and command line.
    pub kernel: KernelConfig,
    /// vCPU count, topology and pinning.
    pub cpus: CpusConfig,
    /// Guest RAM size and backing.
    pub memory: MemoryConfig,
    /// The guest's NUMA nodes and where their RAM lives on the host.
    pub numa: NumaConfig,
    /// API socket and shutdown grace period.
    pub control: ControlConfig,
    /// The command to run through the guest agent, if any.
    pub job: Option<JobConfig>,
    /// Host PCI functions passed through with VFIO.
    pub devices: Vec<DeviceConfig>,
    /// virtio-blk disks, in the order the guest sees them (`/dev/vda`, ...); an
    /// `--image` disk comes last.
    pub disks: Vec<DiskConfig>,
    /// Host directories shared over virtio-fs, each with its tag set.
    pub shares: Vec<ShareConfig>,
    /// Show the guest console (kernel messages) and agent diagnostics.
    pub verbose: bool,
    /// What each thread's seccomp filter does with a call it does not allow.
    pub seccomp: crate::seccomp::SeccompMode,
}

impl VmConfig {
    /// A VM that boots `kernel` with the defaults (1 vCPU, 256 MiB, no devices, no
    /// job, seccomp on); set the fields to change them.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: KernelConfig {
                path: kernel.into(),
                initramfs: None,
                cmdline: String::new(),
            },
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            numa: NumaConfig::default(),
            control: ControlConfig::default(),
            job: None,
            devices: Vec::new(),
            disks: Vec::new(),
            shares: Vec::new(),
            verbose: false,
            seccomp: crate::seccomp::SeccompMode::default(),
        }
    }
}
