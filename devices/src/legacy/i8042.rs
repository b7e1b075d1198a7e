//! The i8042 keyboard controller, reduced to what a VMM needs: its reset line.
//!
//! Linux booted with `reboot=k` resets the machine by writing 0xFE to port 0x64; hpcvm
//! treats that as the guest ending. Status reads return 0 (no data, input buffer empty),
//! so the guest's "wait until the controller is ready" loops finish at once.

use crate::bus::PioDevice;
use crate::trigger::EventFdTrigger;
use vm_superio::I8042Device;

/// First port of the i8042 (data port 0x60; command/status is 0x64).
pub const I8042_BASE: u16 = 0x60;
/// Ports from 0x60 through 0x64.
pub const I8042_PORTS: u16 = 5;

/// The controller; fires its reset trigger when the guest asks for a CPU reset.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that fires `reset` on the guest's reset command.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let off = u8::try_from(offset).unwrap_or(u8::MAX);
        data.fill(self.inner.read(off));
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // Failing to signal the reset eventfd would leave the guest running with
            // nothing to stop it; the eventfd counter cannot overflow in practice.
            let _ = self.inner.write(off, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_fires_the_trigger_and_status_reads_zero() {
        let evt = EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut dev = I8042::new(evt.try_clone().unwrap());
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
        assert!(evt.read().is_err(), "no reset before the command");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
