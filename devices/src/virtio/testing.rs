//! Plays the driver for device-model tests: split rings in a small guest RAM, one
//! page per ring (virtio-queue's mock driver overlaps the available and used rings of
//! a 16-entry queue).

use std::sync::Mutex;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{DeviceQueues, QueueInterrupt, VirtioDevice};

/// Ring entries of every test queue.
pub const SIZE: u16 = 16;
/// Where test data buffers start (above every ring).
pub const DATA: u64 = 0x10_0000;

/// Records which queues were interrupted.
#[derive(Default)]
pub struct Irqs(pub Mutex<Vec<usize>>);

impl QueueInterrupt for Irqs {
    fn notify_queue(&self, index: usize) {
        self.0.lock().unwrap().push(index);
    }
}

/// 4 MiB of guest RAM at 0.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

/// Ring addresses of test queue `q`: descriptor table, available ring, used ring,
/// each in its own page.
fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x1_0000 * (q as u64 + 1);
    (base, base + 0x1000, base + 0x2000)
}

/// `n` ready queues, as a driver would have set them up.
pub fn queues(_mem: &GuestMemoryMmap, n: usize) -> Vec<Queue> {
    (0..n)
        .map(|i| {
            let (desc, avail, used) = rings(i);
            let mut q = Queue::new(SIZE).unwrap();
            q.set_size(SIZE);
            q.set_desc_table_address(Some(desc as u32), Some(0));
            q.set_avail_ring_address(Some(avail as u32), Some(0));
            q.set_used_ring_address(Some(used as u32), Some(0));
            q.set_ready(true);
            q
        })
        .collect()
}

/// Makes one chain of `(addr, len, device_writes)` buffers available on queue `q`,
/// its descriptors from table index `first`.
pub fn push(mem: &GuestMemoryMmap, q: usize, first: u16, bufs: &[(u64, u32, bool)]) {
    let (desc, avail, _) = rings(q);
    for (i, &(addr, len, write)) in bufs.iter().enumerate() {
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        let last = i + 1 == bufs.len();
        if !last {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let next = if last { 0 } else { first + i as u16 + 1 };
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let at = desc + 16 * u64::from(first + i as u16);
        mem.write_obj(d, GuestAddress(at)).unwrap();
    }
    let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
    let slot = avail + 4 + 2 * u64::from(idx % SIZE);
    mem.write_obj(first, GuestAddress(slot)).unwrap();
    mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
        .unwrap();
}

/// The used ring of queue `q`: (descriptor head, bytes written) per entry.
pub fn used(mem: &GuestMemoryMmap, q: usize) -> Vec<(u32, u32)> {
    let base = GuestAddress(rings(q).2);
    let n: u16 = mem.read_obj(base.unchecked_add(2)).unwrap();
    (0..u64::from(n))
        .map(|i| {
            let at = base.unchecked_add(4 + 8 * i);
            let id: u32 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
            (id, len)
        })
        .collect()
}

/// Runs `dev.process(index)` on `queues`; returns the queues it interrupted.
pub fn process(
    dev: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    queues: &mut [Queue],
    index: usize,
) -> Vec<usize> {
    let irqs = Irqs::default();
    let mut dq = DeviceQueues {
        mem,
        queues,
        irq: &irqs,
    };
    dev.process(index, &mut dq);
    irqs.0.into_inner().unwrap()
}

/// An unlinked scratch file (gone when closed), unique within this test binary.
pub fn scratch_file() -> std::fs::File {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("hpcvm-devtest-{}-{n}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}
