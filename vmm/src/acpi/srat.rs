//! SRAT and SLIT: which proximity domain (guest NUMA node) each vCPU and each range of
//! RAM belongs to, and how far the nodes are from each other.

use acpi_tables::sdt::Sdt;
use acpi_tables::slit::SLIT;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::Aml;
use zerocopy::{Immutable, IntoBytes};

use super::madt::MAX_XAPIC_ID;
use super::{oem_table_id, OEM_ID, OEM_REVISION};
use crate::memory::numa::NumaLayout;
use crate::vstate::topology::VcpuPlace;

/// SLIT distance between nodes on different host nodes, or not bound to any
/// (Linux's default remote distance; a node is 10 from itself).
const REMOTE_DISTANCE: u8 = 20;
/// SLIT distance between guest nodes whose RAM is on one host node: as near as the
/// table allows (Linux refuses a SLIT with 10 off the diagonal).
const SAME_HOST_NODE_DISTANCE: u8 = 11;
/// SRAT header: the ACPI header, then a reserved 1 and 8 reserved bytes.
const SRAT_HEADER_LEN: u32 = 36 + 12;
/// The affinity structures' "enabled" flag.
const ENABLED: u32 = 1;

/// Processor Local APIC affinity (type 0); acpi_tables has the memory one only.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct ApicAffinity {
    r#type: u8,
    length: u8,
    domain_lo: u8,
    apic_id: u8,
    flags: u32,
    sapic_eid: u8,
    domain_hi: [u8; 3],
    clock_domain: u32,
}

/// Processor Local x2APIC affinity (type 2), for APIC IDs past 255.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct X2ApicAffinity {
    r#type: u8,
    length: u8,
    reserved: u16,
    domain: u32,
    x2apic_id: u32,
    flags: u32,
    clock_domain: u32,
    reserved2: u32,
}

/// The SRAT for `cpus` laid out in `numa`'s nodes.
pub fn srat(cpus: &[VcpuPlace], numa: &NumaLayout) -> Sdt {
    let mut t = Sdt::new(
        *b"SRAT",
        SRAT_HEADER_LEN,
        3,
        OEM_ID,
        oem_table_id(b"SRAT"),
        OEM_REVISION,
    );
    // The reserved field right after the header must be 1.
    t.write_u32(36, 1);
    for c in cpus {
        let domain = numa.node_of(c.index);
        match u8::try_from(c.apic_id) {
            Ok(apic_id) if c.apic_id <= MAX_XAPIC_ID => {
                let [lo, hi @ ..] = domain.to_le_bytes();
                t.append_slice(
                    ApicAffinity {
                        r#type: 0,
                        length: 16,
                        domain_lo: lo,
                        apic_id,
                        flags: ENABLED,
                        sapic_eid: 0,
                        domain_hi: hi,
                        clock_domain: 0,
                    }
                    .as_bytes(),
                );
            }
            _ => t.append_slice(
                X2ApicAffinity {
                    r#type: 2,
                    length: 24,
                    reserved: 0,
                    domain,
                    x2apic_id: c.apic_id,
                    flags: ENABLED,
                    clock_domain: 0,
                    reserved2: 0,
                }
                .as_bytes(),
            ),
        }
    }
    for (domain, node) in numa.nodes.iter().enumerate() {
        for &(start, len) in &node.ram {
            let mut bytes = Vec::new();
            MemoryAffinity::new(domain as u32, start, len)
                .enabled()
                .to_aml_bytes(&mut bytes);
            t.append_slice(&bytes);
        }
    }
    t
}

/// The SLIT: every node 10 from itself (what `SLIT::new` fills in), 11 from a node
/// bound to the same host node, 20 from the others.
pub fn slit(numa: &NumaLayout) -> SLIT {
    let n = numa.nodes.len();
    let mut t = SLIT::new(OEM_ID, oem_table_id(b"SLIT"), OEM_REVISION, n as u32);
    for (a, na) in numa.nodes.iter().enumerate() {
        for (b, nb) in numa.nodes.iter().enumerate() {
            if a != b {
                let same_host = na.host_node.is_some() && na.host_node == nb.host_node;
                let d = if same_host {
                    SAME_HOST_NODE_DISTANCE
                } else {
                    REMOTE_DISTANCE
                };
                t.set_distance(a, b, d);
            }
        }
    }
    t
}
