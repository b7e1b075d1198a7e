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
use crate::config::{HugePageSize, NumaConfig};

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

/// Each group's share of `ram`, in whole `unit`s, in proportion to its vCPUs; the last
/// group takes what rounding left.
fn split_ram(
    ram: u64,
    unit: u64,
    groups: &[(Vec<u32>, Option<u32>)],
    vcpus: u32,
) -> Result<Vec<u64>, MemoryError> {
    let units = ram / unit;
    if units < groups.len() as u64 {
        return Err(MemoryError::Numa(format!(
            "{} of guest RAM cannot make {} nodes of whole {} units",
            fmt_size(ram),
            groups.len(),
            fmt_size(unit)
        )));
    }
    let mut left = ram;
    let mut shares = Vec::with_capacity(groups.len());
    for (i, (cpus, _)) in groups.iter().enumerate() {
        let share = if i + 1 == groups.len() {
            left
        } else {
            (units * cpus.len() as u64 / u64::from(vcpus)).max(1) * unit
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
/// RAM, first checks that each host node's pool has the pages.
pub fn bind(
    mem: &GuestMemoryMmap,
    layout: &NumaLayout,
    page: HugePageSize,
) -> Result<(), MemoryError> {
    for node in &layout.nodes {
        let Some(host) = node.host_node else { continue };
        if page.is_hugetlb() {
            let need = node.ram.iter().map(|r| r.1).sum::<u64>() / page.bytes();
            check_node_pool(host, page, need)?;
        }
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
            "host node {node} has {free} free {} hugepages, its guest node needs {need}: raise {}",
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
mod tests {
    use super::*;

    fn host2() -> HostNodes {
        HostNodes(vec![(0, vec![0, 1]), (1, vec![2, 3])])
    }

    #[test]
    fn two_nodes_split_vcpus_and_ram_in_order() {
        let l = plan(
            NumaConfig::Nodes(2),
            2,
            512 << 20,
            HugePageSize::None,
            None,
            &HostNodes(vec![(0, vec![0, 1])]),
        )
        .unwrap();
        assert_eq!(l.nodes.len(), 2);
        assert_eq!(l.nodes[0].vcpus, [0]);
        assert_eq!(l.nodes[1].vcpus, [1]);
        assert_eq!(l.nodes[0].ram, [(0, 256 << 20)]);
        assert_eq!(l.nodes[1].ram, [(256 << 20, 256 << 20)]);
        // One host node: both guest nodes live on it.
        assert_eq!(l.nodes[1].host_node, Some(0));
        assert_eq!(l.node_of(1), 1);
    }

    #[test]
    fn auto_follows_the_pinned_cpus_host_nodes() {
        let l = plan(
            NumaConfig::Auto,
            4,
            1 << 30,
            HugePageSize::Size2M,
            Some(&[2, 3, 0, 1]),
            &host2(),
        )
        .unwrap();
        let got: Vec<_> = l
            .nodes
            .iter()
            .map(|n| (n.vcpus.clone(), n.host_node))
            .collect();
        assert_eq!(got, [(vec![0, 1], Some(1)), (vec![2, 3], Some(0))]);
        // Unpinned, auto is one node placed by first touch.
        let flat = plan(
            NumaConfig::Auto,
            4,
            1 << 30,
            HugePageSize::None,
            None,
            &host2(),
        )
        .unwrap();
        assert_eq!(flat.nodes.len(), 1);
        assert_eq!(flat.nodes[0].host_node, None);
    }

    #[test]
    fn a_node_straddling_the_mmio_gap_gets_both_ranges() {
        let l = plan(
            NumaConfig::Nodes(2),
            2,
            4 << 30,
            HugePageSize::Size1G,
            None,
            &HostNodes::default(),
        )
        .unwrap();
        assert_eq!(l.nodes[0].ram, [(0, 2 << 30)]);
        assert_eq!(l.nodes[1].ram, [(2 << 30, 1 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(l.nodes[1].host_node, None);
    }

    #[test]
    fn impossible_splits_are_refused_with_the_reason() {
        let e = plan(
            NumaConfig::Nodes(3),
            2,
            512 << 20,
            HugePageSize::None,
            None,
            &host2(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Cannot lay out guest NUMA nodes: --numa 3 needs at least 3 vCPUs (one per node); the guest has 2"
        );
        let e = plan(
            NumaConfig::Nodes(2),
            2,
            1 << 30,
            HugePageSize::Size1G,
            None,
            &host2(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot make 2 nodes of whole 1G units"),
            "{e}"
        );
    }

    #[test]
    fn host_nodes_are_read_from_sysfs() {
        let h = HostNodes::read();
        // Every Linux host with NUMA has node 0 holding CPU 0.
        if !h.0.is_empty() {
            assert_eq!(h.node_of(0), Some(0));
        }
    }

    #[test]
    fn bound_ram_reports_the_policy_in_numa_maps() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        if HostNodes::read().0.is_empty() {
            return;
        }
        let layout = NumaLayout {
            nodes: vec![NumaNode {
                vcpus: vec![0],
                ram: vec![(0, 8 << 20)],
                host_node: Some(0),
            }],
        };
        bind(&mem, &layout, HugePageSize::None).unwrap();
        let addr = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
        let line = maps
            .lines()
            .find(|l| l.starts_with(&format!("{addr:x} ")))
            .expect("the mapping in numa_maps");
        assert!(line.contains(" bind:0"), "{line}");
    }
}
