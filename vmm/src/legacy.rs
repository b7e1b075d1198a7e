//! Wires the legacy devices to the VM: COM1 on IRQ 4 (irqfd) writing to stdout, COM2
//! on IRQ 3 as the guest agent's channel when a job runs, and the i8042 whose reset
//! command ends the guest.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use devices::legacy::i8042::{I8042_BASE, I8042_PORTS, KBD_IRQ};
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, COM2_BASE, COM2_IRQ, UART_PORTS};
use devices::legacy::{Uart, I8042};
use devices::{EventFdTrigger, PioBus};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::{AgentLink, AgentPort};
use crate::vstate::Vm;
use crate::Error;

/// The legacy devices and the handles the control loop needs.
pub struct LegacyDevices {
    /// Port-I/O bus shared by the vCPUs.
    pub pio: Arc<PioBus>,
    /// COM1, for host input.
    pub console: Arc<Mutex<Uart>>,
    /// COM2 speaking to the guest agent, when a job runs.
    pub agent_port: Option<Arc<Mutex<AgentPort>>>,
    /// The i8042, for Ctrl-Alt-Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// Fired by the i8042 when the guest resets the machine.
    pub reset_evt: EventFd,
}

impl LegacyDevices {
    /// Creates COM1 (output to this process's stdout, or dropped when `console` is
    /// false), the i8042 and, for a job, COM2 as the agent channel on `vm`.
    pub fn new(vm: &Vm, console: bool, agent: Option<Arc<AgentLink>>) -> Result<Self, Error> {
        let io_err = |what| move |source| Error::Io { what, source };
        let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the COM1 interrupt eventfd"))?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let out: Box<dyn Write + Send> = if console {
            Box::new(RawStdout::new().map_err(io_err("stdout for the console"))?)
        } else {
            Box::new(io::sink())
        };
        let console = Arc::new(Mutex::new(Uart::new(EventFdTrigger::new(irq), out)));
        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the reset eventfd"))?;
        let kbd_irq =
            EventFd::new(EFD_NONBLOCK).map_err(io_err("the keyboard interrupt eventfd"))?;
        vm.register_irqfd(&kbd_irq, KBD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            EventFdTrigger::new(reset_evt.try_clone().map_err(io_err("the reset eventfd"))?),
            Some(EventFdTrigger::new(kbd_irq)),
        )));

        let mut bus = PioBus::new();
        bus.insert(COM1_BASE, UART_PORTS, console.clone())
            .and_then(|_| bus.insert(I8042_BASE, I8042_PORTS, i8042.clone()))
            .map_err(|e| Error::Io {
                what: "the port-I/O bus",
                source: io::Error::other(e),
            })?;
        let agent_port = match agent {
            Some(link) => {
                let irq =
                    EventFd::new(EFD_NONBLOCK).map_err(io_err("the COM2 interrupt eventfd"))?;
                vm.register_irqfd(&irq, COM2_IRQ)?;
                let port = Arc::new(Mutex::new(AgentPort::new(EventFdTrigger::new(irq), link)));
                bus.insert(COM2_BASE, UART_PORTS, port.clone())
                    .map_err(|e| Error::Io {
                        what: "the port-I/O bus",
                        source: io::Error::other(e),
                    })?;
                Some(port)
            }
            None => None,
        };
        Ok(Self {
            pio: Arc::new(bus),
            console,
            agent_port,
            i8042,
            reset_evt,
        })
    }
}

/// Unbuffered stdout: each guest byte is visible at once (prompts have no newline).
struct RawStdout(std::fs::File);

impl RawStdout {
    fn new() -> io::Result<Self> {
        Ok(Self(io::stdout().as_fd().try_clone_to_owned()?.into()))
    }
}

impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
