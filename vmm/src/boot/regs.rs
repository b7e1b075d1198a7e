//! Boot-time CPU state: descriptor tables, identity page tables, registers, LAPIC.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, BootImage, Protocol};
use crate::memory::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Selectors: GDT index << 3.
const CODE_SEL: u16 = 1 << 3;
const DATA_SEL: u16 = 2 << 3;
const TSS_SEL: u16 = 3 << 3;

/// A GDT entry from its flags (access byte and granularity nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, code (64- or 32-bit), flat data, TSS.
fn gdt(protocol: Protocol) -> [u64; 4] {
    let code = match protocol {
        Protocol::Linux64 => 0xa09b, // present, exec/read, L=1
        Protocol::Pvh => 0xc09b,     // present, exec/read, D=1, 4K granularity
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The KVM segment register matching GDT entry `entry` at `selector`.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and (for the 64-bit protocol) page tables that
/// identity-map the first 1 GiB with 2 MiB pages.
pub fn write_tables(mem: &GuestMemoryMmap, protocol: Protocol) -> Result<(), BootError> {
    let err = |e: vm_memory::GuestMemoryError| BootError::GuestWrite {
        what: "boot descriptor and page tables",
        detail: e.to_string(),
    };
    for (i, e) in gdt(protocol).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START)).map_err(err)?;
    if protocol == Protocol::Linux64 {
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
            .map_err(err)?;
        mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
            .map_err(err)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
                .map_err(err)?;
        }
    }
    Ok(())
}

/// Sets the boot vCPU's registers for `image`'s entry protocol.
pub fn setup_boot_vcpu(fd: &VcpuFd, image: &BootImage) -> Result<(), kvm_ioctls::Error> {
    fd.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: image.entry,
        ..Default::default()
    };
    match image.protocol {
        Protocol::Pvh => regs.rbx = PVH_INFO_START,
        Protocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }

    let mut sregs: kvm_sregs = fd.get_sregs()?;
    let table = gdt(image.protocol);
    let code = segment(table[1], CODE_SEL);
    let data = segment(table[2], DATA_SEL);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[3], TSS_SEL);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    match image.protocol {
        Protocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        Protocol::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    fd.set_sregs(&sregs)?;
    fd.set_regs(&regs)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Routes LINT0 to the 8259 (ExtINT) and LINT1 to NMI, as firmware would.
pub fn setup_lapic(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = fd.get_lapic()?;
    let mut set_mode = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_flat_segments() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_back_from_the_gdt() {
        let code64 = segment(gdt(Protocol::Linux64)[1], CODE_SEL);
        assert_eq!(
            (code64.l, code64.db, code64.type_, code64.present),
            (1, 0, 0xb, 1)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = segment(gdt(Protocol::Pvh)[1], CODE_SEL);
        assert_eq!((code32.l, code32.db, code32.g, code32.s), (0, 1, 1, 1));
        let tss = segment(gdt(Protocol::Pvh)[3], TSS_SEL);
        assert_eq!((tss.s, tss.type_, tss.selector), (0, 0xb, 0x18));
    }
}
