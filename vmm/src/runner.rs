//! The VM as a program holds it ([`Vmm`], [`RunOptions`]); the crate root's
//! documentation shows how to use it.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::agent::{AgentLink, AgentPort};
use crate::api::ApiSocket;
use crate::builder::{Buses, Restore};
use crate::config::{ControlConfig, MemoryConfig, VmConfig};
use crate::control::lifecycle::RunningVm;
use crate::control::{self, signals::StopSignals, Controller, LoopInputs, Outcome};
use crate::handle::{HandleRequests, VmHandle};
use crate::legacy::LegacyDevices;
use crate::output::OutputThread;
use crate::pci::{Passthrough, PciBus};
use crate::seccomp::SeccompMode;
use crate::virtio::VirtioThread;
use crate::vstate::vcpu::{stop_all, StartGate, Vcpu, VcpuShared};
use crate::vstate::{GuestExit, Vm};
use crate::{host, Error};

/// What a restored VM takes from where it is restored instead of from its
/// checkpoint: the host-side settings, which the guest never sees.
#[derive(Debug, Default, Clone)]
pub struct RestoreHost {
    /// The API socket (the checkpointed VM's is never reused).
    pub api_socket: Option<std::path::PathBuf>,
    /// The shutdown grace period; `None` keeps the checkpointed one.
    pub grace_period: Option<std::time::Duration>,
    /// Checkpoint again on a signal (`--checkpoint-on`); `None` turns it off.
    pub checkpoint_on: Option<crate::config::CheckpointOn>,
    /// `Some` replaces the checkpointed pinning (`Some(None)`: unpinned), e.g. with
    /// a requeued job's new allocation, one host CPU per vCPU; `None` keeps it.
    pub affinity: Option<Option<Vec<usize>>>,
    /// Show the guest console and agent diagnostics (`--verbose`), whatever the
    /// checkpointed run did.
    pub verbose: bool,
}

impl RestoreHost {
    /// The saved VM's configuration with this host's settings in place, refused if
    /// such a VM cannot be restored (passthrough devices).
    fn config_for(self, saved: &VmConfig) -> Result<VmConfig, Error> {
        let mut config = saved.clone();
        self.apply(&mut config)?;
        if let Some(why) = crate::checkpoint::refusal(config.devices.len()) {
            return Err(crate::checkpoint::CheckpointError::Refused(why).into());
        }
        Ok(config)
    }

    fn apply(self, config: &mut crate::config::VmConfig) -> Result<(), Error> {
        config.control.api_socket = self.api_socket;
        config.control.checkpoint_on = self.checkpoint_on;
        config.verbose = self.verbose;
        if let Some(g) = self.grace_period {
            config.control.grace_period = g;
        }
        if let Some(aff) = self.affinity {
            config.cpus.affinity = None;
            let Some(aff) = aff else {
                return Ok(());
            };
            let count = config.cpus.count as usize;
            if aff.len() != count {
                return Err(crate::checkpoint::CheckpointError::Mismatch(format!(
                    "the checkpointed VM has {count} vCPUs and this run has {} host CPUs \
                     to pin them to ({}); give it as many CPUs as when it was checkpointed",
                    aff.len(),
                    host::fmt_cpu_list(&aff)
                ))
                .into());
            }
            config.cpus.affinity = Some(aff);
        }
        Ok(())
    }
}

/// What running a VM may change in the whole process.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Block SIGTERM, SIGINT, SIGHUP, SIGUSR1/2 (and ignore the stray ones) in the
    /// calling thread and the threads it starts, and take them in the control loop:
    /// SIGTERM and SIGINT shut the VM down, the rest reach the job.
    pub signals: bool,
    /// Put a terminal stdin in raw mode while the VM runs and feed it to COM1.
    pub terminal: bool,
    /// Ask the kernel for a short time slice for the control thread, so that its
    /// wakeups preempt busy vCPU threads.
    pub scheduler_slice: bool,
    /// Where the guest's console and the job's stdout go (default: a copy of this
    /// process's stdout).
    pub stdout: Option<OwnedFd>,
    /// Where the job's stderr goes (default: a copy of this process's stderr).
    pub stderr: Option<OwnedFd>,
}

impl RunOptions {
    /// What the `hpcvm` binary uses: signals, the terminal and the slice.
    pub fn process() -> Self {
        Self {
            signals: true,
            terminal: true,
            scheduler_slice: true,
            ..Self::default()
        }
    }
}

/// The VM and the guest RAM it maps, dropped in that order.
pub(crate) struct VmAndMemory {
    pub(crate) vm: Arc<Vm>,
    pub(crate) mem: GuestMemoryMmap,
}

/// A VM built and ready to run. Dropped without running, it releases everything
/// (devices out of the guest first, the VM before its memory).
pub struct Vmm {
    // Drop order: devices, vCPUs, buses, the VM, its memory, the socket, the rest.
    pub(crate) snapshot: Option<crate::checkpoint::Snapshotter>,
    pub(crate) virtio_thread: Option<VirtioThread>,
    pub(crate) pci: Option<PciBus>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) buses: Buses,
    pub(crate) vm: VmAndMemory,
    pub(crate) api: Option<ApiSocket>,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) vcpu_evt: EventFd,
    pub(crate) grace_timer: TimerFd,
    pub(crate) signals: Option<StopSignals>,
    pub(crate) legacy: LegacyDevices,
    pub(crate) agent: Option<Arc<AgentLink>>,
    pub(crate) apic_ids: Vec<u32>,
    pub(crate) stdout_thread: OutputThread,
    pub(crate) stderr_thread: OutputThread,
    pub(crate) handle: VmHandle,
    pub(crate) handle_requests: HandleRequests,
    pub(crate) control: ControlConfig,
    pub(crate) memory: MemoryConfig,
    pub(crate) seccomp: SeccompMode,
    pub(crate) verbose: bool,
    pub(crate) options_terminal: bool,
    pub(crate) options_slice: bool,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Builds the VM `config` describes, up to its vCPUs.
    pub fn build(config: &VmConfig, options: RunOptions) -> Result<Self, Error> {
        crate::builder::build(config, Vec::new(), options, Restore::Boot)
    }

    /// Rebuilds the VM checkpointed in `dir` (docs/checkpoint.md), ready to run on
    /// from where it stopped, with `host`'s settings in place of the checkpointed
    /// ones. Nothing is started if the checkpoint is unusable or does not fit this
    /// host.
    pub fn restore(
        dir: &std::path::Path,
        host: RestoreHost,
        options: RunOptions,
    ) -> Result<Self, Error> {
        let ck = crate::checkpoint::Checkpoint::read(dir)?;
        let config = host.config_for(&ck.state.config)?;
        crate::builder::build(
            &config,
            Vec::new(),
            options,
            Restore::Checkpoint(Box::new(ck)),
        )
    }

    /// Waits on `listener` for one `hpcvm ctl migrate`, builds the VM it sends with
    /// `host`'s settings in place of the sender's, fills its RAM and restores its
    /// state from the stream, then tells the sender to let go: the VM is ready to
    /// run on here (docs/migration.md). A failure on either side before that leaves
    /// the VM running on the sender, and nothing of it here.
    pub fn receive(
        listener: &crate::migration::address::Listener,
        host: RestoreHost,
        options: RunOptions,
    ) -> Result<Self, Error> {
        let io = |what| move |source| Error::Io { what, source };
        let signals = match options.signals {
            true => {
                control::signals::block_stop_signals().map_err(io("blocking SIGTERM/SIGINT"))?;
                Some(StopSignals::new().map_err(io("the signalfd"))?)
            }
            false => None,
        };
        let conn = listener.accept(signals.as_ref())?;
        drop(signals);
        let mut incoming = crate::migration::receive::Incoming::start(conn)?;
        let built = host.config_for(&incoming.config).and_then(|config| {
            crate::builder::build(
                &config,
                Vec::new(),
                options,
                Restore::Incoming(&mut incoming),
            )
        });
        match built {
            Ok(vmm) => {
                incoming.ready()?;
                Ok(vmm)
            }
            Err(e) => {
                incoming.fail(&e.to_string());
                Err(e)
            }
        }
    }

    /// [`Vmm::build`], with `extra` devices on the guest's PCI bus beside the
    /// `--device` ones: devices the embedding program opened itself (or fakes).
    pub fn build_with(
        config: &VmConfig,
        extra: Vec<Passthrough>,
        options: RunOptions,
    ) -> Result<Self, Error> {
        crate::builder::build(config, extra, options, Restore::Boot)
    }

    /// A handle on this VM; requests made before [`Vmm::run`] wait for it.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Runs the VM until it ends, tears it down and returns how it ended. With
    /// [`RunOptions::signals`], call it on the thread that built the VM (or one it
    /// started afterwards): the stop signals are blocked there. Every
    /// resource is released before this returns, whatever the path: vCPU threads
    /// joined, KVM objects closed, guest RAM (hugepages) unmapped, the API socket
    /// file removed.
    pub fn run(self) -> Result<Outcome, Error> {
        let Vmm {
            snapshot,
            mut virtio_thread,
            pci,
            vcpus,
            buses,
            vm,
            api,
            shared,
            vcpu_evt,
            grace_timer,
            signals,
            legacy,
            agent,
            apic_ids,
            stdout_thread,
            stderr_thread,
            handle,
            handle_requests,
            control: control_config,
            memory,
            seccomp,
            verbose,
            options_terminal,
            options_slice,
        } = self;
        drop(handle);
        // A restored VM's devices look at their queues now that it is this
        // process's to run (a migration's sender has let go).
        for d in pci.iter().flat_map(PciBus::virtio_devices) {
            devices::lock(&d).kick_restored();
        }
        let gate = Arc::new(StartGate::default());
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            match vcpu.start(gate.clone()) {
                Ok(h) => handles.push(h),
                Err(source) => {
                    gate.abort();
                    stop_all(&shared, handles);
                    return Err(Error::Io {
                        what: "a vCPU thread",
                        source,
                    });
                }
            }
        }
        gate.open_when_arrived(handles.len());
        let agent: Option<(Arc<AgentLink>, Arc<Mutex<AgentPort>>)> =
            agent.zip(legacy.agent_port.clone());
        let running = RunningVm {
            shared: shared.clone(),
            vcpus: handles,
            apic_ids,
            i8042: legacy.i8042.clone(),
            acpi: legacy.acpi.clone(),
            agent,
            panicked: legacy.panicked.clone(),
            snapshot,
        };
        let controller = Rc::new(RefCell::new(Controller::new(
            running,
            control_config.grace_period,
            grace_timer,
            memory,
        )));
        if options_slice {
            // The control loop runs here: let its wakeups preempt busy vCPU threads.
            if let Err(e) = host::request_slice(host::CONTROL_SLICE) {
                if verbose {
                    log::info!("control thread slice: {e}");
                }
            }
        }
        // The control thread last: everything it starts from here on (the drain
        // pass) inherits its filter.
        let result = crate::seccomp::confine(crate::seccomp::Thread::Control, seccomp)
            .map_err(Error::from)
            .and_then(|()| {
                control::run(
                    controller.clone(),
                    LoopInputs {
                        vcpu_evt,
                        reset_evt: legacy.reset_evt,
                        poweroff_evt: legacy.poweroff_evt,
                        signals,
                        api: api.as_ref(),
                        console: legacy.console.clone(),
                        terminal: options_terminal,
                        handles: Some(handle_requests),
                        checkpoint_on: control_config.checkpoint_on.clone(),
                    },
                )
            });
        let (outcome, handles) = match Rc::try_unwrap(controller) {
            Ok(c) => c.into_inner().finish(),
            Err(_) => unreachable!("the control loop's subscribers are gone"),
        };
        stop_all(&shared, handles);
        // What the guest queued last (the job's final output) goes out before the exit.
        if let Some(t) = virtio_thread.as_mut() {
            t.stop();
        }
        let _ = legacy.console.lock().map(|mut c| c.flush());
        // Output still buffered goes out while the reader takes it; after a destroy,
        // or from a reader that stopped reading, it is dropped and counted.
        let stall = match outcome {
            Some(Outcome::Destroyed { .. } | Outcome::DestroyedAfterGrace { .. }) => {
                Duration::from_millis(500)
            }
            _ => Duration::from_secs(5),
        };
        let dropped = stdout_thread.finish(stall) + stderr_thread.finish(stall);
        if dropped > 0 {
            log::warn!(
                "{dropped} bytes of guest output were dropped: hpcvm's stdout \
                 or stderr did not take them (a full pipe nobody reads)"
            );
        }
        // Devices out of the guest and guest RAM out of the IOMMU before the VM and
        // its memory go.
        drop(virtio_thread);
        drop(pci);
        drop(buses);
        drop(vm);
        drop(api);
        result?;
        Ok(outcome.unwrap_or(Outcome::GuestExited(GuestExit::Reset)))
    }
}

/// Builds and runs the VM `config` describes, as the `hpcvm` binary does (signals,
/// terminal and scheduler slice: [`RunOptions::process`]).
pub fn run(config: &VmConfig) -> Result<Outcome, Error> {
    Vmm::build(config, RunOptions::process())?.run()
}

/// [`run`] with `extra` devices on the guest's PCI bus (see [`Vmm::build_with`]).
pub fn run_with(config: &VmConfig, extra: Vec<Passthrough>) -> Result<Outcome, Error> {
    Vmm::build_with(config, extra, RunOptions::process())?.run()
}
