//! The passthrough model on the fake VFIO device and a fake VM.

use super::bars::{page_span, subtract};
use super::*;
use crate::vfio::fake::{FakeOptions, FakeVfio, FakeVm, MSIX_CAP, MSIX_TABLE};

/// Places BARs from 0xc000_0000 (or 0x40_0000_0000 when high), naturally aligned.
struct Bump(u64, u64);
impl BarAllocator for Bump {
    fn allocate(&mut self, size: u64, high: bool) -> Option<u64> {
        let next = if high { &mut self.1 } else { &mut self.0 };
        let at = next.div_ceil(size) * size;
        *next = at + size;
        Some(at)
    }
}

fn build(options: FakeOptions) -> (VfioPciDevice, Arc<FakeVfio>, Arc<FakeVm>) {
    let fake = Arc::new(FakeVfio::new(options).unwrap());
    let vm = Arc::new(FakeVm::default());
    let mut alloc = Bump(0xc000_0000, 0x40_0000_0000);
    let dev = VfioPciDevice::new(fake.clone(), vm.clone(), &mut alloc, Some(16)).unwrap();
    (dev, fake, vm)
}

fn write32(dev: &mut VfioPciDevice, reg: usize, v: u32) {
    dev.config_write(reg, 0, &v.to_le_bytes());
}

fn enable_msix(dev: &mut VfioPciDevice) {
    dev.config_write(MSIX_CAP, 2, &0x8000u16.to_le_bytes());
}

fn program_vector(dev: &mut VfioPciDevice, v: u64, data: u32, masked: bool) {
    let at = MSIX_TABLE + 16 * v;
    dev.bar_write(0, at, &0xfee0_0000u32.to_le_bytes());
    dev.bar_write(0, at + 4, &0u32.to_le_bytes());
    dev.bar_write(0, at + 8, &data.to_le_bytes());
    dev.bar_write(0, at + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn the_msix_bar_is_mapped_all_but_its_table_and_pba_pages() {
    let (dev, fake, vm) = build(FakeOptions::default());
    assert_eq!(fake.log().maps, vec![(0, 0, 0x2000), (0, 0x4000, 0xc000)]);
    let slots: Vec<_> = vm.state().slots.into_values().collect();
    assert_eq!(slots, vec![(0xc000_0000, 0x2000), (0xc000_4000, 0xc000)]);
    // The table and PBA pages are what stays trapped.
    assert_eq!(dev.trapped_bars()[0].addr, 0xc000_0000);
}

#[test]
fn vfio_sparse_areas_are_honoured() {
    let (_, fake, _) = build(FakeOptions {
        sparse: Some(vec![(0, 0x1000), (0x8000, 0x8000)]),
        ..Default::default()
    });
    assert_eq!(fake.log().maps, vec![(0, 0, 0x1000), (0, 0x8000, 0x8000)]);
}

#[test]
fn an_unmappable_bar_is_trapped_and_reaches_the_device() {
    let (mut dev, fake, vm) = build(FakeOptions {
        mappable: false,
        ..Default::default()
    });
    assert!(vm.state().slots.is_empty());
    dev.bar_write(0, 0x1000, &[1, 2, 3, 4]);
    let mut d = [0u8; 4];
    dev.bar_read(0, 0x1000, &mut d);
    assert_eq!(d, [1, 2, 3, 4]);
    let log = fake.log();
    assert_eq!(log.writes, vec![(0, 0x1000, vec![1, 2, 3, 4])]);
    assert_eq!(log.reads, vec![(0, 0x1000, 4)]);
}

#[test]
fn bar_sizing_and_relocation_follow_the_guest() {
    let (mut dev, _, vm) = build(FakeOptions::default());
    assert_eq!(dev.config_read(regs::BAR0), 0xc000_0000);
    write32(&mut dev, regs::BAR0, u32::MAX);
    assert_eq!(dev.config_read(regs::BAR0), 0xffff_0000);
    write32(&mut dev, regs::BAR0, 0xd000_0000);
    assert_eq!(dev.config_read(regs::BAR0), 0xd000_0000);
    let slots: Vec<_> = vm.state().slots.into_values().collect();
    assert_eq!(slots, vec![(0xd000_0000, 0x2000), (0xd000_4000, 0xc000)]);
    // BAR 1 of a 32-bit BAR 0 and the ROM are unimplemented.
    assert_eq!(dev.config_read(regs::BAR0 + 4), 0);
    write32(&mut dev, regs::ROM, u32::MAX);
    assert_eq!(dev.config_read(regs::ROM), 0);
}

#[test]
fn a_64_bit_bar_sizes_and_moves_through_both_registers() {
    let (mut dev, _, vm) = build(FakeOptions {
        bar0_64bit: true,
        ..Default::default()
    });
    assert_eq!(dev.config_read(regs::BAR0), 0x0000_000c);
    assert_eq!(dev.config_read(regs::BAR0 + 4), 0x40);
    write32(&mut dev, regs::BAR0, u32::MAX);
    write32(&mut dev, regs::BAR0 + 4, u32::MAX);
    assert_eq!(dev.config_read(regs::BAR0), 0xffff_000c);
    assert_eq!(dev.config_read(regs::BAR0 + 4), u32::MAX);
    write32(&mut dev, regs::BAR0, 0x0001_0000);
    write32(&mut dev, regs::BAR0 + 4, 0x80);
    assert_eq!(dev.bars()[0].addr, 0x80_0001_0000);
    let first = vm.state().slots.into_values().next().unwrap();
    assert_eq!(first, (0x80_0001_0000, 0x2000));
}

#[test]
fn msix_vectors_are_routed_in_the_kernel_once_enabled_and_unmasked() {
    let (mut dev, fake, vm) = build(FakeOptions::default());
    // INTx is the interrupt until MSI-X is enabled.
    assert_eq!(fake.log().irqs, vec![(INTX_IRQ, 1)]);
    assert_eq!(
        vm.state().level_irqfds.into_iter().collect::<Vec<_>>(),
        vec![16]
    );
    program_vector(&mut dev, 0, 0x40, false);
    program_vector(&mut dev, 1, 0x41, true);
    // Programming alone routes nothing: MSI-X is still off.
    assert!(vm.state().irqfds.is_empty());
    enable_msix(&mut dev);
    assert_eq!(
        fake.log().irqs,
        vec![(INTX_IRQ, 1), (INTX_IRQ, 0), (MSIX_IRQ, 4)]
    );
    let gsis = dev.msix_gsis();
    let s = vm.state();
    assert_eq!(s.irqfds.iter().copied().collect::<Vec<_>>(), vec![gsis[0]]);
    assert_eq!(s.routes[&gsis[0]], (0xfee0_0000, 0x40));
    // Unmasking vector 1 routes it; masking vector 0 unroutes it.
    dev.bar_write(0, MSIX_TABLE + 16 + 12, &0u32.to_le_bytes());
    dev.bar_write(0, MSIX_TABLE + 12, &1u32.to_le_bytes());
    let s = vm.state();
    assert_eq!(s.irqfds.iter().copied().collect::<Vec<_>>(), vec![gsis[1]]);
    assert_eq!(s.routes[&gsis[1]], (0xfee0_0000, 0x41));
    // The table is the VMM's: none of it reached the device.
    assert!(fake.log().writes.is_empty());
    // The guest reads back what it programmed, and message control shows enable.
    let mut d = [0u8; 4];
    dev.bar_read(0, MSIX_TABLE + 16 + 8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x41);
    assert_eq!(dev.config_read(MSIX_CAP) >> 16, 0x8003);
    // Disabling MSI-X unroutes everything and brings INTx back.
    dev.config_write(MSIX_CAP, 2, &0u16.to_le_bytes());
    assert!(vm.state().irqfds.is_empty());
    assert_eq!(fake.log().irqs[3..], [(MSIX_IRQ, 0), (INTX_IRQ, 1)]);
}

fn pba(dev: &mut VfioPciDevice) -> u64 {
    let mut q = [0u8; 8];
    dev.bar_read(0, crate::vfio::fake::MSIX_PBA, &mut q);
    u64::from_le_bytes(q)
}

#[test]
fn the_pba_shows_what_a_masked_vector_holds_back() {
    let (mut dev, fake, _) = build(FakeOptions::default());
    program_vector(&mut dev, 0, 0x40, false);
    program_vector(&mut dev, 1, 0x41, true);
    enable_msix(&mut dev);
    assert_eq!(pba(&mut dev), 0);
    assert!(fake.raise_msix(0) && fake.raise_msix(1));
    // Vector 0 is routed (KVM takes it); vector 1 is masked and waits.
    assert_eq!(pba(&mut dev), 0b10);
    // Unmasked, it is routed and delivered: no longer pending.
    dev.bar_write(0, MSIX_TABLE + 16 + 12, &0u32.to_le_bytes());
    assert_eq!(pba(&mut dev), 0);
}

#[test]
fn the_function_mask_holds_every_vector() {
    let (mut dev, _, vm) = build(FakeOptions::default());
    program_vector(&mut dev, 0, 0x40, false);
    dev.config_write(MSIX_CAP, 2, &0xc000u16.to_le_bytes());
    assert!(vm.state().irqfds.is_empty());
    enable_msix(&mut dev);
    assert_eq!(vm.state().irqfds.len(), 1);
}

#[test]
fn the_interrupt_line_and_pin_describe_intx() {
    let (mut dev, _, _) = build(FakeOptions::default());
    assert_eq!(dev.config_read(regs::INTERRUPT) & 0xffff, 0x0110);
    dev.config_write(regs::INTERRUPT, 0, &[5]);
    assert_eq!(dev.config_read(regs::INTERRUPT) & 0xffff, 0x0105);
}

#[test]
fn msi_is_unlinked_from_the_capability_list_the_guest_walks() {
    let (mut dev, _, _) = build(FakeOptions {
        msi_cap: true,
        ..Default::default()
    });
    // The device's list is 0x50 (MSI) -> 0x40 (MSI-X); the guest's is 0x40 alone.
    assert_eq!(dev.config_read(regs::CAP_PTR) & 0xff, 0x40);
    assert_eq!((dev.config_read(0x40) >> 8) & 0xff, 0);
    assert_eq!(dev.config_read(0x40) & 0xff, u32::from(regs::CAP_MSIX));
    // Without MSI nothing is rewritten.
    let (mut plain, _, _) = build(FakeOptions::default());
    assert_eq!(plain.config_read(regs::CAP_PTR) & 0xff, 0x40);
}

#[test]
fn command_writes_reach_the_device() {
    let (mut dev, _, _) = build(FakeOptions::default());
    dev.config_write(regs::COMMAND, 0, &0x0006u16.to_le_bytes());
    assert_eq!(dev.config_read(regs::COMMAND) & 0xffff, 0x0006);
}

#[test]
fn releasing_the_device_frees_slots_and_routes_and_resets_it_once() {
    let (mut dev, fake, vm) = build(FakeOptions::default());
    program_vector(&mut dev, 0, 0x40, false);
    enable_msix(&mut dev);
    dev.release();
    let s = vm.state();
    assert!(s.slots.is_empty() && s.irqfds.is_empty() && s.level_irqfds.is_empty());
    let log = fake.log();
    assert_eq!(log.resets, 1);
    assert_eq!(log.irqs.last(), Some(&(MSIX_IRQ, 0)));
    // Dropping after release does not reset the device twice.
    drop(dev);
    assert_eq!(fake.log().resets, 1);
}

#[test]
fn a_slot_refused_part_way_leaves_no_slot_behind() {
    let fake = Arc::new(FakeVfio::new(FakeOptions::default()).unwrap());
    // BAR 0 needs two slots (either side of the MSI-X pages); allow one.
    let vm = Arc::new(FakeVm::with_slot_limit(1));
    let mut alloc = Bump(0xc000_0000, 0x40_0000_0000);
    let err = VfioPciDevice::new(fake.clone(), vm.clone(), &mut alloc, Some(16))
        .err()
        .expect("the second slot is refused");
    assert!(err.to_string().contains("Out of KVM memory slots"), "{err}");
    let s = vm.state();
    assert!(s.slots.is_empty() && s.level_irqfds.is_empty(), "{s:?}");
    assert_eq!(fake.log().resets, 1);
}

#[test]
fn page_subtraction_keeps_whole_pages_only() {
    assert_eq!(
        subtract(
            &[(0, 0x10000)],
            &[page_span(0x2000, 0x40), page_span(0x3000, 8)]
        ),
        vec![(0, 0x2000), (0x4000, 0xc000)]
    );
    assert_eq!(subtract(&[(0x800, 0x1000)], &[]), Vec::<(u64, u64)>::new());
    assert_eq!(subtract(&[(0, 0x1000)], &[(0, 0x1000)]), vec![]);
}
