//! One MSI-X vector of an emulated or passed-through PCI function as KVM delivers it:
//! a GSI with an MSI route and an eventfd that is an irqfd only while the vector may
//! fire. A masked vector's interrupts wait in its eventfd (the PBA can see them) and
//! are injected the moment the irqfd goes back in.

use std::os::fd::AsRawFd;

use devices::pci::MsixTable;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceVm, VmError};

/// A vector's GSI, eventfd and whether KVM is routing it now.
pub struct MsixVector {
    /// The GSI of its MSI route.
    pub gsi: u32,
    /// Written to raise the interrupt (by the device model or VFIO).
    pub evt: EventFd,
    routed: bool,
}

impl MsixVector {
    /// A vector with a GSI of its own, not yet routed.
    pub fn new(vm: &dyn DeviceVm) -> Result<Self, VmError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Kvm {
            what: "eventfd for an MSI-X vector",
            source: vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        Ok(Self::from_parts(vm.allocate_msi_gsi()?, evt))
    }

    /// A vector for `gsi` raised through `evt`, not yet routed.
    pub fn from_parts(gsi: u32, evt: EventFd) -> Self {
        Self {
            gsi,
            evt,
            routed: false,
        }
    }

    /// Routes the vector when MSI-X is on and vector `v` of `table` unmasked, with the
    /// message the guest programmed; unroutes it otherwise. Unregistering consumes
    /// what the eventfd still counted, so nothing is delivered twice.
    pub fn update(&mut self, vm: &dyn DeviceVm, table: &MsixTable, v: usize) {
        if table.enabled() && !table.masked(v) {
            if vm.set_msi_route(self.gsi, table.message(v)).is_ok()
                && !self.routed
                && vm.register_irqfd(&self.evt, self.gsi).is_ok()
            {
                self.routed = true;
            }
        } else {
            self.unroute(vm);
        }
    }

    /// Takes the irqfd out, if it is in.
    pub fn unroute(&mut self, vm: &dyn DeviceVm) {
        if self.routed {
            let _ = vm.unregister_irqfd(&self.evt, self.gsi);
            self.routed = false;
        }
    }

    /// The irqfd is registered.
    pub fn routed(&self) -> bool {
        self.routed
    }

    /// The eventfd holds an interrupt nobody took yet (polled, not consumed): the
    /// vector's PBA bit while it is masked.
    pub fn pending(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call; a zero timeout never blocks.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc == 1 && pfd.revents & libc::POLLIN != 0
    }
}
