//! x86 topology: which APIC ID each vCPU gets and how many bits each level takes.

use crate::config::Topology;

/// Bits needed to number `n` items (the x2APIC ID field width for that level).
pub fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Where one vCPU sits in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuPlace {
    /// Index in creation order (vCPU 0 is the boot CPU).
    pub index: u32,
    /// Package number.
    pub socket: u32,
    /// Core number within the package.
    pub core: u32,
    /// Thread number within the core.
    pub thread: u32,
    /// The (x2)APIC ID: also the KVM vCPU id, so LAPIC, CPUID and MP table agree.
    pub apic_id: u32,
}

/// Places vCPU `index` of `t`: threads fill a core, cores fill a socket.
pub fn place(t: &Topology, index: u32) -> VcpuPlace {
    let thread = index % t.threads;
    let core = (index / t.threads) % t.cores;
    let socket = index / (t.threads * t.cores);
    let smt = id_bits(t.threads);
    let core_bits = id_bits(t.cores);
    VcpuPlace {
        index,
        socket,
        core,
        thread,
        apic_id: (socket << (smt + core_bits)) | (core << smt) | thread,
    }
}

/// Every vCPU's place, in index order.
pub fn places(t: &Topology) -> Vec<VcpuPlace> {
    (0..t.vcpus()).map(|i| place(t, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_bits_round_up_to_powers_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn flat_topology_gives_sequential_apic_ids() {
        let t = Topology {
            sockets: 1,
            cores: 4,
            threads: 1,
        };
        let ids: Vec<u32> = places(&t).iter().map(|p| p.apic_id).collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
    }

    #[test]
    fn smt_and_sockets_leave_gaps_at_non_power_of_two_counts() {
        let t = Topology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        let p = places(&t);
        assert_eq!(
            p[1],
            VcpuPlace {
                index: 1,
                socket: 0,
                core: 0,
                thread: 1,
                apic_id: 1
            }
        );
        assert_eq!(p[2].apic_id, 2); // core 1 thread 0
        assert_eq!(p[5].apic_id, 5); // core 2 thread 1
        assert_eq!(
            p[6],
            VcpuPlace {
                index: 6,
                socket: 1,
                core: 0,
                thread: 0,
                apic_id: 8
            }
        );
        assert_eq!(p[11].apic_id, 8 + 5);
    }
}
