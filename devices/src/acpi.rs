//! The hardware-reduced ACPI platform: the FADT's sleep control and status registers
//! (how the guest powers off) and the Generic Event Device interrupt (how the VMM
//! presses the power button).
//!
//! A hardware-reduced platform (ACPI 6.5, 4.1) has no PM1 event blocks, GPEs or SCI.
//! To enter S5 the guest writes `SLP_TYP | SLP_EN` to the sleep control register; the
//! `SLP_TYP` it uses comes from the DSDT's `\_S5` package, which hpcvm writes as
//! [`S5_SLEEP_TYPE`]. The power button is a `PNP0C0C` device that the GED's `_EVT`
//! method notifies when its interrupt fires; Linux's button drivers turn that into
//! the signal or input event the guest's init listens for.

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// First port of the platform's registers: sleep control, then sleep status.
pub const ACPI_PLATFORM_BASE: u16 = 0x600;
/// Ports the registers take.
pub const ACPI_PLATFORM_PORTS: u16 = 2;
/// Offset of the sleep control register (8 bits).
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the sleep status register (8 bits).
pub const SLEEP_STATUS: u64 = 1;
/// The `SLP_TYP` value of S5 (soft off) in the DSDT's `\_S5` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control: the sleep type field, bits 2-4.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
/// Sleep control: "enter the sleep state in SLP_TYP now".
const SLP_EN: u8 = 1 << 5;

/// The platform's registers and the power button.
pub struct AcpiPlatform {
    poweroff: EventFdTrigger,
    power_button: EventFdTrigger,
}

impl AcpiPlatform {
    /// A platform that fires `poweroff` when the guest enters S5 and raises the GED
    /// interrupt through `power_button` (an irqfd) when the button is pressed.
    pub fn new(poweroff: EventFdTrigger, power_button: EventFdTrigger) -> Self {
        Self {
            poweroff,
            power_button,
        }
    }

    /// Presses the power button: the GED interrupt, whose `_EVT` notifies `PNP0C0C`.
    pub fn press_power_button(&self) {
        // An irqfd write fails only if the counter overflows.
        let _ = self.power_button.write(1);
    }
}

impl BusDevice for AcpiPlatform {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads 0 (WAK_STS clear: the guest is never woken from a sleep
        // state it entered); the control register is write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (SLEEP_CONTROL, [value]) = (offset, data) else {
            // Sleep status writes clear WAK_STS, which is never set.
            return;
        };
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        // Only S5 is offered (the DSDT has no \_S1-\_S4): any other type is ignored,
        // as a platform without that state would.
        if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
            // Fails only if the counter overflows.
            let _ = self.poweroff.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn platform() -> (AcpiPlatform, EventFd, EventFd) {
        let off = EventFd::new(EFD_NONBLOCK).unwrap();
        let button = EventFd::new(EFD_NONBLOCK).unwrap();
        let p = AcpiPlatform::new(
            EventFdTrigger::new(off.try_clone().unwrap()),
            EventFdTrigger::new(button.try_clone().unwrap()),
        );
        (p, off, button)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut p, off, _) = platform();
        p.write(SLEEP_STATUS, &[0x80]);
        assert!(off.read().is_err(), "clearing WAK_STS is not a poweroff");
        p.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2]);
        assert!(off.read().is_err(), "SLP_TYP without SLP_EN only arms it");
        p.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2 | SLP_EN]);
        assert_eq!(off.read().unwrap(), 1);
    }

    #[test]
    fn other_sleep_types_and_wide_writes_are_ignored() {
        let (mut p, off, _) = platform();
        for t in (0..8).filter(|&t| t != S5_SLEEP_TYPE) {
            p.write(SLEEP_CONTROL, &[t << 2 | SLP_EN]);
        }
        p.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2 | SLP_EN, 0]);
        assert!(off.read().is_err());
        let mut status = [0xff];
        p.read(SLEEP_STATUS, &mut status);
        assert_eq!(status, [0]);
    }

    #[test]
    fn the_power_button_raises_the_ged_interrupt() {
        let (p, off, button) = platform();
        p.press_power_button();
        assert_eq!(button.read().unwrap(), 1);
        assert!(off.read().is_err());
    }
}
