//! Guest-physical address map.
//!
//! ```text
//! 0x0000_0000  RAM (boot structures below 1 MiB, kernel from 1 MiB)
//! 0xc000_0000  MMIO gap: PCI BARs 0xc000_0000-0xe000_0000, ECAM 0xe000_0000-0xf000_0000,
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000, TSS/identity map
//! 0x1_0000_0000 RAM above 4 GiB, if the guest has more than 3 GiB
//! (1 GiB-aligned end of RAM, at least 4 GiB) 64-bit PCI BARs, 64 GiB
//! ```
//! The gap starts 1 GiB-aligned so that 1G hugepages back both RAM regions.

use vm_memory::GuestAddress;

/// First byte of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// PCI BARs below 4 GiB (32-bit BARs; small 64-bit ones too).
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI ECAM (memory-mapped config space), 1 MiB per bus, 256 buses.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Size of the 64-bit BAR window above RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Start of the 64-bit BAR window for a guest with `ram` bytes: past the end of RAM,
/// 1 GiB-aligned, never below 4 GiB.
pub fn pci_mmio64_start(ram: u64) -> u64 {
    let top = match ram_ranges(ram).last() {
        Some((start, len)) => start.0 + *len as u64,
        None => 0,
    };
    top.max(MMIO_GAP_END).next_multiple_of(1 << 30)
}

/// KVM's three-page TSS for real-mode emulation on Intel (must be below 4 GiB, not RAM).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on Intel.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Base of the kernel's high memory (ELF and bzImage kernels load from here).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the Extended BIOS Data Area: RAM below this is usable by the guest.
pub const EBDA_START: u64 = 0x9_fc00;
/// The MP floating pointer (in the EBDA, where Linux looks for it).
pub const MPTABLE_START: u64 = EBDA_START;
/// The MP configuration table (in the BIOS area, reserved in the e820 map).
pub const MPTABLE_CONFIG_START: u64 = 0xf_0000;
/// Top of the BIOS area.
pub const BIOS_END: u64 = HIMEM_START;

/// Global descriptor table for the boot vCPU.
pub const GDT_START: u64 = 0x500;
/// Empty interrupt descriptor table for the boot vCPU.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the 64-bit boot path.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-map page tables for the 64-bit boot path.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room for the command line (x86 Linux's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// RAM regions for `size` bytes: below the gap first, the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut v = vec![(GuestAddress(0), low as usize)];
    if size > low {
        v.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    v
}

/// The guest's memory map as (start, length, type), for e820 and PVH alike.
pub fn memory_map(size: u64) -> Vec<(u64, u64, u32)> {
    let low_end = size.min(MMIO_GAP_START);
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, BIOS_END - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if size > low_end {
        map.push((MMIO_GAP_END, size - low_end, E820_RAM));
    }
    map
}

/// End of RAM below the gap (where the initramfs is placed from the top down).
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_below_the_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(
            memory_map(512 << 20),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x60400, 2),
                (0x100000, (512 << 20) - 0x100000, 1)
            ]
        );
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let r = ram_ranges(8 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(1 << 32), 5 << 30)]
        );
        let map = memory_map(8 << 30);
        assert_eq!(map[2], (0x100000, (3 << 30) - 0x100000, 1));
        assert_eq!(map[3], (1 << 32, 5 << 30, 1));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram + 0x60400, 8 << 30, "only the BIOS hole is held back");
    }

    #[test]
    fn pci_windows_sit_in_the_gap_and_past_ram() {
        const {
            assert!(PCI_MMIO32_START >= MMIO_GAP_START);
            assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
            assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= 0xfec0_0000);
        }
        assert_eq!(pci_mmio64_start(512 << 20), 1 << 32);
        assert_eq!(pci_mmio64_start(8 << 30), 9 << 30);
        assert_eq!(pci_mmio64_start((3 << 30) + 1), 5 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut spans = [
            (GDT_START, 0x20),
            (IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, 16),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:#x?} overlaps {:#x?}",
                w[0],
                w[1]
            );
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            );
            assert!(KVM_TSS_ADDR >= MMIO_GAP_START && KVM_IDENTITY_MAP_ADDR >= MMIO_GAP_START);
        }
    }
}
