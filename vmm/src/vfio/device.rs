//! A host PCI function passed through to the guest: the config space the guest sees
//! (BARs, MSI/MSI-X and the interrupt line emulated, the rest the device's own), BARs
//! mapped straight into the guest with KVM memory slots (the one holding the MSI-X
//! table sparsely, trapping only the table and PBA pages), and every interrupt routed
//! in the kernel: the device writes an eventfd, KVM injects the MSI (irqfd).

use std::sync::Arc;

use devices::pci::msix::{MsixChange, MsixTable};
use devices::pci::{dword_bytes, merge_bytes, regs, BarRange, PciDevice};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{Mapping, VfioBackend, CONFIG_REGION, INTX_IRQ, MSIX_IRQ};
use crate::vstate::msix::MsixVector;
use crate::vstate::{DeviceVm, VmError};

/// Host (and guest) page size: the granule of BAR mappings.
const PAGE: u64 = 4096;

/// Errors setting up a passthrough device.
#[derive(Debug, Error)]
pub enum PassthroughError {
    /// An eventfd for an interrupt.
    #[error("Cannot create an interrupt eventfd for {device}: {source}")]
    EventFd {
        /// The device.
        device: String,
        /// Why.
        source: std::io::Error,
    },
    /// The VM refused a route, slot or irqfd.
    #[error("Cannot set up {device} in the VM: {source}")]
    Vm {
        /// The device.
        device: String,
        /// Why.
        source: VmError,
    },
    /// mmap of a BAR failed.
    #[error("Cannot map BAR {bar} of {device}: {source}")]
    Map {
        /// The device.
        device: String,
        /// BAR index.
        bar: usize,
        /// Why.
        source: std::io::Error,
    },
    /// The device's capability list is inconsistent.
    #[error("{device} has a malformed MSI-X capability: {why}")]
    BadMsix {
        /// The device.
        device: String,
        /// What is wrong.
        why: String,
    },
}

/// Where a BAR goes in the guest: the allocator's answer for one BAR.
pub trait BarAllocator {
    /// A naturally aligned guest-physical range of `size` bytes; `high` for 64-bit BARs
    /// (may be placed above 4 GiB).
    fn allocate(&mut self, size: u64, high: bool) -> Option<u64>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarKind {
    Mem32,
    Mem64,
    Io,
}

/// A memory area of a BAR mapped into the guest.
struct MappedArea {
    offset: u64,
    mapping: Mapping,
    slot: Option<u32>,
}

impl MappedArea {
    /// Gives the area to the guest at `bar_addr + offset`.
    fn map(&mut self, vm: &dyn DeviceVm, bar_addr: u64) -> Result<(), VmError> {
        // SAFETY: the mapping lives in this area, which removes the slot (unmap,
        // called by release() before the area is dropped) before unmapping it.
        let slot = unsafe {
            vm.map_memory(
                bar_addr + self.offset,
                self.mapping.as_ptr(),
                self.mapping.len(),
            )
        }?;
        self.slot = Some(slot);
        Ok(())
    }

    /// Takes the area out of the guest.
    fn unmap(&mut self, vm: &dyn DeviceVm) {
        if let Some(slot) = self.slot.take() {
            let _ = vm.unmap_memory(slot);
        }
    }
}

struct Bar {
    kind: BarKind,
    /// The low type bits the guest reads back (memory type, prefetchable).
    flags: u32,
    size: u64,
    addr: u64,
    /// The guest wrote all ones to the low / high register: it is sizing the BAR.
    sizing: [bool; 2],
    mapped: Vec<MappedArea>,
}

/// MSI-X as the guest programs it, and how each vector reaches KVM.
struct Msix {
    cap: usize,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
    table: MsixTable,
    vectors: Vec<MsixVector>,
    /// VFIO has the eventfds (the device may signal them).
    vfio_enabled: bool,
}

/// Legacy INTx through an IOAPIC pin.
struct Intx {
    gsi: u32,
    evt: EventFd,
    resample: EventFd,
    enabled: bool,
}

/// A host PCI function passed through to the guest.
pub struct VfioPciDevice {
    name: String,
    backend: Arc<dyn VfioBackend>,
    vm: Arc<dyn DeviceVm>,
    bars: [Option<Bar>; 6],
    msix: Option<Msix>,
    intx: Option<Intx>,
    interrupt_line: u8,
    released: bool,
    /// Capability pointers rewritten to skip hidden capabilities: (register whose
    /// pointer byte changes, new pointer). Empty when nothing is hidden.
    cap_links: Vec<(usize, u8)>,
}

impl VfioPciDevice {
    /// Builds the model of `backend`: reads its BARs and capabilities, places the BARs
    /// with `alloc`, maps what can be mapped into the guest, and prepares an interrupt
    /// route per MSI-X vector. `intx_gsi` is the IOAPIC pin for INTx, if any.
    pub fn new(
        backend: Arc<dyn VfioBackend>,
        vm: Arc<dyn DeviceVm>,
        alloc: &mut dyn BarAllocator,
        intx_gsi: Option<u32>,
    ) -> Result<Self, PassthroughError> {
        let name = backend.name();
        let mut dev = Self {
            name,
            backend,
            vm,
            bars: Default::default(),
            msix: None,
            intx: None,
            interrupt_line: 0xff,
            released: false,
            cap_links: Vec::new(),
        };
        dev.probe_bars(alloc);
        dev.probe_msix()?;
        dev.hide_msi();
        dev.setup_intx(intx_gsi)?;
        for i in 0..6 {
            dev.map_bar(i)?;
        }
        Ok(dev)
    }

    fn config_dword(&self, reg: usize) -> u32 {
        let mut d = [0u8; 4];
        self.backend.read(CONFIG_REGION, reg as u64, &mut d);
        u32::from_le_bytes(d)
    }

    /// An eventfd for one of the device's interrupts.
    fn eventfd(&self) -> Result<EventFd, PassthroughError> {
        EventFd::new(EFD_NONBLOCK).map_err(|source| PassthroughError::EventFd {
            device: self.name.clone(),
            source,
        })
    }

    fn vm_err(&self) -> impl FnOnce(VmError) -> PassthroughError + '_ {
        move |source| PassthroughError::Vm {
            device: self.name.clone(),
            source,
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        match reg {
            r if (regs::BAR0..regs::BAR0 + 24).contains(&r) => {
                self.bar_register((r - regs::BAR0) / 4)
            }
            // No expansion ROM: option ROMs are for firmware we do not run.
            regs::ROM => 0,
            regs::INTERRUPT => {
                let value = self.config_dword(reg);
                // No pin without an INTx route: the guest must not wait on one.
                let pin = if self.intx.is_some() {
                    value & 0xff00
                } else {
                    0
                };
                (value & 0xffff_0000) | pin | u32::from(self.interrupt_line)
            }
            r => {
                let mut value = self.config_dword(r);
                if let Some(&(_, next)) = self.cap_links.iter().find(|(at, _)| *at == r) {
                    // The pointer is the low byte of CAP_PTR, byte 1 of a capability.
                    value = if r == regs::CAP_PTR {
                        (value & !0xff) | u32::from(next)
                    } else {
                        (value & !0xff00) | u32::from(next) << 8
                    };
                }
                match &self.msix {
                    Some(m) if m.cap == r => (value & 0xffff) | u32::from(m.table.control()) << 16,
                    _ => value,
                }
            }
        }
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        match reg {
            r if (regs::BAR0..regs::BAR0 + 24).contains(&r) => {
                let i = (r - regs::BAR0) / 4;
                let merged = merge_bytes(self.bar_register(i), offset, data);
                self.write_bar_register(i, merged);
            }
            regs::ROM => {}
            regs::INTERRUPT => {
                if offset == 0 {
                    if let Some(&line) = data.first() {
                        self.interrupt_line = line;
                    }
                }
            }
            r if self.msix.as_ref().is_some_and(|m| m.cap == r) => {
                // Only message control (bytes 2-3) is writable; it is ours, not the
                // device's: VFIO enables MSI-X on the device through SET_IRQS.
                let mut current = [0u8; 4];
                let control = self.msix.as_ref().map_or(0, |m| m.table.control());
                dword_bytes(u32::from(control) << 16, 0, &mut current);
                let merged = merge_bytes(u32::from_le_bytes(current), offset, data);
                let changed = self
                    .msix
                    .as_mut()
                    .is_some_and(|m| m.table.set_control((merged >> 16) as u16));
                if changed {
                    self.msix_control_changed();
                }
            }
            r => {
                // Command, status and the rest: the device's, filtered by vfio-pci.
                self.backend.write(CONFIG_REGION, (r + offset) as u64, data);
            }
        }
    }

    fn trapped_bars(&self) -> Vec<BarRange> {
        self.bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_access(bar, offset) {
            Some(MsixRegion::Table(off)) => {
                if let Some(m) = &self.msix {
                    m.table.read_table(off, data);
                }
            }
            Some(MsixRegion::Pba(off)) => {
                if let Some(m) = &mut self.msix {
                    // Pending: the device signalled a vector KVM is not taking (masked,
                    // or MSI-X off); its interrupt waits in the eventfd. Only the 64
                    // vectors of the qword read are looked at.
                    let first = (off / 8 * 64) as usize;
                    for (v, vec) in m.vectors.iter().enumerate().skip(first).take(64) {
                        m.table.set_pending(v, !vec.routed() && vec.pending());
                    }
                    m.table.read_pba(off, data);
                }
            }
            None => self.backend.read(bar as u32, offset, data),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_access(bar, offset) {
            Some(MsixRegion::Table(off)) => {
                let change = self
                    .msix
                    .as_mut()
                    .and_then(|m| m.table.write_table(off, data));
                match change {
                    Some(MsixChange::Vector(v)) => self.update_vector(v),
                    Some(MsixChange::Control) => self.msix_control_changed(),
                    None => {}
                }
            }
            // The PBA is read-only.
            Some(MsixRegion::Pba(_)) => {}
            None => self.backend.write(bar as u32, offset, data),
        }
    }
}

impl VfioPciDevice {
    /// Takes the device out of the guest: interrupts unrouted and disabled, BAR slots
    /// removed, the function reset. Idempotent; also done on drop.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if let Some(m) = &mut self.msix {
            for v in &mut m.vectors {
                v.unroute(self.vm.as_ref());
            }
            if m.vfio_enabled {
                let _ = self.backend.disable_irq(MSIX_IRQ);
                m.vfio_enabled = false;
            }
        }
        self.disable_intx();
        if let Some(intx) = &self.intx {
            let _ = self.vm.unregister_irqfd(&intx.evt, intx.gsi);
        }
        for bar in self.bars.iter_mut().flatten() {
            for area in &mut bar.mapped {
                area.unmap(self.vm.as_ref());
            }
        }
        // Leave the device quiet for whoever uses it next.
        self.backend.reset();
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.release();
    }
}

mod bars;
mod intx;
mod msix;
use msix::MsixRegion;
#[cfg(test)]
mod tests;
