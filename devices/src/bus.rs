//! The buses a vCPU exit is dispatched on: which device answers which x86 I/O port
//! ([`PioBus`]) or guest-physical MMIO address ([`MmioBus`]).

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device reachable through port I/O or MMIO exits.
pub trait BusDevice: Send {
    /// Guest read at `offset` bytes past the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write at `offset` bytes past the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("{space} range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// "I/O port" or "MMIO".
        space: &'static str,
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// An empty range, or one past the end of the address space.
    #[error("{space} range {base:#x}+{len:#x} is empty or runs past the end of the space")]
    BadRange {
        /// "I/O port" or "MMIO".
        space: &'static str,
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Maps address ranges to devices. Addresses with no device read as all ones and
/// swallow writes, like a bus with nothing plugged in.
pub struct Bus {
    space: &'static str,
    /// One past the last address (0 = the whole 64-bit space).
    end: u128,
    entries: Vec<Entry>, // sorted by base, non-overlapping
}

/// The x86 I/O port space, 0..=0xffff.
pub type PioBus = Bus;
/// The guest-physical MMIO space.
pub type MmioBus = Bus;

impl Bus {
    /// An empty port-I/O bus.
    pub fn pio() -> Self {
        Self {
            space: "I/O port",
            end: 0x1_0000,
            entries: Vec::new(),
        }
    }

    /// An empty MMIO bus.
    pub fn mmio() -> Self {
        Self {
            space: "MMIO",
            end: 1 << 64,
            entries: Vec::new(),
        }
    }

    /// Puts `device` on `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = u128::from(base) + u128::from(len);
        let space = self.space;
        if len == 0 || end > self.end {
            return Err(BusError::BadRange { space, base, len });
        }
        let overlaps = self.entries.iter().any(|e| {
            u128::from(base) < u128::from(e.base) + u128::from(e.len) && u128::from(e.base) < end
        });
        if overlaps {
            return Err(BusError::Overlap { space, base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = &self.entries[idx];
        let offset = addr - e.base;
        (offset < e.len).then_some((e, offset))
    }

    /// Dispatches a guest read; returns false (data set to all ones) if no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest write; returns false (write dropped) if no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks `m`, taking the state even if a thread panicked while holding it: for device
/// and VMM state that is still the best there is, so keep serving it rather than
/// cascading the panic.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_port_with_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::pio();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().writes, vec![(7, vec![9])]);
    }

    #[test]
    fn unclaimed_ports_read_all_ones_and_drop_writes() {
        let mut bus = Bus::pio();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x65, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0x5f, &mut b[..1]));
        assert!(!bus.write(0xffff, &[1]));
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let mut bus = Bus::pio();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, d()).unwrap();
        assert_eq!(
            bus.insert(0x3fc, 8, d()),
            Err(BusError::Overlap {
                space: "I/O port",
                base: 0x3fc,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(0xfff0, 0x20, d()),
            Err(BusError::BadRange {
                space: "I/O port",
                base: 0xfff0,
                len: 0x20
            })
        );
        assert_eq!(
            bus.insert(0, 0, d()),
            Err(BusError::BadRange {
                space: "I/O port",
                base: 0,
                len: 0
            })
        );
        bus.insert(0x3f0, 8, d()).unwrap();
    }

    #[test]
    fn mmio_bus_spans_the_64_bit_space() {
        let mut bus = Bus::mmio();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(u64::MAX - 0xfff, 0x1000, dev.clone()).unwrap();
        bus.insert(0xe000_0000, 0x10_0000, dev.clone()).unwrap();
        assert!(bus.write(u64::MAX, &[1]));
        assert!(bus.write(0xe00f_ffff, &[2]));
        assert!(!bus.write(0xe010_0000, &[3]));
        assert_eq!(
            dev.lock().unwrap().writes,
            vec![(0xfff, vec![1]), (0xf_ffff, vec![2])]
        );
        assert!(bus.insert(0xe00f_f000, 0x2000, dev).is_err());
    }
}
