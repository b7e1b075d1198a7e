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

    /// BAR types from config space, sizes from VFIO (never by writing the device's
    /// BARs), guest addresses from the allocator.
    fn probe_bars(&mut self, alloc: &mut dyn BarAllocator) {
        let mut i = 0;
        while i < 6 {
            let raw = self.config_dword(regs::BAR0 + 4 * i);
            let size = self.backend.region(i as u32).size;
            let kind = if raw & 1 == 1 {
                BarKind::Io
            } else if raw & 0b110 == 0b100 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            let next = if kind == BarKind::Mem64 { i + 2 } else { i + 1 };
            if size != 0 && size.is_power_of_two() && kind != BarKind::Io {
                let size = size.max(PAGE);
                if let Some(addr) = alloc.allocate(size, kind == BarKind::Mem64) {
                    self.bars[i] = Some(Bar {
                        kind,
                        flags: raw & 0xf,
                        size,
                        addr,
                        sizing: [false; 2],
                        mapped: Vec::new(),
                    });
                }
            }
            // I/O BARs (rare on HPC devices) are not passed through: the guest sees
            // them unimplemented (reads 0).
            i = next;
        }
    }

    /// Finds the MSI-X capability and allocates a GSI and eventfd per vector.
    fn probe_msix(&mut self) -> Result<(), PassthroughError> {
        let Some(cap) = self.find_capability(regs::CAP_MSIX) else {
            return Ok(());
        };
        let bad = |why: &str| PassthroughError::BadMsix {
            device: self.name.clone(),
            why: why.into(),
        };
        let control = (self.config_dword(cap) >> 16) as u16;
        let table = self.config_dword(cap + 4);
        let pba = self.config_dword(cap + 8);
        let vectors = usize::from(control & 0x7ff) + 1;
        let (table_bar, pba_bar) = ((table & 7) as usize, (pba & 7) as usize);
        let table_offset = u64::from(table & !7);
        let pba_offset = u64::from(pba & !7);
        let msix_table = MsixTable::new(vectors);
        for (bar, off, len) in [
            (table_bar, table_offset, msix_table.table_size()),
            (pba_bar, pba_offset, msix_table.pba_size()),
        ] {
            match self.bars.get(bar).and_then(Option::as_ref) {
                Some(b) if off + len <= b.size => {}
                _ => return Err(bad(&format!("table or PBA outside BAR {bar}"))),
            }
        }
        let mut v = Vec::with_capacity(vectors);
        for _ in 0..vectors {
            let evt = self.eventfd()?;
            let gsi = self.vm.allocate_msi_gsi().map_err(self.vm_err())?;
            v.push(MsixVector::from_parts(gsi, evt));
        }
        self.msix = Some(Msix {
            cap,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
            table: msix_table,
            vectors: v,
            vfio_enabled: false,
        });
        Ok(())
    }

    /// The capability list as (offset, id), in list order; bounded, so a looping
    /// list cannot hang us.
    fn capabilities(&self) -> Vec<(usize, u8)> {
        let mut caps = Vec::new();
        let status = (self.config_dword(regs::COMMAND) >> 16) as u16;
        if status & regs::STATUS_CAP_LIST == 0 {
            return caps;
        }
        let mut ptr = (self.config_dword(regs::CAP_PTR) & 0xfc) as usize;
        while (0x40..regs::CONFIG_SIZE).contains(&ptr) && caps.len() < 48 {
            let head = self.config_dword(ptr);
            caps.push((ptr, head as u8));
            ptr = ((head >> 8) & 0xfc) as usize;
        }
        caps
    }

    fn find_capability(&self, id: u8) -> Option<usize> {
        self.capabilities()
            .into_iter()
            .find_map(|(at, cap)| (cap == id).then_some(at))
    }

    /// Unlinks MSI from the list the guest walks: hpcvm routes MSI-X and INTx, and a
    /// driver falling back to MSI would enable it in config space only, where vfio-pci
    /// does not turn it on, and wait for interrupts that never come.
    fn hide_msi(&mut self) {
        let caps = self.capabilities();
        let visible: Vec<usize> = caps
            .iter()
            .filter(|(_, id)| *id != regs::CAP_MSI)
            .map(|(at, _)| *at)
            .collect();
        if visible.len() == caps.len() {
            return;
        }
        let mut links = vec![(regs::CAP_PTR, visible.first().copied().unwrap_or(0) as u8)];
        for (i, &at) in visible.iter().enumerate() {
            links.push((at, visible.get(i + 1).copied().unwrap_or(0) as u8));
        }
        self.cap_links = links;
    }

    /// INTx: the device's line signals `evt`; KVM asserts `gsi` (level) and writes
    /// `resample` at the guest's EOI, which VFIO turns into an unmask of the line.
    fn setup_intx(&mut self, gsi: Option<u32>) -> Result<(), PassthroughError> {
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

    fn enable_intx(&mut self) {
        if let Some(intx) = &mut self.intx {
            if !intx.enabled
                && self.backend.enable_irq(INTX_IRQ, &[&intx.evt]).is_ok()
                && self.backend.set_intx_unmask(&intx.resample).is_ok()
            {
                intx.enabled = true;
            }
        }
    }

    fn disable_intx(&mut self) {
        if let Some(intx) = &mut self.intx {
            if intx.enabled {
                let _ = self.backend.disable_irq(INTX_IRQ);
                intx.enabled = false;
            }
        }
    }

    /// Page-aligned ranges of BAR `i` that must stay trapped: the MSI-X table and PBA.
    fn trapped_pages(&self, i: usize) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        if let Some(m) = &self.msix {
            if m.table_bar == i {
                v.push(page_span(m.table_offset, m.table.table_size()));
            }
            if m.pba_bar == i {
                v.push(page_span(m.pba_offset, m.table.pba_size()));
            }
        }
        v
    }

    /// mmaps the mappable parts of BAR `i` (all of it but the MSI-X pages, within
    /// the sparse areas VFIO allows) and gives them to the guest as memory slots.
    fn map_bar(&mut self, i: usize) -> Result<(), PassthroughError> {
        if self.bars[i].is_none() {
            return Ok(());
        }
        let info = self.backend.region(i as u32);
        if !info.mappable || info.size < PAGE {
            return Ok(());
        }
        let allowed = info.sparse.clone().unwrap_or(vec![(0, info.size)]);
        let areas = subtract(&allowed, &self.trapped_pages(i));
        let mut mapped = Vec::new();
        for (offset, len) in areas {
            let mapping = self.backend.map(i as u32, offset, len).map_err(|source| {
                PassthroughError::Map {
                    device: self.name.clone(),
                    bar: i,
                    source,
                }
            })?;
            mapped.push(MappedArea {
                offset,
                mapping,
                slot: None,
            });
        }
        // Kept in the BAR before any slot exists, so that a failure part way leaves
        // every slot made so far where release() (on drop) removes it.
        let vm = self.vm.clone();
        let Some(bar) = &mut self.bars[i] else {
            return Ok(());
        };
        bar.mapped = mapped;
        for area in &mut bar.mapped {
            area.map(vm.as_ref(), bar.addr)
                .map_err(|source| PassthroughError::Vm {
                    device: self.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Moves BAR `i`'s memory slots to its new guest address.
    fn remap_bar(&mut self, i: usize) {
        let vm = self.vm.clone();
        let Some(bar) = &mut self.bars[i] else {
            return;
        };
        for area in &mut bar.mapped {
            area.unmap(vm.as_ref());
            // A slot KVM refuses here leaves that part of the BAR trapped.
            let _ = area.map(vm.as_ref(), bar.addr);
        }
    }

    /// The emulated value of BAR register `i` (0-5).
    fn bar_register(&self, i: usize) -> u32 {
        // The high half of a 64-bit BAR lives in register i + 1.
        if i > 0 {
            if let Some(b) = &self.bars[i - 1] {
                if b.kind == BarKind::Mem64 {
                    return if b.sizing[1] {
                        (!(b.size - 1) >> 32) as u32
                    } else {
                        (b.addr >> 32) as u32
                    };
                }
            }
        }
        match &self.bars[i] {
            Some(b) if b.sizing[0] => (!(b.size - 1) as u32 & !0xf) | b.flags,
            Some(b) => (b.addr as u32 & !0xf) | b.flags,
            None => 0,
        }
    }

    fn write_bar_register(&mut self, i: usize, value: u32) {
        let (bar_index, high) = match (i > 0).then(|| &self.bars[i - 1]) {
            Some(Some(b)) if b.kind == BarKind::Mem64 => (i - 1, true),
            _ => (i, false),
        };
        let Some(bar) = &mut self.bars[bar_index] else {
            return;
        };
        let old = bar.addr;
        if value == u32::MAX {
            bar.sizing[usize::from(high)] = true;
            return;
        }
        bar.sizing[usize::from(high)] = false;
        let mask = !(bar.size - 1);
        bar.addr = if high {
            (u64::from(value) << 32 | (bar.addr & 0xffff_ffff)) & mask
        } else {
            (bar.addr & !0xffff_ffff | u64::from(value & !0xf)) & mask
        };
        if bar.addr != old {
            self.remap_bar(bar_index);
        }
    }

    /// MSI-X message control written: enable/disable in VFIO, (un)route vectors.
    fn msix_control_changed(&mut self) {
        let Some(m) = &self.msix else {
            return;
        };
        let enabled = m.table.enabled();
        let vfio_enabled = m.vfio_enabled;
        if enabled && !vfio_enabled {
            // VFIO takes one interrupt type at a time.
            self.disable_intx();
            let m = self.msix.as_mut().expect("checked above");
            let fds: Vec<&EventFd> = m.vectors.iter().map(|v| &v.evt).collect();
            m.vfio_enabled = self.backend.enable_irq(MSIX_IRQ, &fds).is_ok();
        } else if !enabled && vfio_enabled {
            let _ = self.backend.disable_irq(MSIX_IRQ);
            if let Some(m) = self.msix.as_mut() {
                m.vfio_enabled = false;
            }
        }
        let n = self.msix.as_ref().map_or(0, |m| m.vectors.len());
        for v in 0..n {
            self.update_vector(v);
        }
        if !enabled {
            self.enable_intx();
        }
    }

    /// Routes vector `v` when MSI-X is on and the vector unmasked; unroutes it
    /// otherwise. A masked vector's interrupts wait in its eventfd and are delivered
    /// when it is unmasked (KVM injects at once if the eventfd is already signalled).
    fn update_vector(&mut self, v: usize) {
        let Some(m) = &mut self.msix else {
            return;
        };
        if let Some(vec) = m.vectors.get_mut(v) {
            vec.update(self.vm.as_ref(), &m.table, v);
        }
    }

    /// The MSI-X table/PBA access at `offset` of BAR `bar`, if it is one.
    fn msix_access(&self, bar: usize, offset: u64) -> Option<MsixRegion> {
        let m = self.msix.as_ref()?;
        if bar == m.table_bar
            && offset >= m.table_offset
            && offset - m.table_offset < m.table.table_size()
        {
            return Some(MsixRegion::Table(offset - m.table_offset));
        }
        if bar == m.pba_bar && offset >= m.pba_offset && offset - m.pba_offset < m.table.pba_size()
        {
            return Some(MsixRegion::Pba(offset - m.pba_offset));
        }
        None
    }

    /// The guest-visible MSI-X vectors' GSIs (for tests and status).
    pub fn msix_gsis(&self) -> Vec<u32> {
        self.msix
            .as_ref()
            .map(|m| m.vectors.iter().map(|v| v.gsi).collect())
            .unwrap_or_default()
    }

    /// Guest addresses of the memory BARs, (index, address, size).
    pub fn bars(&self) -> Vec<BarRange> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(index, b)| {
                b.as_ref().map(|b| BarRange {
                    index,
                    addr: b.addr,
                    size: b.size,
                })
            })
            .collect()
    }
}

enum MsixRegion {
    Table(u64),
    Pba(u64),
}

/// The page-aligned span covering `offset..offset+len`.
fn page_span(offset: u64, len: u64) -> (u64, u64) {
    let start = offset & !(PAGE - 1);
    let end = (offset + len).div_ceil(PAGE) * PAGE;
    (start, end - start)
}

/// `areas` minus `holes`, both as (offset, len) lists; results page-aligned and
/// non-empty.
fn subtract(areas: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(start, len) in areas {
        let mut pieces = vec![(start, start + len)];
        for &(h_start, h_len) in holes {
            let h_end = h_start + h_len;
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if h_end <= s || h_start >= e {
                        vec![(s, e)]
                    } else {
                        vec![(s, h_start.max(s)), (h_end.min(e), e)]
                    }
                })
                .filter(|(s, e)| e > s)
                .collect();
        }
        for (s, e) in pieces {
            let s = s.div_ceil(PAGE) * PAGE;
            let e = e & !(PAGE - 1);
            if e > s {
                out.push((s, e - s));
            }
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::fake::{FakeOptions, FakeVfio, FakeVm, MSIX_CAP, MSIX_TABLE};

    /// Places BARs from 0xc000_0000 (or 0x40_0000_0000 when high), naturally aligned.
    struct Bump(u64, u64);
    impl BarAllocator for Bump {
        fn allocate(&mut self, size: u64, high: bool) -> Option<u64> {
            let next = if high { &mut self.1 } else { &mut self.0 };
            let at = next.div_ceil(size) * size;
            *next = at + size;
            Some(at)
        }
    }

    fn build(options: FakeOptions) -> (VfioPciDevice, Arc<FakeVfio>, Arc<FakeVm>) {
        let fake = Arc::new(FakeVfio::new(options).unwrap());
        let vm = Arc::new(FakeVm::default());
        let mut alloc = Bump(0xc000_0000, 0x40_0000_0000);
        let dev = VfioPciDevice::new(fake.clone(), vm.clone(), &mut alloc, Some(16)).unwrap();
        (dev, fake, vm)
    }

    fn write32(dev: &mut VfioPciDevice, reg: usize, v: u32) {
        dev.config_write(reg, 0, &v.to_le_bytes());
    }

    fn enable_msix(dev: &mut VfioPciDevice) {
        dev.config_write(MSIX_CAP, 2, &0x8000u16.to_le_bytes());
    }

    fn program_vector(dev: &mut VfioPciDevice, v: u64, data: u32, masked: bool) {
        let at = MSIX_TABLE + 16 * v;
        dev.bar_write(0, at, &0xfee0_0000u32.to_le_bytes());
        dev.bar_write(0, at + 4, &0u32.to_le_bytes());
        dev.bar_write(0, at + 8, &data.to_le_bytes());
        dev.bar_write(0, at + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn the_msix_bar_is_mapped_all_but_its_table_and_pba_pages() {
        let (dev, fake, vm) = build(FakeOptions::default());
        assert_eq!(fake.log().maps, vec![(0, 0, 0x2000), (0, 0x4000, 0xc000)]);
        let slots: Vec<_> = vm.state().slots.into_values().collect();
        assert_eq!(slots, vec![(0xc000_0000, 0x2000), (0xc000_4000, 0xc000)]);
        // The table and PBA pages are what stays trapped.
        assert_eq!(dev.trapped_bars()[0].addr, 0xc000_0000);
    }

    #[test]
    fn vfio_sparse_areas_are_honoured() {
        let (_, fake, _) = build(FakeOptions {
            sparse: Some(vec![(0, 0x1000), (0x8000, 0x8000)]),
            ..Default::default()
        });
        assert_eq!(fake.log().maps, vec![(0, 0, 0x1000), (0, 0x8000, 0x8000)]);
    }

    #[test]
    fn an_unmappable_bar_is_trapped_and_reaches_the_device() {
        let (mut dev, fake, vm) = build(FakeOptions {
            mappable: false,
            ..Default::default()
        });
        assert!(vm.state().slots.is_empty());
        dev.bar_write(0, 0x1000, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        dev.bar_read(0, 0x1000, &mut d);
        assert_eq!(d, [1, 2, 3, 4]);
        let log = fake.log();
        assert_eq!(log.writes, vec![(0, 0x1000, vec![1, 2, 3, 4])]);
        assert_eq!(log.reads, vec![(0, 0x1000, 4)]);
    }

    #[test]
    fn bar_sizing_and_relocation_follow_the_guest() {
        let (mut dev, _, vm) = build(FakeOptions::default());
        assert_eq!(dev.config_read(regs::BAR0), 0xc000_0000);
        write32(&mut dev, regs::BAR0, u32::MAX);
        assert_eq!(dev.config_read(regs::BAR0), 0xffff_0000);
        write32(&mut dev, regs::BAR0, 0xd000_0000);
        assert_eq!(dev.config_read(regs::BAR0), 0xd000_0000);
        let slots: Vec<_> = vm.state().slots.into_values().collect();
        assert_eq!(slots, vec![(0xd000_0000, 0x2000), (0xd000_4000, 0xc000)]);
        // BAR 1 of a 32-bit BAR 0 and the ROM are unimplemented.
        assert_eq!(dev.config_read(regs::BAR0 + 4), 0);
        write32(&mut dev, regs::ROM, u32::MAX);
        assert_eq!(dev.config_read(regs::ROM), 0);
    }

    #[test]
    fn a_64_bit_bar_sizes_and_moves_through_both_registers() {
        let (mut dev, _, vm) = build(FakeOptions {
            bar0_64bit: true,
            ..Default::default()
        });
        assert_eq!(dev.config_read(regs::BAR0), 0x0000_000c);
        assert_eq!(dev.config_read(regs::BAR0 + 4), 0x40);
        write32(&mut dev, regs::BAR0, u32::MAX);
        write32(&mut dev, regs::BAR0 + 4, u32::MAX);
        assert_eq!(dev.config_read(regs::BAR0), 0xffff_000c);
        assert_eq!(dev.config_read(regs::BAR0 + 4), u32::MAX);
        write32(&mut dev, regs::BAR0, 0x0001_0000);
        write32(&mut dev, regs::BAR0 + 4, 0x80);
        assert_eq!(dev.bars()[0].addr, 0x80_0001_0000);
        let first = vm.state().slots.into_values().next().unwrap();
        assert_eq!(first, (0x80_0001_0000, 0x2000));
    }

    #[test]
    fn msix_vectors_are_routed_in_the_kernel_once_enabled_and_unmasked() {
        let (mut dev, fake, vm) = build(FakeOptions::default());
        // INTx is the interrupt until MSI-X is enabled.
        assert_eq!(fake.log().irqs, vec![(INTX_IRQ, 1)]);
        assert_eq!(
            vm.state().level_irqfds.into_iter().collect::<Vec<_>>(),
            vec![16]
        );
        program_vector(&mut dev, 0, 0x40, false);
        program_vector(&mut dev, 1, 0x41, true);
        // Programming alone routes nothing: MSI-X is still off.
        assert!(vm.state().irqfds.is_empty());
        enable_msix(&mut dev);
        assert_eq!(
            fake.log().irqs,
            vec![(INTX_IRQ, 1), (INTX_IRQ, 0), (MSIX_IRQ, 4)]
        );
        let gsis = dev.msix_gsis();
        let s = vm.state();
        assert_eq!(s.irqfds.iter().copied().collect::<Vec<_>>(), vec![gsis[0]]);
        assert_eq!(s.routes[&gsis[0]], (0xfee0_0000, 0x40));
        // Unmasking vector 1 routes it; masking vector 0 unroutes it.
        dev.bar_write(0, MSIX_TABLE + 16 + 12, &0u32.to_le_bytes());
        dev.bar_write(0, MSIX_TABLE + 12, &1u32.to_le_bytes());
        let s = vm.state();
        assert_eq!(s.irqfds.iter().copied().collect::<Vec<_>>(), vec![gsis[1]]);
        assert_eq!(s.routes[&gsis[1]], (0xfee0_0000, 0x41));
        // The table is the VMM's: none of it reached the device.
        assert!(fake.log().writes.is_empty());
        // The guest reads back what it programmed, and message control shows enable.
        let mut d = [0u8; 4];
        dev.bar_read(0, MSIX_TABLE + 16 + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x41);
        assert_eq!(dev.config_read(MSIX_CAP) >> 16, 0x8003);
        // Disabling MSI-X unroutes everything and brings INTx back.
        dev.config_write(MSIX_CAP, 2, &0u16.to_le_bytes());
        assert!(vm.state().irqfds.is_empty());
        assert_eq!(fake.log().irqs[3..], [(MSIX_IRQ, 0), (INTX_IRQ, 1)]);
    }

    fn pba(dev: &mut VfioPciDevice) -> u64 {
        let mut q = [0u8; 8];
        dev.bar_read(0, crate::vfio::fake::MSIX_PBA, &mut q);
        u64::from_le_bytes(q)
    }

    #[test]
    fn the_pba_shows_what_a_masked_vector_holds_back() {
        let (mut dev, fake, _) = build(FakeOptions::default());
        program_vector(&mut dev, 0, 0x40, false);
        program_vector(&mut dev, 1, 0x41, true);
        enable_msix(&mut dev);
        assert_eq!(pba(&mut dev), 0);
        assert!(fake.raise_msix(0) && fake.raise_msix(1));
        // Vector 0 is routed (KVM takes it); vector 1 is masked and waits.
        assert_eq!(pba(&mut dev), 0b10);
        // Unmasked, it is routed and delivered: no longer pending.
        dev.bar_write(0, MSIX_TABLE + 16 + 12, &0u32.to_le_bytes());
        assert_eq!(pba(&mut dev), 0);
    }

    #[test]
    fn the_function_mask_holds_every_vector() {
        let (mut dev, _, vm) = build(FakeOptions::default());
        program_vector(&mut dev, 0, 0x40, false);
        dev.config_write(MSIX_CAP, 2, &0xc000u16.to_le_bytes());
        assert!(vm.state().irqfds.is_empty());
        enable_msix(&mut dev);
        assert_eq!(vm.state().irqfds.len(), 1);
    }

    #[test]
    fn the_interrupt_line_and_pin_describe_intx() {
        let (mut dev, _, _) = build(FakeOptions::default());
        assert_eq!(dev.config_read(regs::INTERRUPT) & 0xffff, 0x0110);
        dev.config_write(regs::INTERRUPT, 0, &[5]);
        assert_eq!(dev.config_read(regs::INTERRUPT) & 0xffff, 0x0105);
    }

    #[test]
    fn msi_is_unlinked_from_the_capability_list_the_guest_walks() {
        let (mut dev, _, _) = build(FakeOptions {
            msi_cap: true,
            ..Default::default()
        });
        // The device's list is 0x50 (MSI) -> 0x40 (MSI-X); the guest's is 0x40 alone.
        assert_eq!(dev.config_read(regs::CAP_PTR) & 0xff, 0x40);
        assert_eq!((dev.config_read(0x40) >> 8) & 0xff, 0);
        assert_eq!(dev.config_read(0x40) & 0xff, u32::from(regs::CAP_MSIX));
        // Without MSI nothing is rewritten.
        let (mut plain, _, _) = build(FakeOptions::default());
        assert_eq!(plain.config_read(regs::CAP_PTR) & 0xff, 0x40);
    }

    #[test]
    fn command_writes_reach_the_device() {
        let (mut dev, _, _) = build(FakeOptions::default());
        dev.config_write(regs::COMMAND, 0, &0x0006u16.to_le_bytes());
        assert_eq!(dev.config_read(regs::COMMAND) & 0xffff, 0x0006);
    }

    #[test]
    fn releasing_the_device_frees_slots_and_routes_and_resets_it_once() {
        let (mut dev, fake, vm) = build(FakeOptions::default());
        program_vector(&mut dev, 0, 0x40, false);
        enable_msix(&mut dev);
        dev.release();
        let s = vm.state();
        assert!(s.slots.is_empty() && s.irqfds.is_empty() && s.level_irqfds.is_empty());
        let log = fake.log();
        assert_eq!(log.resets, 1);
        assert_eq!(log.irqs.last(), Some(&(MSIX_IRQ, 0)));
        // Dropping after release does not reset the device twice.
        drop(dev);
        assert_eq!(fake.log().resets, 1);
    }

    #[test]
    fn a_slot_refused_part_way_leaves_no_slot_behind() {
        let fake = Arc::new(FakeVfio::new(FakeOptions::default()).unwrap());
        // BAR 0 needs two slots (either side of the MSI-X pages); allow one.
        let vm = Arc::new(FakeVm::with_slot_limit(1));
        let mut alloc = Bump(0xc000_0000, 0x40_0000_0000);
        let err = VfioPciDevice::new(fake.clone(), vm.clone(), &mut alloc, Some(16))
            .err()
            .expect("the second slot is refused");
        assert!(err.to_string().contains("Out of KVM memory slots"), "{err}");
        let s = vm.state();
        assert!(s.slots.is_empty() && s.level_irqfds.is_empty(), "{s:?}");
        assert_eq!(fake.log().resets, 1);
    }

    #[test]
    fn page_subtraction_keeps_whole_pages_only() {
        assert_eq!(
            subtract(
                &[(0, 0x10000)],
                &[page_span(0x2000, 0x40), page_span(0x3000, 8)]
            ),
            vec![(0, 0x2000), (0x4000, 0xc000)]
        );
        assert_eq!(subtract(&[(0x800, 0x1000)], &[]), Vec::<(u64, u64)>::new());
        assert_eq!(subtract(&[(0, 0x1000)], &[(0, 0x1000)]), vec![]);
    }
}
