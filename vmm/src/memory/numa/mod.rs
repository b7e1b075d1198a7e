//! Guest NUMA nodes: which vCPUs and which guest RAM each holds, the host node its RAM
//! is bound to (`mbind`), and the host CPUs that prefault it.
//!
//! The guest learns the layout from the SRAT and SLIT ([`crate::acpi`]); the host side
//! is an `MPOL_BIND` policy on each node's part of the guest RAM mapping, set before
//! any page of it is touched, so prefault and the guest's own faults both take pages
//! from that host node.

use std::io;
use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout::ram_ranges;
use super::MemoryError;
use crate::config::memory::fmt_size;
use crate::config::{HugePageSize, NumaConfig, Topology};
use crate::vstate::topology::{id_bits, VcpuPlace};

/// One guest node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// Its vCPUs (indexes).
    pub vcpus: Vec<u32>,
    /// Its guest RAM: (guest-physical start, length).
    pub ram: Vec<(u64, u64)>,
    /// The host node its RAM is bound to (none: placed by first touch).
    pub host_node: Option<u32>,
}

/// The guest's nodes, in proximity-domain order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaLayout {
    /// At least one.
    pub nodes: Vec<NumaNode>,
}

impl NumaNode {
    /// Bytes of guest RAM in the node.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.iter().map(|r| r.1).sum()
    }
}

impl NumaLayout {
    /// The node of vCPU `index`.
    pub fn node_of(&self, index: u32) -> u32 {
        self.nodes
            .iter()
            .position(|n| n.vcpus.contains(&index))
            .unwrap_or(0) as u32
    }
}

/// The host's NUMA nodes: (node, its CPUs), from sysfs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNodes(pub Vec<(u32, Vec<usize>)>);

impl HostNodes {
    /// Reads `/sys/devices/system/node`; empty on a host kernel without NUMA.
    pub fn read() -> Self {
        Self::read_from(Path::new("/sys/devices/system/node"))
    }

    /// Reads a sysfs-like node directory.
    pub fn read_from(dir: &Path) -> Self {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Self::default();
        };
        let mut nodes: Vec<(u32, Vec<usize>)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let node = name.strip_prefix("node")?.parse().ok()?;
                let list = std::fs::read_to_string(e.path().join("cpulist")).ok()?;
                Some((node, crate::config::cpus::parse_cpu_list(list.trim()).ok()?))
            })
            .collect();
        nodes.sort();
        Self(nodes)
    }

    /// The nodes this process may use: those in `mems_allowed` (its cpuset's memory
    /// nodes; all when unknown) that have one of the `allowed` CPUs, each with just
    /// those CPUs. `mbind` to any other node fails, and a node without CPUs here has
    /// no thread to prefault it.
    pub fn usable(&self, allowed: &[usize], mems_allowed: Option<&[usize]>) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(n, _)| mems_allowed.is_none_or(|m| m.contains(&(*n as usize))))
                .map(|(n, cpus)| {
                    let cpus = cpus.iter().copied().filter(|c| allowed.contains(c));
                    (*n, cpus.collect::<Vec<_>>())
                })
                .filter(|(_, cpus)| !cpus.is_empty())
                .collect(),
        )
    }

    /// This process's `Mems_allowed_list` (from /proc/self/status), if readable.
    pub fn mems_allowed() -> Option<Vec<usize>> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Mems_allowed_list:"))?;
        crate::config::cpus::parse_cpu_list(list.trim()).ok()
    }

    /// The node of host CPU `cpu`.
    pub fn node_of(&self, cpu: usize) -> Option<u32> {
        self.0
            .iter()
            .find(|(_, cpus)| cpus.contains(&cpu))
            .map(|&(n, _)| n)
    }

    /// The CPUs of host node `node`.
    pub fn cpus(&self, node: u32) -> &[usize] {
        self.0
            .iter()
            .find(|&&(n, _)| n == node)
            .map_or(&[], |(_, c)| c.as_slice())
    }
}

/// Lays out `vcpus` vCPUs and `ram` bytes of RAM (in `page`-sized pages) as `numa`
/// says, given the vCPUs' pinning (`affinity[i]` is vCPU i's host CPU) and the host's
/// nodes.
pub fn plan(
    numa: NumaConfig,
    vcpus: u32,
    ram: u64,
    page: HugePageSize,
    affinity: Option<&[usize]>,
    host: &HostNodes,
) -> Result<NumaLayout, MemoryError> {
    let pinned_node = |i: u32| affinity.and_then(|a| host.node_of(*a.get(i as usize)?));
    let groups: Vec<(Vec<u32>, Option<u32>)> = match numa {
        NumaConfig::Off => vec![((0..vcpus).collect(), None)],
        NumaConfig::Auto => {
            // One guest node per host node the pinned vCPUs use, in order of first use.
            let mut groups: Vec<(Vec<u32>, Option<u32>)> = Vec::new();
            for i in 0..vcpus {
                let node = pinned_node(i);
                match groups.iter_mut().find(|(_, n)| *n == node) {
                    Some((v, _)) => v.push(i),
                    None => groups.push((vec![i], node)),
                }
            }
            groups
        }
        NumaConfig::Nodes(n) => {
            if n > vcpus {
                return Err(MemoryError::Numa(format!(
                    "--numa {n} needs at least {n} vCPUs (one per node); the guest has {vcpus}"
                )));
            }
            (0..n)
                .map(|k| {
                    let first = k * vcpus / n;
                    let cpus: Vec<u32> = (first..(k + 1) * vcpus / n).collect();
                    // Unpinned: spread the nodes over the host's, in turn.
                    let node = pinned_node(first).or_else(|| {
                        (!host.0.is_empty()).then(|| host.0[k as usize % host.0.len()].0)
                    });
                    (cpus, node)
                })
                .collect()
        }
    };
    let shares = split_ram(ram, page.bytes().max(2 << 20), &groups, vcpus)?;
    let mut offset = 0;
    let nodes = groups
        .into_iter()
        .zip(shares)
        .map(|((vcpus, host_node), len)| {
            let node = NumaNode {
                vcpus,
                ram: guest_ranges(ram, offset, len),
                host_node,
            };
            offset += len;
            node
        })
        .collect();
    Ok(NumaLayout { nodes })
}

/// How many vCPUs share a last-level cache in a guest of several nodes: the largest
/// power of two whose aligned blocks of APIC IDs each lie in one node. Linux numbers
/// the LLCs by APIC ID >> log2(sharers) and warns of an LLC that spans two nodes, so
/// this is what uneven or unaligned nodes need. None with one node (the package's
/// LLC). A core whose threads would be on two nodes is refused.
pub fn llc_sharing(
    layout: &NumaLayout,
    places: &[VcpuPlace],
    topo: &Topology,
) -> Result<Option<u32>, MemoryError> {
    if layout.nodes.len() < 2 {
        return Ok(None);
    }
    let node: Vec<u32> = places.iter().map(|p| layout.node_of(p.index)).collect();
    for (a, pa) in places.iter().enumerate() {
        for (b, pb) in places.iter().enumerate().skip(a + 1) {
            if (pb.socket, pb.core) == (pa.socket, pa.core) && node[b] != node[a] {
                return Err(MemoryError::Numa(format!(
                    "vCPUs {} and {} are threads of one core but would be on guest nodes \
                     {} and {}: give each node whole cores",
                    pa.index, pb.index, node[a], node[b]
                )));
            }
        }
    }
    let max_bits = id_bits(topo.threads) + id_bits(topo.cores);
    let fits = |bits: u32| {
        places.iter().zip(&node).all(|(p, n)| {
            places
                .iter()
                .zip(&node)
                .all(|(q, m)| q.apic_id >> bits != p.apic_id >> bits || m == n)
        })
    };
    let bits = (0..=max_bits).rev().find(|&b| fits(b)).unwrap_or(0);
    Ok(Some(1 << bits))
}

/// Each group's share of `ram`, in whole `unit`s: one unit each, the rest in proportion
/// to its vCPUs; the last group also takes what rounding left.
fn split_ram(
    ram: u64,
    unit: u64,
    groups: &[(Vec<u32>, Option<u32>)],
    vcpus: u32,
) -> Result<Vec<u64>, MemoryError> {
    let units = ram / unit;
    let n = groups.len() as u64;
    if units < n {
        return Err(MemoryError::Numa(format!(
            "{} of guest RAM cannot make {} nodes of whole {} units",
            fmt_size(ram),
            groups.len(),
            fmt_size(unit)
        )));
    }
    // The first units - n are shared out by vCPU count: their floors add up to at
    // most units - n, so every share fits and the last one is never negative.
    let spare = units - n;
    let mut left = ram;
    let mut shares = Vec::with_capacity(groups.len());
    for (i, (cpus, _)) in groups.iter().enumerate() {
        let share = if i + 1 == groups.len() {
            left
        } else {
            (1 + spare * cpus.len() as u64 / u64::from(vcpus)) * unit
        };
        shares.push(share);
        left -= share;
    }
    Ok(shares)
}

/// The guest-physical ranges of RAM bytes `offset..offset+len` (RAM counted from
/// address 0, continuing above 4 GiB past the MMIO gap).
fn guest_ranges(ram: u64, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut seen = 0;
    for (start, size) in ram_ranges(ram) {
        let size = size as u64;
        let lo = offset.max(seen);
        let hi = (offset + len).min(seen + size);
        if lo < hi {
            out.push((start.0 + (lo - seen), hi - lo));
        }
        seen += size;
    }
    out
}

/// Binds each node's RAM in `mem` to its host node (`mbind(MPOL_BIND)`); for hugetlb
/// RAM, first checks that each host node's pool has the pages of all the guest nodes
/// bound to it.
pub fn bind(
    mem: &GuestMemoryMmap,
    layout: &NumaLayout,
    page: HugePageSize,
) -> Result<(), MemoryError> {
    if page.is_hugetlb() {
        for (host, pages) in pool_needs(layout, page) {
            check_node_pool(host, page, pages)?;
        }
    }
    for node in &layout.nodes {
        let Some(host) = node.host_node else { continue };
        for &(gpa, len) in &node.ram {
            let addr = mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|e| MemoryError::Layout(e.to_string()))?;
            mbind(addr as usize, len as usize, host).map_err(|source| MemoryError::Bind {
                node: host,
                size: fmt_size(len),
                source,
            })?;
        }
    }
    Ok(())
}

/// The `page`s each host node must give: the sum over the guest nodes bound to it.
fn pool_needs(layout: &NumaLayout, page: HugePageSize) -> Vec<(u32, u64)> {
    let mut need: Vec<(u32, u64)> = Vec::new();
    for node in &layout.nodes {
        let Some(host) = node.host_node else { continue };
        let pages = node.ram_bytes() / page.bytes();
        match need.iter_mut().find(|(h, _)| *h == host) {
            Some((_, n)) => *n += pages,
            None => need.push((host, pages)),
        }
    }
    need
}

/// What prefaults each node's RAM in `mem`: the node's pinned host CPUs, else its host
/// node's CPUs among `allowed`, else every CPU in `allowed`.
pub fn prefault_parts(
    mem: &GuestMemoryMmap,
    layout: &NumaLayout,
    affinity: Option<&[usize]>,
    allowed: &[usize],
    host: &HostNodes,
) -> Result<Vec<super::prefault::Part>, MemoryError> {
    layout
        .nodes
        .iter()
        .map(|node| {
            let pinned: Vec<usize> = affinity
                .map(|a| {
                    node.vcpus
                        .iter()
                        .filter_map(|&i| a.get(i as usize).copied())
                        .collect()
                })
                .unwrap_or_default();
            let on_node: Vec<usize> = node
                .host_node
                .map(|h| {
                    host.cpus(h)
                        .iter()
                        .copied()
                        .filter(|c| allowed.contains(c))
                        .collect()
                })
                .unwrap_or_default();
            let cpus = [pinned, on_node, allowed.to_vec()]
                .into_iter()
                .find(|c| !c.is_empty())
                .unwrap_or_default();
            let ranges = node
                .ram
                .iter()
                .map(|&(gpa, len)| {
                    mem.get_host_address(GuestAddress(gpa))
                        .map(|a| (a as usize, len as usize))
                        .map_err(|e| MemoryError::Layout(e.to_string()))
                })
                .collect::<Result<_, _>>()?;
            Ok(super::prefault::Part { ranges, cpus })
        })
        .collect()
}

/// Host node `node`'s pool of `page` hugepages must have `need` pages free.
fn check_node_pool(node: u32, page: HugePageSize, need: u64) -> Result<(), MemoryError> {
    let kib = page.bytes() >> 10;
    let dir = Path::new("/sys/devices/system/node")
        .join(format!("node{node}/hugepages/hugepages-{kib}kB"));
    // A node's pool has no reserved count: the global pool's reservations (this VM's
    // among them, made at mmap time) are not per node, so only free pages are known.
    let file = dir.join("free_hugepages");
    let free: u64 = std::fs::read_to_string(&file)
        .map_err(|e| MemoryError::PoolRead(file.display().to_string(), e))?
        .trim()
        .parse()
        .map_err(|_| {
            MemoryError::PoolRead(file.display().to_string(), io::Error::other("not a number"))
        })?;
    if free < need {
        return Err(MemoryError::NodePool(format!(
            "host node {node} has {free} free {} hugepages, the guest nodes bound to it need \
             {need}: raise {}",
            page.name(),
            dir.join("nr_hugepages").display()
        )));
    }
    Ok(())
}

/// Most nodes in the mask handed to mbind (Linux's MAX_NUMNODES limit is 1024).
const MASK_WORDS: usize = 16;

fn mbind(addr: usize, len: usize, node: u32) -> io::Result<()> {
    let mut mask = [0u64; MASK_WORDS];
    let word = mask
        .get_mut(node as usize / 64)
        .ok_or_else(|| io::Error::other(format!("host node {node} is past node 1023")))?;
    *word |= 1 << (node % 64);
    // The kernel reads maxnode - 1 bits of the mask.
    let maxnode = (MASK_WORDS * 64 + 1) as libc::c_ulong;
    // SAFETY: [addr, addr+len) is guest RAM mapped by this process, not yet touched;
    // mbind only sets the policy its pages are allocated by. `mask` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            libc::c_int::from(MPOL_BIND),
            mask.as_ptr(),
            maxnode,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `MPOL_BIND` from linux/mempolicy.h.
const MPOL_BIND: u8 = 2;

#[cfg(test)]
mod tests;
