//! A descriptor chain as the guest buffers it names: split into the bytes the device
//! reads and the bytes it writes, with helpers to peel a header off the front and a
//! status byte off the back, and to hand the rest to the kernel as `iovec`s (one
//! `preadv`/`pwritev`/`writev` per request, no bounce buffer).

use std::io;
use std::os::fd::RawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A guest buffer: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// The buffers of one chain: device-readable ones, then device-writable ones.
#[derive(Debug, Default)]
pub struct Buffers {
    /// What the driver gave the device to read.
    pub readable: Vec<Segment>,
    /// Where the device may write.
    pub writable: Vec<Segment>,
}

impl Buffers {
    /// Walks `chain` (indirect tables included, as virtio-queue resolves them).
    pub fn of(chain: DescriptorChain<&GuestMemoryMmap>) -> Self {
        let mut b = Self::default();
        for d in chain {
            let seg = Segment {
                addr: d.addr(),
                len: u64::from(d.len()),
            };
            if d.is_write_only() {
                b.writable.push(seg);
            } else {
                b.readable.push(seg);
            }
        }
        b
    }
}

/// Total bytes of `segs`.
pub fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Copies the first `out.len()` bytes of `segs` out of guest memory and removes them
/// from `segs`; None if the segments are shorter or outside guest RAM.
pub fn take_front(mem: &GuestMemoryMmap, segs: &mut Vec<Segment>, out: &mut [u8]) -> Option<()> {
    let mut done = 0usize;
    while done < out.len() {
        let first = segs.first_mut()?;
        let n = (out.len() - done).min(first.len as usize);
        mem.read_slice(&mut out[done..done + n], first.addr).ok()?;
        done += n;
        first.addr = first.addr.checked_add(n as u64)?;
        first.len -= n as u64;
        if first.len == 0 {
            segs.remove(0);
        }
    }
    Some(())
}

/// Copies as much of `bytes` as fits into `segs`; returns how many bytes went in.
pub fn copy_to(mem: &GuestMemoryMmap, segs: &[Segment], bytes: &[u8]) -> u64 {
    let mut left = bytes;
    let mut written = 0;
    for seg in segs {
        let n = (seg.len as usize).min(left.len());
        if mem.write_slice(&left[..n], seg.addr).is_err() {
            break;
        }
        written += n as u64;
        left = &left[n..];
    }
    written
}

/// Removes the last byte of `segs` and returns its address (a status byte).
pub fn take_last_byte(segs: &mut Vec<Segment>) -> Option<GuestAddress> {
    while segs.last().is_some_and(|s| s.len == 0) {
        segs.pop();
    }
    let last = segs.last_mut()?;
    last.len -= 1;
    let addr = last.addr.checked_add(last.len)?;
    if last.len == 0 {
        segs.pop();
    }
    Some(addr)
}

/// The host `iovec`s covering `segs`, valid while `mem` is; an error when a segment
/// is not in guest RAM.
pub fn iovecs(mem: &GuestMemoryMmap, segs: &[Segment]) -> io::Result<Vec<libc::iovec>> {
    let mut v = Vec::with_capacity(segs.len());
    for s in segs.iter().filter(|s| s.len > 0) {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            v.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(v)
}

/// Drops the first `n` bytes of `iov`.
fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    while n > 0 && !iov.is_empty() {
        if iov[0].iov_len <= n {
            n -= iov[0].iov_len;
            iov.remove(0);
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            iov[0].iov_base = unsafe { iov[0].iov_base.cast::<u8>().add(n) }.cast();
            iov[0].iov_len -= n;
            n = 0;
        }
    }
}

/// What [`transfer`] does at each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `preadv` from the file into guest memory.
    Read,
    /// `pwritev` from guest memory into the file.
    Write,
}

/// Calls `step` on what is left of `iov` until every byte has moved, retrying on
/// EINTR; `step` returns what the system call did. A step that moves nothing is an
/// error (`what_if_none`): the end of a file, or a stream that takes no more.
fn move_all(
    mut iov: Vec<libc::iovec>,
    what_if_none: &str,
    mut step: impl FnMut(&[libc::iovec]) -> io::Result<isize>,
) -> io::Result<u64> {
    let mut moved = 0u64;
    while !iov.is_empty() {
        let cnt = iov.len().min(libc::UIO_MAXIOV as usize);
        let n = match step(&iov[..cnt]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                what_if_none.to_string(),
            ));
        }
        moved += n as u64;
        advance(&mut iov, n as usize);
    }
    Ok(moved)
}

/// The result of a raw system call returning -1 on error.
fn syscall(n: isize) -> io::Result<isize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n)
    }
}

/// Moves every byte of `iov` between `fd` (from file `offset`) and guest memory,
/// looping over short transfers; a read that hits the end of the file is an error.
pub fn transfer(fd: RawFd, iov: Vec<libc::iovec>, offset: u64, dir: Direction) -> io::Result<u64> {
    let mut offset = offset;
    move_all(iov, "end of the backing file", |iov| {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let cnt = iov.len() as libc::c_int;
        // SAFETY: every iovec points into guest RAM that `mem` keeps mapped for the
        // whole request (see `iovecs`); the kernel checks the fd.
        let n = syscall(unsafe {
            match dir {
                Direction::Read => libc::preadv(fd, iov.as_ptr(), cnt, off),
                Direction::Write => libc::pwritev(fd, iov.as_ptr(), cnt, off),
            }
        })?;
        offset += n as u64;
        Ok(n)
    })
}

/// Writes every byte of `iov` to `fd` (a stream: stdout, a pipe), looping over short
/// writes.
pub fn write_stream(fd: RawFd, iov: Vec<libc::iovec>) -> io::Result<u64> {
    move_all(iov, "the stream took no bytes", |iov| {
        // SAFETY: as in `transfer`: the iovecs point into mapped guest RAM.
        syscall(unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn a_header_spanning_two_buffers_is_peeled_off() {
        let m = mem();
        m.write_slice(&[1, 2, 3], GuestAddress(0x100)).unwrap();
        m.write_slice(&[4, 5, 6, 7], GuestAddress(0x200)).unwrap();
        let mut segs = vec![
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 4,
            },
        ];
        let mut hdr = [0u8; 5];
        take_front(&m, &mut segs, &mut hdr).unwrap();
        assert_eq!(hdr, [1, 2, 3, 4, 5]);
        assert_eq!(
            segs,
            vec![Segment {
                addr: GuestAddress(0x202),
                len: 2
            }]
        );
        assert!(take_front(&m, &mut segs, &mut [0u8; 3]).is_none());
    }

    #[test]
    fn the_status_byte_is_the_last_writable_byte() {
        let mut segs = vec![
            Segment {
                addr: GuestAddress(0x1000),
                len: 512,
            },
            Segment {
                addr: GuestAddress(0x3000),
                len: 1,
            },
        ];
        assert_eq!(take_last_byte(&mut segs), Some(GuestAddress(0x3000)));
        assert_eq!(segs.len(), 1);
        assert_eq!(take_last_byte(&mut segs), Some(GuestAddress(0x11ff)));
        assert_eq!(total(&segs), 511);
        assert_eq!(take_last_byte(&mut Vec::new()), None);
    }

    #[test]
    fn segments_outside_guest_ram_are_refused() {
        let m = mem();
        let segs = [Segment {
            addr: GuestAddress(0xff00),
            len: 0x200,
        }];
        assert!(iovecs(&m, &segs).is_err());
    }

    #[test]
    fn reads_and_writes_go_through_iovecs_at_the_offset() {
        let m = mem();
        let f = crate::virtio::testing::scratch_file();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 2,
            },
        ];
        m.write_slice(b"abc", GuestAddress(0x1000)).unwrap();
        m.write_slice(b"de", GuestAddress(0x2000)).unwrap();
        use std::os::fd::AsRawFd;
        let n = transfer(
            f.as_raw_fd(),
            iovecs(&m, &segs).unwrap(),
            10,
            Direction::Write,
        )
        .unwrap();
        assert_eq!(n, 5);
        let back = [Segment {
            addr: GuestAddress(0x4000),
            len: 5,
        }];
        transfer(
            f.as_raw_fd(),
            iovecs(&m, &back).unwrap(),
            10,
            Direction::Read,
        )
        .unwrap();
        let mut got = [0u8; 5];
        m.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert_eq!(&got, b"abcde");
        // Past the end of the file: an error, not zeros.
        let err = transfer(
            f.as_raw_fd(),
            iovecs(&m, &back).unwrap(),
            100,
            Direction::Read,
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
