//! A fake VFIO device for tests on hosts without VFIO: a ConnectX-like virtual
//! function whose BAR 0 is a memfd (so it can be mapped into a real KVM guest), with
//! an MSI-X capability, INTx, and a log of everything the VMM asked of it. Its
//! "firmware" ([`FakeVfio::start_responder`]) answers a doorbell in BAR 0 by writing
//! a response and raising MSI-X vector 0, as a real HCA raises a completion event.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::lock;
use devices::pci::regs;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{
    DmaDomain, Mapping, RegionInfo, VfioBackend, CONFIG_REGION, INTX_IRQ, MSIX_IRQ,
};

/// Vendor ID the fake reports (Mellanox).
pub const VENDOR: u16 = 0x15b3;
/// Device ID the fake reports (ConnectX-6 virtual function).
pub const DEVICE: u16 = 0x101c;
/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x1_0000;
/// Doorbell register in BAR 0: the guest writes N here...
pub const DOORBELL: u64 = 0x0;
/// ...and the firmware writes N + 1 here, then raises MSI-X vector 0.
pub const RESPONSE: u64 = 0x4;
/// MSI-X table offset in BAR 0.
pub const MSIX_TABLE: u64 = 0x2000;
/// MSI-X PBA offset in BAR 0.
pub const MSIX_PBA: u64 = 0x3000;
/// MSI-X vectors.
pub const MSIX_VECTORS: u16 = 4;
/// Config-space offset of the MSI-X capability.
pub const MSIX_CAP: usize = 0x40;

/// What the VMM did to the fake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeLog {
    /// Region reads that went through the VMM (trapped accesses): (region, offset, len).
    pub reads: Vec<(u32, u64, usize)>,
    /// Region writes that went through the VMM: (region, offset, bytes).
    pub writes: Vec<(u32, u64, Vec<u8>)>,
    /// mmaps of BAR areas: (region, offset, len).
    pub maps: Vec<(u32, u64, u64)>,
    /// SET_IRQS: (irq index, number of eventfds; 0 = disabled).
    pub irqs: Vec<(u32, usize)>,
    /// Function-level resets.
    pub resets: usize,
}

/// Options of the fake: which BAR layout and what VFIO reports about mapping it.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// BAR 0 is a 64-bit BAR (else 32-bit).
    pub bar0_64bit: bool,
    /// VFIO lets the BAR be mmap'd.
    pub mappable: bool,
    /// VFIO's sparse-mmap capability for BAR 0 (None: all of it mappable).
    pub sparse: Option<Vec<(u64, u64)>>,
    /// An MSI capability at 0x50, first in the list (before MSI-X).
    pub msi_cap: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            bar0_64bit: false,
            mappable: true,
            sparse: None,
            msi_cap: false,
        }
    }
}

#[derive(Default)]
struct Irqs {
    msix: Vec<EventFd>,
    intx: Option<EventFd>,
    intx_unmask: Option<EventFd>,
}

/// The fake device.
pub struct FakeVfio {
    options: FakeOptions,
    config: Mutex<[u8; 256]>,
    bar0: File,
    irqs: Mutex<Irqs>,
    log: Mutex<FakeLog>,
}

impl FakeVfio {
    /// A fake ConnectX VF with 4 MSI-X vectors in BAR 0 at 0x2000 (PBA 0x3000).
    pub fn new(options: FakeOptions) -> io::Result<Self> {
        let bar0 = crate::host::memfd(c"fake-vfio-bar0")?;
        bar0.set_len(BAR0_SIZE)?;
        let mut c = [0u8; 256];
        let put = |c: &mut [u8; 256], at: usize, v: u32| {
            c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        put(
            &mut c,
            regs::ID,
            u32::from(DEVICE) << 16 | u32::from(VENDOR),
        );
        put(
            &mut c,
            regs::COMMAND,
            u32::from(regs::STATUS_CAP_LIST) << 16,
        );
        // Class 02 (network), subclass 07 (InfiniBand).
        put(&mut c, regs::CLASS, 0x0207_0000);
        put(
            &mut c,
            regs::BAR0,
            if options.bar0_64bit { 0b1100 } else { 0 },
        );
        put(&mut c, regs::CAP_PTR, MSIX_CAP as u32);
        put(&mut c, regs::INTERRUPT, 0x0100); // INTA
        put(
            &mut c,
            MSIX_CAP,
            u32::from(MSIX_VECTORS - 1) << 16 | u32::from(regs::CAP_MSIX),
        );
        put(&mut c, MSIX_CAP + 4, MSIX_TABLE as u32);
        put(&mut c, MSIX_CAP + 8, MSIX_PBA as u32);
        if options.msi_cap {
            // MSI, 64-bit, 1 vector, pointing on to MSI-X.
            put(&mut c, 0x50, 0x0080 << 16 | (MSIX_CAP as u32) << 8 | 0x05);
            put(&mut c, regs::CAP_PTR, 0x50);
        }
        Ok(Self {
            options,
            config: Mutex::new(c),
            bar0,
            irqs: Mutex::new(Irqs::default()),
            log: Mutex::new(FakeLog::default()),
        })
    }

    /// What the VMM has done to the device so far.
    pub fn log(&self) -> FakeLog {
        lock(&self.log).clone()
    }

    /// Raises MSI-X vector `v` as the device would; false if MSI-X is not enabled.
    pub fn raise_msix(&self, v: usize) -> bool {
        lock(&self.irqs)
            .msix
            .get(v)
            .is_some_and(|e| e.write(1).is_ok())
    }

    /// Raises INTx; false if INTx is not enabled.
    pub fn raise_intx(&self) -> bool {
        lock(&self.irqs)
            .intx
            .as_ref()
            .is_some_and(|e| e.write(1).is_ok())
    }

    /// The eventfd KVM writes when the guest acknowledges INTx (for tests).
    pub fn intx_unmask_fd(&self) -> Option<EventFd> {
        lock(&self.irqs)
            .intx_unmask
            .as_ref()
            .and_then(|e| e.try_clone().ok())
    }

    /// Reads a dword of BAR 0's memory directly (as the device sees it).
    pub fn bar0_read(&self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        let _ = self.bar0.read_exact_at(&mut d, offset);
        u32::from_le_bytes(d)
    }

    /// Writes a dword of BAR 0's memory directly.
    pub fn bar0_write(&self, offset: u64, value: u32) {
        let _ = self.bar0.write_all_at(&value.to_le_bytes(), offset);
    }

    /// Starts the device's "firmware": a thread that polls the doorbell and, for each
    /// new nonzero value N, writes N + 1 to the response register and raises MSI-X
    /// vector 0. Stops when the returned guard drops.
    pub fn start_responder(self: &Arc<Self>) -> Responder {
        let stop = Arc::new(AtomicBool::new(false));
        let (dev, flag) = (self.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("fake-vfio".into())
            .spawn(move || {
                let mut last = 0;
                while !flag.load(Ordering::Relaxed) {
                    let n = dev.bar0_read(DOORBELL);
                    if n != 0 && n != last {
                        last = n;
                        dev.bar0_write(RESPONSE, n.wrapping_add(1));
                        dev.raise_msix(0);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
            .ok();
        Responder { stop, thread }
    }
}

/// The running firmware thread of a [`FakeVfio`]; stopped and joined on drop.
pub struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VfioBackend for FakeVfio {
    fn name(&self) -> String {
        "fake 0000:00:00.0".into()
    }

    fn region(&self, index: u32) -> RegionInfo {
        match index {
            0 => RegionInfo {
                size: BAR0_SIZE,
                mappable: self.options.mappable,
                sparse: self.options.sparse.clone(),
            },
            CONFIG_REGION => RegionInfo {
                size: 256,
                mappable: false,
                sparse: None,
            },
            _ => RegionInfo::default(),
        }
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        match index {
            CONFIG_REGION => {
                let c = lock(&self.config);
                let at = offset as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = c.get(at + i).copied().unwrap_or(0xff);
                }
            }
            0 => {
                lock(&self.log).reads.push((index, offset, data.len()));
                let _ = self.bar0.read_exact_at(data, offset);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        match index {
            CONFIG_REGION => {
                let mut c = lock(&self.config);
                // Only the command register is writable in this fake.
                for (i, &b) in data.iter().enumerate() {
                    let at = offset as usize + i;
                    if at == regs::COMMAND || at == regs::COMMAND + 1 {
                        c[at] = b;
                    }
                }
            }
            0 => {
                lock(&self.log).writes.push((index, offset, data.to_vec()));
                let _ = self.bar0.write_all_at(data, offset);
            }
            _ => {}
        }
    }

    fn map(&self, index: u32, offset: u64, len: u64) -> io::Result<Mapping> {
        if index != 0 || offset + len > BAR0_SIZE || !self.options.mappable {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        lock(&self.log).maps.push((index, offset, len));
        Mapping::new(&self.bar0, offset, len)
    }

    fn irq_count(&self, index: u32) -> u32 {
        match index {
            INTX_IRQ => 1,
            MSIX_IRQ => u32::from(MSIX_VECTORS),
            _ => 0,
        }
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let clones = fds
            .iter()
            .map(|e| e.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let mut irqs = lock(&self.irqs);
        match index {
            MSIX_IRQ if clones.len() <= usize::from(MSIX_VECTORS) => {
                if irqs.intx.is_some() {
                    return Err(io::Error::other("INTx still enabled"));
                }
                irqs.msix = clones;
            }
            INTX_IRQ if clones.len() == 1 => {
                if !irqs.msix.is_empty() {
                    return Err(io::Error::other("MSI-X still enabled"));
                }
                irqs.intx = clones.into_iter().next();
            }
            _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
        lock(&self.log).irqs.push((index, fds.len()));
        Ok(())
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        let mut irqs = lock(&self.irqs);
        match index {
            MSIX_IRQ => irqs.msix.clear(),
            INTX_IRQ => {
                irqs.intx = None;
                irqs.intx_unmask = None;
            }
            _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
        lock(&self.log).irqs.push((index, 0));
        Ok(())
    }

    fn set_intx_unmask(&self, fd: &EventFd) -> io::Result<()> {
        lock(&self.irqs).intx_unmask = Some(fd.try_clone()?);
        Ok(())
    }

    fn reset(&self) {
        lock(&self.log).resets += 1;
    }
}

/// A fake IOMMU domain that records what was mapped: (IOVA, length) per call.
#[derive(Default)]
pub struct FakeDma {
    /// Mapped ranges, in order.
    pub mapped: Mutex<Vec<(u64, u64)>>,
}

impl DmaDomain for FakeDma {
    fn map_guest_memory(&self, mem: &GuestMemoryMmap) -> io::Result<()> {
        let mut m = lock(&self.mapped);
        for r in mem.iter() {
            m.push((r.start_addr().0, r.len()));
        }
        Ok(())
    }

    fn unmap_guest_memory(&self, mem: &GuestMemoryMmap) -> io::Result<()> {
        let mut m = lock(&self.mapped);
        for r in mem.iter() {
            m.retain(|&(iova, _)| iova != r.start_addr().0);
        }
        Ok(())
    }
}

/// What a [`FakeVm`] was asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeVmState {
    /// Live memory slots: slot -> (guest address, length).
    pub slots: std::collections::BTreeMap<u32, (u64, u64)>,
    /// MSI routes: GSI -> (address, data).
    pub routes: std::collections::BTreeMap<u32, (u64, u32)>,
    /// GSIs with a registered irqfd.
    pub irqfds: std::collections::BTreeSet<u32>,
    /// GSIs with a level-triggered (resample) irqfd.
    pub level_irqfds: std::collections::BTreeSet<u32>,
    /// MMIO addresses with a registered ioeventfd.
    pub ioevents: std::collections::BTreeSet<u64>,
}

/// A VM that records slots, routes and irqfds instead of calling KVM.
#[derive(Default)]
pub struct FakeVm {
    state: Mutex<FakeVmState>,
    next_slot: Mutex<u32>,
    next_gsi: Mutex<u32>,
    slot_limit: Option<usize>,
}

impl FakeVm {
    /// A VM that refuses memory slots beyond `n` live ones, as KVM does when its
    /// slots run out.
    pub fn with_slot_limit(n: usize) -> Self {
        Self {
            slot_limit: Some(n),
            ..Default::default()
        }
    }

    /// A copy of what has been recorded.
    pub fn state(&self) -> FakeVmState {
        lock(&self.state).clone()
    }
}

impl crate::vstate::DeviceVm for FakeVm {
    unsafe fn map_memory(
        &self,
        gpa: u64,
        _host: *mut u8,
        len: u64,
    ) -> Result<u32, crate::vstate::VmError> {
        let mut state = lock(&self.state);
        if let Some(max) = self.slot_limit.filter(|&m| state.slots.len() >= m) {
            return Err(crate::vstate::VmError::OutOfSlots { max });
        }
        let mut n = lock(&self.next_slot);
        *n += 1;
        state.slots.insert(*n, (gpa, len));
        Ok(*n)
    }

    fn unmap_memory(&self, slot: u32) -> Result<(), crate::vstate::VmError> {
        lock(&self.state).slots.remove(&slot);
        Ok(())
    }

    fn allocate_msi_gsi(&self) -> Result<u32, crate::vstate::VmError> {
        let mut n = lock(&self.next_gsi);
        *n += 1;
        Ok(23 + *n)
    }

    fn set_msi_route(
        &self,
        gsi: u32,
        msg: devices::pci::msix::MsiMessage,
    ) -> Result<(), crate::vstate::VmError> {
        lock(&self.state).routes.insert(gsi, (msg.addr, msg.data));
        Ok(())
    }

    fn register_irqfd(&self, _evt: &EventFd, gsi: u32) -> Result<(), crate::vstate::VmError> {
        lock(&self.state).irqfds.insert(gsi);
        Ok(())
    }

    fn unregister_irqfd(&self, _evt: &EventFd, gsi: u32) -> Result<(), crate::vstate::VmError> {
        let mut s = lock(&self.state);
        s.irqfds.remove(&gsi);
        s.level_irqfds.remove(&gsi);
        Ok(())
    }

    fn register_ioevent(&self, _evt: &EventFd, addr: u64) -> Result<(), crate::vstate::VmError> {
        lock(&self.state).ioevents.insert(addr);
        Ok(())
    }

    fn unregister_ioevent(&self, _evt: &EventFd, addr: u64) -> Result<(), crate::vstate::VmError> {
        lock(&self.state).ioevents.remove(&addr);
        Ok(())
    }

    fn register_irqfd_resample(
        &self,
        _evt: &EventFd,
        _resample: &EventFd,
        gsi: u32,
    ) -> Result<(), crate::vstate::VmError> {
        lock(&self.state).level_irqfds.insert(gsi);
        Ok(())
    }
}
