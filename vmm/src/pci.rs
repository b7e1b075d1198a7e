//! The guest's PCI bus, built only when a device is passed through or a virtio device
//! is attached: the root complex
//! on the port and MMIO buses, the BAR windows (below 4 GiB and above RAM), guest RAM
//! mapped for DMA, and the passthrough devices.

use std::sync::{Arc, Mutex};

use devices::bus::BusError;
use devices::pci::{PciConfigIo, PciEcam, PciMmioWindow, PciRoot};
use devices::{lock, MmioBus, PioBus};
use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::GuestMemoryMmap;

use crate::memory::layout::{
    pci_mmio64_start, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
    PCI_MMIO64_SIZE,
};
use crate::vfio::backend::{DmaDomain, VfioBackend};
use crate::vfio::device::{BarAllocator, PassthroughError, VfioPciDevice};
use crate::virtio::VirtioPciDevice;
use crate::vstate::DeviceVm;
use devices::virtio::VirtioDevice;

/// Ports of configuration mechanism #1.
const CONFIG_IO_PORT: u64 = 0xcf8;
/// IOAPIC pins PCI INTx lines are spread over (level-triggered, not ISA).
const INTX_GSI_BASE: u32 = 16;

/// (device number on bus 0, INTx GSI) of passthrough device `i` (from 0): devices
/// take slots 1, 2, ... in order (the host bridge is 0), their INTx lines IOAPIC pins
/// 16-23 in turn.
fn intx_route(i: usize) -> (u8, u8) {
    (i as u8 + 1, (INTX_GSI_BASE as usize + i % 8) as u8)
}

/// The INTx routes of `devices` passthrough devices, for the MP table, which is
/// written before the devices are opened.
pub fn intx_routes(devices: usize) -> Vec<(u8, u8)> {
    (0..devices.min(31)).map(intx_route).collect()
}

/// Errors building the bus.
#[derive(Debug, Error)]
pub enum PciError {
    /// A device could not be set up.
    #[error(transparent)]
    Device(#[from] PassthroughError),
    /// The bus has no free slot.
    #[error("No free PCI slot for {0}: at most 31 devices")]
    BusFull(String),
    /// A virtio device's notifications or interrupts could not be wired.
    #[error("Cannot set up {device}: {source}")]
    Virtio {
        /// The device.
        device: String,
        /// Why.
        source: crate::vstate::VmError,
    },
    /// A device region would not fit on the port or MMIO bus.
    #[error("Cannot place the PCI bus: {0}")]
    Layout(#[from] BusError),
    /// The IOMMU refused guest RAM.
    #[error("Cannot map guest RAM for DMA by {device}: {source} (is RLIMIT_MEMLOCK high enough? through iommufd it counts all of this user's VMs together; see hpcvm doctor)")]
    Dma {
        /// The device.
        device: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A host device to pass through and the IOMMU domain it DMAs through.
#[derive(Clone)]
pub struct Passthrough {
    /// The device (real VFIO, or a fake in tests).
    pub backend: Arc<dyn VfioBackend>,
    /// Its IOMMU domain; devices sharing one share the `Arc`.
    pub dma: Arc<dyn DmaDomain>,
}

/// BAR placement in the two windows, naturally aligned.
struct Windows {
    low: AddressAllocator,
    high: AddressAllocator,
}

impl BarAllocator for Windows {
    fn allocate(&mut self, size: u64, high: bool) -> Option<u64> {
        let take = |a: &mut AddressAllocator| {
            a.allocate(size, size, AllocPolicy::FirstMatch)
                .ok()
                .map(|r| r.start())
        };
        // 64-bit BARs go high, but small ones may sit low (where a 32-bit guest
        // or early boot code can reach them) while there is room.
        if high && size > 64 << 20 {
            take(&mut self.high).or_else(|| take(&mut self.low))
        } else {
            take(&mut self.low).or_else(|| if high { take(&mut self.high) } else { None })
        }
    }
}

/// A virtio device model to put on the bus, with a name for messages.
pub struct VirtioSlot {
    /// What it is ("disk /data/in.img", "console").
    pub name: String,
    /// The device model.
    pub device: Box<dyn VirtioDevice>,
}

/// The bus and what must be undone at teardown.
pub struct PciBus {
    config_io: Arc<Mutex<PciConfigIo>>,
    devices: Vec<Arc<Mutex<VfioPciDevice>>>,
    virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
    dma: Vec<Arc<dyn DmaDomain>>,
    mem: GuestMemoryMmap,
}

impl PciBus {
    /// Builds the bus with `passthrough` devices on it, then the `virtio` ones, and
    /// puts it on `pio`/`mmio`.
    pub fn build(
        vm: Arc<dyn DeviceVm>,
        mem: &GuestMemoryMmap,
        ram: u64,
        passthrough: Vec<Passthrough>,
        virtio: Vec<VirtioSlot>,
        pio: &mut PioBus,
        mmio: &mut MmioBus,
    ) -> Result<Self, PciError> {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let mut bus = Self {
            config_io: Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            devices: Vec::new(),
            virtio: Vec::new(),
            dma: Vec::new(),
            mem: mem.clone(),
        };
        let high_start = pci_mmio64_start(ram);
        let mut windows = Windows {
            low: AddressAllocator::new(PCI_MMIO32_START, PCI_MMIO32_SIZE).map_err(|_| {
                BusError::BadRange {
                    space: "MMIO",
                    base: PCI_MMIO32_START,
                    len: PCI_MMIO32_SIZE,
                }
            })?,
            high: AddressAllocator::new(high_start, PCI_MMIO64_SIZE).map_err(|_| {
                BusError::BadRange {
                    space: "MMIO",
                    base: high_start,
                    len: PCI_MMIO64_SIZE,
                }
            })?,
        };
        if passthrough.len() + virtio.len() > 31 {
            let name = match passthrough.get(31) {
                Some(p) => p.backend.name(),
                None => virtio[31 - passthrough.len()].name.clone(),
            };
            return Err(PciError::BusFull(name));
        }
        for p in passthrough {
            if !bus.dma.iter().any(|d| Arc::ptr_eq(d, &p.dma)) {
                p.dma
                    .map_guest_memory(mem)
                    .map_err(|source| PciError::Dma {
                        device: p.backend.name(),
                        source,
                    })?;
                bus.dma.push(p.dma.clone());
            }
            let (slot, gsi) = intx_route(bus.devices.len());
            let dev = VfioPciDevice::new(
                p.backend.clone(),
                vm.clone(),
                &mut windows,
                Some(u32::from(gsi)),
            )?;
            let dev = Arc::new(Mutex::new(dev));
            bus.devices.push(dev.clone());
            let added = lock(&root).add(dev);
            debug_assert_eq!(added, Some(slot), "slots fill in order");
        }
        for v in virtio {
            let bar = windows
                .allocate(crate::virtio::pci::BAR_SIZE, true)
                .ok_or_else(|| PciError::BusFull(v.name.clone()))?;
            let dev = VirtioPciDevice::new(v.name.clone(), v.device, vm.clone(), mem.clone(), bar)
                .map_err(|source| PciError::Virtio {
                    device: v.name,
                    source,
                })?;
            let dev = Arc::new(Mutex::new(dev));
            bus.virtio.push(dev.clone());
            lock(&root).add(dev);
        }
        pio.insert(CONFIG_IO_PORT, 8, bus.config_io.clone())?;
        mmio.insert(
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
        )?;
        for (base, len) in [
            (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            (high_start, PCI_MMIO64_SIZE),
        ] {
            mmio.insert(
                base,
                len,
                Arc::new(Mutex::new(PciMmioWindow::new(root.clone(), base))),
            )?;
        }
        Ok(bus)
    }

    /// The configuration port (0xcf8), whose latched address a checkpoint saves.
    pub fn config_io(&self) -> Arc<Mutex<PciConfigIo>> {
        self.config_io.clone()
    }

    /// The virtio devices, for the device thread.
    pub fn virtio_devices(&self) -> Vec<Arc<Mutex<VirtioPciDevice>>> {
        self.virtio.clone()
    }

    /// Takes every device out of the guest and unmaps guest RAM from the IOMMU; the
    /// vCPUs must be stopped. Also done on drop.
    pub fn release(&mut self) {
        for d in self.virtio.drain(..) {
            lock(&d).release();
        }
        for d in self.devices.drain(..) {
            lock(&d).release();
        }
        for dma in self.dma.drain(..) {
            let _ = dma.unmap_guest_memory(&self.mem);
        }
    }
}

impl Drop for PciBus {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::fake::{FakeDma, FakeOptions, FakeVfio, FakeVm};

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges = crate::memory::layout::ram_ranges(size);
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn devices_share_one_dma_map_and_get_slots_and_bars() {
        let vm = Arc::new(FakeVm::default());
        let dma = Arc::new(FakeDma::default());
        let fakes: Vec<_> = (0..2)
            .map(|_| Arc::new(FakeVfio::new(FakeOptions::default()).unwrap()))
            .collect();
        let pt = fakes
            .iter()
            .map(|f| Passthrough {
                backend: f.clone(),
                dma: dma.clone(),
            })
            .collect();
        let (mut pio, mut mmio) = (PioBus::pio(), MmioBus::mmio());
        let m = mem(64 << 20);
        let mut bus = PciBus::build(
            vm.clone(),
            &m,
            64 << 20,
            pt,
            Vec::new(),
            &mut pio,
            &mut mmio,
        )
        .unwrap();
        assert_eq!(*dma.mapped.lock().unwrap(), vec![(0, 64 << 20)]);
        // Device 1 answers config reads through 0xcf8 and through ECAM.
        pio.write(0xcf8, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        let mut id = [0u8; 4];
        pio.read(0xcfc, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x101c_15b3);
        mmio.read(PCI_ECAM_START + (2 << 15), &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x101c_15b3);
        // The two BAR 0s do not overlap.
        let slots: Vec<_> = vm.state().slots.into_values().collect();
        assert_eq!(slots[0].0, PCI_MMIO32_START);
        assert_eq!(slots[2].0, PCI_MMIO32_START + 0x1_0000);
        bus.release();
        assert!(dma.mapped.lock().unwrap().is_empty());
        assert!(vm.state().slots.is_empty());
        assert!(fakes.iter().all(|f| f.log().resets == 1));
    }

    #[test]
    fn big_64_bit_bars_go_above_ram_small_ones_stay_low() {
        let mut w = Windows {
            low: AddressAllocator::new(PCI_MMIO32_START, PCI_MMIO32_SIZE).unwrap(),
            high: AddressAllocator::new(8 << 30, PCI_MMIO64_SIZE).unwrap(),
        };
        assert_eq!(w.allocate(1 << 30, true), Some(8 << 30));
        assert_eq!(w.allocate(1 << 20, true), Some(PCI_MMIO32_START));
        assert_eq!(
            w.allocate(1 << 20, false),
            Some(PCI_MMIO32_START + (1 << 20))
        );
        // A 32-bit BAR never goes high, even when the low window is full.
        assert_eq!(w.allocate(1 << 30, false), None);
    }
}
