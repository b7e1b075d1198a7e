//! Guest RAM: where it sits in guest-physical space and what host memory backs it.

pub mod hugepages;
pub mod layout;
pub mod numa;
pub mod prefault;
pub mod touched;

use std::io;

use std::sync::Arc;
use thiserror::Error;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap};

use crate::config::{memory::fmt_size, HugePageSize, MemoryConfig};
pub use hugepages::HugePagePool;

/// Errors building guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Not enough free hugepages of the asked size.
    #[error(
        "Hugepage pool has {free} free {size} pages, guest needs {needed}: raise {knob} \
         (e.g. echo {want} > {knob})"
    )]
    PoolTooSmall {
        /// Page size name.
        size: &'static str,
        /// Free, unreserved pages.
        free: u64,
        /// Pages the guest needs.
        needed: u64,
        /// Where the pool size is set.
        knob: String,
        /// A pool size that would do.
        want: u64,
    },
    /// The host kernel has no pool for that page size.
    #[error("This host has no {0} hugepage support ({1} is missing)")]
    NoPool(&'static str, String),
    /// Reading the pool's counters failed.
    #[error("Cannot read hugepage pool counters in {0}: {1}")]
    PoolRead(String, io::Error),
    /// More RAM than the host has.
    #[error("Guest memory {guest} is more than this host's {host} of RAM")]
    LargerThanHost {
        /// Asked-for size.
        guest: String,
        /// MemTotal.
        host: String,
    },
    /// mmap of guest RAM failed.
    #[error("Cannot map {size} of guest RAM ({backing}): {source}")]
    Map {
        /// Region size.
        size: String,
        /// Backing description.
        backing: &'static str,
        /// The mmap error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the layout (a bug: regions are computed, not user-given).
    #[error("Guest memory layout rejected: {0}")]
    Layout(String),
    /// madvise on guest RAM failed.
    #[error("Cannot advise guest RAM ({what}): {source}")]
    Advise {
        /// The advice.
        what: &'static str,
        /// The madvise error.
        source: io::Error,
    },
    /// The memfd for shared guest RAM (`--share`) could not be made.
    #[error("Cannot create {size} of shared guest RAM (memfd, for --share): {source}")]
    SharedFile {
        /// Guest RAM size.
        size: String,
        /// Why.
        source: io::Error,
    },
    /// The guest's NUMA nodes cannot be laid out as asked.
    #[error("Cannot lay out guest NUMA nodes: {0}")]
    Numa(String),
    /// A host node's hugepage pool cannot back its guest node.
    #[error("Not enough hugepages on a host NUMA node: {0}")]
    NodePool(String),
    /// Binding a node's RAM to its host node failed.
    #[error("Cannot bind {size} of guest RAM to host NUMA node {node} (mbind): {source}")]
    Bind {
        /// The host node.
        node: u32,
        /// How much RAM.
        size: String,
        /// The mbind error.
        source: io::Error,
    },
    /// Populating guest RAM failed.
    #[error("Prefaulting guest RAM failed (chunk at host address {addr:#x}): {source}")]
    Prefault {
        /// Host address of the chunk that failed.
        addr: usize,
        /// The madvise error.
        source: io::Error,
    },
}

/// Creates guest RAM as described by `cfg`, laid out by [`layout::ram_ranges`].
///
/// Hugetlb memory is mapped without `MAP_NORESERVE`, so the kernel reserves every page
/// at mmap time: a pool that runs dry fails here, not with a SIGBUS inside the guest.
pub fn create_guest_memory(
    cfg: &MemoryConfig,
    shared: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    check_host_ram(cfg.size)?;
    if cfg.hugepages.is_hugetlb() {
        HugePagePool::read(cfg.hugepages)?.check_can_supply(cfg.size)?;
    }
    let file = if shared {
        Some(Arc::new(ram_memfd(cfg)?))
    } else {
        None
    };
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, size) in layout::ram_ranges(cfg.size) {
        let backing = file
            .as_ref()
            .map(|f| FileOffset::from_arc(f.clone(), offset));
        offset += size as u64;
        let region = map_region(size, cfg.hugepages, backing)?;
        regions.push(
            GuestRegionMmap::new(region, start)
                .ok_or_else(|| MemoryError::Layout(format!("region at {start:?} overflows")))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

/// A memfd as large as guest RAM (hugetlb-backed for hugepage guests: no hugetlbfs
/// mount needed), for RAM another process (virtiofsd) must map too.
fn ram_memfd(cfg: &MemoryConfig) -> Result<std::fs::File, MemoryError> {
    let flags = match cfg.hugepages {
        HugePageSize::Size2M => libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        HugePageSize::Size1G => libc::MFD_HUGETLB | libc::MFD_HUGE_1GB,
        HugePageSize::None | HugePageSize::Thp => 0,
    };
    let err = |source| MemoryError::SharedFile {
        size: fmt_size(cfg.size),
        source,
    };
    let file = crate::host::memfd_with(c"hpcvm-guest-ram", flags).map_err(err)?;
    file.set_len(cfg.size).map_err(err)?;
    Ok(file)
}

fn map_region(
    size: usize,
    pages: HugePageSize,
    file: Option<FileOffset>,
) -> Result<vm_memory::MmapRegion<()>, MemoryError> {
    // Shared file-backed RAM when another process maps it too; the reservation
    // of hugetlb pages still happens here, at mmap time, for both kinds.
    let mut flags = if file.is_some() {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
    };
    let backing = match pages {
        HugePageSize::None => {
            flags |= libc::MAP_NORESERVE;
            "anonymous"
        }
        HugePageSize::Thp => {
            flags |= libc::MAP_NORESERVE;
            "anonymous, THP"
        }
        HugePageSize::Size2M => {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
            "hugetlb 2M"
        }
        HugePageSize::Size1G => {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_1GB;
            "hugetlb 1G"
        }
    };
    let mut builder = MmapRegionBuilder::new(size)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(pages.is_hugetlb());
    if let Some(f) = file {
        builder = builder.with_file_offset(f);
    }
    let region = builder.build().map_err(|source| {
        // ENOMEM from a hugetlb mmap means the reservation failed: someone took
        // pages between our check and the mmap. Report the pool as it is now.
        if pages.is_hugetlb() {
            if let Ok(pool) = HugePagePool::read(pages) {
                if let Err(e) = pool.check_can_supply(size as u64) {
                    return e;
                }
            }
        }
        MemoryError::Map {
            size: fmt_size(size as u64),
            backing,
            source,
        }
    })?;
    // Guest RAM stays out of any child this process forks: copy-on-write would move
    // a page the guest (or a VFIO device's DMA, pinned at its old address) still
    // uses. It also keeps guest RAM its own VMA, never merged with a neighbouring
    // heap mapping, so /proc/PID/smaps shows it as one region of its own size.
    // SAFETY: the range is exactly the mapping just created and owned by `region`;
    // MADV_DONTFORK only changes what fork() copies.
    if unsafe { libc::madvise(region.as_ptr().cast(), size, libc::MADV_DONTFORK) } != 0 {
        return Err(MemoryError::Advise {
            what: "MADV_DONTFORK",
            source: io::Error::last_os_error(),
        });
    }
    if pages == HugePageSize::Thp {
        // Not by default: a tiny guest's first touch would cost a whole 2 MiB page.
        // SAFETY: the range is exactly the mapping just created and owned by `region`;
        // MADV_HUGEPAGE only changes how the kernel backs it.
        unsafe {
            libc::madvise(region.as_ptr().cast(), size, libc::MADV_HUGEPAGE);
        }
    }
    Ok(region)
}

/// Refuses guests larger than the host's RAM: anonymous guest memory is mapped with
/// `MAP_NORESERVE`, so without this the guest would find out by being OOM-killed.
fn check_host_ram(size: u64) -> Result<(), MemoryError> {
    let Some(host) = meminfo_bytes("MemTotal") else {
        return Ok(());
    };
    if size > host {
        return Err(MemoryError::LargerThanHost {
            guest: fmt_size(size),
            host: format!("{} MiB", host >> 20),
        });
    }
    Ok(())
}

/// A `/proc/meminfo` line's value in bytes.
pub fn meminfo_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib << 10)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    /// The VmFlags line of the /proc/self/smaps entry that starts at `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&start))
            .find(|l| l.starts_with("VmFlags:"))
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn guest_ram_is_left_out_of_forked_children() {
        let cfg: MemoryConfig = "16M".parse().unwrap();
        let mem = create_guest_memory(&cfg, false).unwrap();
        let region = mem.iter().next().unwrap();
        let flags = vm_flags(region.as_ptr() as usize);
        assert!(flags.split_whitespace().any(|f| f == "dc"), "{flags:?}");
    }
}
