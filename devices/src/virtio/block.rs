//! virtio-blk: a raw image file or host block device as a guest disk. One request
//! queue; each request is one `preadv`/`pwritev` straight between the file and guest
//! RAM. Read-only disks advertise VIRTIO_BLK_F_RO and fail writes with an I/O error
//! without touching the file; flush is `fdatasync`; discard punches holes where the
//! file supports it.

use std::fs::File;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::descriptors::{
    copy_to, iovecs, take_front, take_last_byte, total, transfer, Buffers, Direction,
};
use super::{read_config_bytes, DeviceQueues, VirtioDevice, COMMON_FEATURES};

/// Bytes per sector, as virtio-blk counts them.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors per request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest serial the guest can read (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Status byte: the request type is not supported.
const S_UNSUPP: u8 = 2;
/// Bytes of one discard segment (virtio_blk_discard_write_zeroes).
const DISCARD_SEGMENT: usize = 16;
/// Discard segments per request the device accepts.
const MAX_DISCARD_SEG: u32 = 32;

/// How the disk is presented.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockOptions {
    /// Refuse writes (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// What the guest reads as the disk's serial (`/sys/block/vdX/serial`), at most
    /// 20 bytes.
    pub serial: String,
    /// The backing file supports hole punching (regular files on most filesystems,
    /// block devices with discard).
    pub discard: bool,
}

/// One virtio-blk device.
#[derive(Debug)]
pub struct Block {
    file: File,
    sectors: u64,
    opts: BlockOptions,
    config: Vec<u8>,
}

impl Block {
    /// A disk backed by `file`, `size` bytes long (rounded down to whole sectors).
    pub fn new(file: File, size: u64, opts: BlockOptions) -> Self {
        let sectors = size / SECTOR_SIZE;
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        // seg_max: a request's data descriptors, leaving header and status.
        config[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment.
        config[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        Self {
            file,
            sectors,
            opts,
            config,
        }
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves one request; returns the bytes written into the chain's buffers.
    fn request(&mut self, mem: &GuestMemoryMmap, mut b: Buffers) -> u32 {
        let Some(status_addr) = take_last_byte(&mut b.writable) else {
            // No status byte: nothing can be reported.
            return 0;
        };
        let mut hdr = [0u8; 16];
        let (status, written) = match take_front(mem, &mut b.readable, &mut hdr) {
            None => (VIRTIO_BLK_S_IOERR as u8, 0),
            Some(()) => {
                let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
                let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
                self.execute(mem, kind, sector, &b)
            }
        };
        let _ = mem.write_obj(status, status_addr);
        (written + 1).min(u64::from(u32::MAX)) as u32
    }

    /// Runs request `kind` at `sector`; (status, bytes written to the guest).
    fn execute(&mut self, mem: &GuestMemoryMmap, kind: u32, sector: u64, b: &Buffers) -> (u8, u64) {
        let ok = VIRTIO_BLK_S_OK as u8;
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let in_bounds = |len: u64| {
            len.is_multiple_of(SECTOR_SIZE)
                && sector
                    .checked_add(len / SECTOR_SIZE)
                    .is_some_and(|end| end <= self.sectors)
        };
        let fd = self.file.as_raw_fd();
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = total(&b.writable);
                if !in_bounds(len) {
                    return (ioerr, 0);
                }
                match iovecs(mem, &b.writable)
                    .and_then(|iov| transfer(fd, iov, sector * SECTOR_SIZE, Direction::Read))
                {
                    Ok(n) => (ok, n),
                    Err(_) => (ioerr, 0),
                }
            }
            VIRTIO_BLK_T_OUT => {
                let len = total(&b.readable);
                if self.opts.read_only || !in_bounds(len) {
                    return (ioerr, 0);
                }
                match iovecs(mem, &b.readable)
                    .and_then(|iov| transfer(fd, iov, sector * SECTOR_SIZE, Direction::Write))
                {
                    Ok(_) => (ok, 0),
                    Err(_) => (ioerr, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.opts.read_only {
                    return (ok, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (ok, 0),
                    Err(_) => (ioerr, 0),
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; SERIAL_LEN];
                let s = self.opts.serial.as_bytes();
                id[..s.len().min(SERIAL_LEN)].copy_from_slice(&s[..s.len().min(SERIAL_LEN)]);
                (ok, copy_to(mem, &b.writable, &id))
            }
            VIRTIO_BLK_T_DISCARD if self.opts.discard && !self.opts.read_only => {
                (self.discard(mem, b), 0)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// Punches a hole for each discard segment in the request.
    fn discard(&mut self, mem: &GuestMemoryMmap, b: &Buffers) -> u8 {
        let mut segs = b.readable.clone();
        let count = total(&segs) as usize / DISCARD_SEGMENT;
        if count == 0 || count > MAX_DISCARD_SEG as usize {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        for _ in 0..count {
            let mut raw = [0u8; DISCARD_SEGMENT];
            if take_front(mem, &mut segs, &mut raw).is_none() {
                return VIRTIO_BLK_S_IOERR as u8;
            }
            let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let n = u64::from(u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")));
            if sector.checked_add(n).is_none_or(|end| end > self.sectors) {
                return VIRTIO_BLK_S_IOERR as u8;
            }
            // SAFETY: fallocate on our own fd with plain integer arguments.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (sector * SECTOR_SIZE) as libc::off_t,
                    (n * SECTOR_SIZE) as libc::off_t,
                )
            };
            if rc != 0 {
                return VIRTIO_BLK_S_IOERR as u8;
            }
        }
        VIRTIO_BLK_S_OK as u8
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = COMMON_FEATURES
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.opts.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else if self.opts.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn state(&self) -> Result<super::DeviceState, String> {
        Ok(super::DeviceState::Block {
            sectors: self.sectors,
        })
    }

    fn restore(&mut self, state: &super::DeviceState) -> Result<(), String> {
        match state {
            super::DeviceState::Block { sectors } if *sectors == self.sectors => Ok(()),
            super::DeviceState::Block { sectors } => Err(format!(
                "the disk had {sectors} sectors at the checkpoint and has {} now",
                self.sectors
            )),
            other => Err(format!("a disk cannot take the state of {other:?}")),
        }
    }

    fn process(&mut self, index: usize, queues: &mut DeviceQueues<'_>) {
        queues.drain(index, |mem, chain| self.request(mem, Buffers::of(chain)));
    }
}

#[cfg(test)]
mod tests;
