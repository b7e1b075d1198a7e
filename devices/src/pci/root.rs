//! The PCI root complex: bus 0 with up to 32 single-function devices, reached through
//! configuration mechanism #1 (ports 0xcf8/0xcfc) and ECAM (memory-mapped config),
//! plus the dispatch of trapped BAR accesses in the MMIO windows.

use std::sync::{Arc, Mutex};

use super::{dword_bytes, regs, HostBridge, PciDevice};
use crate::bus::{lock, BusDevice};

/// Devices on bus 0.
pub const SLOTS: usize = 32;
/// Bytes of ECAM per bus (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Bus 0 and the devices on it.
pub struct PciRoot {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge)));
        Self { slots }
    }

    /// Puts `device` in the first free slot; returns its device number, or None when
    /// the bus is full.
    pub fn add(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Option<u8> {
        let free = self.slots.iter().position(Option::is_none)?;
        self.slots[free] = Some(device);
        Some(free as u8)
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }

    /// Config read of `data.len()` bytes at byte `offset` of a function's config space;
    /// all ones where there is no function.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, dev, func) {
            Some(d) if offset < regs::CONFIG_SIZE_EXPRESS => {
                let dword = lock(d).config_read(offset & !3);
                dword_bytes(dword, offset & 3, data);
            }
            _ => data.fill(0xff),
        }
    }

    /// Config write of `data` at byte `offset` of a function's config space.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &[u8]) {
        if let Some(d) = self.function(bus, dev, func) {
            let within = offset & 3;
            if offset < regs::CONFIG_SIZE_EXPRESS && within + data.len() <= 4 {
                lock(d).config_write(offset & !3, within, data);
            }
        }
    }

    /// Dispatches a trapped access at guest-physical `addr` to the BAR containing it;
    /// false when no device's trapped BAR does.
    fn bar_access(
        &self,
        addr: u64,
        access: &mut dyn FnMut(&mut dyn PciDevice, usize, u64),
    ) -> bool {
        for d in self.slots.iter().flatten() {
            let mut d = lock(d);
            let hit = d
                .trapped_bars()
                .into_iter()
                .find(|b| addr >= b.addr && addr - b.addr < b.size);
            if let Some(b) = hit {
                access(&mut *d, b.index, addr - b.addr);
                return true;
            }
        }
        false
    }
}

/// Configuration mechanism #1: the address register at 0xcf8 and the data window at
/// 0xcfc-0xcff, 8 ports from 0xcf8.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    /// The I/O-port face of `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    /// The address latched at 0xcf8 (for a checkpoint).
    pub fn address(&self) -> u32 {
        self.address
    }

    /// Latches `address` as a guest write to 0xcf8 would.
    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    /// (bus, device, function, register offset) selected by the address register, if
    /// its enable bit is set.
    fn target(&self, port_offset: u64) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        (a & 0x8000_0000 != 0).then(|| {
            (
                (a >> 16) as u8,
                ((a >> 11) & 0x1f) as u8,
                ((a >> 8) & 0x7) as u8,
                (a & 0xfc) as usize + (port_offset as usize - 4),
            )
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset) {
                Some((b, d, f, reg)) => lock(&self.root).config_read(b, d, f, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only dword accesses hit the address register (0xcf9 is the reset
            // control register on real chipsets, 0xcfb turbo/other).
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                if let Some((b, d, f, reg)) = self.target(offset) {
                    lock(&self.root).config_write(b, d, f, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: config space memory-mapped, 4 KiB per function, 1 MiB per bus.
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    /// The memory-mapped config face of `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }
}

fn ecam_target(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = ecam_target(offset);
        if (reg & 3) + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        lock(&self.root).config_read(b, d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = ecam_target(offset);
        lock(&self.root).config_write(b, d, f, reg, data);
    }
}

/// An MMIO window BARs are allocated in: trapped accesses go to the BAR holding them,
/// the rest read as all ones. (Mapped BAR areas are KVM memory slots and never exit.)
pub struct PciMmioWindow {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
}

impl PciMmioWindow {
    /// The window starting at guest-physical `base`.
    pub fn new(root: Arc<Mutex<PciRoot>>, base: u64) -> Self {
        Self { root, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        let root = lock(&self.root);
        if !root.bar_access(addr, &mut |d, bar, off| d.bar_read(bar, off, data)) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base + offset;
        lock(&self.root).bar_access(addr, &mut |d, bar, off| d.bar_write(bar, off, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{host_bridge, merge_bytes, BarRange};

    /// A function with one 4 KiB trapped BAR at 0xc000_0000 and a scratch register.
    #[derive(Default)]
    struct Probe {
        scratch: u32,
        bar_writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn config_read(&mut self, reg: usize) -> u32 {
            match reg {
                regs::ID => 0x1234_abcd,
                0x40 => self.scratch,
                _ => 0,
            }
        }
        fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
            if reg == 0x40 {
                self.scratch = merge_bytes(self.scratch, offset, data);
            }
        }
        fn trapped_bars(&self) -> Vec<BarRange> {
            vec![BarRange {
                index: 2,
                addr: 0xc000_0000,
                size: 0x1000,
            }]
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.bar_writes.push((bar, offset, data.to_vec()));
        }
    }

    fn root_with_probe() -> (Arc<Mutex<PciRoot>>, Arc<Mutex<Probe>>) {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let probe = Arc::new(Mutex::new(Probe::default()));
        assert_eq!(root.lock().unwrap().add(probe.clone()), Some(1));
        (root, probe)
    }

    fn cf8(io: &mut PciConfigIo, dev: u32, reg: u32) {
        io.write(0, &(0x8000_0000 | dev << 11 | reg).to_le_bytes());
    }

    #[test]
    fn mechanism_one_finds_the_host_bridge_and_the_device() {
        let (root, _) = root_with_probe();
        let mut io = PciConfigIo::new(root);
        let mut d = [0u8; 4];
        cf8(&mut io, 0, 0);
        io.read(4, &mut d);
        let bridge = u32::from(host_bridge::DEVICE) << 16 | u32::from(host_bridge::VENDOR);
        assert_eq!(u32::from_le_bytes(d), bridge);
        cf8(&mut io, 1, 0);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_abcd);
        // The upper half of the ID dword through port 0xcfe.
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1234);
        // Empty slots and other functions float high.
        cf8(&mut io, 7, 0);
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(0, &(0x8000_0000u32 | 1 << 11 | 1 << 8).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Without the enable bit nothing is selected.
        io.write(0, &(1u32 << 11).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn byte_writes_through_0xcfd_land_in_the_right_byte() {
        let (root, probe) = root_with_probe();
        let mut io = PciConfigIo::new(root);
        cf8(&mut io, 1, 0x40);
        io.write(4, &0x1122_3344u32.to_le_bytes());
        io.write(5, &[0xaa]);
        assert_eq!(probe.lock().unwrap().scratch, 0x1122_aa44);
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0840);
    }

    #[test]
    fn ecam_reaches_the_same_config_space() {
        let (root, probe) = root_with_probe();
        let mut ecam = PciEcam::new(root);
        let mut d = [0u8; 4];
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_abcd);
        ecam.write((1 << 15) + 0x42, &[0x55, 0x66]);
        assert_eq!(probe.lock().unwrap().scratch, 0x6655_0000);
        // Bus 1 does not exist.
        ecam.read(1 << 20, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn trapped_bar_accesses_reach_the_device_with_their_offset() {
        let (root, probe) = root_with_probe();
        let mut window = PciMmioWindow::new(root, 0xc000_0000);
        let mut d = [0u8; 4];
        window.read(0x10, &mut d);
        assert_eq!(d, [0x10; 4]);
        window.write(0xffc, &[1, 2, 3, 4]);
        window.write(0x1000, &[9]);
        window.read(0x1000, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(
            probe.lock().unwrap().bar_writes,
            vec![(2, 0xffc, vec![1, 2, 3, 4])]
        );
    }
}
