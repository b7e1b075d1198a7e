//! Which pages of a private anonymous mapping were ever written: present in this
//! process's page table, or swapped out (/proc/self/pagemap). A page that is
//! neither was never touched and reads as zero, so a checkpoint or a migration need
//! not read it (reading it would fault in the zero page, 1M faults per 4 GiB).
//! Shared RAM (a memfd, for shares: virtiofsd writes it through its own mapping,
//! which this page table does not show) is asked instead which parts of the file
//! hold data (SEEK_DATA/SEEK_HOLE: a page nobody wrote is a hole).

use std::fs::File;
use std::os::unix::fs::FileExt;

const PAGE: usize = 4096;
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per call (2 MiB of entries: 1 GiB of address space).
const BATCH: usize = 1 << 18;

/// The byte ranges `(offset, len)` of `[ptr, ptr + len)` that may hold data, in
/// page units; the whole range when the page map cannot be read.
pub fn ranges(ptr: *const u8, len: usize) -> Vec<(usize, usize)> {
    let whole = vec![(0, len)];
    let base = ptr as usize;
    if !base.is_multiple_of(PAGE) {
        return whole;
    }
    let Ok(map) = File::open("/proc/self/pagemap") else {
        return whole;
    };
    let pages = len.div_ceil(PAGE);
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut buf = vec![0u8; BATCH.min(pages) * 8];
    let mut first = 0;
    while first < pages {
        let n = BATCH.min(pages - first);
        let bytes = &mut buf[..n * 8];
        let at = ((base / PAGE + first) * 8) as u64;
        if map.read_exact_at(bytes, at).is_err() {
            return whole;
        }
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
            if entry & (PRESENT | SWAPPED) == 0 {
                continue;
            }
            let off = (first + i) * PAGE;
            let end = (off + PAGE).min(len);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 = end - last.0,
                _ => out.push((off, end - off)),
            }
        }
        first += n;
    }
    out
}

/// The byte ranges `(offset, len)` of `[start, start + len)` of `file` that may hold
/// data; the whole range when its file system cannot tell (hugetlbfs reports every
/// offset as data).
pub fn file_ranges(file: &File, start: u64, len: usize) -> Vec<(usize, usize)> {
    use std::os::fd::AsRawFd;
    let whole = vec![(0, len)];
    let end = start + len as u64;
    let seek = |at: u64, whence: libc::c_int| {
        let at = i64::try_from(at).ok()?;
        // SAFETY: lseek on a descriptor `file` keeps open; only its offset moves
        // (RAM is reached through the mapping, never through that offset).
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        Some(r)
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA) else {
            return whole;
        };
        if data < 0 {
            // ENXIO: no data from here to the end of the file.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return whole;
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        let Some(hole) = seek(data, libc::SEEK_HOLE).filter(|&h| h >= 0) else {
            return whole;
        };
        let hole = (hole as u64).min(end);
        out.push(((data - start) as usize, (hole - data) as usize));
        at = hole;
    }
    out
}

/// The parts of guest RAM that may hold data, as (region index, offset in the
/// region, length): an anonymous region's untouched pages and a memfd's holes are
/// zero and left out.
pub fn parts(mem: &vm_memory::GuestMemoryMmap) -> Vec<(usize, usize, usize)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .enumerate()
        .flat_map(|(i, r)| {
            let len = r.len() as usize;
            let parts = match r.file_offset() {
                None => ranges(r.as_ptr(), len),
                Some(f) => file_ranges(f.file(), f.start(), len),
            };
            parts.into_iter().map(move |(off, n)| (i, off, n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_written_pages_are_listed() {
        let len = 64 * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let b = p.cast::<u8>();
        // SAFETY: offsets inside the mapping.
        unsafe {
            *b.add(3 * PAGE + 5) = 1;
            *b.add(4 * PAGE) = 1;
            *b.add(40 * PAGE) = 1;
        }
        assert_eq!(
            ranges(b, len),
            vec![(3 * PAGE, 2 * PAGE), (40 * PAGE, PAGE)]
        );
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
    }

    #[test]
    fn only_written_parts_of_a_memfd_are_listed() {
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"touched-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: the descriptor was just made and nothing else owns it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(64 * PAGE as u64).unwrap();
        file.write_all_at(b"x", 3 * PAGE as u64 + 5).unwrap();
        file.write_all_at(b"y", 4 * PAGE as u64).unwrap();
        file.write_all_at(b"z", 40 * PAGE as u64).unwrap();
        assert_eq!(
            file_ranges(&file, 0, 64 * PAGE),
            vec![(3 * PAGE, 2 * PAGE), (40 * PAGE, PAGE)]
        );
        // A region starting inside the file: offsets are the region's.
        assert_eq!(
            file_ranges(&file, 4 * PAGE as u64, 8 * PAGE),
            vec![(0, PAGE)]
        );
        assert!(file_ranges(&file, 50 * PAGE as u64, 10 * PAGE).is_empty());
    }
}
