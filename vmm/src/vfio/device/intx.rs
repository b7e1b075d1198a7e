//! INTx of a passthrough function: the line signals an eventfd, KVM asserts the
//! IOAPIC pin and resamples at the guest's EOI.

use super::*;

impl VfioPciDevice {
    /// INTx: the device's line signals `evt`; KVM asserts `gsi` (level) and writes
    /// `resample` at the guest's EOI, which VFIO turns into an unmask of the line.
    pub(super) fn setup_intx(&mut self, gsi: Option<u32>) -> Result<(), PassthroughError> {
        let pin = (self.config_dword(regs::INTERRUPT) >> 8) as u8;
        let (Some(gsi), true) = (gsi, pin != 0 && self.backend.irq_count(INTX_IRQ) > 0) else {
            return Ok(());
        };
        let intx = Intx {
            gsi,
            evt: self.eventfd()?,
            resample: self.eventfd()?,
            enabled: false,
        };
        self.vm
            .register_irqfd_resample(&intx.evt, &intx.resample, gsi)
            .map_err(self.vm_err())?;
        self.interrupt_line = gsi as u8;
        self.intx = Some(intx);
        self.enable_intx();
        Ok(())
    }

    pub(super) fn enable_intx(&mut self) {
        if let Some(intx) = &mut self.intx {
            if !intx.enabled
                && self.backend.enable_irq(INTX_IRQ, &[&intx.evt]).is_ok()
                && self.backend.set_intx_unmask(&intx.resample).is_ok()
            {
                intx.enabled = true;
            }
        }
    }

    pub(super) fn disable_intx(&mut self) {
        if let Some(intx) = &mut self.intx {
            if intx.enabled {
                let _ = self.backend.disable_irq(INTX_IRQ);
                intx.enabled = false;
            }
        }
    }
}
