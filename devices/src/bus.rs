//! The port-I/O bus: which device answers which x86 I/O port.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device reachable through x86 `in`/`out` instructions.
pub trait PioDevice: Send {
    /// Guest `in` at `offset` bytes past the device's base port.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest `out` at `offset` bytes past the device's base port.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors from building the bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping port ranges.
    #[error("I/O ports {base:#x}+{len} overlap a device already on the bus")]
    Overlap {
        /// First port of the rejected range.
        base: u16,
        /// Number of ports in the rejected range.
        len: u16,
    },
    /// A range of zero ports, or one past port 0xffff.
    #[error("I/O port range {base:#x}+{len} is empty or runs past 0xffff")]
    BadRange {
        /// First port of the rejected range.
        base: u16,
        /// Number of ports in the rejected range.
        len: u16,
    },
}

struct Entry {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Maps port ranges to devices. Ports with no device read as all ones and swallow
/// writes, like an ISA bus with nothing plugged in.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>, // sorted by base, non-overlapping
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` on ports `base..base+len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(BusError::BadRange { base, len });
        }
        let overlaps = self.entries.iter().any(|e| {
            let e_end = u32::from(e.base) + u32::from(e.len);
            u32::from(base) < e_end && u32::from(e.base) < end
        });
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Entry, u16)> {
        let idx = self
            .entries
            .partition_point(|e| e.base <= port)
            .checked_sub(1)?;
        let e = &self.entries[idx];
        let offset = port - e.base;
        (offset < e.len).then_some((e, offset))
    }

    /// Dispatches a guest `in`; returns false (data set to all ones) if no device owns `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
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

    /// Dispatches a guest `out`; returns false (write dropped) if no device owns `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
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
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_port_with_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().writes, vec![(7, vec![9])]);
    }

    #[test]
    fn unclaimed_ports_read_all_ones_and_drop_writes() {
        let mut bus = PioBus::new();
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
        let mut bus = PioBus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, d()).unwrap();
        assert_eq!(
            bus.insert(0x3fc, 8, d()),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(0xfff0, 0x20, d()),
            Err(BusError::BadRange {
                base: 0xfff0,
                len: 0x20
            })
        );
        assert_eq!(
            bus.insert(0, 0, d()),
            Err(BusError::BadRange { base: 0, len: 0 })
        );
        bus.insert(0x3f0, 8, d()).unwrap();
    }
}
