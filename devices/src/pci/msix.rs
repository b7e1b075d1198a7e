//! The MSI-X table and pending-bit array a VMM emulates for a device: the guest
//! programs vectors (address, data, mask) here and the VMM turns them into interrupt
//! routes. Layout per the PCI spec: 16 bytes per entry, PBA one bit per vector.

/// Bytes per MSI-X table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: per-vector mask.
const VECTOR_MASKED: u32 = 1;

/// One vector's message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (the LAPIC window, 0xfeeX_XXXX on x86).
    pub addr: u64,
    /// Message data (vector and delivery mode on x86).
    pub data: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Every vector starts masked (PCI spec, MSI-X vector control reset value).
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctrl: VECTOR_MASKED,
        }
    }
}

/// What a guest write changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixChange {
    /// Vector `n`'s message or mask.
    Vector(usize),
    /// The enable bit or the function mask.
    Control,
}

/// The emulated table, PBA and message-control state of one function.
#[derive(Clone, Debug)]
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    control: u16,
}

/// An MSI-X table's contents in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Each entry: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// Message control.
    pub control: u16,
}

impl MsixTable {
    /// The table as the guest programmed it, for a checkpoint.
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.ctrl])
                .collect(),
            control: self.control,
        }
    }

    /// Puts back what [`MsixTable::state`] saved, for a table of the same size.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), String> {
        if state.entries.len() != self.entries.len() {
            return Err(format!(
                "the MSI-X table had {} vectors, this one has {}",
                state.entries.len(),
                self.entries.len()
            ));
        }
        for (e, &[addr_lo, addr_hi, data, ctrl]) in self.entries.iter_mut().zip(&state.entries) {
            *e = Entry {
                addr_lo,
                addr_hi,
                data,
                ctrl,
            };
        }
        // The table size bits are the device's; only enable and mask are the guest's.
        let size_bits = self.control & !(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        self.control = size_bits | state.control & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
        Ok(())
    }

    /// A table of `vectors` entries (1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: usize) -> Self {
        let vectors = vectors.clamp(1, 2048);
        Self {
            entries: vec![Entry::default(); vectors],
            pending: vec![0; vectors.div_ceil(64)],
            control: (vectors - 1) as u16,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false: a table has at least one vector.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// Message control as the guest reads it (table size in bits 10:0).
    pub fn control(&self) -> u16 {
        self.control
    }

    /// Guest write of message control: only enable and function mask are writable.
    /// Returns whether either changed.
    pub fn set_control(&mut self, value: u16) -> bool {
        let writable = CTRL_ENABLE | CTRL_FUNCTION_MASK;
        let new = (self.control & !writable) | (value & writable);
        let changed = new != self.control;
        self.control = new;
        changed
    }

    /// MSI-X enabled by the guest.
    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0
    }

    /// Vector `v` may not fire now (its own mask or the function mask).
    pub fn masked(&self, v: usize) -> bool {
        self.control & CTRL_FUNCTION_MASK != 0
            || self
                .entries
                .get(v)
                .is_none_or(|e| e.ctrl & VECTOR_MASKED != 0)
    }

    /// Vector `v`'s programmed message.
    pub fn message(&self, v: usize) -> MsiMessage {
        self.entries
            .get(v)
            .map(|e| MsiMessage {
                addr: u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo),
                data: e.data,
            })
            .unwrap_or_default()
    }

    /// Records that vector `v` fired while masked (the PBA bit the guest sees).
    pub fn set_pending(&mut self, v: usize, pending: bool) {
        if let Some(q) = self.pending.get_mut(v / 64) {
            let bit = 1u64 << (v % 64);
            if pending {
                *q |= bit;
            } else {
                *q &= !bit;
            }
        }
    }

    /// Guest read at `offset` into the table: dword or qword accesses, aligned.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((e, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.entries[e];
        let fields = [e.addr_lo, e.addr_hi, e.data, e.ctrl];
        let lo = fields[field];
        if data.len() == 8 {
            let v = u64::from(fields[field + 1]) << 32 | u64::from(lo);
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.copy_from_slice(&lo.to_le_bytes());
        }
    }

    /// Guest write at `offset` into the table; returns the vector it changed.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Option<MsixChange> {
        let (e, field) = self.locate(offset, data.len())?;
        let before = self.entries[e];
        let mut words = [0u32; 2];
        for (i, w) in words.iter_mut().enumerate().take(data.len() / 4) {
            *w = u32::from_le_bytes(data[i * 4..i * 4 + 4].try_into().ok()?);
        }
        for (i, &w) in words.iter().enumerate().take(data.len() / 4) {
            let entry = &mut self.entries[e];
            match field + i {
                0 => entry.addr_lo = w & !3,
                1 => entry.addr_hi = w,
                2 => entry.data = w,
                _ => entry.ctrl = w & VECTOR_MASKED,
            }
        }
        (self.entries[e] != before).then_some(MsixChange::Vector(e))
    }

    /// Guest read at `offset` into the PBA.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let q = self
            .pending
            .get((offset / 8) as usize)
            .copied()
            .unwrap_or(0);
        let bytes = q.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// (entry, dword within the entry) of an aligned 4- or 8-byte access.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let e = usize::try_from(offset / ENTRY_SIZE).ok()?;
        (e < self.entries.len()).then_some((e, (offset % ENTRY_SIZE / 4) as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_start_masked_and_disabled() {
        let t = MsixTable::new(4);
        assert_eq!(t.control(), 3);
        assert!(!t.enabled());
        assert!((0..4).all(|v| t.masked(v)));
        let mut d = [0u8; 4];
        t.read_table(3 * 16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
    }

    #[test]
    fn the_guest_programs_a_vector_with_dword_and_qword_writes() {
        let mut t = MsixTable::new(2);
        assert_eq!(
            t.write_table(16, &0x0000_0000_fee0_1000u64.to_le_bytes()),
            Some(MsixChange::Vector(1))
        );
        assert_eq!(
            t.write_table(24, &0x41u32.to_le_bytes()),
            Some(MsixChange::Vector(1))
        );
        assert_eq!(
            t.write_table(28, &0u32.to_le_bytes()),
            Some(MsixChange::Vector(1))
        );
        // Writing the same value again changes nothing.
        assert_eq!(t.write_table(28, &0u32.to_le_bytes()), None);
        assert_eq!(
            t.message(1),
            MsiMessage {
                addr: 0xfee0_1000,
                data: 0x41
            }
        );
        assert!(!t.masked(1) && t.masked(0));
        let mut q = [0u8; 8];
        t.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
    }

    #[test]
    fn function_mask_and_enable_are_the_only_writable_control_bits() {
        let mut t = MsixTable::new(8);
        t.write_table(12, &0u32.to_le_bytes());
        assert!(t.set_control(0xffff));
        assert_eq!(t.control(), CTRL_ENABLE | CTRL_FUNCTION_MASK | 7);
        assert!(t.enabled() && t.masked(0));
        assert!(t.set_control(CTRL_ENABLE));
        assert!(!t.masked(0));
        assert!(!t.set_control(CTRL_ENABLE));
    }

    #[test]
    fn misaligned_or_odd_sized_accesses_are_dropped() {
        let mut t = MsixTable::new(1);
        assert_eq!(t.write_table(2, &[0; 4]), None);
        assert_eq!(t.write_table(0, &[0; 2]), None);
        assert_eq!(t.write_table(16, &[0; 4]), None);
        let mut d = [0u8; 2];
        t.read_table(0, &mut d);
        assert_eq!(d, [0xff; 2]);
    }

    #[test]
    fn pending_bits_show_in_the_pba() {
        let mut t = MsixTable::new(70);
        assert_eq!(t.pba_size(), 16);
        t.set_pending(65, true);
        t.set_pending(3, true);
        let mut q = [0u8; 8];
        t.read_pba(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 2);
        let mut d = [0u8; 4];
        t.read_pba(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 8);
        t.set_pending(3, false);
        t.read_pba(0, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
