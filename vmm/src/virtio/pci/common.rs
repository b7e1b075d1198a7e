//! The common configuration structure (virtio 1.x, 4.1.4.3): feature negotiation,
//! device status, and the selected queue's size, vector, addresses and ready bit.

use devices::lock;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
use virtio_queue::{Queue, QueueT};

use super::{VirtioPciDevice, NO_VECTOR};

impl VirtioPciDevice {
    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    pub(super) fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let sel = usize::from(self.queue_select);
        let q = self.queues.get(sel);
        let qv = lock(&self.irq.queue_vector)
            .get(sel)
            .copied()
            .unwrap_or(NO_VECTOR);
        let features = self.dev.features();
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => 0,
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size())),
            0x1a => u64::from(qv),
            0x1c => q.map_or(0, |q| u64::from(q.ready())),
            0x1e => sel as u64,
            0x20 => q.map_or(0, |q| q.desc_table() & 0xffff_ffff),
            0x24 => q.map_or(0, |q| q.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            0x2c => q.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.used_ring() & 0xffff_ffff),
            0x34 => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(raw);
        let (lo, w16) = (v as u32, v as u16);
        let nvec = self.vectors.len() as u16;
        let vector = |x: u16| if x < nvec { x } else { NO_VECTOR };
        // Queue registers are frozen once the device runs.
        let queue_ok = !self.active;
        match offset {
            0x00 => self.device_feature_select = lo,
            0x08 => self.driver_feature_select = lo,
            0x0c if self.status & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = self.driver_features & !0xffff_ffff | u64::from(lo),
                    1 => {
                        self.driver_features =
                            self.driver_features & 0xffff_ffff | u64::from(lo) << 32
                    }
                    _ => {}
                }
            }
            0x10 => self.config_vector = vector(w16),
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_select = w16,
            0x18 if queue_ok => {
                if let Some(q) = self.selected() {
                    q.set_size(w16);
                }
            }
            0x1a => {
                let sel = usize::from(self.queue_select);
                if let Some(slot) = lock(&self.irq.queue_vector).get_mut(sel) {
                    *slot = vector(w16);
                }
            }
            0x1c if queue_ok => {
                if let Some(q) = self.selected() {
                    q.set_ready(w16 == 1);
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if queue_ok => {
                let high = offset & 4 != 0;
                let (lo_part, hi_part) = if high {
                    (None, Some(lo))
                } else {
                    (Some(lo), None)
                };
                if let Some(q) = self.selected() {
                    match offset & !4 {
                        0x20 => q.set_desc_table_address(lo_part, hi_part),
                        0x28 => q.set_avail_ring_address(lo_part, hi_part),
                        _ => q.set_used_ring_address(lo_part, hi_part),
                    }
                }
            }
            _ => {}
        }
    }
}
