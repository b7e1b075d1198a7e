//! The ACPI tables that describe the machine to the guest, built with rust-vmm's
//! `acpi_tables` and written into the BIOS area of guest RAM:
//!
//! | table | what it says |
//! |-------|--------------|
//! | RSDP  | where the XSDT is (at [`RSDP_START`], also handed over in the boot protocol) |
//! | XSDT  | the other tables |
//! | FADT  | a hardware-reduced platform; sleep control/status registers for S5 |
//! | DSDT  | the UARTs, the PCI root (windows, ECAM, INTx routing), the GED and power button, `\_S5` |
//! | MADT  | the vCPUs' local APICs, the IOAPIC, LINT1 as NMI |
//! | MCFG  | the ECAM window, when there is a PCI bus |
//! | SRAT, SLIT | the guest's NUMA nodes, when it has more than one |
//!
//! The MP table is still written beside them, for a kernel built without ACPI or booted
//! with `acpi=off`; a kernel with ACPI ignores it.

mod dsdt;
mod madt;
mod srat;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi::{ACPI_PLATFORM_BASE, SLEEP_CONTROL, SLEEP_STATUS};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::mptable::PciIntx;
use crate::memory::layout::{MPTABLE_CONFIG_START, PCI_ECAM_START};
use crate::memory::numa::NumaLayout;
use crate::vstate::topology::VcpuPlace;

/// Where the RSDP goes: the start of the BIOS area Linux also scans for it.
pub const RSDP_START: u64 = 0xe_0000;
/// The tables end before the MP configuration table.
const TABLES_END: u64 = MPTABLE_CONFIG_START;
/// The GSI of the Generic Event Device (the power button).
pub const GED_GSI: u32 = 5;
/// OEM ID in every table header.
const OEM_ID: [u8; 6] = *b"HPCVM ";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: no VGA, no CMOS RTC, ASPM not to be enabled.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 4) | (1 << 5);

/// The OEM table ID of the table with signature `sig`: "HPCVM" and the signature.
fn oem_table_id(sig: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"HPCVM   ";
    id[4..].copy_from_slice(sig);
    id
}

/// Errors writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area (only with hundreds of vCPUs or nodes).
    #[error("The ACPI tables ({size} bytes) do not fit below {end:#x}")]
    TooBig {
        /// Bytes of tables.
        size: u64,
        /// Where they must end.
        end: u64,
    },
    /// Writing guest memory failed.
    #[error("Cannot write the ACPI tables into guest RAM: {0}")]
    GuestWrite(String),
}

/// The guest's PCI root, when it has a PCI bus.
#[derive(Debug, Clone)]
pub struct PciRoot<'a> {
    /// The 64-bit BAR window above RAM: (start, length).
    pub mmio64: (u64, u64),
    /// INTx routes of the devices that have them.
    pub intx: &'a [PciIntx],
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct Machine<'a> {
    /// The vCPUs.
    pub cpus: &'a [VcpuPlace],
    /// The NUMA nodes (one when the guest is flat).
    pub numa: &'a NumaLayout,
    /// The PCI root, if there is a bus.
    pub pci: Option<PciRoot<'a>>,
    /// COM2 is there (the guest agent's channel).
    pub com2: bool,
}

/// Places tables one after another, 8-byte aligned, and records their addresses.
struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    /// Appends `table`; returns its guest-physical address.
    fn add(&mut self, table: &dyn Aml) -> u64 {
        self.bytes.resize(self.bytes.len().next_multiple_of(8), 0);
        let at = RSDP_START + self.bytes.len() as u64;
        table.to_aml_bytes(&mut self.bytes);
        at
    }
}

/// Builds every table for `machine`: the bytes to place at [`RSDP_START`].
pub fn build(machine: &Machine<'_>) -> Vec<u8> {
    let mut w = Writer { bytes: Vec::new() };
    // The RSDP comes first, at a fixed address; it is rewritten once the XSDT's
    // address is known.
    w.add(&Rsdp::new(OEM_ID, 0));
    let dsdt = w.add(&dsdt::build(machine));
    let mut entries = vec![
        w.add(&fadt(dsdt)),
        w.add(&madt::build(machine.cpus, oem_table_id(b"APIC"))),
    ];
    if machine.pci.is_some() {
        let mut mcfg = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
        mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
        entries.push(w.add(&mcfg));
    }
    if machine.numa.nodes.len() > 1 {
        entries.push(w.add(&srat::srat(machine.cpus, machine.numa)));
        entries.push(w.add(&srat::slit(machine.numa)));
    }
    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    for e in entries {
        xsdt.add_entry(e);
    }
    let xsdt = w.add(&xsdt);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt).to_aml_bytes(&mut rsdp);
    w.bytes[..rsdp.len()].copy_from_slice(&rsdp);
    w.bytes
}

/// Writes the tables for `machine` into `mem` at [`RSDP_START`].
pub fn write(mem: &GuestMemoryMmap, machine: &Machine<'_>) -> Result<(), AcpiError> {
    let bytes = build(machine);
    let size = bytes.len() as u64;
    if RSDP_START + size > TABLES_END {
        return Err(AcpiError::TooBig {
            size,
            end: TABLES_END,
        });
    }
    mem.write_slice(&bytes, GuestAddress(RSDP_START))
        .map_err(|e| AcpiError::GuestWrite(e.to_string()))
}

/// A one-byte register in port space.
fn io_register(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// A hardware-reduced FADT pointing at the DSDT and the sleep registers.
fn fadt(dsdt: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        // The power button is a device (PNP0C0C), there is no sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    let base = u64::from(ACPI_PLATFORM_BASE);
    fadt.sleep_control_reg = io_register(base + SLEEP_CONTROL);
    fadt.sleep_status_reg = io_register(base + SLEEP_STATUS);
    fadt.finalize()
}

#[cfg(test)]
mod tests;
