use super::*;
use crate::vfio::fake::FakeVm;
use devices::virtio::COMMON_FEATURES;
use vm_memory::GuestAddress;

/// A device with two queues and a 4-byte config space.
struct Probe;

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64, 64]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES | 1 << 9
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        devices::virtio::read_config_bytes(&[1, 2, 3, 4], offset, data)
    }
    fn process(&mut self, _index: usize, _queues: &mut DeviceQueues<'_>) {}
}

const BAR: u64 = 0xc000_0000;

fn device() -> (VirtioPciDevice, Arc<FakeVm>) {
    let vm = Arc::new(FakeVm::default());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let d = VirtioPciDevice::new("probe".into(), Box::new(Probe), vm.clone(), mem, BAR).unwrap();
    (d, vm)
}

fn r32(d: &mut VirtioPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.bar_read(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(d: &mut VirtioPciDevice, off: u64, v: u32) {
    d.bar_write(0, off, &v.to_le_bytes());
}

fn w16(d: &mut VirtioPciDevice, off: u64, v: u16) {
    d.bar_write(0, off, &v.to_le_bytes());
}

fn r16(d: &mut VirtioPciDevice, off: u64) -> u16 {
    let mut b = [0u8; 2];
    d.bar_read(0, off, &mut b);
    u16::from_le_bytes(b)
}

fn status(d: &mut VirtioPciDevice) -> u8 {
    let mut b = [0u8];
    d.bar_read(0, 0x14, &mut b);
    b[0]
}

fn set_status(d: &mut VirtioPciDevice, s: u32) {
    d.bar_write(0, 0x14, &[s as u8]);
}

/// Negotiates `features` the way Linux does; returns the status read back.
fn negotiate(d: &mut VirtioPciDevice, features: u64) -> u8 {
    set_status(d, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    for sel in 0..2 {
        w32(d, 0x08, sel);
        w32(d, 0x0c, (features >> (32 * sel)) as u32);
    }
    set_status(
        d,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    status(d)
}

/// Sets up queue `q` at `base` (descriptors, then rings a page apart).
fn setup_queue(d: &mut VirtioPciDevice, q: u16, base: u32) {
    w16(d, 0x16, q);
    w16(d, 0x18, 16);
    w32(d, 0x20, base);
    w32(d, 0x24, 0);
    w32(d, 0x28, base + 0x1000);
    w32(d, 0x2c, 0);
    w32(d, 0x30, base + 0x2000);
    w32(d, 0x34, 0);
    w16(d, 0x1c, 1);
}

#[test]
fn the_driver_negotiates_sets_up_queues_and_starts_the_device() {
    let (mut d, _vm) = device();
    w32(&mut d, 0x00, 0);
    let lo = r32(&mut d, 0x04);
    w32(&mut d, 0x00, 1);
    let hi = r32(&mut d, 0x04);
    let offered = u64::from(hi) << 32 | u64::from(lo);
    assert_eq!(offered, Probe.features());
    assert_eq!(r16(&mut d, 0x12), 2, "num_queues");
    let s = negotiate(&mut d, offered);
    assert_ne!(s & VIRTIO_CONFIG_S_FEATURES_OK as u8, 0);
    setup_queue(&mut d, 0, 0x1_0000);
    setup_queue(&mut d, 1, 0x2_0000);
    w16(&mut d, 0x16, 1);
    assert_eq!(r16(&mut d, 0x18), 16);
    assert_eq!(r16(&mut d, 0x1e), 1, "queue_notify_off is the queue index");
    assert_eq!(r32(&mut d, 0x28), 0x2_1000);
    assert!(!d.active());
    let s = status(&mut d) as u32;
    set_status(&mut d, s | VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(d.active());
    // Queue registers are frozen while the device runs.
    w16(&mut d, 0x18, 8);
    assert_eq!(r16(&mut d, 0x18), 16);
    // Device config is read through the BAR.
    assert_eq!(r32(&mut d, DEVICE_CFG), 0x0403_0201);
}

#[test]
fn features_not_offered_or_without_version_1_fail_features_ok() {
    let (mut d, _vm) = device();
    let s = negotiate(&mut d, COMMON_FEATURES | 1 << 20);
    assert_eq!(s & VIRTIO_CONFIG_S_FEATURES_OK as u8, 0);
    set_status(&mut d, 0);
    let s = negotiate(&mut d, 1 << 9);
    assert_eq!(s & VIRTIO_CONFIG_S_FEATURES_OK as u8, 0, "legacy driver");
    // Without FEATURES_OK, DRIVER_OK does not start the device.
    let s = status(&mut d) as u32;
    set_status(&mut d, s | VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(!d.active());
}

#[test]
fn a_queue_outside_guest_ram_makes_the_device_need_a_reset() {
    let (mut d, _vm) = device();
    negotiate(&mut d, COMMON_FEATURES);
    setup_queue(&mut d, 0, 0x4000_0000);
    let s = status(&mut d) as u32;
    set_status(&mut d, s | VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(!d.active());
    assert_ne!(status(&mut d) & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
}

#[test]
fn reset_forgets_the_negotiation_and_the_queues() {
    let (mut d, _vm) = device();
    negotiate(&mut d, COMMON_FEATURES);
    setup_queue(&mut d, 0, 0x1_0000);
    let s = status(&mut d) as u32;
    set_status(&mut d, s | VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(d.active());
    set_status(&mut d, 0);
    assert!(!d.active());
    assert_eq!(status(&mut d), 0);
    w32(&mut d, 0x08, 0);
    assert_eq!(r32(&mut d, 0x0c), 0);
    w16(&mut d, 0x16, 0);
    assert_eq!(r16(&mut d, 0x1c), 0, "queue no longer enabled");
}

#[test]
fn notifications_are_ioeventfds_that_follow_the_bar() {
    let (mut d, vm) = device();
    let at = |base: u64| [base + NOTIFY, base + NOTIFY + 4].into_iter().collect();
    assert_eq!(vm.state().ioevents, at(BAR));
    // The guest sizes, then moves, BAR 0.
    d.config_write(regs::BAR0, 0, &u32::MAX.to_le_bytes());
    assert_eq!(d.config_read(regs::BAR0), !(BAR_SIZE as u32 - 1) | 0b100);
    d.config_write(regs::BAR0, 0, &0xd000_0000u32.to_le_bytes());
    assert_eq!(d.config_read(regs::BAR0), 0xd000_0004);
    assert_eq!(vm.state().ioevents, at(0xd000_0000));
    d.release();
    assert!(vm.state().ioevents.is_empty());
}

#[test]
fn msix_vectors_are_routed_once_enabled_and_unmasked() {
    let (mut d, vm) = device();
    // Message control: 3 vectors (two queues and config).
    assert_eq!(d.config_read(CAP_MSIX) >> 16, 2);
    // Program vector 1 and unmask it, then enable MSI-X.
    w32(&mut d, MSIX_TABLE + 16, 0xfee0_0000);
    w32(&mut d, MSIX_TABLE + 24, 0x41);
    w32(&mut d, MSIX_TABLE + 28, 0);
    assert!(vm.state().irqfds.is_empty(), "not before MSI-X is enabled");
    d.config_write(CAP_MSIX, 2, &0x8000u16.to_le_bytes());
    let gsi = d.vectors[1].gsi;
    assert_eq!(vm.state().irqfds.into_iter().collect::<Vec<_>>(), vec![gsi]);
    assert_eq!(vm.state().routes[&gsi], (0xfee0_0000, 0x41));
    // Queue vectors past the table read back as NO_VECTOR.
    w16(&mut d, 0x16, 0);
    w16(&mut d, 0x1a, 7);
    assert_eq!(r16(&mut d, 0x1a), NO_VECTOR);
    w16(&mut d, 0x1a, 1);
    assert_eq!(r16(&mut d, 0x1a), 1);
    // A queue interrupt lands in vector 1's eventfd.
    d.irq.notify_queue(0);
    assert_eq!(d.vectors[1].evt.read().unwrap(), 1);
    // Masking takes the irqfd out; what fires meanwhile shows in the PBA.
    w32(&mut d, MSIX_TABLE + 28, 1);
    assert!(vm.state().irqfds.is_empty());
    d.irq.notify_queue(0);
    assert_eq!(r32(&mut d, MSIX_PBA), 0b10);
}

#[test]
fn config_space_lists_the_virtio_capabilities_in_bar_0() {
    let (mut d, _vm) = device();
    assert_eq!(d.config_read(0), 0x1042_1af4);
    assert_eq!(d.config_read(0x2c) >> 16, 0x42);
    let mut at = (d.config_read(regs::CAP_PTR) & 0xff) as usize;
    let mut seen = Vec::new();
    while at != 0 {
        let head = d.config_read(at);
        let (id, next) = (head as u8, (head >> 8) as u8);
        if id == CAP_VENDOR {
            let kind = (head >> 24) as u8;
            let bar = d.config_read(at + 4) as u8;
            let offset = d.config_read(at + 8);
            seen.push((kind, bar, offset));
        } else {
            seen.push((id, 0xff, 0));
        }
        at = usize::from(next);
    }
    assert_eq!(
        seen,
        vec![
            (regs::CAP_MSIX, 0xff, 0),
            (1, 0, COMMON as u32),
            (2, 0, NOTIFY as u32),
            (3, 0, ISR as u32),
            (4, 0, DEVICE_CFG as u32),
        ]
    );
    // The notify capability's multiplier.
    assert_eq!(d.config_read(0x5c + 16), NOTIFY_MULTIPLIER);
}
