//! A 16550A UART (vm-superio) with its interrupt on an irqfd, and host input queued
//! beyond its 64-byte FIFO: what does not fit is fed in as the guest drains the FIFO.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Base port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Base port of COM2.
pub const COM2_BASE: u16 = 0x2f8;
/// Ports a UART decodes.
pub const UART_PORTS: u16 = 8;
/// ISA IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
/// ISA IRQ line of COM2.
pub const COM2_IRQ: u32 = 3;

/// Most host input kept waiting for the guest beyond the FIFO.
pub const MAX_PENDING_INPUT: usize = 2 << 20;

/// A UART whose transmit side writes to `out` (stdout for the console, the agent
/// protocol decoder for COM2).
pub struct Uart {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
}

impl Uart {
    /// A UART raising its interrupt through `irq` and sending guest output to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(irq, out),
            pending: VecDeque::new(),
        }
    }

    /// Queues host input for the guest to read; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.uart
            .enqueue_raw_bytes(bytes)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }

    /// Queues host input of any length: the FIFO gets what fits now, the rest as the
    /// guest reads. Fails (queuing nothing) past [`MAX_PENDING_INPUT`] waiting bytes.
    pub fn queue_input(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.pending.len() + bytes.len() > MAX_PENDING_INPUT {
            return Err(io::Error::other(format!(
                "guest has {} bytes of unread input already",
                self.pending.len()
            )));
        }
        self.pending.extend(bytes);
        self.pump();
        Ok(())
    }

    fn pump(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (a, _) = self.pending.as_slices();
            let n = a.len().min(self.uart.fifo_capacity());
            match self.uart.enqueue_raw_bytes(&a[..n]) {
                Ok(k) if k > 0 => {
                    self.pending.drain(..k);
                }
                _ => break,
            }
        }
    }

    /// Free room in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Flushes what the guest wrote so far.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are byte-wide; a wider access reads the register then all ones.
        data.fill(0xff);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
        if !self.pending.is_empty() {
            self.pump();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // The only failure is the writer's (stdout closed) or the irqfd's; the guest
            // cannot do anything about either, and the console must not stop the VM.
            let _ = self.uart.write(off, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Uart, Shared, EventFdTrigger) {
        let evt = EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let out = Shared::default();
        let s = Uart::new(evt.try_clone().unwrap(), Box::new(out.clone()));
        (s, out, evt)
    }

    #[test]
    fn guest_writes_to_thr_reach_the_writer() {
        let (mut s, out, _) = uart();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn host_input_is_readable_and_raises_the_irq() {
        let (mut s, _, evt) = uart();
        s.write(1, &[0x01]); // IER: receive-data-available interrupt on
        assert_eq!(s.enqueue_input(b"x").unwrap(), 1);
        assert_eq!(evt.read().unwrap(), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "LSR data-ready");
        let mut rbr = [0u8];
        s.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }

    #[test]
    fn input_longer_than_the_fifo_arrives_whole_as_the_guest_reads() {
        let (mut s, _, _) = uart();
        let msg: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        s.queue_input(&msg).unwrap();
        let mut got = Vec::new();
        for _ in 0..5000 {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, msg);
    }

    #[test]
    fn queued_input_is_bounded() {
        let (mut s, _, _) = uart();
        s.queue_input(&vec![0u8; MAX_PENDING_INPUT]).unwrap();
        assert!(s.queue_input(&[0u8; 128]).is_err());
    }
}
