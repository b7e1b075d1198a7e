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

/// The input port: what the guest reads from it comes from `fd`.
pub struct InputPort {
    /// The name the guest reads in `/sys/class/virtio-ports/vportNpM/name`.
    pub name: String,
    /// Where the bytes come from (hpcvm's stdin).
    pub fd: OwnedFd,
}

/// Most bytes read from the input fd at once.
const INPUT_CHUNK: usize = 64 << 10;

/// The input port's state.
struct Input {
    name: String,
    fd: OwnedFd,
    /// Its port number (after the output ports).
    port: usize,
    /// Read from the fd, not yet in a guest buffer.
    pending: VecDeque<u8>,
    /// The fd reached its end.
    eof: bool,
    /// The port was closed towards the guest (after `eof` and `pending` drained).
    closed: bool,
    /// epoll can wait for the fd.
    pollable: bool,
    /// The guest has the port open: the driver discards data that arrives before.
    guest_open: bool,
}

/// epoll can wait for `fd`: a pipe, socket or terminal; not a regular file or
/// /dev/null, which are always readable (and which epoll refuses).
fn pollable(fd: &OwnedFd) -> bool {
    // SAFETY: stat is plain data, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat and isatty on an fd the caller owns; `st` is valid for writing.
    let (ok, tty) = unsafe {
        (
            libc::fstat(fd.as_raw_fd(), &mut st) == 0,
            libc::isatty(fd.as_raw_fd()) == 1,
        )
    };
    tty || ok && matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
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
    input: Option<Input>,
}

/// The receive queue of port `port`.
fn rx_of(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
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
    /// A console with output `ports` (at least one).
    pub fn new(ports: Vec<ConsolePort>) -> Self {
        Self::with_input(ports, None)
    }

    /// A console with output `ports` and an `input` port after them.
    pub fn with_input(ports: Vec<ConsolePort>, input: Option<InputPort>) -> Self {
        let count = ports.len() + usize::from(input.is_some());
        let mut config = vec![0u8; 12];
        // cols, rows (unused: no console port), max_nr_ports.
        config[4..8].copy_from_slice(&(count as u32).to_le_bytes());
        let input = input.map(|i| Input {
            pollable: pollable(&i.fd),
            name: i.name,
            fd: i.fd,
            port: ports.len(),
            pending: VecDeque::new(),
            eof: false,
            closed: false,
            guest_open: false,
        });
        Self {
            stats: vec![PortStats::default(); ports.len()],
            ports,
            outbox: VecDeque::new(),
            config,
            input,
        }
    }

    fn port_count(&self) -> usize {
        self.ports.len() + usize::from(self.input.is_some())
    }

    fn port_name(&self, port: usize) -> Option<&str> {
        match self.ports.get(port) {
            Some(p) => Some(&p.name),
            None => self
                .input
                .as_ref()
                .filter(|i| i.port == port)
                .map(|i| i.name.as_str()),
        }
    }

    /// Reads the input fd once into the bounce buffer (if it is empty).
    fn read_input(&mut self) {
        let Some(i) = self.input.as_mut() else {
            return;
        };
        if !i.pending.is_empty() || i.eof {
            return;
        }
        let mut buf = vec![0u8; INPUT_CHUNK];
        // SAFETY: reads at most buf.len() bytes into buf from an fd this device owns.
        let n = unsafe { libc::read(i.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => i.eof = true,
            n if n > 0 => i.pending.extend(&buf[..n as usize]),
            _ => {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    // A broken stdin ends the job's input like an end of file.
                    i.eof = true;
                }
            }
        }
    }

    /// Moves pending input into the driver's receive buffers, one buffer per chain,
    /// and closes the port once the input has ended and all of it is delivered.
    fn deliver_input(&mut self, queues: &mut DeviceQueues<'_>) {
        let Some(i) = self.input.as_mut().filter(|i| i.guest_open) else {
            return;
        };
        let rx = rx_of(i.port);
        while !i.pending.is_empty() {
            let pending = &mut i.pending;
            let took = queues.fill(rx, 1, |mem, chain| {
                // Straight from the bounce buffer, no copy of it per chain.
                let bytes = pending.make_contiguous();
                let bytes = &bytes[..bytes.len().min(INPUT_CHUNK)];
                let n = copy_to(mem, &Buffers::of(chain).writable, bytes);
                pending.drain(..n as usize);
                n as u32
            });
            if took == 0 {
                break;
            }
        }
        if i.eof && i.pending.is_empty() && !i.closed {
            i.closed = true;
            let port = i.port as u32;
            self.outbox.push_back(control(port, event::PORT_OPEN, 0));
            self.flush_outbox(queues);
        }
    }

    /// Fills the guest's buffers with what waits; a file-like input (a regular file,
    /// /dev/null) is read here, a pollable one (a pipe) when the device thread sees
    /// it readable.
    fn feed_input(&mut self, queues: &mut DeviceQueues<'_>) {
        if self.input_fd().is_some() {
            self.deliver_input(queues);
        } else {
            self.pump_input(queues, false);
        }
    }

    /// Feeds the guest from the input fd: delivers what is pending, and while
    /// the driver has buffers, reads more. `once`: read the fd at most once (it said
    /// it is readable; another read could block).
    fn pump_input(&mut self, queues: &mut DeviceQueues<'_>, once: bool) {
        let mut reads = 0;
        loop {
            self.deliver_input(queues);
            let Some(i) = self.input.as_ref().filter(|i| i.guest_open) else {
                return;
            };
            if !i.pending.is_empty() || i.eof || (once && reads > 0) {
                return;
            }
            self.read_input();
            reads += 1;
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
                for p in 0..self.port_count() {
                    self.outbox
                        .push_back(control(p as u32, event::DEVICE_ADD, 1));
                }
            }
            event::PORT_READY if value == 1 => {
                if let Some(name) = self.port_name(id as usize) {
                    let mut named = control(id, event::PORT_NAME, 1);
                    named.extend_from_slice(name.as_bytes());
                    self.outbox.push_back(named);
                    let closed = self
                        .input
                        .as_ref()
                        .is_some_and(|i| i.port == id as usize && i.closed);
                    self.outbox
                        .push_back(control(id, event::PORT_OPEN, u16::from(!closed)));
                }
            }
            // A program in the guest opened or closed the input port.
            event::PORT_OPEN => {
                if let Some(i) = self.input.as_mut().filter(|i| i.port == id as usize) {
                    i.guest_open = value == 1;
                }
            }
            // The rest need nothing from a host side that is always connected.
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
        vec![QUEUE_SIZE; 2 * self.port_count() + 2]
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
            // The guest may just have opened the input port.
            self.feed_input(queues);
        } else if index == CONTROL_RX {
            self.flush_outbox(queues);
        } else if self.input.as_ref().is_some_and(|i| rx_of(i.port) == index) {
            // The driver gave buffers for input: fill them.
            self.feed_input(queues);
        } else if let Some(port) = port_of_tx(index) {
            // Written out before the buffer goes back to the driver, which may
            // reuse it at once.
            queues.drain(index, |mem, chain| {
                self.transmit(port, mem, &Buffers::of(chain));
                0
            });
        }
        // Other receive queues: the host sends no input to output ports.
    }

    fn input_fd(&self) -> Option<std::os::fd::RawFd> {
        self.input
            .as_ref()
            .filter(|i| i.pollable)
            .map(|i| i.fd.as_raw_fd())
    }

    fn wants_input(&self) -> bool {
        self.input
            .as_ref()
            .is_some_and(|i| i.guest_open && i.pending.is_empty() && !i.eof)
    }

    fn input_ready(&mut self, queues: &mut DeviceQueues<'_>) {
        self.pump_input(queues, true);
    }

    fn reset(&mut self) {
        self.outbox.clear();
    }

    fn state(&self) -> Result<super::DeviceState, String> {
        Ok(super::DeviceState::Console(ConsoleState {
            ports: self.ports.iter().map(|p| p.name.clone()).collect(),
            stats: self.stats.iter().map(|s| (s.bytes, s.dropped)).collect(),
            outbox: self.outbox.iter().cloned().collect(),
            input: self.input.as_ref().map(|i| InputState {
                name: i.name.clone(),
                pending: i.pending.iter().copied().collect(),
                eof: i.eof,
                closed: i.closed,
                guest_open: i.guest_open,
            }),
        }))
    }

    fn restore(&mut self, state: &super::DeviceState) -> Result<(), String> {
        let super::DeviceState::Console(s) = state else {
            return Err(format!("a console cannot take the state of {state:?}"));
        };
        let names: Vec<&str> = self.ports.iter().map(|p| p.name.as_str()).collect();
        let input = self.input.as_ref().map(|i| i.name.as_str());
        if s.ports != names || s.input.as_ref().map(|i| i.name.as_str()) != input {
            return Err(format!(
                "the console had ports {:?} (input {:?}) at the checkpoint, not {names:?} \
                 (input {input:?})",
                s.ports,
                s.input.as_ref().map(|i| &i.name)
            ));
        }
        if s.stats.len() != self.stats.len() || s.outbox.len() > 4 * self.port_count() + 4 {
            return Err("the console state does not fit its ports".into());
        }
        for (st, &(bytes, dropped)) in self.stats.iter_mut().zip(&s.stats) {
            *st = PortStats { bytes, dropped };
        }
        self.outbox = s.outbox.iter().cloned().collect();
        if let (Some(i), Some(saved)) = (self.input.as_mut(), &s.input) {
            i.pending = saved.pending.iter().copied().collect();
            i.eof = saved.eof;
            i.closed = saved.closed;
            i.guest_open = saved.guest_open;
        }
        Ok(())
    }
}

/// The console's state in a checkpoint (the ports' host sides are the new
/// process's stdout and stderr).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    /// Output port names, in order.
    pub ports: Vec<String>,
    /// (bytes, dropped) of each output port.
    pub stats: Vec<(u64, u64)>,
    /// Control messages not yet taken by the driver.
    pub outbox: Vec<Vec<u8>>,
    /// The input port, if there is one.
    pub input: Option<InputState>,
}

/// The input port's state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InputState {
    /// Its name.
    pub name: String,
    /// Read from the host, not yet delivered.
    pub pending: Vec<u8>,
    /// The host side had ended.
    pub eof: bool,
    /// The port was closed towards the guest.
    pub closed: bool,
    /// The guest had the port open.
    pub guest_open: bool,
}

#[cfg(test)]
mod tests;
