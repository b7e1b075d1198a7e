//! The host bridge at 00:00.0: what an OS expects to find first on bus 0.

use super::{regs, BarRange, PciDevice};

/// Vendor ID of the host bridge (Intel).
pub const VENDOR: u16 = 0x8086;
/// Device ID of the host bridge (a generic Intel host bridge ID, as other VMMs use).
pub const DEVICE: u16 = 0x0d57;

/// A host bridge with no BARs and no capabilities; writes are ignored.
#[derive(Default)]
pub struct HostBridge;

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        match reg {
            regs::ID => u32::from(DEVICE) << 16 | u32::from(VENDOR),
            // Class 06 (bridge), subclass 00 (host bridge).
            regs::CLASS => 0x0600_0000,
            // Header type 0, single function.
            _ => 0,
        }
    }

    fn config_write(&mut self, _reg: usize, _offset: usize, _data: &[u8]) {}

    fn trapped_bars(&self) -> Vec<BarRange> {
        Vec::new()
    }

    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
