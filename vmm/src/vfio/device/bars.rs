//! The BARs of a passthrough function: sizes and types from VFIO and config space,
//! guest addresses from the allocator, the mappable parts given to the guest as KVM
//! memory slots (and moved with the BAR), the rest trapped.

use super::*;

impl VfioPciDevice {
    /// BAR types from config space, sizes from VFIO (never by writing the device's
    /// BARs), guest addresses from the allocator.
    pub(super) fn probe_bars(&mut self, alloc: &mut dyn BarAllocator) {
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

    /// Page-aligned ranges of BAR `i` that must stay trapped: the MSI-X table and PBA.
    pub(super) fn trapped_pages(&self, i: usize) -> Vec<(u64, u64)> {
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
    pub(super) fn map_bar(&mut self, i: usize) -> Result<(), PassthroughError> {
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
    pub(super) fn remap_bar(&mut self, i: usize) {
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
    pub(super) fn bar_register(&self, i: usize) -> u32 {
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

    pub(super) fn write_bar_register(&mut self, i: usize, value: u32) {
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

/// The page-aligned span covering `offset..offset+len`.
pub(super) fn page_span(offset: u64, len: u64) -> (u64, u64) {
    let start = offset & !(PAGE - 1);
    let end = (offset + len).div_ceil(PAGE) * PAGE;
    (start, end - start)
}

/// `areas` minus `holes`, both as (offset, len) lists; results page-aligned and
/// non-empty.
pub(super) fn subtract(areas: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
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
