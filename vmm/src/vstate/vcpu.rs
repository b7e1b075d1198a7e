//! vCPU threads: each owns one KVM vCPU, pins itself, and runs KVM_RUN until the guest
//! stops or the VMM asks it to. The VMM stops a vCPU by setting a flag and sending it
//! [`kick_signal`]; the signal handler sets `immediate_exit`, so a vCPU that is about to
//! enter the guest leaves at once instead of missing the kick.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::{MmioBus, PioBus};
use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::checkpoint::vcpu::VcpuState;

/// How the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset the machine (i8042 reset, KVM reset event): its way of exiting.
    Reset,
    /// The guest powered off (KVM shutdown system event).
    Poweroff,
    /// A vCPU halted with no interrupt controller to wake it.
    Halted,
    /// The guest kernel panicked (seen on its console), then reset (`panic=-1`).
    KernelPanic,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU index.
        vcpu: u32,
    },
    /// The guest reported a crash (KVM crash system event, e.g. pvpanic).
    Crash {
        /// The vCPU index.
        vcpu: u32,
    },
    /// KVM could not emulate an instruction.
    EmulationFailure {
        /// The vCPU index.
        vcpu: u32,
        /// Guest RIP at the failure.
        rip: u64,
        /// The instruction's bytes, when KVM or guest memory could supply them.
        insn: Vec<u8>,
    },
    /// Another KVM internal error.
    InternalError {
        /// The vCPU index.
        vcpu: u32,
        /// KVM's suberror code.
        suberror: u32,
    },
    /// The hardware refused to enter the guest.
    EntryFailure {
        /// The vCPU index.
        vcpu: u32,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM_RUN failed or returned an exit hpcvm does not handle.
    VcpuFault {
        /// The vCPU index.
        vcpu: u32,
        /// What went wrong.
        error: String,
    },
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestExit::Reset => write!(f, "Guest reset the machine"),
            GuestExit::Poweroff => write!(f, "Guest powered off"),
            GuestExit::Halted => write!(f, "Guest halted"),
            GuestExit::KernelPanic => write!(
                f,
                "Guest kernel panicked (its console says why: run with --verbose)"
            ),
            GuestExit::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu} triple-faulted (KVM shutdown exit)")
            }
            GuestExit::Crash { vcpu } => write!(f, "Guest reported a crash on vCPU {vcpu}"),
            GuestExit::EmulationFailure { vcpu, rip, insn } => {
                write!(
                    f,
                    "KVM emulation failure on vCPU {vcpu} at RIP {rip:#x}, instruction bytes: "
                )?;
                if insn.is_empty() {
                    write!(f, "unavailable")
                } else {
                    let hex: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
                    write!(f, "{}", hex.join(" "))
                }
            }
            GuestExit::InternalError { vcpu, suberror } => {
                write!(f, "KVM internal error on vCPU {vcpu} (suberror {suberror})")
            }
            GuestExit::EntryFailure { vcpu, reason } => {
                write!(
                    f,
                    "vCPU {vcpu} failed to enter the guest (hardware reason {reason:#x})"
                )
            }
            GuestExit::VcpuFault { vcpu, error } => write!(f, "vCPU {vcpu}: {error}"),
        }
    }
}

/// What the vCPU threads and the VMM's control loop share.
pub struct VcpuShared {
    stop: AtomicBool,
    exit: Mutex<Option<GuestExit>>,
    exit_evt: EventFd,
    pause: Mutex<PauseState>,
    pause_cond: Condvar,
}

#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
    /// Bumped to ask every parked vCPU to save its state once more.
    save_round: u64,
    /// What each vCPU saved in the current round, by index.
    saved: Vec<Option<Result<VcpuState, String>>>,
}

impl VcpuShared {
    /// New shared state; `exit_evt` is signalled when a vCPU records an exit.
    pub fn new(exit_evt: EventFd) -> Self {
        Self {
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_evt,
            pause: Mutex::new(PauseState::default()),
            pause_cond: Condvar::new(),
        }
    }

    fn pause_state(&self) -> std::sync::MutexGuard<'_, PauseState> {
        devices::lock(&self.pause)
    }

    /// Asks every vCPU to park at its next exit (kick them to make that now).
    pub fn request_pause(&self) {
        self.pause_state().requested = true;
    }

    /// Waits up to `timeout` until `n` vCPUs are parked; true if they are.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let guard = self.pause_state();
        let (guard, _) = self
            .pause_cond
            .wait_timeout_while(guard, timeout, |s| s.parked < n)
            .unwrap_or_else(|p| p.into_inner());
        guard.parked >= n
    }

    /// Has every parked vCPU save its state (after completing its pending I/O) and
    /// waits up to `timeout` for all `n`: their states by index, or why not.
    pub fn save_parked(&self, n: usize, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let mut s = self.pause_state();
        if !s.requested || s.parked < n {
            return Err("the vCPUs are not paused".into());
        }
        s.save_round += 1;
        s.saved = (0..n).map(|_| None).collect();
        self.pause_cond.notify_all();
        let (mut s, _) = self
            .pause_cond
            .wait_timeout_while(s, timeout, |s| s.saved.iter().any(Option::is_none))
            .unwrap_or_else(|p| p.into_inner());
        let saved = std::mem::take(&mut s.saved);
        saved
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| Err(format!("vCPU {i} did not save its state"))))
            .enumerate()
            .map(|(i, r)| r.map_err(|e| format!("vCPU {i}: {e}")))
            .collect()
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.pause_state().requested = false;
        self.pause_cond.notify_all();
    }

    /// Parks the calling vCPU `index` while a pause is requested, running `save`
    /// whenever [`Self::save_parked`] asks; false if it must stop instead.
    fn park_if_paused(
        &self,
        index: u32,
        save: &mut dyn FnMut() -> Result<VcpuState, String>,
    ) -> bool {
        let mut s = self.pause_state();
        if !s.requested {
            return true;
        }
        s.parked += 1;
        let mut round = s.save_round;
        self.pause_cond.notify_all();
        while s.requested && !self.stop.load(Ordering::Acquire) {
            if s.save_round != round {
                round = s.save_round;
                drop(s);
                let state = save();
                s = self.pause_state();
                if let Some(slot) = s.saved.get_mut(index as usize) {
                    *slot = Some(state);
                }
                self.pause_cond.notify_all();
                continue;
            }
            s = self.pause_cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
        !self.stop.load(Ordering::Acquire)
    }

    /// Tells every vCPU to leave its loop (parked ones included).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.pause_state();
        self.pause_cond.notify_all();
    }

    /// Records how the guest ended (the first report wins) and wakes the control loop.
    pub fn record(&self, exit: GuestExit) {
        let mut slot = devices::lock(&self.exit);
        if slot.is_none() {
            *slot = Some(exit);
        }
        drop(slot);
        // Cannot fail short of the counter overflowing.
        let _ = self.exit_evt.write(1);
    }

    /// The recorded exit, if any.
    pub fn exit(&self) -> Option<GuestExit> {
        devices::lock(&self.exit).clone()
    }
}

/// Holds vCPU threads after they have pinned themselves until every one exists, so no
/// guest code runs before the whole VM is placed; or tells them all to give up.
#[derive(Default)]
pub struct StartGate {
    state: Mutex<GateState>,
    cond: Condvar,
}

#[derive(Default)]
struct GateState {
    arrived: usize,
    go: Option<bool>,
}

impl StartGate {
    /// Waits until `n` vCPU threads have arrived (pinned), then lets them run.
    pub fn open_when_arrived(&self, n: usize) {
        let mut s = devices::lock(&self.state);
        while s.arrived < n {
            s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.go = Some(true);
        self.cond.notify_all();
    }

    /// Tells every vCPU thread, arrived or not, to return without running the guest.
    pub fn abort(&self) {
        devices::lock(&self.state).go = Some(false);
        self.cond.notify_all();
    }

    fn arrive_and_wait(&self) -> bool {
        let mut s = devices::lock(&self.state);
        s.arrived += 1;
        self.cond.notify_all();
        loop {
            if let Some(go) = s.go {
                return go;
            }
            s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A configured vCPU ready to be started on its own thread.
pub struct Vcpu {
    /// Index in creation order; vCPU 0 boots.
    pub index: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Host CPU to pin to, if any.
    pub host_cpu: Option<usize>,
    /// Port-I/O devices.
    pub pio: Arc<PioBus>,
    /// MMIO devices (PCI config and trapped BAR pages).
    pub mmio: Arc<MmioBus>,
    /// Guest RAM, to read the bytes of an instruction KVM failed to emulate.
    pub mem: GuestMemoryMmap,
    /// State shared with the VMM.
    pub shared: Arc<VcpuShared>,
    /// The seccomp filter it runs the guest under.
    pub seccomp: crate::seccomp::SeccompMode,
    /// The MSRs a checkpoint saves (KVM's list).
    pub msr_index: Arc<[u32]>,
    /// The host has XCRs to save.
    pub has_xcrs: bool,
    /// The CPUID it was given, saved with it.
    pub cpuid: Arc<[kvm_bindings::kvm_cpuid_entry2]>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    /// vCPU index.
    pub index: u32,
    /// Host CPU it is pinned to.
    pub host_cpu: Option<usize>,
    /// Kernel thread id, once the thread has started (0 before).
    pub tid: Arc<AtomicI32>,
    thread: JoinHandle<()>,
    /// Disconnected when the thread is done (its vCPU fd closed).
    done: mpsc::Receiver<()>,
}

/// The real-time signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while its VcpuFd
        // is alive and cleared before it is dropped; a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()));
    });
    result
}

impl Vcpu {
    /// Starts the vCPU on a thread named `vcpuN`; it pins itself, then waits for `gate`.
    pub fn start(self, gate: Arc<StartGate>) -> io::Result<VcpuHandle> {
        let index = self.index;
        let host_cpu = self.host_cpu;
        let tid = Arc::new(AtomicI32::new(0));
        let tid2 = tid.clone();
        let (finished, done) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid2.store(unsafe { libc::gettid() }, Ordering::Release);
                self.run(&gate);
                // `self` (the vCPU fd) is gone; dropping the sender tells stop_all.
                drop(finished);
            })?;
        Ok(VcpuHandle {
            index,
            host_cpu,
            tid,
            thread,
            done,
        })
    }

    fn run(mut self, gate: &StartGate) {
        let pinned = match self.host_cpu {
            Some(cpu) => crate::host::pin_current_thread(cpu)
                .map_err(|e| format!("cannot pin to host CPU {cpu}: {e}")),
            None => Ok(()),
        };
        // Built before the gate (it allocates), installed after it: the last thing
        // before the guest runs.
        let filter = crate::seccomp::build(crate::seccomp::Thread::Vcpu, self.seccomp);
        if !gate.arrive_and_wait() {
            return;
        }
        let confined = filter
            .and_then(|f| crate::seccomp::apply(crate::seccomp::Thread::Vcpu, f.as_ref()))
            .map_err(|e| e.to_string());
        if let Err(error) = pinned.and(confined) {
            self.shared.record(GuestExit::VcpuFault {
                vcpu: self.index,
                error,
            });
            return;
        }
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        let exit = self.run_loop();
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        if let Some(exit) = exit {
            self.shared.record(exit);
        }
    }

    /// Runs the guest until it stops (Some) or the VMM asks the vCPU to stop (None).
    fn run_loop(&mut self) -> Option<GuestExit> {
        let vcpu = self.index;
        crate::fatal::inject("vcpu");
        let shared = self.shared.clone();
        loop {
            if shared.stop.load(Ordering::Acquire)
                || !shared.park_if_paused(vcpu, &mut || self.save_state())
            {
                return None;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pio.read(port.into(), data);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(port.into(), data);
                }
                // Unclaimed addresses read all ones and drop writes.
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio.read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => return Some(GuestExit::Halted),
                Ok(VcpuExit::Shutdown) => return Some(GuestExit::TripleFault { vcpu }),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Some(match kind {
                        KVM_SYSTEM_EVENT_RESET => GuestExit::Reset,
                        KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::Poweroff,
                        KVM_SYSTEM_EVENT_CRASH => GuestExit::Crash { vcpu },
                        other => GuestExit::VcpuFault {
                            vcpu,
                            error: format!("unhandled KVM system event {other}"),
                        },
                    })
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Some(GuestExit::EntryFailure { vcpu, reason })
                }
                Ok(VcpuExit::InternalError) => return Some(self.internal_error()),
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    return Some(GuestExit::VcpuFault {
                        vcpu,
                        error: format!("unhandled KVM exit {other:?}"),
                    })
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    return Some(GuestExit::VcpuFault {
                        vcpu,
                        error: format!("KVM_RUN failed: {e}"),
                    })
                }
            }
        }
    }

    /// Completes the I/O of the last exit (KVM_RUN with `immediate_exit`, which
    /// returns before entering the guest), then saves the vCPU's state.
    fn save_state(&mut self) -> Result<VcpuState, String> {
        self.fd.set_kvm_immediate_exit(1);
        let done = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(format!("completing the last exit: {e}")),
            Ok(exit) => Err(format!("completing the last exit: got {exit:?}")),
        };
        self.fd.set_kvm_immediate_exit(0);
        done?;
        crate::checkpoint::vcpu::save(&self.fd, &self.cpuid, &self.msr_index, self.has_xcrs)
    }

    fn internal_error(&mut self) -> GuestExit {
        let vcpu = self.index;
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` / `emulation_failure`
        // union members; both views start with suberror and ndata.
        let (suberror, ndata, flags, kvm_insn) = unsafe {
            let ef = run.__bindgen_anon_1.emulation_failure;
            let insn = ef.__bindgen_anon_1.__bindgen_anon_1;
            (ef.suberror, ef.ndata, ef.flags, insn)
        };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return GuestExit::InternalError { vcpu, suberror };
        }
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        let kvm_has_bytes = ndata >= 3
            && flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
            && kvm_insn.insn_size > 0;
        let insn = if kvm_has_bytes {
            kvm_insn.insn_bytes[..usize::from(kvm_insn.insn_size.min(15))].to_vec()
        } else {
            self.guest_insn_bytes(rip)
        };
        GuestExit::EmulationFailure { vcpu, rip, insn }
    }

    /// Reads up to 15 bytes at CS:RIP through the guest's own page tables.
    fn guest_insn_bytes(&self, rip: u64) -> Vec<u8> {
        let Ok(sregs) = self.fd.get_sregs() else {
            return Vec::new();
        };
        let linear = sregs.cs.base.wrapping_add(rip);
        let phys = if sregs.cr0 & 0x8000_0000 != 0 {
            match self.fd.translate_gva(linear) {
                Ok(t) if t.valid != 0 => t.physical_address,
                _ => return Vec::new(),
            }
        } else {
            linear
        };
        // Up to 15 bytes, fewer if the instruction runs off the end of guest RAM.
        (0..15u64)
            .map_while(|i| self.mem.read_obj::<u8>(GuestAddress(phys + i)).ok())
            .collect()
    }
}

impl VcpuHandle {
    /// Makes the vCPU leave KVM_RUN (or not enter it) and look at the shared state.
    pub fn kick(&self) {
        // ESRCH only if the thread is already gone.
        let _ = self.thread.kill(kick_signal());
    }

    /// Waits for the thread.
    pub fn join(self) {
        // A panicking vCPU thread has already printed its panic.
        let _ = self.thread.join();
    }
}

/// How long `stop_all` waits for a kicked vCPU thread before kicking it again.
const KICK_RETRY: Duration = Duration::from_millis(1);

/// Stops every vCPU: sets the stop flag, kicks every thread, then waits for each to
/// finish (woken the moment it does), kicking again every `KICK_RETRY` (a kick that
/// lands just before KVM_RUN is caught by `immediate_exit`; one that lands before the
/// thread published its kvm_run is lost and repeated).
pub fn stop_all(shared: &VcpuShared, handles: Vec<VcpuHandle>) {
    shared.request_stop();
    for h in &handles {
        h.kick();
    }
    for h in handles {
        while let Err(mpsc::RecvTimeoutError::Timeout) = h.done.recv_timeout(KICK_RETRY) {
            h.kick();
        }
        h.join();
    }
}
