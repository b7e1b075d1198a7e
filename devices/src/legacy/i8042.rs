//! The i8042 keyboard controller, reduced to what a VMM needs: its reset line and a
//! Ctrl-Alt-Del keystroke for asking the guest to shut down.
//!
//! Linux booted with `reboot=k` resets the machine by writing 0xFE to port 0x64; hpcvm
//! treats that as the guest ending. [`I8042::ctrl_alt_del`] queues the key sequence in
//! the output buffer and raises IRQ 1. (vm-superio's i8042 has the reset command only.)

use std::collections::VecDeque;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// First port of the i8042 (data port 0x60; command/status is 0x64).
pub const I8042_BASE: u16 = 0x60;
/// Ports from 0x60 through 0x64.
pub const I8042_PORTS: u16 = 5;
/// ISA IRQ line of the keyboard.
pub const KBD_IRQ: u32 = 1;

const DATA: u64 = 0;
const COMMAND: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_OUTPUT_FULL: u8 = 0x01;
/// Scancode set 1 (what a PC controller delivers after translation): LCtrl, LAlt,
/// Delete pressed, then released in reverse order.
pub const CTRL_ALT_DEL: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// Keystrokes kept before the oldest are dropped (a guest that never reads must not
/// make the VMM grow without bound).
const MAX_QUEUED: usize = 64;

/// The controller.
pub struct I8042 {
    reset: EventFdTrigger,
    kbd_irq: Option<EventFdTrigger>,
    out: VecDeque<u8>,
}

impl I8042 {
    /// A controller that fires `reset` on the guest's reset command and `kbd_irq`
    /// (IRQ 1) when it has keystrokes for the guest.
    pub fn new(reset: EventFdTrigger, kbd_irq: Option<EventFdTrigger>) -> Self {
        Self {
            reset,
            kbd_irq,
            out: VecDeque::new(),
        }
    }

    /// Presses Ctrl-Alt-Del: the PC way of asking the OS to shut down or reboot.
    pub fn ctrl_alt_del(&mut self) {
        for b in CTRL_ALT_DEL {
            if self.out.len() == MAX_QUEUED {
                self.out.pop_front();
            }
            self.out.push_back(b);
        }
        self.raise_irq();
    }

    /// Keystrokes waiting for the guest (for a checkpoint).
    pub fn state(&self) -> Vec<u8> {
        self.out.iter().copied().collect()
    }

    /// Puts back keystrokes [`I8042::state`] saw waiting (at most the queue's size).
    pub fn restore(&mut self, queued: &[u8]) {
        let start = queued.len().saturating_sub(MAX_QUEUED);
        self.out = queued[start..].iter().copied().collect();
        if !self.out.is_empty() {
            self.raise_irq();
        }
    }

    fn raise_irq(&self) {
        if let Some(irq) = &self.kbd_irq {
            // An irqfd write fails only if the counter overflows.
            let _ = irq.write(1);
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => {
                let v = self.out.pop_front().unwrap_or(0);
                if !self.out.is_empty() {
                    self.raise_irq();
                }
                v
            }
            COMMAND if !self.out.is_empty() => STATUS_OUTPUT_FULL,
            _ => 0,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            // Failing to signal would leave the guest running with nothing to stop it;
            // the eventfd counter cannot overflow in practice.
            let _ = self.reset.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn evt() -> EventFdTrigger {
        EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn reset_command_fires_the_trigger_and_idle_status_reads_zero() {
        let reset = evt();
        let mut dev = I8042::new(reset.try_clone().unwrap(), None);
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
        assert!(reset.read().is_err(), "no reset before the command");
        dev.write(4, &[0x20]);
        assert!(reset.read().is_err(), "other commands do not reset");
        dev.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn ctrl_alt_del_is_read_back_byte_by_byte_with_an_interrupt() {
        let irq = evt();
        let mut dev = I8042::new(evt(), Some(irq.try_clone().unwrap()));
        dev.ctrl_alt_del();
        assert!(irq.read().unwrap() >= 1);
        let mut got = Vec::new();
        loop {
            let mut s = [0];
            dev.read(4, &mut s);
            if s[0] & STATUS_OUTPUT_FULL == 0 {
                break;
            }
            let mut b = [0];
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }

    #[test]
    fn an_unread_queue_stays_bounded() {
        let mut dev = I8042::new(evt(), None);
        for _ in 0..100 {
            dev.ctrl_alt_del();
        }
        assert_eq!(dev.out.len(), MAX_QUEUED);
    }
}
