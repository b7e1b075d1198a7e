//! The KVM VM: in-kernel irqchip and PIT, guest RAM slots, and host capabilities.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::errno;
use vmm_sys_util::eventfd::EventFd;

use std::sync::Mutex;

use devices::lock;
use devices::pci::msix::MsiMessage;
use vm_allocator::IdAllocator;

use super::irq::{DeviceVm, GsiRoutes};
use crate::memory::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Errors setting up the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("Cannot open /dev/kvm: {0} (is the kvm module loaded and are you in the kvm group?)")]
    OpenKvm(errno::Error),
    /// KVM's API version is not the stable one.
    #[error("Unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// More vCPUs than the host KVM allows.
    #[error("{asked} vCPUs is more than this host's KVM allows ({max})")]
    TooManyVcpus {
        /// vCPUs asked for.
        asked: u32,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// Every GSI is taken.
    #[error("Out of interrupt routes: KVM allows {max} GSIs")]
    OutOfGsis {
        /// KVM's limit.
        max: usize,
    },
    /// Every memory slot is taken.
    #[error("Out of KVM memory slots ({max}): too many device memory areas")]
    OutOfSlots {
        /// KVM_CAP_NR_MEMSLOTS.
        max: usize,
    },
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The ioctl's error.
        source: errno::Error,
    },
}

// kvm-ioctls does not wrap KVM_REINJECT_CONTROL (_IO(KVMIO, 0x71), struct argument).
vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// Turns off PIT tick reinjection (QEMU's `lost_tick_policy=discard`). Linux keeps
/// time with kvm-clock and the TSC, not by counting PIT ticks; and while reinjection
/// is on, KVM holds an IRQ-ack notifier whose removal at VM teardown waits for an SRCU
/// grace period: measured here, 12 ms of every VM's exit (exec -> exit of the tiny
/// guest went from 24 ms to 12 ms median without it).
fn discard_lost_pit_ticks(fd: &VmFd) -> Result<(), errno::Error> {
    let ctl = kvm_bindings::kvm_reinject_control {
        pit_reinject: 0,
        reserved: [0; 31],
    };
    // SAFETY: the VM fd is valid and the kernel reads exactly one kvm_reinject_control.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_REINJECT_CONTROL(), &ctl) };
    if rc < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

fn kvm_err(what: &'static str) -> impl FnOnce(errno::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// An open KVM VM and what the host KVM offers its vCPUs.
pub struct Vm {
    /// The /dev/kvm handle.
    pub kvm: Kvm,
    /// The VM file descriptor.
    pub fd: VmFd,
    /// KVM_GET_SUPPORTED_CPUID, the base of every vCPU's CPUID.
    pub supported_cpuid: CpuId,
    /// MSRs the host KVM saves and restores.
    pub msr_index: Vec<u32>,
    /// The GSI routing table (legacy lines plus device MSI vectors).
    routes: Mutex<GsiRoutes>,
    /// Memory slots for device memory (BARs), after the RAM slots.
    device_slots: Mutex<IdAllocator>,
}

/// Slots below this hold guest RAM (one per RAM region; at most two today).
const FIRST_DEVICE_SLOT: u32 = 8;

impl Vm {
    /// Opens /dev/kvm and creates a VM; [`Vm::create_irqchip`] completes it.
    pub fn new(vcpus: u32) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        let max = kvm.get_max_vcpus();
        if vcpus as usize > max {
            return Err(VmError::TooManyVcpus { asked: vcpus, max });
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(kvm_err("GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let fd = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("SET_IDENTITY_MAP_ADDR"))?;
        let max_slots = kvm.get_nr_memslots().max(FIRST_DEVICE_SLOT as usize + 1);
        let device_slots = IdAllocator::new(FIRST_DEVICE_SLOT, max_slots as u32 - 1)
            .map_err(|_| VmError::OutOfSlots { max: max_slots })?;
        Ok(Self {
            kvm,
            fd,
            supported_cpuid,
            msr_index,
            routes: Mutex::new(GsiRoutes::default()),
            device_slots: Mutex::new(device_slots),
        })
    }

    /// Creates the in-kernel LAPIC/IOAPIC/PIC and PIT; must precede vCPU creation.
    /// Mostly waiting in the kernel (a kernel thread for the PIT, RCU grace periods),
    /// so the builder runs it beside guest memory setup.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("CREATE_IRQCHIP"))?;
        self.fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("CREATE_PIT2"))?;
        if self.kvm.check_extension(Cap::ReinjectControl) {
            discard_lost_pit_ticks(&self.fd).map_err(kvm_err("REINJECT_CONTROL"))?;
        }
        Ok(())
    }

    /// Gives KVM every guest RAM region, one memory slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        self.set_ram_slots(mem, 0)
    }

    /// Turns KVM's dirty-page log of every RAM slot on or off (live migration: what
    /// the vCPUs wrote since the last [`Vm::dirty_pages`]). Turning it on starts a
    /// clean log.
    pub fn log_dirty_pages(&self, mem: &GuestMemoryMmap, on: bool) -> Result<(), VmError> {
        self.set_ram_slots(mem, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// RAM slot `slot`'s dirty log since the last call, one bit per 4 KiB page, and
    /// a clean log from here on.
    pub fn dirty_pages(&self, slot: u32, len: u64) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, len as usize)
            .map_err(kvm_err("GET_DIRTY_LOG"))
    }

    fn set_ram_slots(&self, mem: &GuestMemoryMmap, flags: u32) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range is a live mapping owned by `mem`, which outlives
            // the VM: the VMM drops vCPUs and the VM before guest memory.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Wires `evt` to guest interrupt line `gsi`: each write raises it in the kernel.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm_err("IRQFD"))
    }
}

impl DeviceVm for Vm {
    unsafe fn map_memory(&self, gpa: u64, host: *mut u8, len: u64) -> Result<u32, VmError> {
        let max = self.kvm.get_nr_memslots();
        let slot = lock(&self.device_slots)
            .allocate_id()
            .map_err(|_| VmError::OutOfSlots { max })?;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller keeps the host range mapped while the slot exists.
        if let Err(e) = unsafe { self.fd.set_user_memory_region(r) } {
            let _ = lock(&self.device_slots).free_id(slot);
            return Err(VmError::Kvm {
                what: "SET_USER_MEMORY_REGION (device memory)",
                source: e,
            });
        }
        Ok(slot)
    }

    fn unmap_memory(&self, slot: u32) -> Result<(), VmError> {
        let r = kvm_userspace_memory_region {
            slot,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.fd.set_user_memory_region(r) }
            .map_err(kvm_err("SET_USER_MEMORY_REGION (delete)"))?;
        let _ = lock(&self.device_slots).free_id(slot);
        Ok(())
    }

    fn allocate_msi_gsi(&self) -> Result<u32, VmError> {
        lock(&self.routes).allocate()
    }

    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), VmError> {
        let mut routes = lock(&self.routes);
        routes.set_msi(gsi, msg);
        self.fd
            .set_gsi_routing(&routes.kvm_table()?)
            .map_err(kvm_err("SET_GSI_ROUTING"))
    }

    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        Vm::register_irqfd(self, evt, gsi)
    }

    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .unregister_irqfd(evt, gsi)
            .map_err(kvm_err("IRQFD (deassign)"))
    }

    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err("IOEVENTFD"))
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), VmError> {
        self.fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err("IOEVENTFD (deassign)"))
    }

    fn register_irqfd_resample(
        &self,
        evt: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_irqfd_with_resample(evt, resample, gsi)
            .map_err(kvm_err("IRQFD (resample)"))
    }
}
