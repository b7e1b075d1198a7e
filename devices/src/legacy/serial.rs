//! A 16550A UART (vm-superio) with its interrupt on an irqfd, and host input queued
//! beyond its 64-byte FIFO: what does not fit is fed in as the guest drains the FIFO.
//!
//! The wrapper also keeps the interrupt identification register honest about received
//! data. vm-superio forgets the receive interrupt on every RBR read, even with bytes
//! still in the FIFO; a real 16550 reports it in IIR for as long as data is waiting.
//! Linux's 8250 handler reads at most 256 bytes per pass and then asks IIR whether to go
//! on: with vm-superio's answer ("nothing pending") the rest of a longer message stayed in
//! the FIFO, unread, until some later host input raised a fresh interrupt.

use std::collections::VecDeque;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
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

/// Register offsets and bits the wrapper looks at.
const IER: u64 = 1;
const IIR: u64 = 2;
const LCR: u8 = 3;
const LCR_DLAB: u8 = 0x80;
const IER_RDA: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO_ENABLED: u8 = 0xc0;
/// The receive FIFO's size in vm-superio.
const FIFO_SIZE: usize = 64;

/// A UART whose transmit side writes to `out` (stdout for the console, the agent
/// protocol decoder for COM2).
pub struct Uart {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
    /// IER as the guest last wrote it (vm-superio hides it behind DLAB on reads).
    ier: u8,
    /// A transmitter-empty interrupt reported neither yet nor cleared: IIR showed the
    /// higher-priority receive interrupt instead.
    thre_held: bool,
}

impl Uart {
    /// A UART raising its interrupt through `irq` and sending guest output to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(irq, out),
            pending: VecDeque::new(),
            ier: 0,
            thre_held: false,
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

    /// IIR as a 16550 reports it: received data outranks a transmitter-empty
    /// interrupt, which stays pending until an IIR read reports it.
    fn read_iir(&mut self) -> u8 {
        // vm-superio's read clears its identification bits (the THRE one we keep).
        let iir = self.uart.read(IIR as u8);
        // Only while enabled: masking THRI in IER withdraws a pending THRE report.
        let thre = (iir & IIR_THRE != 0 || self.thre_held) && self.ier & IER_THRI != 0;
        let rx_waiting = self.uart.fifo_capacity() < FIFO_SIZE && self.ier & IER_RDA != 0;
        if rx_waiting {
            self.thre_held = thre;
            IIR_FIFO_ENABLED | IIR_RDA
        } else if thre {
            self.thre_held = false;
            IIR_FIFO_ENABLED | IIR_THRE
        } else {
            IIR_FIFO_ENABLED | IIR_NONE
        }
    }

    /// Flushes what the guest wrote so far.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }

    /// Everything the guest could see of the UART: registers, both FIFOs' contents
    /// and the input still queued behind the receive FIFO (for a checkpoint).
    pub fn state(&self) -> UartState {
        let s = self.uart.state();
        UartState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
            pending: self.pending.iter().copied().collect(),
            ier: self.ier,
            thre_held: self.thre_held,
        }
    }

    /// Puts the UART back as [`Uart::state`] saw it, keeping its interrupt and
    /// writer. Refuses a state no 16550 could be in (an overfull FIFO).
    pub fn restore(&mut self, state: &UartState) -> io::Result<()> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            state.regs;
        if state.fifo.len() > FIFO_SIZE || state.pending.len() > MAX_PENDING_INPUT {
            return Err(io::Error::other(format!(
                "UART state holds {} FIFO bytes (at most {FIFO_SIZE}) and {} queued",
                state.fifo.len(),
                state.pending.len()
            )));
        }
        let s = SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: state.fifo.clone(),
        };
        let irq = self.uart.interrupt_evt().try_clone()?;
        let old = std::mem::replace(
            &mut self.uart,
            Serial::new(irq.try_clone()?, Box::new(io::sink())),
        );
        self.uart = Serial::from_state(&s, irq, NoEvents, old.into_writer())
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.pending = state.pending.iter().copied().collect();
        self.ier = state.ier;
        self.thre_held = state.thre_held;
        Ok(())
    }
}

/// A [`Uart`]'s state in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR as vm-superio keeps them.
    pub regs: [u8; 9],
    /// The receive FIFO.
    pub fifo: Vec<u8>,
    /// Host input waiting behind the FIFO.
    pub pending: Vec<u8>,
    /// IER as the guest wrote it.
    pub ier: u8,
    /// A transmitter-empty interrupt not yet reported.
    pub thre_held: bool,
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are byte-wide; a wider access reads the register then all ones.
        data.fill(0xff);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = if offset == IIR {
                self.read_iir()
            } else {
                self.uart.read(off)
            };
        }
        if !self.pending.is_empty() {
            self.pump();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if offset == IER && self.uart.read(LCR) & LCR_DLAB == 0 {
                self.ier = value;
                if value & IER_THRI == 0 {
                    self.thre_held = false;
                }
            }
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
        read_ready(&mut s, 5000, &mut got);
        assert_eq!(got, msg);
    }

    /// Reads RBR into `got` while LSR says data ready, at most `max` bytes.
    fn read_ready(s: &mut Uart, max: usize, got: &mut Vec<u8>) {
        for _ in 0..max {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
    }

    /// Reads like Linux's 8250 handler: IIR, then at most 256 bytes while LSR says
    /// data ready, and again while IIR reports an interrupt.
    fn linux_irq_pass(s: &mut Uart, got: &mut Vec<u8>) -> bool {
        let mut iir = [0u8];
        s.read(IIR, &mut iir);
        if iir[0] & IIR_NONE != 0 {
            return false;
        }
        read_ready(s, 256, got);
        true
    }

    #[test]
    fn iir_reports_received_data_until_the_fifo_is_drained() {
        let (mut s, _, evt) = uart();
        s.write(IER, &[IER_RDA]);
        // Longer than one 256-byte pass, with the queue behind the FIFO empty before
        // the pass ends: the last 44 bytes wait in the FIFO with no new input to raise
        // another interrupt.
        let msg: Vec<u8> = (0..300u32).map(|i| (i % 253) as u8).collect();
        s.queue_input(&msg).unwrap();
        assert_eq!(evt.read().unwrap(), 1, "one interrupt for the input");
        let mut got = Vec::new();
        let mut passes = 0;
        while linux_irq_pass(&mut s, &mut got) {
            passes += 1;
            assert!(passes < 10, "IIR never went quiet");
        }
        assert_eq!(got, msg, "the whole message, read from one interrupt");
        assert_eq!(passes, 2, "256 + 44 bytes");
    }

    #[test]
    fn received_data_outranks_a_held_transmit_interrupt() {
        let (mut s, _, _) = uart();
        s.write(IER, &[IER_RDA | 0x02]); // and THR-empty
        s.write(0, b"x"); // THR empty again: THRE pending
        s.enqueue_input(b"ab").unwrap();
        let iir = |s: &mut Uart| {
            let mut v = [0u8];
            s.read(IIR, &mut v);
            v[0] & 0x0f
        };
        assert_eq!(iir(&mut s), IIR_RDA);
        let mut b = [0u8; 1];
        s.read(0, &mut b);
        s.read(0, &mut b);
        assert_eq!(iir(&mut s), IIR_THRE, "kept while data outranked it");
        assert_eq!(iir(&mut s), IIR_NONE, "reading IIR cleared it");
        // A held THRE is withdrawn when the guest masks THRI (as Linux's stop_tx does).
        s.write(0, b"y");
        s.enqueue_input(b"c").unwrap();
        assert_eq!(iir(&mut s), IIR_RDA);
        s.write(IER, &[IER_RDA]);
        s.read(0, &mut b);
        assert_eq!(iir(&mut s), IIR_NONE, "THRI masked: no THRE report");
    }

    #[test]
    fn ier_writes_behind_dlab_set_the_divisor_not_the_mask() {
        let (mut s, _, _) = uart();
        s.write(u64::from(LCR), &[LCR_DLAB]);
        s.write(IER, &[IER_RDA]); // divisor high byte
        s.write(u64::from(LCR), &[0x03]);
        s.enqueue_input(b"a").unwrap();
        let mut v = [0u8];
        s.read(IIR, &mut v);
        assert_eq!(v[0] & 0x0f, IIR_NONE, "receive interrupt not enabled");
    }

    #[test]
    fn queued_input_is_bounded() {
        let (mut s, _, _) = uart();
        s.queue_input(&vec![0u8; MAX_PENDING_INPUT]).unwrap();
        assert!(s.queue_input(&[0u8; 128]).is_err());
    }
}
