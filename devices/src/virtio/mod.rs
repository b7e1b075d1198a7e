//! Virtio device models: what a device does with its virtqueues, independent of the
//! transport that carries them (hpcvm's is virtio-pci, in the `vmm` crate). Rings are
//! rust-vmm's `virtio-queue`; definitions come from `virtio-bindings` where it has them.

pub mod block;
pub mod console;
mod descriptors;
pub mod fs_failed;
#[cfg(test)]
mod testing;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use block::{Block, BlockOptions};
pub use console::{Console, ConsolePort, ConsoleState, InputPort};

/// Feature bits every hpcvm device offers (virtio 1.x, event-index suppression of
/// notifications and interrupts, indirect descriptors).
pub const COMMON_FEATURES: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
    | 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
    | 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// How a device tells the driver that a queue has used buffers.
pub trait QueueInterrupt: Send + Sync {
    /// Signals queue `index`'s interrupt.
    fn notify_queue(&self, index: usize);
}

/// The queues of an activated device, and the memory they live in.
pub struct DeviceQueues<'a> {
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, in the order of [`VirtioDevice::queue_max_sizes`].
    pub queues: &'a mut [Queue],
    /// Interrupt delivery.
    pub irq: &'a dyn QueueInterrupt,
}

impl DeviceQueues<'_> {
    /// Pops every available chain of queue `index` into `handle` (which returns the
    /// bytes it wrote into the chain), re-arming notifications until the ring stays
    /// empty, then interrupts the driver if the ring's event index asks for it.
    pub fn drain<F>(&mut self, index: usize, handle: F)
    where
        F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
    {
        self.fill(index, usize::MAX, handle);
    }

    /// As [`DeviceQueues::drain`], but takes at most `max` chains; returns how many.
    /// Notifications are left enabled, so the driver's next buffer wakes the device.
    pub fn fill<F>(&mut self, index: usize, max: usize, mut handle: F) -> usize
    where
        F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
    {
        let mem = self.mem;
        let Some(q) = self.queues.get_mut(index) else {
            return 0;
        };
        if !q.ready() {
            return 0;
        }
        let mut used = 0;
        loop {
            if q.disable_notification(mem).is_err() {
                break;
            }
            let before = used;
            while used < max {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let len = handle(mem, chain);
                // A failure here means the used ring is outside guest RAM: the
                // driver broke the queue, and there is nobody to tell.
                let _ = q.add_used(mem, head, len);
                used += 1;
            }
            // Go round again only for chains that arrived meanwhile: a ring the
            // driver broke (an available index no chain stands behind) must not
            // keep this thread spinning.
            match q.enable_notification(mem) {
                Ok(true) if used < max && used > before => continue,
                _ => break,
            }
        }
        if used > 0 && q.needs_notification(mem).unwrap_or(true) {
            self.irq.notify_queue(index);
        }
        used
    }
}

/// What a device that hands its queues to another process needs at activation.
pub struct ActivateContext<'a> {
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
    /// The queues as the driver set them up.
    pub queues: &'a [Queue],
    /// Each queue's notification eventfd (a KVM ioeventfd).
    pub kicks: &'a [EventFd],
    /// Each queue's interrupt eventfd (an MSI-X irqfd).
    pub calls: Vec<EventFd>,
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`virtio_ids`).
    fn device_type(&self) -> u32;
    /// Maximum size of each of its queues; the number of entries is the queue count.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits it offers (with [`COMMON_FEATURES`]).
    fn features(&self) -> u64;
    /// Reads `data.len()` bytes of its configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver wrote its configuration space (most fields are read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features acknowledged; Err makes the
    /// device need a reset (the reason goes to hpcvm's stderr).
    fn activate(&mut self, _features: u64, _ctx: ActivateContext<'_>) -> Result<(), String> {
        Ok(())
    }
    /// Another process serves the queues (vhost-user): hpcvm's device thread leaves
    /// the notifications alone.
    fn serves_own_queues(&self) -> bool {
        false
    }
    /// A pidfd of the process serving the queues (see [`Self::serves_own_queues`]),
    /// readable once that process has ended; a new descriptor each call.
    fn backend_exit(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }
    /// That process ended: the device serves its queues itself from now on,
    /// carrying on from where the backend stopped.
    fn backend_ended(&mut self, _queues: &mut DeviceQueues<'_>) {}
    /// An fd the device reads from, for the device thread to wait on while
    /// [`Self::wants_input`] (the console's stdin port, when stdin is a pipe).
    fn input_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The device has room for more input from [`Self::input_fd`].
    fn wants_input(&self) -> bool {
        false
    }
    /// [`Self::input_fd`] is readable.
    fn input_ready(&mut self, _queues: &mut DeviceQueues<'_>) {}
    /// Queue `index` was notified (or the device is being drained at teardown).
    fn process(&mut self, index: usize, queues: &mut DeviceQueues<'_>);
    /// The driver reset the device: forget everything negotiated.
    fn reset(&mut self) {}
    /// A checkpoint or migration begins: whatever serves the queues outside hpcvm (a
    /// vhost-user backend) stops and hands over its state, so that until
    /// [`Self::resume`] only the vCPUs write guest RAM. Err says why it cannot.
    fn quiesce(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// The checkpoint is written or the migration failed: what [`Self::quiesce`]
    /// stopped carries on where it stopped.
    fn resume(&mut self, _ctx: ActivateContext<'_>) -> Result<(), String> {
        Ok(())
    }
    /// What the device model holds beyond its queues, for a checkpoint; Err says
    /// why this device cannot be checkpointed.
    fn state(&self) -> Result<DeviceState, String> {
        Err("this device cannot be checkpointed".into())
    }
    /// Takes back what [`Self::state`] saved (in a device built from the same
    /// configuration); Err says what does not match.
    fn restore(&mut self, _state: &DeviceState) -> Result<(), String> {
        Err("this device cannot be restored".into())
    }
}

/// A device model's own state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// A disk: only its size, to notice a backing file that changed.
    Block {
        /// Capacity in sectors.
        sectors: u64,
    },
    /// The console.
    Console(console::ConsoleState),
    /// A virtio-fs share served by a vhost-user backend (virtiofsd).
    Fs(FsState),
}

/// A share's backend as a checkpoint holds it: where its rings stopped and what it
/// said of itself (virtiofsd: the guest's inodes and open files, by path).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsState {
    /// Each queue's next available index, where the backend stopped; empty if the
    /// driver had not started the device.
    pub bases: Vec<u16>,
    /// The backend's own state, as it sent it (vhost-user SET_DEVICE_STATE_FD).
    #[serde(with = "base64_bytes")]
    pub backend: Vec<u8>,
}

/// Bytes as one base64 string (a JSON array of numbers would be four times larger).
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Reads `data.len()` bytes at `offset` of a little-endian configuration `space`;
/// bytes past its end read as zero.
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| space.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}
