//! The virtio-pci modern transport (virtio 1.x, section 4.1): a PCI function whose one
//! 64-bit memory BAR holds the common configuration, the ISR, the device
//! configuration, the queue notification area and the MSI-X table and PBA, each
//! described by a vendor capability. Queue notifications are KVM ioeventfds and
//! interrupts MSI-X irqfds, so the data path costs no exit to hpcvm; only setup
//! (config space, common configuration) is trapped.

mod common;
mod state;

pub use state::{QueueSnapshot, VirtioPciState};

use std::sync::{Arc, Mutex};

use devices::lock;
use devices::pci::msix::MsixChange;
use devices::pci::{merge_bytes, regs, BarRange, MsixTable, PciDevice};
use devices::virtio::{DeviceQueues, QueueInterrupt, VirtioDevice};
use virtio_bindings::virtio_config::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::msix::MsixVector;
use crate::vstate::{DeviceVm, VmError};

/// PCI vendor ID of virtio devices.
pub const VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the virtio device type.
const DEVICE_BASE: u16 = 0x1040;
/// "No vector" in the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// Size of the BAR (a power of two).
pub const BAR_SIZE: u64 = 0x8000;
/// Where each structure sits in the BAR.
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;

/// Capability offsets in config space.
const CAP_MSIX: usize = 0x40;
/// Virtio capability types (virtio_pci_cap.cfg_type).
const CAPS: [(usize, u8, u64, u64); 4] = [
    (0x4c, 1, COMMON, COMMON_LEN),
    (0x5c, 2, NOTIFY, 0), // length set from the queue count
    (0x70, 3, ISR, 1),
    (0x80, 4, DEVICE_CFG, DEVICE_CFG_LEN),
];
/// The vendor-specific capability ID.
const CAP_VENDOR: u8 = 0x09;

/// Interrupts for the device model: each queue's MSI-X vector, as the driver chose.
struct Irq {
    evts: Vec<EventFd>,
    queue_vector: Mutex<Vec<u16>>,
}

impl QueueInterrupt for Irq {
    fn notify_queue(&self, index: usize) {
        let v = lock(&self.queue_vector)
            .get(index)
            .copied()
            .unwrap_or(NO_VECTOR);
        if let Some(evt) = self.evts.get(usize::from(v)) {
            let _ = evt.write(1);
        }
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    name: String,
    dev: Box<dyn VirtioDevice>,
    vm: Arc<dyn DeviceVm>,
    mem: GuestMemoryMmap,
    config: Vec<u8>,
    command: u16,
    bar_addr: u64,
    bar_sizing: [bool; 2],
    /// Where the queues' ioeventfds are registered (the BAR address then).
    ioevents_at: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    config_vector: u16,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    msix: MsixTable,
    vectors: Vec<MsixVector>,
    irq: Arc<Irq>,
    active: bool,
    /// Restored: each queue is looked at once when the VM starts running.
    kick_on_run: bool,
}

fn vm_io(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |e| VmError::Kvm {
        what,
        source: vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

impl VirtioPciDevice {
    /// `dev` as a PCI function whose BAR sits at guest-physical `bar_addr`.
    pub fn new(
        name: String,
        dev: Box<dyn VirtioDevice>,
        vm: Arc<dyn DeviceVm>,
        mem: GuestMemoryMmap,
        bar_addr: u64,
    ) -> Result<Self, VmError> {
        let sizes = dev.queue_max_sizes();
        let queues = sizes
            .iter()
            .map(|&s| {
                Queue::new(s).map_err(|_| vm_io("a virtqueue")(std::io::Error::other("bad size")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let notify = (0..sizes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(vm_io("a queue eventfd")))
            .collect::<Result<Vec<_>, _>>()?;
        let nvec = sizes.len() + 1;
        let vectors = (0..nvec)
            .map(|_| MsixVector::new(vm.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let evts = vectors
            .iter()
            .map(|v| v.evt.try_clone().map_err(vm_io("an MSI-X eventfd")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut d = Self {
            name,
            config: config_space(dev.device_type(), sizes.len()),
            dev,
            vm,
            mem,
            command: 0,
            bar_addr,
            bar_sizing: [false; 2],
            ioevents_at: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            queues,
            notify,
            msix: MsixTable::new(nvec),
            vectors,
            irq: Arc::new(Irq {
                evts,
                queue_vector: Mutex::new(vec![NO_VECTOR; sizes.len()]),
            }),
            active: false,
            kick_on_run: false,
        };
        d.register_ioevents()?;
        Ok(d)
    }

    /// What the device is (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queues' notification eventfds, for the device thread to wait on (only
    /// while no other process serves the queues: it reads them too).
    pub fn notifiers(&self) -> std::io::Result<Vec<EventFd>> {
        self.notify.iter().map(EventFd::try_clone).collect()
    }

    /// The fd the device model reads input from, if it has one epoll can wait for.
    pub fn input_fd(&self) -> Option<std::os::fd::RawFd> {
        self.dev.input_fd()
    }

    /// The active device has room for input from [`Self::input_fd`].
    pub fn wants_input(&self) -> bool {
        self.active && self.dev.wants_input()
    }

    /// [`Self::input_fd`] is readable.
    pub fn input_ready(&mut self) {
        if !self.active {
            return;
        }
        let mut q = DeviceQueues {
            mem: &self.mem,
            queues: &mut self.queues,
            irq: self.irq.as_ref(),
        };
        self.dev.input_ready(&mut q);
    }

    /// Another process (a vhost-user backend) serves the queues now.
    pub fn served_elsewhere(&self) -> bool {
        self.dev.serves_own_queues()
    }

    /// A pidfd of the process serving the queues, if one does.
    pub fn backend_exit(&self) -> Option<std::os::fd::OwnedFd> {
        self.dev.backend_exit()
    }

    /// That process has ended: the device model takes its queues back.
    pub fn backend_ended(&mut self) {
        let queues: &mut [Queue] = if self.active {
            &mut self.queues
        } else {
            &mut []
        };
        let mut q = DeviceQueues {
            mem: &self.mem,
            queues,
            irq: self.irq.as_ref(),
        };
        self.dev.backend_ended(&mut q);
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The driver has started the device (DRIVER_OK) and not reset it.
    pub fn active(&self) -> bool {
        self.active
    }

    /// The VM goes on in another process (a live migration's receiver, or the
    /// restore of a checkpoint it stopped at): this copy of the device serves its
    /// queues and input no more, so that nothing the guest queued is done twice.
    pub fn hand_over(&mut self) {
        self.active = false;
    }

    /// Runs the device model on queue `index`, if the device is active.
    pub fn process(&mut self, index: usize) {
        if !self.active || self.dev.serves_own_queues() {
            return;
        }
        let mut q = DeviceQueues {
            mem: &self.mem,
            queues: &mut self.queues,
            irq: self.irq.as_ref(),
        };
        self.dev.process(index, &mut q);
    }

    /// The device model, for status and tests.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.dev.as_ref()
    }

    fn register_ioevents(&mut self) -> Result<(), VmError> {
        let base = self.bar_addr + NOTIFY;
        for (i, evt) in self.notify.iter().enumerate() {
            let addr = base + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Err(e) = self.vm.register_ioevent(evt, addr) {
                for (j, done) in self.notify.iter().enumerate().take(i) {
                    let _ = self
                        .vm
                        .unregister_ioevent(done, base + j as u64 * u64::from(NOTIFY_MULTIPLIER));
                }
                return Err(e);
            }
        }
        self.ioevents_at = Some(self.bar_addr);
        Ok(())
    }

    fn unregister_ioevents(&mut self) {
        if let Some(at) = self.ioevents_at.take() {
            for (i, evt) in self.notify.iter().enumerate() {
                let addr = at + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                let _ = self.vm.unregister_ioevent(evt, addr);
            }
        }
    }

    /// Unroutes every vector and removes the ioeventfds; the vCPUs must be stopped.
    pub fn release(&mut self) {
        self.unregister_ioevents();
        for v in &mut self.vectors {
            v.unroute(self.vm.as_ref());
        }
    }

    fn reset(&mut self) {
        self.dev.reset();
        for q in &mut self.queues {
            q.reset();
        }
        lock(&self.irq.queue_vector).fill(NO_VECTOR);
        self.config_vector = NO_VECTOR;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.status = 0;
        self.active = false;
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let features_ok = VIRTIO_CONFIG_S_FEATURES_OK as u8;
        let driver_ok = VIRTIO_CONFIG_S_DRIVER_OK as u8;
        let mut new = value;
        if new & features_ok != 0 && self.status & features_ok == 0 {
            let offered = self.dev.features();
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.driver_features & !offered != 0 || self.driver_features & version_1 == 0 {
                new &= !features_ok;
            }
        }
        if new & driver_ok != 0 && !self.active && new & features_ok != 0 {
            let event_idx = self.driver_features
                & 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
                != 0;
            let mut valid = true;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
                if q.ready() && !q.is_valid(&self.mem) {
                    valid = false;
                }
            }
            let started = if valid {
                self.start_device()
            } else {
                Err("a queue lies outside guest RAM".to_string())
            };
            match started {
                Ok(()) => self.active = true,
                Err(e) => {
                    log::error!("{}: cannot start: {e}", self.name);
                    new |= VIRTIO_CONFIG_S_NEEDS_RESET as u8;
                }
            }
        }
        self.status = new;
    }

    /// Activates the device model with the queues and the eventfds each queue
    /// notifies and interrupts through.
    fn start_device(&mut self) -> Result<(), String> {
        let calls = self.calls()?;
        let ctx = devices::virtio::ActivateContext {
            mem: &self.mem,
            queues: &self.queues,
            kicks: &self.notify,
            calls,
        };
        self.dev.activate(self.driver_features, ctx)
    }

    /// Each queue's interrupt eventfd (its vector's irqfd; a loose one where the
    /// queue has no vector: interrupts go nowhere).
    fn calls(&self) -> Result<Vec<EventFd>, String> {
        let vectors = lock(&self.irq.queue_vector).clone();
        vectors
            .iter()
            .map(|&v| match self.vectors.get(usize::from(v)) {
                Some(vec) => vec.evt.try_clone(),
                None => EventFd::new(EFD_NONBLOCK),
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("interrupt eventfds: {e}"))
    }

    /// A checkpoint or migration begins: a backend serving the active device's
    /// queues from another process stops and hands over its state (see
    /// [`VirtioDevice::quiesce`]). Err names the device and why it cannot.
    pub fn quiesce(&mut self) -> Result<(), String> {
        if !self.active {
            return Ok(());
        }
        self.dev
            .quiesce()
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// The checkpoint is written or the migration failed: what [`Self::quiesce`]
    /// stopped carries on (nothing for a device handed over, never started, or
    /// whose queues hpcvm serves itself: the device thread resumes with the lock).
    pub fn resume_backend(&mut self) {
        if !self.active || !self.dev.serves_own_queues() {
            return;
        }
        let resumed = self.calls().and_then(|calls| {
            let ctx = devices::virtio::ActivateContext {
                mem: &self.mem,
                queues: &self.queues,
                kicks: &self.notify,
                calls,
            };
            self.dev.resume(ctx)
        });
        match resumed {
            // A kick the backend took just before its rings stopped may not have
            // been acted on: each queue is looked at once more.
            Ok(()) => self.kick_all(),
            Err(e) => log::error!("{}: cannot carry on after the checkpoint: {e}", self.name),
        }
    }

    /// A restored device looks at each of its queues once, for what the driver
    /// queued before the checkpoint or during a migration; called when the VM starts
    /// running, not before: a migration's receiver must not act on anything the
    /// guest asked for until the sender has let go of the VM.
    pub fn kick_restored(&mut self) {
        if std::mem::take(&mut self.kick_on_run) {
            self.kick_all();
        }
    }

    fn kick_all(&self) {
        for evt in &self.notify {
            let _ = evt.write(1);
        }
    }

    fn update_vector(&mut self, v: usize) {
        if let Some(vec) = self.vectors.get_mut(v) {
            vec.update(self.vm.as_ref(), &self.msix, v);
        }
    }

    fn bar_register(&self, high: bool) -> u32 {
        if high {
            if self.bar_sizing[1] {
                (!(BAR_SIZE - 1) >> 32) as u32
            } else {
                (self.bar_addr >> 32) as u32
            }
        } else if self.bar_sizing[0] {
            (!(BAR_SIZE - 1) as u32) | BAR_MEM64
        } else {
            self.bar_addr as u32 | BAR_MEM64
        }
    }

    fn write_bar(&mut self, high: bool, value: u32) {
        if value == u32::MAX {
            self.bar_sizing[usize::from(high)] = true;
            return;
        }
        self.bar_sizing[usize::from(high)] = false;
        let old = self.bar_addr;
        let addr = if high {
            u64::from(value) << 32 | (self.bar_addr & 0xffff_ffff)
        } else {
            self.bar_addr & !0xffff_ffff | u64::from(value & !0xf)
        };
        self.bar_addr = addr & !(BAR_SIZE - 1);
        if self.bar_addr != old {
            // The notification addresses move with the BAR.
            self.unregister_ioevents();
            let _ = self.register_ioevents();
        }
    }
}

/// BAR 0 type bits: 64-bit memory, not prefetchable.
const BAR_MEM64: u32 = 0b100;

/// The static part of config space: IDs, class, capabilities.
fn config_space(device_type: u32, queues: usize) -> Vec<u8> {
    let mut c = vec![0u8; regs::CONFIG_SIZE];
    let put =
        |c: &mut Vec<u8>, at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut c, 0, &VENDOR.to_le_bytes());
    put(&mut c, 2, &(DEVICE_BASE + device_type as u16).to_le_bytes());
    // Revision 1 (modern only); class: mass storage for block, communication for
    // the console, else "other".
    let class: u32 = match device_type {
        2 => 0x01_80_00,
        3 => 0x07_80_00,
        _ => 0xff_00_00,
    };
    put(&mut c, 8, &(class << 8 | 1).to_le_bytes());
    put(&mut c, 0x2c, &VENDOR.to_le_bytes());
    put(&mut c, 0x2e, &(0x40 + device_type as u16).to_le_bytes());
    put(&mut c, regs::CAP_PTR, &[CAP_MSIX as u8]);
    // MSI-X: table and PBA in BAR 0.
    let vectors = queues + 1;
    put(&mut c, CAP_MSIX, &[regs::CAP_MSIX, CAPS[0].0 as u8]);
    put(&mut c, CAP_MSIX + 2, &((vectors - 1) as u16).to_le_bytes());
    put(&mut c, CAP_MSIX + 4, &(MSIX_TABLE as u32).to_le_bytes());
    put(&mut c, CAP_MSIX + 8, &(MSIX_PBA as u32).to_le_bytes());
    for (i, &(at, kind, offset, len)) in CAPS.iter().enumerate() {
        let next = CAPS.get(i + 1).map_or(0, |n| n.0 as u8);
        let len = if kind == 2 {
            queues as u64 * u64::from(NOTIFY_MULTIPLIER)
        } else {
            len
        };
        let cap_len = if kind == 2 { 20 } else { 16 };
        put(&mut c, at, &[CAP_VENDOR, next, cap_len, kind, 0, 0, 0, 0]);
        put(&mut c, at + 8, &(offset as u32).to_le_bytes());
        put(&mut c, at + 12, &(len as u32).to_le_bytes());
        if kind == 2 {
            put(&mut c, at + 16, &NOTIFY_MULTIPLIER.to_le_bytes());
        }
    }
    c
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        let stat = |c: &[u8]| u32::from_le_bytes(c[reg..reg + 4].try_into().expect("4 bytes"));
        match reg {
            regs::COMMAND => u32::from(regs::STATUS_CAP_LIST) << 16 | u32::from(self.command),
            regs::BAR0 => self.bar_register(false),
            r if r == regs::BAR0 + 4 => self.bar_register(true),
            CAP_MSIX => stat(&self.config) & 0xffff | u32::from(self.msix.control()) << 16,
            r if r < regs::CONFIG_SIZE => stat(&self.config),
            _ => 0,
        }
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        match reg {
            regs::COMMAND => {
                let v = merge_bytes(u32::from(self.command), offset, data);
                self.command = v as u16;
            }
            regs::BAR0 => {
                let v = merge_bytes(self.bar_register(false), offset, data);
                self.write_bar(false, v);
            }
            r if r == regs::BAR0 + 4 => {
                let v = merge_bytes(self.bar_register(true), offset, data);
                self.write_bar(true, v);
            }
            CAP_MSIX => {
                let dword = u32::from(self.msix.control()) << 16;
                let v = merge_bytes(dword, offset, data);
                if self.msix.set_control((v >> 16) as u16) {
                    for i in 0..self.vectors.len() {
                        self.update_vector(i);
                    }
                }
            }
            _ => {}
        }
    }

    fn trapped_bars(&self) -> Vec<BarRange> {
        if self.command & regs::CMD_MEMORY == 0 {
            return Vec::new();
        }
        vec![BarRange {
            index: 0,
            addr: self.bar_addr,
            size: BAR_SIZE,
        }]
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_read(o - COMMON, data),
            o if (ISR..ISR + 1).contains(&o) => data.fill(0),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.dev.read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_size()).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + self.msix.pba_size()).contains(&o) => {
                for (v, vec) in self.vectors.iter().enumerate() {
                    self.msix.set_pending(v, !vec.routed() && vec.pending());
                }
                self.msix.read_pba(o - MSIX_PBA, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_write(o - COMMON, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.dev.write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY..NOTIFY + self.queues.len() as u64 * 4).contains(&o) => {
                // Only reached when KVM did not take the write as an ioeventfd.
                if let Some(evt) = self.notify.get(((o - NOTIFY) / 4) as usize) {
                    let _ = evt.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_size()).contains(&o) => {
                if let Some(MsixChange::Vector(v)) = self.msix.write_table(o - MSIX_TABLE, data) {
                    self.update_vector(v);
                }
            }
            _ => {}
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests;
