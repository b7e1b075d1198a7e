use super::*;
use crate::memory::numa::{NumaLayout, NumaNode};
use crate::vstate::topology::place;

/// The tables in `bytes` (placed at RSDP_START), by signature, as the guest finds them
/// from the RSDP.
fn tables(bytes: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    let at = |addr: u64| &bytes[(addr - RSDP_START) as usize..];
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(&bytes[..8], b"RSD PTR ");
    assert_eq!(sum(&bytes[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&bytes[..36]), 0, "RSDP extended checksum");
    let table = |addr: u64| {
        let t = at(addr);
        let len = u32_at(t, 4) as usize;
        let t = t[..len].to_vec();
        assert_eq!(
            sum(&t),
            0,
            "checksum of {:?}",
            String::from_utf8_lossy(&t[..4])
        );
        (t[..4].try_into().unwrap(), t)
    };
    let (sig, xsdt) = table(u64_at(bytes, 24));
    assert_eq!(&sig, b"XSDT");
    let mut out: Vec<([u8; 4], Vec<u8>)> = (36..xsdt.len())
        .step_by(8)
        .map(|o| table(u64_at(&xsdt, o)))
        .collect();
    let fadt = out
        .iter()
        .find(|t| &t.0 == b"FACP")
        .expect("a FADT")
        .1
        .clone();
    out.push(table(u64_at(&fadt, 140)));
    out
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn get<'a>(t: &'a [([u8; 4], Vec<u8>)], sig: &[u8; 4]) -> &'a [u8] {
    &t.iter()
        .find(|x| &x.0 == sig)
        .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)))
        .1
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn flat(vcpus: u32, ram: u64) -> NumaLayout {
    NumaLayout {
        nodes: vec![NumaNode {
            vcpus: (0..vcpus).collect(),
            ram: vec![(0, ram)],
            host_node: None,
        }],
    }
}

fn cpus(n: u32) -> Vec<VcpuPlace> {
    let t = crate::config::Topology {
        sockets: 1,
        cores: n,
        threads: 1,
    };
    (0..n).map(|i| place(&t, i)).collect()
}

#[test]
fn a_flat_guest_without_pci_gets_fadt_madt_dsdt_only() {
    let cpus = cpus(2);
    let numa = flat(2, 256 << 20);
    let bytes = build(&Machine {
        cpus: &cpus,
        numa: &numa,
        pci: None,
        com2: false,
    });
    let t = tables(&bytes);
    let sigs: Vec<&[u8; 4]> = t.iter().map(|x| &x.0).collect();
    assert_eq!(sigs, [b"FACP", b"APIC", b"DSDT"]);
    // Hardware-reduced, with the sleep registers on the platform device's ports.
    let fadt = get(&t, b"FACP");
    let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_eq!(fadt[244], 1, "sleep control register in I/O space");
    assert_eq!(
        u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
        u64::from(ACPI_PLATFORM_BASE)
    );
    let dsdt = get(&t, b"DSDT");
    for name in [&b"COM1"[..], b"GED_", b"PWRB", b"_S5_", b"ACPI0013"] {
        assert!(contains(dsdt, name), "{}", String::from_utf8_lossy(name));
    }
    assert!(!contains(dsdt, b"PCI0") && !contains(dsdt, b"COM2"));
}

#[test]
fn the_madt_lists_every_vcpu_and_the_ioapic() {
    let cpus = cpus(3);
    let numa = flat(3, 256 << 20);
    let bytes = build(&Machine {
        cpus: &cpus,
        numa: &numa,
        pci: None,
        com2: true,
    });
    let t = tables(&bytes);
    let madt = get(&t, b"APIC");
    let mut apics = Vec::new();
    let mut ioapics = 0;
    let mut o = 44;
    while o < madt.len() {
        let (kind, len) = (madt[o], madt[o + 1] as usize);
        match kind {
            0 => apics.push((madt[o + 2], madt[o + 3])),
            1 => ioapics += 1,
            _ => {}
        }
        o += len;
    }
    assert_eq!(apics, [(0, 0), (1, 1), (2, 2)]);
    assert_eq!(ioapics, 1);
    assert!(contains(get(&t, b"DSDT"), b"COM2"));
}

#[test]
fn a_pci_bus_adds_mcfg_the_root_and_its_intx_routes() {
    let cpus = cpus(1);
    let numa = flat(1, 256 << 20);
    let intx = [(1u8, 16u8)];
    let bytes = build(&Machine {
        cpus: &cpus,
        numa: &numa,
        pci: Some(PciRoot {
            mmio64: (4 << 30, 64 << 30),
            intx: &intx,
        }),
        com2: false,
    });
    let t = tables(&bytes);
    let mcfg = get(&t, b"MCFG");
    assert_eq!(
        u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
        PCI_ECAM_START
    );
    let dsdt = get(&t, b"DSDT");
    for name in [&b"PCI0"[..], b"_PRT", b"_CRS", b"MRES"] {
        assert!(contains(dsdt, name), "{}", String::from_utf8_lossy(name));
    }
    // The _PRT entry for device 1: address 0x0001ffff as a DWord.
    assert!(contains(dsdt, &[0x0c, 0xff, 0xff, 0x01, 0x00]));
}

#[test]
fn two_nodes_get_srat_and_slit() {
    let cpus = cpus(2);
    let numa = NumaLayout {
        nodes: vec![
            NumaNode {
                vcpus: vec![0],
                ram: vec![(0, 256 << 20)],
                host_node: Some(0),
            },
            NumaNode {
                vcpus: vec![1],
                ram: vec![(256 << 20, 256 << 20)],
                host_node: Some(1),
            },
        ],
    };
    let bytes = build(&Machine {
        cpus: &cpus,
        numa: &numa,
        pci: None,
        com2: false,
    });
    let t = tables(&bytes);
    let srat = get(&t, b"SRAT");
    assert_eq!(u32::from_le_bytes(srat[36..40].try_into().unwrap()), 1);
    let mut cpu_domains = Vec::new();
    let mut mem = Vec::new();
    let mut o = 48;
    while o < srat.len() {
        let (kind, len) = (srat[o], srat[o + 1] as usize);
        let s = &srat[o..o + len];
        match kind {
            0 => cpu_domains.push((s[3], s[2])),
            1 => mem.push((
                u32::from_le_bytes(s[2..6].try_into().unwrap()),
                u64::from_le_bytes(s[8..16].try_into().unwrap()),
                u64::from_le_bytes(s[16..24].try_into().unwrap()),
                u32::from_le_bytes(s[28..32].try_into().unwrap()),
            )),
            _ => panic!("unexpected SRAT structure {kind}"),
        }
        o += len;
    }
    assert_eq!(cpu_domains, [(0, 0), (1, 1)]);
    assert_eq!(mem, [(0, 0, 256 << 20, 1), (1, 256 << 20, 256 << 20, 1)]);
    let slit = get(&t, b"SLIT");
    assert_eq!(u64::from_le_bytes(slit[36..44].try_into().unwrap()), 2);
    assert_eq!(&slit[44..48], &[10, 20, 20, 10]);
}

#[test]
fn guest_nodes_on_one_host_node_are_near_in_the_slit() {
    let node = |vcpu: u32, host_node| NumaNode {
        vcpus: vec![vcpu],
        ram: vec![(u64::from(vcpu) << 28, 1 << 28)],
        host_node,
    };
    let numa = NumaLayout {
        nodes: vec![
            node(0, Some(0)),
            node(1, Some(0)),
            node(2, Some(1)),
            node(3, None),
        ],
    };
    let mut bytes = Vec::new();
    super::srat::slit(&numa).to_aml_bytes(&mut bytes);
    #[rustfmt::skip]
    let want = [
        10, 11, 20, 20,
        11, 10, 20, 20,
        20, 20, 10, 20,
        20, 20, 20, 10,
    ];
    assert_eq!(&bytes[44..60], &want);
}

#[test]
fn the_tables_fit_for_the_largest_guest() {
    let cpus = cpus(255);
    let numa = flat(255, 1 << 40);
    let intx: Vec<(u8, u8)> = (1..32).map(|d| (d, 16 + d % 8)).collect();
    let machine = Machine {
        cpus: &cpus,
        numa: &numa,
        pci: Some(PciRoot {
            mmio64: (1 << 40, 64 << 30),
            intx: &intx,
        }),
        com2: true,
    };
    let size = build(&machine).len() as u64;
    assert!(RSDP_START + size <= TABLES_END, "{size} bytes");
    tables(&build(&machine));
}
