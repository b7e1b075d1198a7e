//! virtio-console with VIRTIO_CONSOLE_F_MULTIPORT: named output ports (the job's
//! stdout and stderr) that the guest sees as `/dev/vportNpM`, each a plain character
//! device taking writes of up to 32 KiB per buffer, with no tty layer in between.
//!
//! Queues: port 0 receive/transmit (0, 1), control receive/transmit (2, 3), then
//! receive/transmit of port *n* at 2n+2 and 2n+3. The control handshake: the driver
//! says DEVICE_READY, the device adds each port, the driver says PORT_READY for it,
//! the device names it and opens it (the host side is always connected).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use vm_memory::GuestMemoryMmap;

use super::descriptors::{copy_to, iovecs, take_front, total, write_stream, Buffers};
use super::{read_config_bytes, DeviceQueues, VirtioDevice, COMMON_FEATURES};

/// Feature bit: several ports and a control queue pair.
pub const F_MULTIPORT: u32 = 1;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Control receive queue (device -> driver).
const CONTROL_RX: usize = 2;
/// Control transmit queue (driver -> device).
const CONTROL_TX: usize = 3;

/// Control events (struct virtio_console_control's `event`).
mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const PORT_READY: u16 = 3;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

/// An output port: what the guest writes to it goes to `out`.
pub struct ConsolePort {
    /// The name the guest reads in `/sys/class/virtio-ports/vportNpM/name`.
    pub name: String,
    /// Where the bytes go (hpcvm's stdout or stderr).
    pub out: OwnedFd,
}

/// Bytes the guest wrote to each port and what failed, for status reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Bytes taken from the guest.
    pub bytes: u64,
    /// The host side could not take them (stdout closed): they were dropped.
    pub dropped: u64,
}

/// The console device.
pub struct Console {
    ports: Vec<ConsolePort>,
    stats: Vec<PortStats>,
    /// Control messages waiting for a buffer in the control receive queue.
    outbox: VecDeque<Vec<u8>>,
    config: Vec<u8>,
}

/// The port whose transmit queue is `queue`, if it is one.
fn port_of_tx(queue: usize) -> Option<usize> {
    match queue {
        1 => Some(0),
        q if q >= 5 && q % 2 == 1 => Some((q - 3) / 2),
        _ => None,
    }
}

fn control(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(8);
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

impl Console {
    /// A console with `ports` (at least one).
    pub fn new(ports: Vec<ConsolePort>) -> Self {
        let mut config = vec![0u8; 12];
        // cols, rows (unused: no console port), max_nr_ports.
        config[4..8].copy_from_slice(&(ports.len() as u32).to_le_bytes());
        Self {
            stats: vec![PortStats::default(); ports.len()],
            ports,
            outbox: VecDeque::new(),
            config,
        }
    }

    /// What each port has carried so far.
    pub fn stats(&self) -> &[PortStats] {
        &self.stats
    }

    /// A message from the driver on the control transmit queue.
    fn on_control(&mut self, msg: &[u8]) {
        if msg.len() < 8 {
            return;
        }
        let id = u32::from_le_bytes(msg[0..4].try_into().expect("4 bytes"));
        let ev = u16::from_le_bytes(msg[4..6].try_into().expect("2 bytes"));
        let value = u16::from_le_bytes(msg[6..8].try_into().expect("2 bytes"));
        match ev {
            event::DEVICE_READY if value == 1 => {
                for p in 0..self.ports.len() {
                    self.outbox
                        .push_back(control(p as u32, event::DEVICE_ADD, 1));
                }
            }
            event::PORT_READY if value == 1 => {
                if let Some(port) = self.ports.get(id as usize) {
                    let mut named = control(id, event::PORT_NAME, 1);
                    named.extend_from_slice(port.name.as_bytes());
                    self.outbox.push_back(named);
                    self.outbox.push_back(control(id, event::PORT_OPEN, 1));
                }
            }
            // PORT_OPEN from the guest (a program opened the port) and the rest need
            // nothing from a host side that is always connected.
            _ => {}
        }
    }

    /// Hands waiting control messages to the driver's control receive buffers.
    fn flush_outbox(&mut self, queues: &mut DeviceQueues<'_>) {
        let outbox = &mut self.outbox;
        queues.fill(CONTROL_RX, outbox.len(), |mem, chain| {
            let msg = outbox.pop_front().unwrap_or_default();
            copy_to(mem, &Buffers::of(chain).writable, &msg) as u32
        });
    }

    /// Sends what the guest wrote to port `port` to its host side.
    fn transmit(&mut self, port: usize, mem: &GuestMemoryMmap, b: &Buffers) {
        let len = total(&b.readable);
        let Some(p) = self.ports.get(port) else {
            return;
        };
        let result: io::Result<u64> =
            iovecs(mem, &b.readable).and_then(|iov| write_stream(p.out.as_raw_fd(), iov));
        let s = &mut self.stats[port];
        s.bytes += len;
        if result.is_err() {
            s.dropped += len;
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // Port 0's pair, the control pair, then a pair per further port.
        vec![QUEUE_SIZE; 2 * self.ports.len() + 2]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES | 1 << F_MULTIPORT
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process(&mut self, index: usize, queues: &mut DeviceQueues<'_>) {
        if index == CONTROL_TX {
            let mut msgs = Vec::new();
            queues.drain(CONTROL_TX, |mem, chain| {
                let mut b = Buffers::of(chain);
                let n = total(&b.readable).min(64) as usize;
                let mut msg = vec![0u8; n];
                if take_front(mem, &mut b.readable, &mut msg).is_some() {
                    msgs.push(msg);
                }
                0
            });
            for m in msgs {
                self.on_control(&m);
            }
            self.flush_outbox(queues);
        } else if index == CONTROL_RX {
            self.flush_outbox(queues);
        } else if let Some(port) = port_of_tx(index) {
            // Written out before the buffer goes back to the driver, which may
            // reuse it at once.
            queues.drain(index, |mem, chain| {
                self.transmit(port, mem, &Buffers::of(chain));
                0
            });
        }
        // Receive queues: the host never sends input to a port.
    }

    fn reset(&mut self) {
        self.outbox.clear();
    }
}

#[cfg(test)]
mod tests;
