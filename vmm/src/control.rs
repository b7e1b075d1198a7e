//! The VMM's control loop on event-manager: waits for the guest to stop and forwards
//! terminal input to the console.

use std::cell::Cell;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialConsole;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use crate::vstate::vcpu::VcpuShared;
use crate::vstate::GuestExit;
use crate::Error;

/// Wakes the loop when a vCPU records an exit or the i8042 fires a reset.
struct ExitWatch {
    shared: Arc<VcpuShared>,
    vcpu_evt: EventFd,
    reset_evt: EventFd,
    done: Rc<Cell<bool>>,
}

impl MutEventSubscriber for ExitWatch {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.vcpu_evt, &self.reset_evt] {
            // Registration of a fresh eventfd cannot fail short of epoll limits; the
            // run loop then never ends on its own, which destroy (issue 3) covers.
            let _ = ops.add(Events::new(fd, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.shared.record(GuestExit::Reset);
        } else {
            let _ = self.vcpu_evt.read();
        }
        self.done.set(true);
    }
}

/// Feeds a terminal's keystrokes to the guest console, in raw mode while the VM runs.
struct ConsoleInput {
    console: Arc<Mutex<SerialConsole>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&std::io::stdin(), EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let mut console = self.console.lock().unwrap_or_else(|p| p.into_inner());
        let room = console.input_room().min(buf.len());
        if room == 0 {
            return; // the guest has not drained its FIFO yet; try on the next wake-up
        }
        match std::io::stdin().lock().read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                // EOF or a dead terminal: stop listening rather than spin.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let _ = console.enqueue_input(&buf[..n]);
            }
        }
    }
}

/// Puts the terminal back in canonical mode when dropped.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        use std::io::IsTerminal;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        stdin.lock().set_raw_mode().ok().map(|_| RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// Runs the control loop until the guest stops.
pub fn run_until_exit(
    shared: Arc<VcpuShared>,
    vcpu_evt: EventFd,
    reset_evt: EventFd,
    console: Arc<Mutex<SerialConsole>>,
) -> Result<(), Error> {
    let em_err = |e: event_manager::Error| Error::Io {
        what: "the control loop",
        source: std::io::Error::other(e.to_string()),
    };
    let mut em: EventManager<Box<dyn MutEventSubscriber>> = EventManager::new().map_err(em_err)?;
    let done = Rc::new(Cell::new(false));
    em.add_subscriber(Box::new(ExitWatch {
        shared,
        vcpu_evt,
        reset_evt,
        done: done.clone(),
    }));
    let raw_terminal = RawTerminal::enter();
    if raw_terminal.is_some() {
        em.add_subscriber(Box::new(ConsoleInput { console }));
    }
    while !done.get() {
        match em.run() {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(em_err(e)),
        }
    }
    Ok(())
}
