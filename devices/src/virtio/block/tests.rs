use std::io::{Read, Seek, SeekFrom, Write};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::{mem, process, push, queues, scratch_file, used, DATA};

fn disk(contents: &[u8], read_only: bool) -> (Block, File) {
    let mut f = scratch_file();
    f.write_all(contents).unwrap();
    let opts = BlockOptions {
        read_only,
        serial: "disk-serial-1".into(),
        discard: true,
    };
    let dev = Block::new(f.try_clone().unwrap(), contents.len() as u64, opts);
    (dev, f)
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(DATA)).unwrap();
}

const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x100;

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn a_read_lands_in_guest_memory_with_its_length_and_an_interrupt() {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let (mut dev, _f) = disk(&data, false);
    let m = mem();
    let mut q = queues(&m, 1);
    header(&m, VIRTIO_BLK_T_IN, 2);
    push(
        &m,
        0,
        0,
        &[(DATA, 16, false), (BUF, 1024, true), (STATUS, 1, true)],
    );
    assert_eq!(process(&mut dev, &m, &mut q, 0), vec![0]);
    let mut got = vec![0u8; 1024];
    m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got, &data[1024..2048]);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used(&m, 0), vec![(0, 1025)]);
}

#[test]
fn a_read_only_disk_fails_writes_and_keeps_its_bytes() {
    let data = vec![0x5au8; 2048];
    let (mut dev, mut f) = disk(&data, true);
    assert_ne!(dev.features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(dev.features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
    let m = mem();
    let mut q = queues(&m, 1);
    header(&m, VIRTIO_BLK_T_OUT, 0);
    m.write_slice(&[0u8; 512], GuestAddress(BUF)).unwrap();
    push(
        &m,
        0,
        0,
        &[(DATA, 16, false), (BUF, 512, false), (STATUS, 1, true)],
    );
    process(&mut dev, &m, &mut q, 0);
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    let mut now = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut now).unwrap();
    assert_eq!(now, data);
}

#[test]
fn writes_reach_the_file_and_flush_succeeds() {
    let (mut dev, mut f) = disk(&[0u8; 4096], false);
    let m = mem();
    let mut q = queues(&m, 1);
    header(&m, VIRTIO_BLK_T_OUT, 1);
    m.write_slice(&[0xabu8; 512], GuestAddress(BUF)).unwrap();
    push(
        &m,
        0,
        0,
        &[(DATA, 16, false), (BUF, 512, false), (STATUS, 1, true)],
    );
    process(&mut dev, &m, &mut q, 0);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    push(&m, 0, 3, &[(DATA, 16, false), (STATUS, 1, true)]);
    process(&mut dev, &m, &mut q, 0);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    let mut now = vec![0u8; 4096];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut now).unwrap();
    assert!(now[..512].iter().all(|&b| b == 0));
    assert!(now[512..1024].iter().all(|&b| b == 0xab));
    assert_eq!(used(&m, 0), vec![(0, 1), (3, 1)]);
}

#[test]
fn requests_past_the_end_or_of_unknown_type_are_refused() {
    let (mut dev, _f) = disk(&[1u8; 1024], false);
    let m = mem();
    let mut q = queues(&m, 1);
    header(&m, VIRTIO_BLK_T_IN, 1);
    push(
        &m,
        0,
        0,
        &[(DATA, 16, false), (BUF, 1024, true), (STATUS, 1, true)],
    );
    process(&mut dev, &m, &mut q, 0);
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    header(&m, 0x77, 0);
    push(&m, 0, 3, &[(DATA, 16, false), (STATUS, 1, true)]);
    process(&mut dev, &m, &mut q, 0);
    assert_eq!(status(&m), S_UNSUPP);
}

#[test]
fn get_id_returns_the_serial() {
    let (mut dev, _f) = disk(&[0u8; 512], false);
    let m = mem();
    let mut q = queues(&m, 1);
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    push(
        &m,
        0,
        0,
        &[(DATA, 16, false), (BUF, 20, true), (STATUS, 1, true)],
    );
    process(&mut dev, &m, &mut q, 0);
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-1");
    assert!(id[13..].iter().all(|&b| b == 0));
}

#[test]
fn discard_punches_a_hole_that_reads_as_zeros() {
    let (mut dev, mut f) = disk(&[0xffu8; 8192], false);
    let m = mem();
    let mut q = queues(&m, 1);
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    m.write_slice(&seg, GuestAddress(BUF)).unwrap();
    push(
        &m,
        0,
        0,
        &[(DATA, 16, false), (BUF, 16, false), (STATUS, 1, true)],
    );
    process(&mut dev, &m, &mut q, 0);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    let mut now = vec![0u8; 8192];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut now).unwrap();
    assert!(now[..4096].iter().all(|&b| b == 0xff));
    assert!(now[4096..].iter().all(|&b| b == 0));
}

#[test]
fn the_config_space_reports_capacity_in_sectors() {
    let (dev, _f) = disk(&[0u8; 4096 + 100], false);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    assert_eq!(dev.sectors(), 8);
}
