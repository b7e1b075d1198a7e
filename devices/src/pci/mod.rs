//! PCI: the root complex the guest enumerates (configuration mechanism #1 on ports
//! 0xcf8/0xcfc and ECAM), its host bridge, and the MSI-X table model shared by
//! device models.

pub mod host_bridge;
pub mod msix;
pub mod root;

pub use host_bridge::HostBridge;
pub use msix::MsixTable;
pub use root::{PciConfigIo, PciEcam, PciMmioWindow, PciRoot};

/// Config-space registers every function has (byte offsets).
pub mod regs {
    /// Vendor ID (16 bits), device ID (16 bits).
    pub const ID: usize = 0x00;
    /// Command (16 bits), status (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Revision, programming interface, subclass, class.
    pub const CLASS: usize = 0x08;
    /// Cache line, latency timer, header type, BIST.
    pub const HEADER: usize = 0x0c;
    /// First of the six base address registers.
    pub const BAR0: usize = 0x10;
    /// Expansion ROM base address (type 0 header).
    pub const ROM: usize = 0x30;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line (8 bits), interrupt pin (8 bits).
    pub const INTERRUPT: usize = 0x3c;
    /// Command register: memory space decode.
    pub const CMD_MEMORY: u16 = 1 << 1;
    /// Command register: bus master.
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    /// Command register: INTx disable.
    pub const CMD_INTX_DISABLE: u16 = 1 << 10;
    /// Status register: capabilities list present.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Capability ID of MSI.
    pub const CAP_MSI: u8 = 0x05;
    /// Capability ID of MSI-X.
    pub const CAP_MSIX: u8 = 0x11;
    /// Size of the type 0 configuration space of a conventional function.
    pub const CONFIG_SIZE: usize = 256;
    /// Size of a PCI Express function's configuration space.
    pub const CONFIG_SIZE_EXPRESS: usize = 4096;
}

/// A memory BAR as the guest has programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRange {
    /// BAR index (0-5).
    pub index: usize,
    /// Guest-physical base address.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// A PCI function on the root bus, as the root complex sees it.
pub trait PciDevice: Send {
    /// Reads the config-space dword at byte offset `reg` (a multiple of 4).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte offset `reg + offset` of config space,
    /// `reg` a multiple of 4 and `offset + data.len() <= 4`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
    /// Memory BARs whose accesses the VMM traps (those not mapped straight into the
    /// guest, or only partly), at their current guest addresses.
    fn trapped_bars(&self) -> Vec<BarRange>;
    /// Guest read at `offset` into memory BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Guest write at `offset` into memory BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// Reads `data.len()` bytes at byte `offset` of a little-endian dword.
pub fn dword_bytes(dword: u32, offset: usize, data: &mut [u8]) {
    let bytes = dword.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(offset + i).copied().unwrap_or(0xff);
    }
}

/// Merges `data` written at byte `offset` into `dword`.
pub fn merge_bytes(dword: u32, offset: usize, data: &[u8]) -> u32 {
    let mut bytes = dword.to_le_bytes();
    for (i, &b) in data.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(offset + i) {
            *slot = b;
        }
    }
    u32::from_le_bytes(bytes)
}
