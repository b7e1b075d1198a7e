//! The VM's lifecycle as the queueing system sees it, in one state machine:
//!
//! | state          | shutdown                        | destroy   | guest stops        | grace expires        |
//! |----------------|---------------------------------|-----------|--------------------|----------------------|
//! | running        | notify guest, arm grace -> shutting-down | -> destroyed | -> exited | -                    |
//! | paused         | resume, then as running         | -> destroyed | (cannot happen) | -                    |
//! | shutting-down  | notify again, keep deadline     | -> destroyed | -> shut down     | -> destroyed after grace |
//!
//! "Notify the guest" is SIGTERM to the job where the guest agent runs one; otherwise
//! the ACPI power button, and Ctrl-Alt-Del on the i8042 for a guest without ACPI. SIGTERM/SIGINT mean shutdown; the second one, destroy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::acpi::AcpiPlatform;
use devices::legacy::I8042;
use hpcvm_agent::{JobError, JobExit};

use crate::agent::{AgentLink, AgentPort};
use serde_json::Value;
use vmm_sys_util::timerfd::TimerFd;

use super::report::{Answer, MemoryStatus, StateChange, Status, VcpuStatus, VmState};
use crate::api::server::Handler;
use crate::api::Command;
use crate::checkpoint::Snapshotter;
use crate::config::MemoryConfig;
use crate::vstate::vcpu::{VcpuHandle, VcpuShared};
use crate::vstate::GuestExit;

/// How long `pause` waits for every vCPU to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a checkpoint waits for the parked vCPUs to save their state.
pub(super) const CHECKPOINT_VCPU_TIMEOUT: Duration = Duration::from_secs(10);

/// How the VM ended, as reported in hpcvm's exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest stopped by itself.
    GuestExited(GuestExit),
    /// The guest stopped after being asked to shut down.
    ShutDown(GuestExit),
    /// The guest ignored a shutdown request for the whole grace period.
    DestroyedAfterGrace {
        /// The grace period.
        grace: Duration,
    },
    /// Stopped at once on request.
    Destroyed {
        /// Who asked (`"API"`, `"second SIGTERM"`, ...).
        by: String,
    },
    /// The job ran and ended; the guest then stopped.
    JobExited {
        /// How the job ended.
        exit: JobExit,
        /// It ended after a shutdown request.
        on_request: bool,
    },
    /// The job could not be started.
    JobFailed(JobError),
    /// The guest stopped before the agent reported the job's status.
    JobLost(GuestExit),
    /// Checkpointed on request, then stopped.
    Checkpointed {
        /// The checkpoint directory.
        dir: std::path::PathBuf,
    },
    /// Migrated to another hpcvm, which runs it on.
    Migrated {
        /// Where it went.
        to: String,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::GuestExited(e) => write!(f, "{e}"),
            Outcome::ShutDown(e) => write!(f, "Guest shut down on request ({e})"),
            Outcome::DestroyedAfterGrace { grace } => write!(
                f,
                "Guest did not stop within the {:.3} s grace period; destroyed",
                grace.as_secs_f64()
            ),
            Outcome::Destroyed { by } => write!(f, "Destroyed on request ({by})"),
            Outcome::JobExited {
                exit: JobExit::Code(c),
                ..
            } => write!(f, "Job exited with status {c}"),
            Outcome::JobExited {
                exit: JobExit::Signal(s),
                ..
            } => write!(f, "Job killed by signal {s}"),
            Outcome::JobFailed(e) => write!(f, "Job could not start: {}", e.error),
            Outcome::JobLost(e) => {
                write!(f, "Guest stopped before the job reported its status ({e})")
            }
            Outcome::Checkpointed { dir } => write!(
                f,
                "Checkpointed to {} and stopped (hpcvm restore {} carries it on)",
                dir.display(),
                dir.display()
            ),
            Outcome::Migrated { to } => write!(f, "Migrated to {to}, which runs the VM on"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Running,
    Paused,
    ShuttingDown { since: Instant, deadline: Instant },
}

/// What of a started VM the controller acts on.
pub struct RunningVm {
    /// State shared with the vCPU threads.
    pub shared: Arc<VcpuShared>,
    /// The vCPU threads.
    pub vcpus: Vec<VcpuHandle>,
    /// Each vCPU's APIC id, in index order.
    pub apic_ids: Vec<u32>,
    /// The i8042, for Ctrl-Alt-Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI platform, for its power button.
    pub acpi: Arc<Mutex<AcpiPlatform>>,
    /// The guest agent channel, when a job runs.
    pub agent: Option<(Arc<AgentLink>, Arc<Mutex<AgentPort>>)>,
    /// Set when the guest kernel announced a panic on its console.
    pub panicked: Arc<std::sync::atomic::AtomicBool>,
    /// What a checkpoint saves beside the vCPUs.
    pub snapshot: Option<Snapshotter>,
}

/// Drives the VM's lifecycle; the control loop's subscribers call into it.
pub struct Controller {
    pub(super) shared: Arc<VcpuShared>,
    pub(super) vcpus: Vec<VcpuHandle>,
    apic_ids: Vec<u32>,
    i8042: Arc<Mutex<I8042>>,
    acpi: Arc<Mutex<AcpiPlatform>>,
    agent: Option<(Arc<AgentLink>, Arc<Mutex<AgentPort>>)>,
    panicked: Arc<std::sync::atomic::AtomicBool>,
    pub(super) snapshot: Option<Snapshotter>,
    default_grace: Duration,
    grace_timer: TimerFd,
    state: State,
    pub(super) outcome: Option<Outcome>,
    started: Instant,
    memory: MemoryConfig,
}

impl Controller {
    /// A controller for the running VM `parts`.
    pub fn new(
        parts: RunningVm,
        default_grace: Duration,
        grace_timer: TimerFd,
        memory: MemoryConfig,
    ) -> Self {
        Self {
            shared: parts.shared,
            vcpus: parts.vcpus,
            apic_ids: parts.apic_ids,
            i8042: parts.i8042,
            acpi: parts.acpi,
            agent: parts.agent,
            panicked: parts.panicked,
            snapshot: parts.snapshot,
            default_grace,
            grace_timer,
            state: State::Running,
            outcome: None,
            started: Instant::now(),
            memory,
        }
    }

    /// The grace timer's fd, for the control loop to watch.
    pub fn grace_timer(&self) -> &TimerFd {
        &self.grace_timer
    }

    /// True once the VM has ended one way or another.
    pub fn is_done(&self) -> bool {
        self.outcome.is_some()
    }

    /// How it ended, and the vCPU threads to stop and join.
    pub fn finish(self) -> (Option<Outcome>, Vec<VcpuHandle>) {
        // Parked vCPUs leave without entering the guest again: after a checkpoint
        // that stops the VM, the guest must not run on past the saved state.
        self.shared.request_stop();
        self.shared.resume();
        (self.outcome, self.vcpus)
    }

    fn state_name(&self) -> VmState {
        match (self.outcome.is_some(), self.state) {
            (true, _) => VmState::Stopping,
            (_, State::Running) => VmState::Running,
            (_, State::Paused) => VmState::Paused,
            (_, State::ShuttingDown { .. }) => VmState::ShuttingDown,
        }
    }

    /// Asks the guest to stop, destroying it after `grace` (default: `--grace-period`).
    pub fn shutdown(&mut self, grace: Option<Duration>) -> Result<StateChange, String> {
        if self.is_done() {
            return Err("the VM is already stopping".into());
        }
        if self.state == State::Paused {
            // A paused guest cannot honour the request.
            self.resume()?;
        }
        match self.job_agent() {
            // The job gets SIGTERM, as if it ran on the host.
            Some((link, port)) => {
                link.signal(libc::SIGTERM as u8);
                devices::lock(port).flush_to_guest();
            }
            // The power button (what systemd and acpid act on; hpcvm's guest kernel
            // turns it into SIGRTMIN+4 for init), and Ctrl-Alt-Del for a kernel
            // booted without ACPI.
            None => {
                devices::lock(&self.acpi).press_power_button();
                devices::lock(&self.i8042).ctrl_alt_del();
            }
        }
        let now = Instant::now();
        // At most a day (what the socket accepts), whatever a program asks for.
        let longest = Duration::from_secs_f64(crate::api::protocol::MAX_TIMEOUT_S);
        let asked = now + grace.unwrap_or(self.default_grace).min(longest);
        let (since, deadline) = match self.state {
            State::ShuttingDown { since, deadline } => (since, deadline.min(asked)),
            _ => (now, asked),
        };
        self.state = State::ShuttingDown { since, deadline };
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            self.grace_expired();
        } else if let Err(e) = self.grace_timer.reset(left, None) {
            // Without a timer nothing would enforce the grace period: destroy now.
            self.destroy(&format!("grace timer failed: {e}"));
        }
        Ok(StateChange {
            state: self.state_name(),
            grace_left_s: Some(left.as_secs_f64()),
        })
    }

    /// Passes `sig` on to the guest job's process group (ignored without a job).
    pub fn forward_signal(&mut self, sig: libc::c_int) {
        if let (Some((link, port)), Ok(sig)) = (self.job_agent(), u8::try_from(sig)) {
            link.signal(sig);
            devices::lock(port).flush_to_guest();
        }
    }

    /// The agent while it runs a job: after it handed the guest to the image's own
    /// init (`hpcvm run --image` without a command) the guest is like any other.
    fn job_agent(&self) -> Option<&(Arc<AgentLink>, Arc<Mutex<AgentPort>>)> {
        self.agent
            .as_ref()
            .filter(|(link, _)| !link.report().handed_over)
    }

    /// True while a shutdown is under way.
    pub fn shutting_down(&self) -> bool {
        matches!(self.state, State::ShuttingDown { .. })
    }

    /// Stops the VM now.
    pub fn destroy(&mut self, by: &str) {
        if self.outcome.is_none() {
            self.outcome = Some(Outcome::Destroyed { by: by.to_string() });
        }
    }

    /// The grace timer's fd became readable. The fd is non-blocking, and a shutdown
    /// handled in between may have moved the deadline: only a deadline that has
    /// passed ends the VM.
    pub fn grace_timer_fired(&mut self) {
        let _ = self.grace_timer.wait();
        if let State::ShuttingDown { deadline, .. } = self.state {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.grace_expired();
            } else if let Err(e) = self.grace_timer.reset(left, None) {
                self.destroy(&format!("grace timer failed: {e}"));
            }
        }
    }

    /// The grace period ran out (or was zero: no timer was armed, and none is read).
    fn grace_expired(&mut self) {
        if let (State::ShuttingDown { since, deadline }, None) = (self.state, &self.outcome) {
            self.outcome = Some(Outcome::DestroyedAfterGrace {
                grace: deadline - since,
            });
        }
    }

    /// The guest powered off through ACPI (S5).
    pub fn guest_powered_off(&mut self) {
        self.shared.record(GuestExit::Poweroff);
        self.guest_stopped();
    }

    /// The guest reset the machine through the i8042.
    pub fn guest_reset(&mut self) {
        self.shared.record(GuestExit::Reset);
        self.guest_stopped();
    }

    /// A vCPU recorded that the guest stopped (reset, poweroff, crash, error).
    pub fn guest_stopped(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let mut exit = self.shared.exit().unwrap_or(GuestExit::Reset);
        if exit == GuestExit::Reset && self.panicked.load(std::sync::atomic::Ordering::Acquire) {
            exit = GuestExit::KernelPanic;
        }
        if let Some((link, _)) = self.job_agent() {
            let report = link.report();
            self.outcome = Some(match (report.error, report.exit) {
                (Some(e), _) => Outcome::JobFailed(e),
                (None, Some(x)) => Outcome::JobExited {
                    exit: x,
                    on_request: self.shutting_down(),
                },
                (None, None) => Outcome::JobLost(exit),
            });
            return;
        }
        let clean = matches!(
            exit,
            GuestExit::Reset | GuestExit::Poweroff | GuestExit::Halted
        );
        self.outcome = Some(if self.shutting_down() && clean {
            Outcome::ShutDown(exit)
        } else {
            Outcome::GuestExited(exit)
        });
    }

    /// Parks every vCPU outside the guest.
    pub fn pause(&mut self) -> Result<StateChange, String> {
        match self.state {
            State::Paused => return Ok(StateChange::to(VmState::Paused)),
            State::ShuttingDown { .. } => return Err("cannot pause during a shutdown".into()),
            State::Running => {}
        }
        self.shared.request_pause();
        for v in &self.vcpus {
            v.kick();
        }
        if !self.shared.wait_parked(self.vcpus.len(), PAUSE_TIMEOUT) {
            self.shared.resume();
            return Err(format!(
                "vCPUs did not leave the guest within {} s; still running",
                PAUSE_TIMEOUT.as_secs()
            ));
        }
        self.state = State::Paused;
        Ok(StateChange::to(VmState::Paused))
    }

    /// True while the vCPUs are paused.
    pub fn paused(&self) -> bool {
        self.state == State::Paused
    }

    /// Writes a checkpoint to `dir`: pauses the vCPUs (if running), saves the VM,
    /// then resumes it, or with `stop` ends the VM as [`Outcome::Checkpointed`].
    /// A failed checkpoint leaves the VM as it was.
    pub fn checkpoint(&mut self, dir: &std::path::Path, stop: bool) -> Result<Answer, String> {
        if self.is_done() {
            return Err("the VM is already stopping".into());
        }
        if self.shutting_down() {
            return Err("cannot checkpoint during a shutdown".into());
        }
        let Some(snapshot) = self.snapshot.as_ref() else {
            return Err("this VM cannot be checkpointed".into());
        };
        snapshot.refused().map_err(|e| e.to_string())?;
        let was_paused = self.state == State::Paused;
        if !was_paused {
            self.pause()?;
        }
        let n = self.vcpus.len();
        let shared = self.shared.clone();
        let written = self
            .snapshot
            .as_ref()
            .expect("checked above")
            .write(dir, stop, || shared.save_parked(n, CHECKPOINT_VCPU_TIMEOUT));
        let result = match written {
            Ok(w) => {
                if stop {
                    self.outcome = Some(Outcome::Checkpointed {
                        dir: dir.to_path_buf(),
                    });
                }
                Ok(Answer::Checkpointed(super::report::CheckpointReport {
                    dir: dir.display().to_string(),
                    ram: w.ram,
                    data: w.data,
                    seconds: w.seconds,
                    stopped: stop,
                }))
            }
            Err(e) => Err(e.to_string()),
        };
        if !was_paused && self.outcome.is_none() {
            self.resume()?;
        }
        result
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<StateChange, String> {
        if self.state == State::Paused {
            self.shared.resume();
            self.state = State::Running;
        }
        Ok(StateChange::to(self.state_name()))
    }

    /// What `status` reports.
    pub fn status(&self) -> Status {
        let vcpus = self
            .vcpus
            .iter()
            .zip(&self.apic_ids)
            .map(|(v, &apic_id)| VcpuStatus {
                index: v.index,
                apic_id,
                host_cpu: v.host_cpu,
                tid: v.tid.load(std::sync::atomic::Ordering::Acquire),
            })
            .collect();
        let grace_left_s = match self.state {
            State::ShuttingDown { deadline, .. } => Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64(),
            ),
            _ => None,
        };
        Status {
            state: self.state_name(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            pid: std::process::id(),
            vcpus,
            memory: MemoryStatus {
                size: self.memory.size,
                backing: self.memory.hugepages.name(),
                prefault: self.memory.prefault,
            },
            grace_left_s,
        }
    }

    /// Carries out `command`, whoever asked (the socket, a [`crate::VmHandle`]).
    pub fn apply(&mut self, command: &Command) -> Result<Answer, String> {
        match command {
            Command::Status => {
                crate::fatal::inject("status-request");
                Ok(Answer::Status(self.status()))
            }
            Command::Shutdown { timeout_s } => {
                let grace = timeout_s
                    .map(Duration::try_from_secs_f64)
                    .transpose()
                    .map_err(|_| format!("invalid grace period {timeout_s:?}"))?;
                self.shutdown(grace).map(Answer::Changed)
            }
            Command::Destroy => {
                self.destroy("API");
                Ok(Answer::Changed(StateChange::to(VmState::Stopping)))
            }
            Command::Pause => self.pause().map(Answer::Changed),
            Command::Resume => self.resume().map(Answer::Changed),
            Command::Checkpoint { dir, stop } => self.checkpoint(dir, *stop),
            Command::Migrate { to } => self.migrate(to),
        }
    }
}

impl Handler for Controller {
    fn handle(&mut self, command: &Command) -> Result<Value, String> {
        self.apply(command).map(|a| a.to_json())
    }
}
