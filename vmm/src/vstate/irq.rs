//! Interrupt routes and device memory slots a device model asks the VM for: the
//! [`DeviceVm`] trait, so device models can be tested against a recorder, and its
//! KVM implementation on [`Vm`](super::Vm).
//!
//! KVM has one GSI routing table per VM, replaced whole by KVM_SET_GSI_ROUTING; so
//! the table lives here, starting with the routes KVM sets up itself for the
//! in-kernel PIC and IOAPIC (which the replacement would otherwise drop), plus one
//! MSI route per device vector.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use vmm_sys_util::eventfd::EventFd;

use super::VmError;
use devices::pci::msix::MsiMessage;

/// Pins of the in-kernel IOAPIC: GSIs 0..24 are the legacy lines.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI handed out for MSI/MSI-X vectors.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
pub const MAX_ROUTES: usize = 4096;

/// What a device model needs from the VM: guest-physical mappings of device memory
/// and interrupt routes. Implemented by [`Vm`](super::Vm) with KVM ioctls.
pub trait DeviceVm: Send + Sync {
    /// Maps `len` bytes of host memory at `host` to guest-physical `gpa` (no exits on
    /// access); returns the slot for [`DeviceVm::unmap_memory`].
    ///
    /// # Safety
    /// `host..host+len` must stay mapped until the slot is unmapped or the VM is gone.
    unsafe fn map_memory(&self, gpa: u64, host: *mut u8, len: u64) -> Result<u32, VmError>;
    /// Removes a slot made by [`DeviceVm::map_memory`].
    fn unmap_memory(&self, slot: u32) -> Result<(), VmError>;
    /// A GSI of its own for one MSI/MSI-X vector.
    fn allocate_msi_gsi(&self) -> Result<u32, VmError>;
    /// Routes `gsi` to the MSI message `msg` (replacing any earlier route).
    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), VmError>;
    /// Makes each write to `evt` raise `gsi` in the kernel, without a VMM exit.
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError>;
    /// Undoes [`DeviceVm::register_irqfd`].
    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError>;
    /// Makes each guest write to the MMIO address `addr` signal `evt` in the kernel,
    /// without a VMM exit (a virtqueue notification).
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), VmError>;
    /// Undoes [`DeviceVm::register_ioevent`].
    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), VmError>;
    /// A level-triggered line: `evt` asserts `gsi`, and KVM writes `resample` when the
    /// guest acknowledges it (INTx through the IOAPIC).
    fn register_irqfd_resample(
        &self,
        evt: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), VmError>;
}

/// The VM's GSI routing table.
pub struct GsiRoutes {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

impl Default for GsiRoutes {
    fn default() -> Self {
        Self {
            msi: BTreeMap::new(),
            next_gsi: FIRST_MSI_GSI,
        }
    }
}

impl GsiRoutes {
    /// Hands out the next unused MSI GSI.
    pub fn allocate(&mut self) -> Result<u32, VmError> {
        if self.next_gsi as usize >= MAX_ROUTES {
            return Err(VmError::OutOfGsis { max: MAX_ROUTES });
        }
        let gsi = self.next_gsi;
        self.next_gsi += 1;
        Ok(gsi)
    }

    /// Sets (or replaces) the MSI route of `gsi`.
    pub fn set_msi(&mut self, gsi: u32, msg: MsiMessage) {
        self.msi.insert(gsi, msg);
    }

    /// The whole table: KVM's default PIC/IOAPIC routes, then the MSI routes.
    pub fn table(&self) -> Vec<kvm_irq_routing_entry> {
        let mut entries = Vec::with_capacity(40 + self.msi.len());
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            e
        };
        // As kvm_setup_default_irq_routing: ISA lines on both PICs and the IOAPIC,
        // 16..24 on the IOAPIC only.
        for gsi in 0..16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, pic, gsi % 8));
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for gsi in 16..IOAPIC_PINS {
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, msg) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.addr as u32;
            e.u.msi.address_hi = (msg.addr >> 32) as u32;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        entries
    }

    /// The table as KVM_SET_GSI_ROUTING takes it.
    pub fn kvm_table(&self) -> Result<KvmIrqRouting, VmError> {
        let entries = self.table();
        KvmIrqRouting::from_entries(&entries).map_err(|_| VmError::OutOfGsis { max: MAX_ROUTES })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_legacy_routes_and_adds_msi_ones() {
        let mut r = GsiRoutes::default();
        let gsi = r.allocate().unwrap();
        assert_eq!(gsi, 24);
        r.set_msi(
            gsi,
            MsiMessage {
                addr: 0x1_fee0_1000,
                data: 0x41,
            },
        );
        let t = r.table();
        assert_eq!(t.len(), 32 + 8 + 1);
        // GSI 4 (COM1) still reaches the master PIC pin 4 and IOAPIC pin 4.
        let com1: Vec<_> = t.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(com1.len(), 2);
        // SAFETY: both entries are irqchip routes.
        let pins: Vec<_> = com1
            .iter()
            .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert_eq!(
            pins,
            vec![(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
        let msi = t.last().unwrap();
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI route.
        let m = unsafe { msi.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x41));
        // Replacing a route does not add one.
        r.set_msi(gsi, MsiMessage::default());
        assert_eq!(r.table().len(), 41);
        assert!(r.kvm_table().is_ok());
    }

    #[test]
    fn gsis_run_out_with_an_error() {
        let mut r = GsiRoutes {
            next_gsi: MAX_ROUTES as u32 - 1,
            ..Default::default()
        };
        r.allocate().unwrap();
        assert!(r.allocate().unwrap_err().to_string().contains("4096"));
    }
}
