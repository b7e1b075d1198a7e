//! The DSDT, in AML built with `acpi_tables::aml`:
//!
//! ```text
//! \_SB.COM1, COM2   PNP0501: the UARTs with their ports and IRQs (a hardware-reduced
//!                   guest maps no ISA IRQ it is not told about)
//! \_SB.PCI0         PNP0A08: bus 0, config ports, the two BAR windows, _PRT, _PXM
//! \_SB.MRES         PNP0C02: the ECAM window, reserved (Linux uses MCFG's ECAM only then)
//! \_SB.GED_         ACPI0013: its interrupt runs _EVT, which notifies PWRB
//! \_SB.PWRB         PNP0C0C: the power button
//! \_S5              the SLP_TYP of soft off
//! ```

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Method, Name,
    Notify, Package, Path, ResourceTemplate, Scope, IO, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use devices::acpi::S5_SLEEP_TYPE;
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, COM2_BASE, COM2_IRQ};

use super::{oem_table_id, Machine, PciRoot, GED_GSI, OEM_ID, OEM_REVISION};
use crate::memory::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START};

/// Notify value for a power button press ("S0 power button pressed").
const NOTIFY_POWER_BUTTON: u8 = 0x80;
/// The UART register block.
const UART_PORTS: u8 = 8;
/// The `_ADR`-style address meaning "every function of device `d`" in a `_PRT`.
fn prt_address(device: u8) -> u32 {
    (u32::from(device) << 16) | 0xffff
}

/// A device named `name` holding `children`, encoded.
fn device(name: &str, children: &[&dyn Aml]) -> Vec<u8> {
    bytes(&Device::new(name.into(), children.to_vec()))
}

/// A 16550 at `base` on `irq` (edge, active high, as KVM's IOAPIC takes ISA lines).
fn uart(name: &str, uid: u8, base: u16, irq: u32) -> Vec<u8> {
    let io = IO::new(base, base, 1, UART_PORTS);
    let int = Interrupt::new(true, true, false, false, irq);
    let crs = ResourceTemplate::new(vec![&io, &int]);
    device(
        name,
        &[
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CRS".into(), &crs),
        ],
    )
}

/// The Generic Event Device and the power button it notifies.
fn power_button() -> Vec<u8> {
    let int = Interrupt::new(true, true, false, false, GED_GSI);
    let crs = ResourceTemplate::new(vec![&int]);
    let pwrb = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&pwrb, &NOTIFY_POWER_BUTTON);
    let evt = Method::new("_EVT".into(), 1, false, vec![&notify]);
    let ged = device(
        "GED_",
        &[
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_CRS".into(), &crs),
            &evt,
        ],
    );
    let button = device(
        "PWRB",
        &[
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &ZERO),
        ],
    );
    [ged, button].concat()
}

/// The PCI root bridge and the reservation of its ECAM window.
fn pci_root(root: &PciRoot<'_>, numa: bool) -> Vec<u8> {
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let config = IO::new(0xcf8, 0xcf8, 1, 8);
    let low = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let (high_start, high_len) = root.mmio64;
    let high = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        high_start,
        high_start + high_len - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &config, &low, &high]);
    // Every pin of a device with INTx goes to its one GSI (level, through the IOAPIC).
    let routes: Vec<(u32, u8, u32)> = root
        .intx
        .iter()
        .flat_map(|&(dev, gsi)| (0..4u8).map(move |pin| (prt_address(dev), pin, u32::from(gsi))))
        .collect();
    let entries: Vec<Package<'_>> = routes
        .iter()
        .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &ZERO, gsi]))
        .collect();
    let prt = Package::new(entries.iter().map(|p| p as &dyn Aml).collect());
    let prt = Name::new("_PRT".into(), &prt);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let seg = Name::new("_SEG".into(), &ZERO);
    let uid = Name::new("_UID".into(), &ZERO);
    let bbn = Name::new("_BBN".into(), &ZERO);
    let crs = Name::new("_CRS".into(), &crs);
    // On guest node 0 (without it Linux warns that the bus's node is unknown).
    let pxm = Name::new("_PXM".into(), &ZERO);
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &seg, &uid, &bbn, &crs];
    if !routes.is_empty() {
        children.push(&prt);
    }
    if numa {
        children.push(&pxm);
    }
    let pci = device("PCI0", &children);

    let ecam = Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let ecam = ResourceTemplate::new(vec![&ecam]);
    let mres = device(
        "MRES",
        &[
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_CRS".into(), &ecam),
        ],
    );
    [pci, mres].concat()
}

fn bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// A scope whose body is already-encoded AML.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The DSDT of `machine`.
pub fn build(machine: &Machine<'_>) -> Sdt {
    let mut devices = uart("COM1", 1, COM1_BASE, COM1_IRQ);
    if machine.com2 {
        devices.extend(uart("COM2", 2, COM2_BASE, COM2_IRQ));
    }
    if let Some(root) = &machine.pci {
        devices.extend(pci_root(root, machine.numa.nodes.len() > 1));
    }
    devices.extend(power_button());
    let body = Raw(devices);
    let sb = Scope::new("\\_SB_".into(), vec![&body]);
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &ZERO, &ZERO, &ZERO]);
    let s5 = Name::new("_S5_".into(), &s5);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, oem_table_id(b"DSDT"), OEM_REVISION);
    dsdt.append_slice(&[bytes(&sb), bytes(&s5)].concat());
    dsdt
}
