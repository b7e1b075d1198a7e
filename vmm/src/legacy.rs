//! Wires the platform devices to the VM: COM1 on IRQ 4 (irqfd) writing to stdout, COM2
//! on IRQ 3 as the guest agent's channel when a job runs, the i8042 whose reset
//! command ends the guest, and the ACPI platform (S5 ends the guest too; its power
//! button asks the guest to shut down).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::acpi::{AcpiPlatform, ACPI_PLATFORM_BASE, ACPI_PLATFORM_PORTS};
use devices::legacy::i8042::{I8042_BASE, I8042_PORTS, KBD_IRQ};
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, COM2_BASE, COM2_IRQ, UART_PORTS};
use devices::legacy::{Uart, I8042};
use devices::{EventFdTrigger, PioBus};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::{AgentLink, AgentPort};
use crate::output::Output;
use crate::vstate::Vm;
use crate::Error;

/// The legacy devices and the handles the control loop needs.
pub struct LegacyDevices {
    /// Port-I/O bus with the legacy devices on it (the builder adds PCI, then
    /// shares it with the vCPUs).
    pub pio: PioBus,
    /// COM1, for host input.
    pub console: Arc<Mutex<Uart>>,
    /// COM2 speaking to the guest agent, when a job runs.
    pub agent_port: Option<Arc<Mutex<AgentPort>>>,
    /// The i8042, for Ctrl-Alt-Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// Set once the guest kernel has announced a panic on COM1.
    pub panicked: Arc<AtomicBool>,
    /// Fired by the i8042 when the guest resets the machine.
    pub reset_evt: EventFd,
    /// The ACPI platform, for its power button.
    pub acpi: Arc<Mutex<AcpiPlatform>>,
    /// Fired when the guest enters S5 (ACPI poweroff).
    pub poweroff_evt: EventFd,
}

impl LegacyDevices {
    /// Creates COM1 (output to `console`, hpcvm's stdout, or dropped without one),
    /// the i8042 and, for a job, COM2 as the agent channel on `vm`.
    pub fn new(
        vm: &Vm,
        console: Option<Output>,
        agent: Option<Arc<AgentLink>>,
    ) -> Result<Self, Error> {
        let io_err = |what| move |source| Error::Io { what, source };
        let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the COM1 interrupt eventfd"))?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let out: Box<dyn Write + Send> = match console {
            Some(out) => Box::new(out),
            None => Box::new(io::sink()),
        };
        let panicked = Arc::new(AtomicBool::new(false));
        let out = Box::new(PanicWatch::new(out, panicked.clone()));
        let console = Arc::new(Mutex::new(Uart::new(EventFdTrigger::new(irq), out)));
        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the reset eventfd"))?;
        let kbd_irq =
            EventFd::new(EFD_NONBLOCK).map_err(io_err("the keyboard interrupt eventfd"))?;
        vm.register_irqfd(&kbd_irq, KBD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            EventFdTrigger::new(reset_evt.try_clone().map_err(io_err("the reset eventfd"))?),
            Some(EventFdTrigger::new(kbd_irq)),
        )));

        let poweroff_evt =
            EventFd::new(EFD_NONBLOCK).map_err(io_err("the ACPI poweroff eventfd"))?;
        let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the power button eventfd"))?;
        vm.register_irqfd(&ged_irq, crate::acpi::GED_GSI)?;
        let acpi = Arc::new(Mutex::new(AcpiPlatform::new(
            EventFdTrigger::new(
                poweroff_evt
                    .try_clone()
                    .map_err(io_err("the ACPI poweroff eventfd"))?,
            ),
            EventFdTrigger::new(ged_irq),
        )));

        let mut bus = PioBus::pio();
        bus.insert(COM1_BASE.into(), UART_PORTS.into(), console.clone())
            .and_then(|_| bus.insert(I8042_BASE.into(), I8042_PORTS.into(), i8042.clone()))
            .and_then(|_| {
                bus.insert(
                    ACPI_PLATFORM_BASE.into(),
                    ACPI_PLATFORM_PORTS.into(),
                    acpi.clone(),
                )
            })
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
                bus.insert(COM2_BASE.into(), UART_PORTS.into(), port.clone())
                    .map_err(|e| Error::Io {
                        what: "the port-I/O bus",
                        source: io::Error::other(e),
                    })?;
                Some(port)
            }
            None => None,
        };
        Ok(Self {
            pio: bus,
            console,
            agent_port,
            i8042,
            panicked,
            reset_evt,
            acpi,
            poweroff_evt,
        })
    }
}

/// What Linux prints when it panics; with `panic=-1 reboot=k` the reset that follows
/// would otherwise look like a clean exit.
const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";

/// Passes console output on and notes a kernel panic in it.
struct PanicWatch {
    inner: Box<dyn Write + Send>,
    tail: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl PanicWatch {
    fn new(inner: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            tail: Vec::with_capacity(2 * PANIC_MARK.len()),
            panicked,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if self.tail.len() == PANIC_MARK.len() {
                self.tail.remove(0);
            }
            self.tail.push(b);
            if self.tail == PANIC_MARK {
                self.panicked.store(true, Ordering::Release);
            }
        }
    }
}

impl Write for PanicWatch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        // Never blocks (an Output); a closed stdout drops the bytes.
        let _ = self.inner.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_line_is_noticed_even_split_across_writes() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = PanicWatch::new(Box::new(io::sink()), flag.clone());
        w.write_all(b"[  1.0] Kernel pan").unwrap();
        assert!(!flag.load(Ordering::Acquire));
        w.write_all(b"ic - not syncing: Attempted to kill init!\n")
            .unwrap();
        assert!(flag.load(Ordering::Acquire));
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = PanicWatch::new(Box::new(io::sink()), flag.clone());
        w.write_all(b"Kernel panic - not synced? no: Kernel panic- not syncing")
            .unwrap();
        assert!(!flag.load(Ordering::Acquire));
    }
}
