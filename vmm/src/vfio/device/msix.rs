//! MSI-X of a passthrough function: the table and PBA trapped and emulated, every
//! vector routed in the kernel (the device writes an eventfd, KVM injects the MSI),
//! and MSI hidden so that a driver cannot fall back to it.

use super::*;

impl VfioPciDevice {
    /// Finds the MSI-X capability and allocates a GSI and eventfd per vector.
    pub(super) fn probe_msix(&mut self) -> Result<(), PassthroughError> {
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
    pub(super) fn capabilities(&self) -> Vec<(usize, u8)> {
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

    pub(super) fn find_capability(&self, id: u8) -> Option<usize> {
        self.capabilities()
            .into_iter()
            .find_map(|(at, cap)| (cap == id).then_some(at))
    }

    /// Unlinks MSI from the list the guest walks: hpcvm routes MSI-X and INTx, and a
    /// driver falling back to MSI would enable it in config space only, where vfio-pci
    /// does not turn it on, and wait for interrupts that never come.
    pub(super) fn hide_msi(&mut self) {
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

    /// MSI-X message control written: enable/disable in VFIO, (un)route vectors.
    pub(super) fn msix_control_changed(&mut self) {
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
    pub(super) fn update_vector(&mut self, v: usize) {
        let Some(m) = &mut self.msix else {
            return;
        };
        if let Some(vec) = m.vectors.get_mut(v) {
            vec.update(self.vm.as_ref(), &m.table, v);
        }
    }

    /// The MSI-X table/PBA access at `offset` of BAR `bar`, if it is one.
    pub(super) fn msix_access(&self, bar: usize, offset: u64) -> Option<MsixRegion> {
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
}

pub(super) enum MsixRegion {
    Table(u64),
    Pba(u64),
}
