use std::io::Read;
use std::os::fd::FromRawFd;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::{mem, process, push, queues, used, DATA};

fn pipe() -> (std::fs::File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors we own.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

fn console() -> (Console, std::fs::File, std::fs::File) {
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let c = Console::new(vec![
        ConsolePort {
            name: "hpcvm.stdout".into(),
            out: out_w,
        },
        ConsolePort {
            name: "hpcvm.stderr".into(),
            out: err_w,
        },
    ]);
    (c, out_r, err_r)
}

/// The control messages the device wrote into receive buffers at DATA + 0x100 * i.
fn received(m: &GuestMemoryMmap) -> Vec<(u32, u16, u16, Vec<u8>)> {
    used(m, CONTROL_RX)
        .into_iter()
        .map(|(id, len)| {
            let mut buf = vec![0u8; len as usize];
            m.read_slice(&mut buf, GuestAddress(DATA + 0x100 * u64::from(id)))
                .unwrap();
            (
                u32::from_le_bytes(buf[0..4].try_into().unwrap()),
                u16::from_le_bytes(buf[4..6].try_into().unwrap()),
                u16::from_le_bytes(buf[6..8].try_into().unwrap()),
                buf[8..].to_vec(),
            )
        })
        .collect()
}

fn send_control(m: &GuestMemoryMmap, slot: u16, id: u32, ev: u16, value: u16) {
    let addr = DATA + 0x8000 + 0x10 * u64::from(slot);
    m.write_slice(&control(id, ev, value), GuestAddress(addr))
        .unwrap();
    push(m, CONTROL_TX, slot, &[(addr, 8, false)]);
}

#[test]
fn the_handshake_adds_names_and_opens_every_port() {
    let (mut c, _o, _e) = console();
    assert_eq!(c.queue_max_sizes().len(), 6);
    let m = mem();
    let mut q = queues(&m, 6);
    for i in 0..8u16 {
        push(
            &m,
            CONTROL_RX,
            i,
            &[(DATA + 0x100 * u64::from(i), 0x100, true)],
        );
    }
    send_control(&m, 0, u32::MAX, event::DEVICE_READY, 1);
    process(&mut c, &m, &mut q, CONTROL_TX);
    assert_eq!(
        received(&m),
        vec![
            (0, event::DEVICE_ADD, 1, vec![]),
            (1, event::DEVICE_ADD, 1, vec![])
        ]
    );
    send_control(&m, 1, 1, event::PORT_READY, 1);
    let irqs = process(&mut c, &m, &mut q, CONTROL_TX);
    assert!(irqs.contains(&CONTROL_RX));
    let got = received(&m);
    assert_eq!(got[2], (1, event::PORT_NAME, 1, b"hpcvm.stderr".to_vec()));
    assert_eq!(got[3], (1, event::PORT_OPEN, 1, vec![]));
}

#[test]
fn control_messages_wait_for_receive_buffers() {
    let (mut c, _o, _e) = console();
    let m = mem();
    let mut q = queues(&m, 6);
    send_control(&m, 0, u32::MAX, event::DEVICE_READY, 1);
    process(&mut c, &m, &mut q, CONTROL_TX);
    assert!(received(&m).is_empty());
    push(&m, CONTROL_RX, 0, &[(DATA, 0x100, true)]);
    process(&mut c, &m, &mut q, CONTROL_RX);
    assert_eq!(received(&m), vec![(0, event::DEVICE_ADD, 1, vec![])]);
    push(&m, CONTROL_RX, 1, &[(DATA + 0x100, 0x100, true)]);
    process(&mut c, &m, &mut q, CONTROL_RX);
    assert_eq!(received(&m).len(), 2);
}

#[test]
fn each_port_writes_to_its_own_host_fd_in_order() {
    let (mut c, mut out, mut err) = console();
    let m = mem();
    let mut q = queues(&m, 6);
    m.write_slice(b"hello ", GuestAddress(DATA)).unwrap();
    m.write_slice(b"world\n", GuestAddress(DATA + 0x1000))
        .unwrap();
    m.write_slice(b"oops\n", GuestAddress(DATA + 0x2000))
        .unwrap();
    push(&m, 1, 0, &[(DATA, 6, false), (DATA + 0x1000, 6, false)]);
    push(&m, 5, 0, &[(DATA + 0x2000, 5, false)]);
    process(&mut c, &m, &mut q, 1);
    process(&mut c, &m, &mut q, 5);
    drop(c);
    let mut s = String::new();
    out.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello world\n");
    s.clear();
    err.read_to_string(&mut s).unwrap();
    assert_eq!(s, "oops\n");
    assert_eq!(used(&m, 1), vec![(0, 0)]);
}

#[test]
fn queue_numbers_map_to_ports() {
    assert_eq!(port_of_tx(1), Some(0));
    assert_eq!(port_of_tx(5), Some(1));
    assert_eq!(port_of_tx(7), Some(2));
    assert_eq!(port_of_tx(3), None);
    assert_eq!(port_of_tx(4), None);
}

/// A console with one output port and an input port reading `input`.
fn console_with_input(input: OwnedFd) -> (Console, std::fs::File) {
    let (out_r, out_w) = pipe();
    let c = Console::with_input(
        vec![ConsolePort {
            name: "hpcvm.stdout".into(),
            out: out_w,
        }],
        Some(InputPort {
            name: "hpcvm.stdin".into(),
            fd: input,
        }),
    );
    (c, out_r)
}

/// Port 1's receive queue (the input port of `console_with_input`).
const INPUT_RX: usize = 4;

#[test]
fn input_waits_for_the_guest_to_open_the_port_then_arrives_and_ends_with_a_close() {
    let mut f = crate::virtio::testing::scratch_file();
    std::io::Write::write_all(&mut f, b"input deck\n").unwrap();
    std::io::Seek::rewind(&mut f).unwrap();
    let (mut c, _o) = console_with_input(f.into());
    assert_eq!(c.queue_max_sizes().len(), 6);
    assert!(c.input_fd().is_none(), "a file is not polled");
    let m = mem();
    let mut q = queues(&m, 6);
    for i in 0..8u16 {
        push(
            &m,
            CONTROL_RX,
            i,
            &[(DATA + 0x100 * u64::from(i), 0x100, true)],
        );
    }
    push(&m, INPUT_RX, 0, &[(DATA + 0x4000, 4, true)]);
    push(&m, INPUT_RX, 1, &[(DATA + 0x5000, 64, true)]);
    // Buffers before the guest opened the port: the driver would discard data.
    process(&mut c, &m, &mut q, INPUT_RX);
    assert!(used(&m, INPUT_RX).is_empty());
    send_control(&m, 0, 1, event::PORT_OPEN, 1);
    process(&mut c, &m, &mut q, CONTROL_TX);
    // Split over the buffers as they come; each used length is what it holds.
    assert_eq!(used(&m, INPUT_RX), vec![(0, 4), (1, 7)]);
    let mut got = vec![0u8; 11];
    m.read_slice(&mut got[..4], GuestAddress(DATA + 0x4000))
        .unwrap();
    m.read_slice(&mut got[4..], GuestAddress(DATA + 0x5000))
        .unwrap();
    assert_eq!(&got, b"input deck\n");
    // The file's end: the next buffer finds nothing, and the port is closed.
    push(&m, INPUT_RX, 2, &[(DATA + 0x6000, 64, true)]);
    process(&mut c, &m, &mut q, INPUT_RX);
    assert_eq!(
        used(&m, INPUT_RX).len(),
        2,
        "no empty buffer is handed back"
    );
    assert!(received(&m).contains(&(1, event::PORT_OPEN, 0, vec![])));
    assert!(!c.wants_input());
}

#[test]
fn a_pipe_is_read_only_when_the_device_thread_says_it_is_readable() {
    let (r, w) = pipe();
    let mut w = std::fs::File::from(w);
    let (mut c, _o) = console_with_input(r.into());
    assert!(c.input_fd().is_some(), "a pipe is polled");
    let m = mem();
    let mut q = queues(&m, 6);
    for i in 0..8u16 {
        push(
            &m,
            CONTROL_RX,
            i,
            &[(DATA + 0x100 * u64::from(i), 0x100, true)],
        );
    }
    send_control(&m, 0, 1, event::PORT_OPEN, 1);
    process(&mut c, &m, &mut q, CONTROL_TX);
    push(&m, INPUT_RX, 0, &[(DATA + 0x4000, 64, true)]);
    // Nothing written yet: processing the queue must not block on a read.
    process(&mut c, &m, &mut q, INPUT_RX);
    assert!(c.wants_input());
    std::io::Write::write_all(&mut w, b"abc").unwrap();
    let irqs = crate::virtio::testing::Irqs::default();
    let mut dq = DeviceQueues {
        mem: &m,
        queues: &mut q,
        irq: &irqs,
    };
    c.input_ready(&mut dq);
    assert_eq!(used(&m, INPUT_RX), vec![(0, 3)]);
    drop(w);
    c.input_ready(&mut dq);
    assert!(!c.wants_input(), "the end of the pipe ends the input");
    assert!(received(&m).contains(&(1, event::PORT_OPEN, 0, vec![])));
}
