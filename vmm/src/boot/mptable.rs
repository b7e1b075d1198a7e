//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its
//! CPUs, its IOAPIC and the ISA interrupt routing. Linux looks for the floating pointer
//! in the last KiB of base memory; the configuration table sits in the BIOS area.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::memory::layout::{MPTABLE_CONFIG_START, MPTABLE_START};
use crate::vstate::topology::VcpuPlace;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and FPU+APIC feature flags for processor entries.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ISA: u8 = 0;
const BUS_PCI: u8 = 1;
/// I/O interrupt flags for PCI INTx: active high, level triggered (how KVM's IOAPIC
/// and hpcvm's resample irqfds treat the line).
const PCI_INTX_FLAGS: u8 = 0b1101;

/// A PCI device whose INTx lines the table routes: (device number on bus 0, GSI).
pub type PciIntx = (u8, u8);

/// Builds the floating pointer and configuration table for `cpus` and, when there is
/// a PCI bus, the INTx routes of its devices; returns (floating pointer bytes, config
/// table bytes).
pub fn build(cpus: &[VcpuPlace], pci: &[PciIntx]) -> (Vec<u8>, Vec<u8>) {
    let ioapic_id = cpus.iter().map(|c| c.apic_id).max().unwrap_or(0) as u8 + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for c in cpus {
        let mut e = vec![ENTRY_PROCESSOR, c.apic_id as u8, APIC_VERSION];
        e.push(CPU_ENABLED | if c.index == 0 { CPU_BSP } else { 0 });
        e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        entries.extend(e);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    if !pci.is_empty() {
        entries.extend_from_slice(&[ENTRY_BUS, BUS_PCI]);
        entries.extend_from_slice(b"PCI   ");
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, edge/high (the bus default), as KVM's IOAPIC wires it.
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[
            ENTRY_IOINT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // INTA-INTD of each PCI device -> its IOAPIC pin; source IRQ = device << 2 | pin.
    for &(dev, gsi) in pci {
        for pin in 0..4 {
            entries.extend_from_slice(&[
                ENTRY_IOINT,
                INT_TYPE_INT,
                PCI_INTX_FLAGS,
                0,
                BUS_PCI,
                dev << 2 | pin,
                ioapic_id,
                gsi,
            ]);
            count += 1;
        }
    }
    // LINT0 of every LAPIC is ExtINT (the 8259), LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_EXTINT, 0, 0, BUS_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HPCVM   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(MPTABLE_CONFIG_START as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision 1.4
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = a config table is present
    fp[10] = checksum(&fp);
    (fp, table)
}

/// Writes the MP table for `cpus` and `pci` devices into guest RAM.
pub fn write(mem: &GuestMemoryMmap, cpus: &[VcpuPlace], pci: &[PciIntx]) -> Result<(), BootError> {
    let (fp, table) = build(cpus, pci);
    let err = |e: vm_memory::GuestMemoryError| BootError::GuestWrite {
        what: "the MP table",
        detail: e.to_string(),
    };
    mem.write_slice(&fp, GuestAddress(MPTABLE_START))
        .map_err(err)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_CONFIG_START))
        .map_err(err)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Topology;
    use crate::vstate::topology::places;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_to_zero_and_point_at_each_other() {
        let cpus = places(&Topology {
            sockets: 1,
            cores: 4,
            threads: 1,
        });
        let (fp, table) = build(&cpus, &[]);
        assert_eq!(fp.len(), 16);
        assert_eq!(sum(&fp), 0);
        assert_eq!(sum(&table), 0);
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()), 0xf0000);
        assert_eq!(
            u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize,
            table.len()
        );
    }

    #[test]
    fn lists_every_cpu_with_its_apic_id_and_one_bsp() {
        let cpus = places(&Topology {
            sockets: 2,
            cores: 3,
            threads: 1,
        });
        let (_, table) = build(&cpus, &[]);
        let count = u16::from_le_bytes(table[0x22..0x24].try_into().unwrap());
        let mut off = 44;
        let mut ids = Vec::new();
        let mut bsps = 0;
        let mut ioapic = None;
        for _ in 0..count {
            match table[off] {
                ENTRY_PROCESSOR => {
                    ids.push(table[off + 1]);
                    bsps += usize::from(table[off + 3] & CPU_BSP != 0);
                    off += 20;
                }
                ENTRY_IOAPIC => {
                    ioapic = Some(table[off + 1]);
                    off += 8;
                }
                _ => off += 8,
            }
        }
        assert_eq!(off, table.len());
        assert_eq!(ids, vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(bsps, 1);
        assert_eq!(ioapic, Some(7), "IOAPIC id clear of every LAPIC id");
    }

    #[test]
    fn largest_guest_fits_in_the_bios_area() {
        let cpus = places(&Topology {
            sockets: 1,
            cores: 254,
            threads: 1,
        });
        let (_, table) = build(&cpus, &[]);
        assert!(MPTABLE_CONFIG_START + table.len() as u64 <= 0x10_0000);
    }

    #[test]
    fn pci_devices_get_a_bus_and_their_intx_routes() {
        let cpus = places(&"1".parse::<crate::config::CpusConfig>().unwrap().topology);
        let (_, plain) = build(&cpus, &[]);
        let (_, table) = build(&cpus, &[(1, 16), (2, 17)]);
        // One bus entry (8 bytes) and 4 pins x 2 devices of I/O interrupt entries.
        assert_eq!(table.len(), plain.len() + 8 + 8 * 8);
        assert_eq!(sum(&table), 0);
        let pci_bus = table
            .windows(8)
            .any(|w| w == [ENTRY_BUS, BUS_PCI, b'P', b'C', b'I', b' ', b' ', b' ']);
        assert!(pci_bus);
        // INTB of device 2 -> IOAPIC pin 17, level, active high.
        let intb = [
            ENTRY_IOINT,
            INT_TYPE_INT,
            PCI_INTX_FLAGS,
            0,
            BUS_PCI,
            2 << 2 | 1,
        ];
        let at = table
            .windows(6)
            .position(|w| w == intb)
            .expect("INTB route");
        assert_eq!(table[at + 7], 17);
    }
}
