//! A virtio-pci function's state in a checkpoint: what the driver negotiated and
//! programmed (status, features, BAR address, queues, MSI-X vectors) and the device
//! model's own state; and putting it back into a function built from the same
//! configuration.

use devices::lock;
use devices::pci::msix::MsixState;
use devices::virtio::DeviceState;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::VirtioPciDevice;

/// One virtqueue as the driver set it up and the device has used it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Descriptor table, available and used ring addresses.
    pub rings: [u64; 3],
    /// The device's next available and used indexes.
    pub next: [u16; 2],
    /// Event-index suppression negotiated.
    pub event_idx: bool,
    /// The queue's MSI-X vector.
    pub vector: u16,
}

/// A virtio-pci function's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// What the device is (checked against the one restored into).
    pub name: String,
    /// Virtio device type.
    pub device_type: u32,
    /// PCI command register.
    pub command: u16,
    /// BAR 0's guest-physical address.
    pub bar_addr: u64,
    /// Feature select registers (device, driver).
    pub feature_select: [u32; 2],
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// Device status.
    pub status: u8,
    /// Queue select register.
    pub queue_select: u16,
    /// Configuration-change vector.
    pub config_vector: u16,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
    /// The MSI-X table.
    pub msix: MsixState,
    /// Vectors holding an interrupt not yet delivered (masked at the checkpoint).
    pub pending: Vec<bool>,
    /// The driver started the device.
    pub active: bool,
    /// The device model's own state.
    pub device: DeviceState,
}

impl VirtioPciDevice {
    /// The function's state; Err names why this device cannot be checkpointed.
    pub fn state(&self) -> Result<VirtioPciState, String> {
        let device = self
            .dev
            .state()
            .map_err(|e| format!("{}: {e}", self.name))?;
        let vectors = lock(&self.irq.queue_vector).clone();
        let queues = self
            .queues
            .iter()
            .zip(vectors)
            .map(|(q, vector)| {
                let s = q.state();
                QueueSnapshot {
                    max_size: s.max_size,
                    size: s.size,
                    ready: s.ready,
                    rings: [s.desc_table, s.avail_ring, s.used_ring],
                    next: [s.next_avail, s.next_used],
                    event_idx: s.event_idx_enabled,
                    vector,
                }
            })
            .collect();
        Ok(VirtioPciState {
            name: self.name.clone(),
            device_type: self.dev.device_type(),
            command: self.command,
            bar_addr: self.bar_addr,
            feature_select: [self.device_feature_select, self.driver_feature_select],
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            config_vector: self.config_vector,
            queues,
            msix: self.msix.state(),
            pending: self.vectors.iter().map(|v| v.pending()).collect(),
            active: self.active,
            device,
        })
    }

    /// Puts `s` back into this function (built from the same configuration, not
    /// yet seen by the guest): BAR, queues, vectors (routed again), device model.
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), String> {
        let name = self.name.clone();
        let err = |e: String| format!("{name}: {e}");
        if s.name != self.name || s.device_type != self.dev.device_type() {
            return Err(err(format!(
                "the checkpoint has {} (virtio type {}) here",
                s.name, s.device_type
            )));
        }
        if s.queues.len() != self.queues.len() || s.pending.len() != self.vectors.len() {
            return Err(err(format!(
                "{} queues at the checkpoint, {} now",
                s.queues.len(),
                self.queues.len()
            )));
        }
        if s.driver_features & !self.dev.features() != 0 {
            return Err(err(
                "the driver had features this device does not offer".into()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            let state = QueueState {
                max_size: q.max_size,
                next_avail: q.next[0],
                next_used: q.next[1],
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.rings[0],
                avail_ring: q.rings[1],
                used_ring: q.rings[2],
            };
            let queue = Queue::try_from(state).map_err(|e| err(format!("queue {i}: {e:?}")))?;
            if queue.max_size() != self.queues[i].max_size()
                || (queue.ready() && !queue.is_valid(&self.mem))
            {
                return Err(err(format!("queue {i} does not fit this device or RAM")));
            }
            queues.push(queue);
        }
        self.msix.restore(&s.msix).map_err(err)?;
        self.dev.restore(&s.device).map_err(err)?;
        self.queues = queues;
        *lock(&self.irq.queue_vector) = s.queues.iter().map(|q| q.vector).collect();
        self.command = s.command;
        [self.device_feature_select, self.driver_feature_select] = s.feature_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.queue_select = s.queue_select;
        self.config_vector = s.config_vector;
        if s.bar_addr != self.bar_addr {
            self.unregister_ioevents();
            self.bar_addr = s.bar_addr & !(super::BAR_SIZE - 1);
            self.register_ioevents()
                .map_err(|e| err(format!("queue notifications: {e}")))?;
        }
        for v in 0..self.vectors.len() {
            self.update_vector(v);
            if s.pending[v] {
                let _ = self.vectors[v].evt.write(1);
            }
        }
        if s.active {
            self.start_device().map_err(err)?;
            self.active = true;
            // Whatever the driver queued meanwhile is looked at once the VM runs.
            self.kick_on_run = true;
        }
        Ok(())
    }
}
