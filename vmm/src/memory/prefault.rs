//! Populates guest RAM before the guest runs, in parallel on the host CPUs the VM may use.
//!
//! Each thread is pinned to one of those CPUs and populates a contiguous slice, so the
//! pages come from that CPU's NUMA node (first touch) and the zeroing the kernel does for
//! every new page is spread over all of them.

use std::io;

use super::MemoryError;

/// Host memory to populate and the host CPUs to do it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// (host address, length) ranges.
    pub ranges: Vec<(usize, usize)>,
    /// CPUs the threads for these ranges are pinned to, one thread per CPU (at least
    /// one thread, unpinned, when empty).
    pub cpus: Vec<usize>,
}

/// Populates every part from its own CPUs (a guest NUMA node from its host node's),
/// all parts at once.
pub fn prefault_parts(parts: &[Part], page_size: u64) -> Result<(), MemoryError> {
    let page = page_size as usize;
    let mut work: Vec<(usize, usize, Option<usize>)> = Vec::new(); // (address, length, CPU)
    for part in parts {
        let threads = part.cpus.len().max(1);
        let mut n = 0;
        for &(base, len) in &part.ranges {
            let pages = len / page;
            let per = pages.div_ceil(threads).max(1);
            let mut off = 0;
            while off < len {
                let chunk = (per * page).min(len - off);
                work.push((base + off, chunk, part.cpus.get(n % threads).copied()));
                n += 1;
                off += chunk;
            }
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, cpu))| {
                std::thread::Builder::new()
                    .name(format!("prefault{i}"))
                    .spawn_scoped(s, move || {
                        if let Some(cpu) = cpu {
                            // Best effort: an unpinned prefault is slower, not wrong.
                            let _ = crate::host::pin_current_thread(cpu);
                        }
                        populate(addr, len, page).map_err(|e| (addr, e))
                    })
                    .map_err(|e| MemoryError::Prefault { addr: 0, source: e })
            })
            .collect();
        for h in handles {
            match h?.join() {
                Ok(Ok(())) => {}
                Ok(Err((addr, source))) => {
                    return Err(MemoryError::Prefault { addr, source });
                }
                Err(_) => {
                    return Err(MemoryError::Prefault {
                        addr: 0,
                        source: io::Error::other("prefault thread panicked"),
                    })
                }
            }
        }
        Ok(())
    })
}

fn populate(addr: usize, len: usize, page: usize) -> io::Result<()> {
    // SAFETY: [addr, addr+len) lies inside a guest RAM mapping that outlives this call;
    // MADV_POPULATE_WRITE only faults pages in, it does not change their contents.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch each page instead. Writing a
    // zero over a fresh page leaves guest-visible memory unchanged (it is all zeroes).
    for off in (0..len).step_by(page) {
        // SAFETY: in bounds of the mapping as above; the guest is not running yet.
        unsafe { std::ptr::write_volatile((addr + off) as *mut u8, 0) };
    }
    Ok(())
}
