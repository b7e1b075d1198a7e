//! `--share`: virtio-fs through vhost-user, served by the Rust `virtiofsd`. hpcvm
//! starts one virtiofsd per share on a listening socket it made itself (an abstract
//! Unix socket: no file to leave behind), connects to it before the guest starts,
//! and at DRIVER_OK hands it guest RAM (a shared memfd) and the queues, whose
//! notifications (ioeventfds) and interrupts (irqfds) then go between KVM and
//! virtiofsd without hpcvm. virtiofsd dies with hpcvm (PR_SET_PDEATHSIG), whatever
//! ends it, and is killed and reaped when the VM is torn down. If it ends first, the
//! device thread (watching its pidfd) takes the queues back and fails every request
//! with EIO ([`devices::virtio::fs_failed`]), so the job gets I/O errors, not a hang.
//! For a checkpoint or migration virtiofsd stops its rings and hands over its state
//! ([`state`]).

mod state;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use devices::virtio::fs_failed::{fail_requests, resume_from_used};
use devices::virtio::{read_config_bytes, ActivateContext, DeviceQueues, VirtioDevice};
use thiserror::Error;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::config::ShareConfig;

/// virtio-fs device type.
const VIRTIO_ID_FS: u32 = 26;
/// Queue entries (the high-priority queue and one request queue).
const QUEUE_SIZE: u16 = 256;
/// Bytes of the tag field in the config space.
const TAG_LEN: usize = 36;
/// How long virtiofsd may take to answer a vhost-user request: GET_VRING_BASE
/// waits for the request in hand, which on a slow network file system may be long.
const REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
/// vhost-user's own feature bit: protocol features are negotiated.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Why a share cannot be attached.
#[derive(Debug, Error)]
pub enum ShareError {
    /// The host directory is not there.
    #[error("Cannot share {dir}: {reason}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No virtiofsd binary.
    #[error("--share needs virtiofsd, which is not installed: install it with `cargo install virtiofsd` (or `make deps`), or set HPCVM_VIRTIOFSD to its path{hint}")]
    NoVirtiofsd {
        /// What else to try.
        hint: &'static str,
    },
    /// `--checkpoint-on` asked for, and this virtiofsd cannot hand over its state.
    #[error("--checkpoint-on: cannot checkpoint this VM: the virtiofsd serving {dir} cannot hand over its state (vhost-user DEVICE_STATE); install a virtiofsd with migration support (its --help lists --migration-mode; `cargo install virtiofsd`) or set HPCVM_VIRTIOFSD to one")]
    NoHandOver {
        /// The directory.
        dir: PathBuf,
    },
    /// virtiofsd could not be started or did not answer.
    #[error("Cannot start virtiofsd for {dir}: {reason}")]
    Start {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Where virtiofsd is: `$HPCVM_VIRTIOFSD`, else on PATH, else cargo's bin folder,
/// else /usr/libexec (where distributions put the Rust one). QEMU's old C virtiofsd
/// (/usr/lib/qemu) is not used: it takes other options and needs root.
pub fn find_virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HPCVM_VIRTIOFSD") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home)
        .chain([PathBuf::from("/usr/libexec")])
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

/// A running virtiofsd and the vhost-user connection to it.
struct Backend {
    dir: PathBuf,
    child: ChildGuard,
    /// Readable once virtiofsd has ended (None where the kernel has no pidfds).
    pidfd: Option<OwnedFd>,
    frontend: Frontend,
    /// It ended during the run and the device serves the queues itself (and the
    /// error has been printed).
    ended: bool,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Some(status) = self.child.exited() {
            log::warn!(
                "virtiofsd for {} exited during the run ({status}); the guest's \
                 I/O to that directory failed from then on",
                self.dir.display()
            );
        }
        // The guard kills and reaps it.
    }
}

/// One virtio-fs device.
pub struct Fs {
    dir: PathBuf,
    config: Vec<u8>,
    backend: Backend,
    backend_features: u64,
    /// The protocol features virtiofsd offers (none if it does not negotiate them).
    offered_protocol: VhostUserProtocolFeatures,
    /// Which rings virtiofsd serves now.
    running: Vec<bool>,
    /// Where its rings stopped, while quiesced for a checkpoint or migration.
    stopped: Option<Vec<u16>>,
    /// What it handed over then.
    saved: Option<Vec<u8>>,
    /// The state a restored device gives its new virtiofsd when the rings start.
    incoming: Option<devices::virtio::FsState>,
}

impl Fs {
    /// Starts virtiofsd for `share` and connects to it.
    pub fn start(
        share: &ShareConfig,
        index: usize,
        seccomp: crate::seccomp::SeccompMode,
    ) -> Result<Self, ShareError> {
        let dir = share.host_dir.clone();
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ShareError::Dir {
                    dir,
                    reason: "not a directory".into(),
                })
            }
            Err(e) => {
                return Err(ShareError::Dir {
                    dir,
                    reason: e.to_string(),
                })
            }
        }
        let bin = find_virtiofsd().ok_or(ShareError::NoVirtiofsd {
            hint: " (or run with --no-share-cwd when only the working directory is shared)",
        })?;
        let start = |reason: String| ShareError::Start {
            dir: dir.clone(),
            reason,
        };
        let name = format!("hpcvm-{}-fs{index}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| start(format!("socket address: {e}")))?;
        let listener =
            UnixListener::bind_addr(&addr).map_err(|e| start(format!("listening socket: {e}")))?;
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--fd={fd}"))
            .arg("--shared-dir")
            .arg(&dir)
            .args(["--cache", "auto", "--log-level", "error"])
            // Each queue's requests answered in order: what the device thread relies
            // on to take the queues over if virtiofsd ends.
            .arg("--thread-pool-size=0")
            // Root can sandbox virtiofsd in namespaces; a user's virtiofsd runs with
            // the user's own rights, which is all it can give the guest anyway.
            .args(["--sandbox", if is_root() { "namespace" } else { "none" }])
            // virtiofsd confines itself, the way hpcvm's own threads are.
            .args(["--seccomp", seccomp.virtiofsd_arg()])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if share.read_only {
            cmd.arg("--readonly");
        }
        // SAFETY: between fork and exec the child only makes async-signal-safe calls.
        unsafe {
            cmd.pre_exec(move || {
                // Die with hpcvm, however it ends; no terminal signals of its own.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setpgid(0, 0);
                // Stop and warning signals are hpcvm's to handle (a batch system
                // signals every process of the job step: SIGTERM to end it, SIGUSR1
                // ahead of a time limit (`sbatch --signal`) to have it checkpoint,
                // and virtiofsd would die of either): the guest's files must stay
                // served until the guest is gone. They stay blocked across exec
                // (virtiofsd installs handlers but keeps the mask); SIGKILL, hpcvm's
                // death or the end of the connection still end it.
                let mut held: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut held);
                for sig in [
                    libc::SIGTERM,
                    libc::SIGINT,
                    libc::SIGHUP,
                    libc::SIGQUIT,
                    libc::SIGUSR1,
                    libc::SIGUSR2,
                    libc::SIGALRM,
                ] {
                    libc::sigaddset(&mut held, sig);
                }
                libc::sigprocmask(libc::SIG_SETMASK, &held, std::ptr::null_mut());
                // The listening socket is inherited (hpcvm's fds are close-on-exec).
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| start(format!("{}: {e}", bin.display())))?;
        let pidfd = pidfd_open(child.id());
        let child = ChildGuard(child);
        // The connection waits in the backlog until virtiofsd accepts it.
        let stream = UnixStream::connect_addr(&addr).map_err(|e| start(format!("connect: {e}")))?;
        // A virtiofsd that does not answer is treated as gone rather than hang the
        // thread that asked (a vCPU, or the control thread stopping its rings).
        stream
            .set_read_timeout(Some(REPLY_WAIT))
            .map_err(|e| start(format!("socket timeout: {e}")))?;
        drop(listener);
        let mut frontend = Frontend::from_stream(stream, 2);
        frontend
            .set_owner()
            .map_err(|e| start(format!("vhost-user SET_OWNER: {e} (did virtiofsd start?)")))?;
        let backend_features = frontend
            .get_features()
            .map_err(|e| start(format!("vhost-user GET_FEATURES: {e}")))?;
        // Asked now (not only at activation) to know whether the VM can be
        // checkpointed before the guest runs.
        let offered_protocol = if backend_features & F_PROTOCOL_FEATURES != 0 {
            frontend
                .get_protocol_features()
                .map_err(|e| start(format!("vhost-user GET_PROTOCOL_FEATURES: {e}")))?
        } else {
            VhostUserProtocolFeatures::empty()
        };
        let mut config = vec![0u8; TAG_LEN + 4];
        let tag = share.tag.as_bytes();
        config[..tag.len().min(TAG_LEN)].copy_from_slice(&tag[..tag.len().min(TAG_LEN)]);
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Self {
            dir: dir.clone(),
            config,
            backend: Backend {
                dir,
                child,
                pidfd,
                frontend,
                ended: false,
            },
            backend_features,
            offered_protocol,
            running: vec![false; 2],
            stopped: None,
            saved: None,
            incoming: None,
        })
    }

    /// The shared host directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Why this share's VM cannot be checkpointed or migrated, if it cannot.
    pub fn hand_over_refusal(&self) -> Option<String> {
        let hands_over = self
            .offered_protocol
            .contains(VhostUserProtocolFeatures::DEVICE_STATE);
        (!hands_over).then(|| {
            format!(
                "the virtiofsd serving {} cannot hand over its state (vhost-user \
                 DEVICE_STATE): checkpointing or migrating a VM with shares needs a \
                 virtiofsd with migration support (its --help lists --migration-mode)",
                self.dir.display()
            )
        })
    }

    /// virtiofsd's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.backend.child.exited()
    }

    /// Features, protocol features (the device-state transfer too, when offered)
    /// and guest RAM.
    fn negotiate(&mut self, features: u64, ctx: &ActivateContext<'_>) -> vhost::Result<()> {
        let f = &mut self.backend.frontend;
        let mut acked = features & self.backend_features;
        if self.backend_features & F_PROTOCOL_FEATURES != 0 {
            acked |= F_PROTOCOL_FEATURES;
        }
        f.set_features(acked)?;
        if acked & F_PROTOCOL_FEATURES != 0 {
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::DEVICE_STATE;
            f.set_protocol_features(self.offered_protocol & wanted)?;
        }
        let regions = ctx
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<vhost::Result<Vec<_>>>()?;
        f.set_mem_table(&regions)?;
        Ok(())
    }

    /// Hands virtiofsd the ready queues, each carrying on from `bases` (where it
    /// stopped; 0 for a fresh start).
    fn start_rings(&mut self, ctx: &ActivateContext<'_>, bases: &[u16]) -> vhost::Result<()> {
        let f = &mut self.backend.frontend;
        let host = |gpa: u64| {
            ctx.mem
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| vhost::Error::InvalidGuestMemory)
        };
        for (i, q) in ctx.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            f.set_vring_num(i, q.size())?;
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            f.set_vring_addr(i, &cfg)?;
            f.set_vring_base(i, bases.get(i).copied().unwrap_or(0))?;
            f.set_vring_call(i, &ctx.calls[i])?;
            f.set_vring_kick(i, &ctx.kicks[i])?;
            if self.backend_features & F_PROTOCOL_FEATURES != 0 {
                f.set_vring_enable(i, true)?;
            }
            if let Some(r) = self.running.get_mut(i) {
                *r = true;
            }
        }
        Ok(())
    }

    /// `what` failed with `e`: the message, with virtiofsd's exit status if it ended.
    fn failed(&mut self, what: &str, e: impl std::fmt::Display) -> String {
        let status = self
            .exited()
            .map(|s| format!(" (virtiofsd exited: {s})"))
            .unwrap_or_default();
        format!(
            "{what} with virtiofsd for {}: {e}{status}",
            self.dir.display()
        )
    }
}

/// A started virtiofsd: killed and reaped when dropped, whether the connection was
/// never set up or the VM is done.
struct ChildGuard(Child);

impl ChildGuard {
    /// Its exit status, if it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pidfd for `pid`, or None where the kernel has none (before 5.3): virtiofsd's
/// end is then noticed only at teardown.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the descriptor was just created and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        // What virtiofsd offers of what the transport can carry.
        self.backend_features & !F_PROTOCOL_FEATURES & devices::virtio::COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, features: u64, ctx: ActivateContext<'_>) -> Result<(), String> {
        if self.backend.ended {
            return Err(format!("virtiofsd for {} has ended", self.dir.display()));
        }
        self.negotiate(features, &ctx)
            .map_err(|e| self.failed("vhost-user setup", e))?;
        let bases = match self.incoming.take() {
            Some(state) => {
                self.load(&state.backend)?;
                state.bases
            }
            None => Vec::new(),
        };
        self.start_rings(&ctx, &bases)
            .map_err(|e| self.failed("vhost-user setup", e))
    }

    fn serves_own_queues(&self) -> bool {
        !self.backend.ended
    }

    fn backend_exit(&self) -> Option<OwnedFd> {
        self.backend.pidfd.as_ref()?.try_clone().ok()
    }

    fn backend_ended(&mut self, queues: &mut DeviceQueues<'_>) {
        if self.backend.ended {
            return;
        }
        self.backend.ended = true;
        let status = self.exited().map(|s| format!(" ({s})")).unwrap_or_default();
        log::error!(
            "virtiofsd for {} ended during the run{status}: the guest's I/O to \
             that directory fails with EIO from now on",
            self.dir.display()
        );
        for i in 0..queues.queues.len() {
            if resume_from_used(&mut queues.queues[i], queues.mem) {
                fail_requests(queues, i);
            }
        }
    }

    fn process(&mut self, index: usize, queues: &mut DeviceQueues<'_>) {
        if self.backend.ended {
            fail_requests(queues, index);
        }
    }

    fn reset(&mut self) {
        self.stopped = None;
        self.saved = None;
        self.incoming = None;
        if self.backend.ended {
            return;
        }
        // virtiofsd gone or stuck: nothing serves the rings either way.
        let _ = self.stop_rings();
    }

    fn quiesce(&mut self) -> Result<(), String> {
        self.quiesce_backend()
    }

    fn resume(&mut self, ctx: ActivateContext<'_>) -> Result<(), String> {
        self.resume_backend(&ctx)
    }

    fn state(&self) -> Result<devices::virtio::DeviceState, String> {
        self.backend_state()
    }

    fn restore(&mut self, state: &devices::virtio::DeviceState) -> Result<(), String> {
        self.restore_backend(state)
    }
}
