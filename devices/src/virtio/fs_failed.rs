//! A virtio-fs device whose backend (the virtiofsd serving its queues) has ended:
//! hpcvm takes the queues back and answers every FUSE request with EIO, so the job
//! sees I/O errors at once instead of hanging on a request nobody will answer.
//!
//! Taking over is possible because virtiofsd (with `--thread-pool-size=0`, as hpcvm
//! starts it) completes each queue's requests in order: every chain before the used
//! ring's index was answered, every chain from it on was not (some may be half
//! done), so the device carries on from the used index.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::descriptors::{copy_to, take_front, total, Buffers};
use super::DeviceQueues;

/// struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, extlen/pad.
const IN_HEADER: usize = 40;
/// struct fuse_out_header: len, error, unique.
const OUT_HEADER: usize = 16;

/// Moves `q` to where the ended backend stopped: the next chain to take and the next
/// used slot are both the used ring's index in guest memory. False if the ring is
/// outside guest RAM (the queue is then left alone).
pub fn resume_from_used(q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if !q.ready() {
        return true;
    }
    match q.used_idx(mem, Ordering::Acquire) {
        Ok(idx) => {
            q.set_next_avail(idx.0);
            q.set_next_used(idx.0);
            true
        }
        Err(_) => false,
    }
}

/// Answers every request waiting on queue `index` with EIO.
pub fn fail_requests(queues: &mut DeviceQueues<'_>, index: usize) {
    queues.drain(index, fail);
}

/// The reply to one request: a bare fuse_out_header with -EIO and the request's
/// `unique`, or nothing for requests that take no reply (FORGET, which has no
/// device-writable buffer) and for chains too short to hold one.
fn fail(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
    let mut b = Buffers::of(chain);
    let mut header = [0u8; IN_HEADER];
    if take_front(mem, &mut b.readable, &mut header).is_none()
        || total(&b.writable) < OUT_HEADER as u64
    {
        return 0;
    }
    let mut out = [0u8; OUT_HEADER];
    out[0..4].copy_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    out[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
    out[8..16].copy_from_slice(&header[8..16]);
    // A header that did not land whole in guest RAM is not a reply.
    if copy_to(mem, &b.writable, &out) < OUT_HEADER as u64 {
        return 0;
    }
    OUT_HEADER as u32
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::{mem, push, queues, used, Irqs, DATA};

    fn request(mem: &GuestMemoryMmap, at: u64, opcode: u32, unique: u64) {
        let mut h = [0u8; IN_HEADER];
        h[0..4].copy_from_slice(&(IN_HEADER as u32).to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn run(mem: &GuestMemoryMmap, q: &mut [Queue], index: usize) -> Vec<usize> {
        let irqs = Irqs::default();
        let mut dq = DeviceQueues {
            mem,
            queues: q,
            irq: &irqs,
        };
        fail_requests(&mut dq, index);
        irqs.0.into_inner().unwrap()
    }

    #[test]
    fn a_request_gets_eio_with_its_unique_and_an_interrupt() {
        let m = mem();
        let mut q = queues(&m, 2);
        request(&m, DATA, 15, 0xfeed_beef_0000_0042); // FUSE_READ
        push(&m, 1, 0, &[(DATA, 80, false), (DATA + 0x1000, 4096, true)]);
        assert_eq!(run(&m, &mut q, 1), vec![1]);
        assert_eq!(used(&m, 1), vec![(0, OUT_HEADER as u32)]);
        let mut out = [0u8; OUT_HEADER];
        m.read_slice(&mut out, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(u32::from_le_bytes(out[0..4].try_into().unwrap()), 16);
        assert_eq!(
            i32::from_le_bytes(out[4..8].try_into().unwrap()),
            -libc::EIO
        );
        assert_eq!(
            u64::from_le_bytes(out[8..16].try_into().unwrap()),
            0xfeed_beef_0000_0042
        );
    }

    #[test]
    fn a_forget_is_completed_without_a_reply() {
        let m = mem();
        let mut q = queues(&m, 2);
        m.write_slice(&[0xaa; 16], GuestAddress(DATA + 0x1000))
            .unwrap();
        request(&m, DATA, 2, 7); // FUSE_FORGET, on the high-priority queue
        push(&m, 0, 0, &[(DATA, 48, false)]);
        run(&m, &mut q, 0);
        assert_eq!(used(&m, 0), vec![(0, 0)]);
    }

    #[test]
    fn a_chain_too_short_for_a_header_is_completed_empty() {
        let m = mem();
        let mut q = queues(&m, 2);
        push(&m, 1, 0, &[(DATA, 8, false), (DATA + 0x1000, 4096, true)]);
        run(&m, &mut q, 1);
        assert_eq!(used(&m, 1), vec![(0, 0)]);
    }

    #[test]
    fn takeover_starts_at_the_used_index_so_answered_requests_are_not_answered_twice() {
        let m = mem();
        let mut q = queues(&m, 2);
        // Three requests; the backend answered the first, took the second, and died.
        for (i, unique) in [(0u16, 1u64), (2, 2), (4, 3)] {
            let at = DATA + 0x100 * u64::from(i);
            request(&m, at, 15, unique);
            push(
                &m,
                1,
                i,
                &[
                    (at, 40, false),
                    (DATA + 0x1_0000 + 0x100 * u64::from(i), 64, true),
                ],
            );
        }
        // What the backend did: one used entry, index 1. The device's own view
        // (next_avail 0) is stale.
        {
            let irqs = Irqs::default();
            let mut dq = DeviceQueues {
                mem: &m,
                queues: &mut q,
                irq: &irqs,
            };
            dq.fill(1, 1, |_, _| 77);
        }
        q[1].set_next_avail(0);
        q[1].set_next_used(0);
        assert!(resume_from_used(&mut q[1], &m));
        run(&m, &mut q, 1);
        assert_eq!(used(&m, 1), vec![(0, 77), (2, 16), (4, 16)]);
        let unique = |i: u64| -> u64 {
            m.read_obj(GuestAddress(DATA + 0x1_0000 + 0x100 * i + 8))
                .unwrap()
        };
        assert_eq!((unique(2), unique(4)), (2, 3));
    }
}
