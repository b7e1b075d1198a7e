//! The VMM's control loop on event-manager: the guest stopping (a vCPU exit, an i8042
//! reset, ACPI S5), stop signals, the
//! grace timer, the API socket and terminal input are its events; [`Controller`]
//! decides what each means.

pub mod console;
pub mod lifecycle;
pub mod migrate;
pub mod report;
pub mod signals;

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::Uart;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::server::Handler;
use crate::api::ApiSocket;
use crate::config::CheckpointOn;
use crate::Error;
pub use lifecycle::{Controller, Outcome};
pub use report::{Answer, MemoryStatus, StateChange, Status, VcpuStatus, VmState};
use signals::StopSignals;

/// Everything the loop listens to besides the controller itself.
pub struct LoopInputs<'a> {
    /// Signalled by a vCPU that recorded a guest exit.
    pub vcpu_evt: EventFd,
    /// Signalled by the i8042 reset line.
    pub reset_evt: EventFd,
    /// Signalled when the guest enters ACPI S5.
    pub poweroff_evt: EventFd,
    /// SIGTERM/SIGINT, when the VMM handles the process's signals.
    pub signals: Option<StopSignals>,
    /// Put a terminal stdin in raw mode and feed it to COM1.
    pub terminal: bool,
    /// Requests from [`crate::VmHandle`]s.
    pub(crate) handles: Option<crate::handle::HandleRequests>,
    /// The API socket, if one was asked for.
    pub api: Option<&'a ApiSocket>,
    /// COM1, for terminal input.
    pub console: Arc<Mutex<Uart>>,
    /// Checkpoint and stop on this signal instead of its usual meaning.
    pub checkpoint_on: Option<CheckpointOn>,
}

/// Wakes the controller for guest exits, resets, stop signals and the grace timer.
struct LifecycleEvents {
    ctl: Rc<RefCell<Controller>>,
    vcpu_evt: EventFd,
    reset_evt: EventFd,
    poweroff_evt: EventFd,
    signals: Option<StopSignals>,
    /// When the first stop signal arrived.
    first_stop: Option<Instant>,
    checkpoint_on: Option<CheckpointOn>,
}

/// `--checkpoint-on`'s signal came: checkpoint and stop. Should that fail, the job
/// runs on (SIGUSR1/2) or the signal keeps its meaning (SIGTERM: shut down).
fn checkpoint_on_signal(ctl: &mut Controller, on: &CheckpointOn) -> bool {
    let name = crate::control::signals::name(on.signal);
    match ctl.checkpoint(&on.dir, true) {
        Ok(answer) => {
            log::info!("{name}: {}", answer.to_json());
            true
        }
        Err(e) => {
            eprintln!(
                "hpcvm: {name}: checkpoint to {} failed: {e}",
                on.dir.display()
            );
            false
        }
    }
}

impl MutEventSubscriber for LifecycleEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let timer = self.ctl.borrow().grace_timer().as_raw_fd();
        let signals = self.signals.as_ref().map(AsRawFd::as_raw_fd);
        let stops = [&self.vcpu_evt, &self.reset_evt, &self.poweroff_evt].map(AsRawFd::as_raw_fd);
        for fd in stops.into_iter().chain([timer]).chain(signals) {
            // Failing to watch one of these leaves the VM without that way out;
            // epoll_ctl only fails on resource exhaustion at this point.
            let _ = ops.add(Events::new_raw(fd, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let mut ctl = self.ctl.borrow_mut();
        if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            ctl.guest_reset();
        } else if fd == self.poweroff_evt.as_raw_fd() {
            let _ = self.poweroff_evt.read();
            ctl.guest_powered_off();
        } else if fd == self.vcpu_evt.as_raw_fd() {
            let _ = self.vcpu_evt.read();
            ctl.guest_stopped();
        } else if let Some(signals) = self.signals.as_mut().filter(|s| s.as_raw_fd() == fd) {
            while let Some(sig) = signals.next() {
                if signals::IGNORED_SIGNALS.contains(&sig) {
                    continue;
                }
                if let Some(on) = self.checkpoint_on.as_ref().filter(|on| on.signal == sig) {
                    // A repeat (slurmd sends SIGTERM twice) once it is done is nothing.
                    if ctl.is_done() || checkpoint_on_signal(&mut ctl, on) || sig != libc::SIGTERM {
                        continue;
                    }
                }
                if signals::FORWARDED_SIGNALS.contains(&sig) {
                    ctl.forward_signal(sig);
                    continue;
                }
                let repeat = self
                    .first_stop
                    .is_some_and(|t| t.elapsed() < signals::REPEAT_WINDOW);
                self.first_stop.get_or_insert_with(Instant::now);
                if ctl.shutting_down() {
                    if !repeat {
                        ctl.destroy(&format!("second {}", signals::name(sig)));
                    }
                } else if let Err(e) = ctl.shutdown(None) {
                    log::info!("{}: {e}", signals::name(sig));
                }
            }
        } else if fd == ctl.grace_timer().as_raw_fd() {
            ctl.grace_timer_fired();
        }
    }
}

/// Runs the control loop until the VM has ended.
pub fn run(ctl: Rc<RefCell<Controller>>, inputs: LoopInputs<'_>) -> Result<(), Error> {
    let em_err = |e: event_manager::Error| Error::Io {
        what: "the control loop",
        source: std::io::Error::other(e.to_string()),
    };
    let mut em: EventManager<Box<dyn MutEventSubscriber>> = EventManager::new().map_err(em_err)?;
    em.add_subscriber(Box::new(LifecycleEvents {
        ctl: ctl.clone(),
        vcpu_evt: inputs.vcpu_evt,
        reset_evt: inputs.reset_evt,
        poweroff_evt: inputs.poweroff_evt,
        signals: inputs.signals,
        first_stop: None,
        checkpoint_on: inputs.checkpoint_on,
    }));
    if let Some(api) = inputs.api {
        let handler: Rc<RefCell<dyn Handler>> = ctl.clone();
        let server = api.server(handler).map_err(|source| Error::Io {
            what: "the API socket",
            source,
        })?;
        em.add_subscriber(Box::new(server));
    }
    if let Some(requests) = inputs.handles {
        em.add_subscriber(Box::new(requests.serve(ctl.clone())));
    }
    let raw_terminal = inputs.terminal.then(console::RawTerminal::enter).flatten();
    if raw_terminal.is_some() {
        em.add_subscriber(Box::new(console::ConsoleInput::new(inputs.console)));
    }
    while !ctl.borrow().is_done() {
        match em.run() {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(em_err(e)),
        }
    }
    Ok(())
}
