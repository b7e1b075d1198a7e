//! The MADT: one local APIC (or x2APIC, for IDs past 254) per vCPU, the IOAPIC, and
//! LINT1 of every local APIC as NMI. No interrupt source overrides: KVM's IOAPIC
//! wires ISA IRQ n to pin n, and the DSDT's devices name their GSIs.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{Aml, AmlSink};
use zerocopy::{Immutable, IntoBytes};

use super::{OEM_ID, OEM_REVISION};
use crate::vstate::topology::VcpuPlace;

/// Where the local APICs are.
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Where the IOAPIC is.
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Largest APIC ID a (non-x2) local APIC entry holds; 255 means "all". The SRAT
/// switches to x2APIC entries at the same point.
pub(super) const MAX_XAPIC_ID: u32 = 254;
/// The processor UID meaning "every processor", in an NMI entry.
const ALL_PROCESSORS: u8 = 0xff;

/// Processor Local x2APIC (type 9), which acpi_tables does not have.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalX2Apic {
    r#type: u8,
    length: u8,
    reserved: u16,
    x2apic_id: u32,
    flags: u32,
    processor_uid: u32,
}

/// Local APIC NMI (type 4), which acpi_tables does not have.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for LocalX2Apic {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The IOAPIC's ID: past every vCPU's APIC ID, as in the MP table.
pub fn ioapic_id(cpus: &[VcpuPlace]) -> u8 {
    let top = cpus.iter().map(|c| c.apic_id).max().unwrap_or(0);
    u8::try_from(top + 1)
        .unwrap_or(u8::MAX - 1)
        .min(u8::MAX - 1)
}

/// The MADT for `cpus`.
pub fn build(cpus: &[VcpuPlace], table_id: [u8; 8]) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        table_id,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for c in cpus {
        match (u8::try_from(c.index), u8::try_from(c.apic_id)) {
            (Ok(uid), Ok(id)) if c.apic_id <= MAX_XAPIC_ID => {
                madt.add_structure(ProcessorLocalApic::new(uid, id, EnabledStatus::Enabled))
            }
            _ => madt.add_structure(LocalX2Apic {
                r#type: 9,
                length: 16,
                reserved: 0,
                x2apic_id: c.apic_id,
                flags: EnabledStatus::Enabled as u32,
                processor_uid: c.index,
            }),
        }
    }
    madt.add_structure(IoApic::new(ioapic_id(cpus), IOAPIC_ADDR, 0));
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: ALL_PROCESSORS,
        flags: 0,
        lint: 1,
    });
    madt
}
