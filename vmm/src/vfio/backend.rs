//! The ioctl line: what the passthrough device model needs from a host VFIO device
//! and its IOMMU, as a trait ([`VfioBackend`]), so the model above it is tested against
//! a fake (`vfio::fake`) on hosts without VFIO. [`HostVfio`] is the real thing, on
//! vfio-ioctls, in a [`HostDma`] domain: the legacy container/group interface, or
//! iommufd with VFIO device cdevs.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP;
use vfio_ioctls::{
    VfioContainer, VfioDevice, VfioDeviceFd, VfioIommufd, VfioOps, VfioRegionInfoCap,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// VFIO region index of the PCI config space (BARs are regions 0-5).
pub use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX as CONFIG_REGION;
/// VFIO interrupt index of INTx.
pub use vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX as INTX_IRQ;
/// VFIO interrupt index of MSI-X.
pub use vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX as MSIX_IRQ;

/// One VFIO region (a BAR, the config space, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist, e.g. an unused BAR).
    pub size: u64,
    /// The host lets us mmap (parts of) it.
    pub mappable: bool,
    /// The parts that may be mmap'd, as (offset, size); None means all of it.
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// A host mapping of part of a device region, unmapped on drop.
pub struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain device memory; the pointer is never dereferenced as a
// Rust reference, only handed to KVM as a memory slot.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, shared and read-write.
    pub fn new(fd: &impl AsRawFd, offset: u64, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh shared mapping chosen by the kernel; failure is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Self { addr, len })
    }

    /// The host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// True for an empty mapping (never made by [`Mapping::new`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mmap returned; nothing references it now.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// A VFIO PCI device as the device model uses it.
pub trait VfioBackend: Send + Sync {
    /// The device's name for messages (its BDF).
    fn name(&self) -> String;
    /// Region `index` (BARs 0-5, ROM 6, config 7).
    fn region(&self, index: u32) -> RegionInfo;
    /// Reads from a region (config space, or a BAR's trapped part).
    fn read(&self, index: u32, offset: u64, data: &mut [u8]);
    /// Writes to a region.
    fn write(&self, index: u32, offset: u64, data: &[u8]);
    /// Maps `len` bytes of region `index` from `offset` into this process.
    fn map(&self, index: u32, offset: u64, len: u64) -> io::Result<Mapping>;
    /// Interrupts the device has of kind `index` (INTx, MSI, MSI-X).
    fn irq_count(&self, index: u32) -> u32;
    /// Has the device signal interrupt `i` of kind `index` by writing `fds[i]`.
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;
    /// Stops interrupts of kind `index`.
    fn disable_irq(&self, index: u32) -> io::Result<()>;
    /// For INTx: the device's line is unmasked whenever `fd` is written (KVM writes
    /// it when the guest acknowledges the interrupt).
    fn set_intx_unmask(&self, fd: &EventFd) -> io::Result<()>;
    /// Function-level reset.
    fn reset(&self);
}

/// The IOMMU domain the devices DMA through: guest RAM mapped at IOVA = guest address.
pub trait DmaDomain: Send + Sync {
    /// Maps all of guest RAM (pins it).
    fn map_guest_memory(&self, mem: &GuestMemoryMmap) -> io::Result<()>;
    /// Unmaps all of guest RAM.
    fn unmap_guest_memory(&self, mem: &GuestMemoryMmap) -> io::Result<()>;
}

fn vfio_err(e: vfio_ioctls::VfioError) -> io::Error {
    io::Error::other(e.to_string())
}

/// The IOMMU domain of a VM, shared by all its passthrough devices: a legacy VFIO
/// container, or an iommufd IO address space. Either way it is tied to the VM through a
/// KVM VFIO device, so KVM knows about non-coherent DMA and the devices in use.
pub struct HostDma {
    ops: Arc<dyn VfioOps>,
    iommufd: bool,
}

impl HostDma {
    fn kvm_vfio_device(vm: &kvm_ioctls::VmFd) -> io::Result<Arc<VfioDeviceFd>> {
        let mut dev = kvm_bindings::kvm_create_device {
            type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_vfio = vm
            .create_device(&mut dev)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio)))
    }

    /// Opens /dev/vfio/vfio; devices join it through their group nodes.
    pub fn container(vm: &kvm_ioctls::VmFd) -> io::Result<Self> {
        let container = VfioContainer::new(Some(Self::kvm_vfio_device(vm)?)).map_err(vfio_err)?;
        Ok(Self {
            ops: Arc::new(container),
            iommufd: false,
        })
    }

    /// Opens /dev/iommu and allocates an IO address space; devices are opened through
    /// their cdevs (/dev/vfio/devices/vfioN), bound to the iommufd and attached to it.
    pub fn iommufd(vm: &kvm_ioctls::VmFd) -> io::Result<Self> {
        let iommufd = Arc::new(IommuFd::new().map_err(|e| io::Error::other(e.to_string()))?);
        let ioas =
            VfioIommufd::new(iommufd, None, Some(Self::kvm_vfio_device(vm)?)).map_err(vfio_err)?;
        Ok(Self {
            ops: Arc::new(ioas),
            iommufd: true,
        })
    }

    /// Opens the device at `sysfs` (bound to vfio-pci) in this domain.
    pub fn open(&self, sysfs: &Path, name: String) -> io::Result<HostVfio> {
        let device = VfioDevice::new(sysfs, self.ops.clone(), self.iommufd).map_err(vfio_err)?;
        Ok(HostVfio { device, name })
    }
}

impl DmaDomain for HostDma {
    fn map_guest_memory(&self, mem: &GuestMemoryMmap) -> io::Result<()> {
        for region in mem.iter() {
            // SAFETY: guest RAM stays mapped until unmap_guest_memory, which the VMM
            // calls before dropping it; the VMM holds no Rust references into it
            // that the device's DMA could alias (it accesses guest RAM through
            // vm-memory's volatile accessors).
            unsafe {
                self.ops.vfio_dma_map(
                    region.start_addr().0,
                    region.len() as usize,
                    region.as_ptr(),
                )
            }
            .map_err(vfio_err)?;
        }
        Ok(())
    }

    fn unmap_guest_memory(&self, mem: &GuestMemoryMmap) -> io::Result<()> {
        for region in mem.iter() {
            self.ops
                .vfio_dma_unmap(region.start_addr().0, region.len() as usize)
                .map_err(vfio_err)?;
        }
        Ok(())
    }
}

/// A host PCI device opened through VFIO.
pub struct HostVfio {
    device: VfioDevice,
    name: String,
}

impl VfioBackend for HostVfio {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn region(&self, index: u32) -> RegionInfo {
        let flags = self.device.get_region_flags(index);
        let caps = self.device.get_region_caps(index);
        let sparse = caps.iter().find_map(|c| match c {
            VfioRegionInfoCap::SparseMmap(s) => {
                Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
            }
            _ => None,
        });
        RegionInfo {
            size: self.device.get_region_size(index),
            mappable: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            sparse,
        }
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.device.region_read(index, data, offset);
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        self.device.region_write(index, data, offset);
    }

    fn map(&self, index: u32, offset: u64, len: u64) -> io::Result<Mapping> {
        let base = self.device.get_region_offset(index);
        Mapping::new(&self.device, base + offset, len)
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.device.get_irq_info(index).map_or(0, |i| i.count)
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        self.device
            .enable_irq(index, fds.to_vec())
            .map_err(vfio_err)
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        self.device.disable_irq(index).map_err(vfio_err)
    }

    fn set_intx_unmask(&self, fd: &EventFd) -> io::Result<()> {
        self.device
            .set_irq_resample_fd(INTX_IRQ, vec![fd])
            .map_err(vfio_err)
    }

    fn reset(&self) {
        self.device.reset();
    }
}
