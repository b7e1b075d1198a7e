//! The CPUID each vCPU sees: KVM's supported set, with the topology of this VM and, on a
//! software-virtualized host only, the features its instruction emulator lacks hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::topology::{id_bits, VcpuPlace};
use crate::config::Topology;

// Leaf 1 ECX / EDX bits.
const ECX_CX16: u32 = 1 << 13;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
// Leaf 7 subleaf 0 EBX bits.
const EBX7_SMAP: u32 = 1 << 20;
// Leaf 0xB / 0x1F level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Features hidden from the guest on a software-KVM host: the emulator has no xrstor,
/// cmpxchg16b, popcnt or clac, and a guest kernel using them dies with an emulation
/// failure. AVX goes with XSAVE (it cannot be enabled without it).
pub const SOFTWARE_KVM_HIDDEN_LEAF1_ECX: u32 =
    ECX_CX16 | ECX_POPCNT | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX;
/// The same features, hidden through the guest kernel's command line. Needed on top of
/// the CPUID filter on kvm_pvm, which takes leaf 1 ECX/EDX and leaf 7 feature bits
/// from the host CPU whatever KVM_SET_CPUID2 says (measured: leaf 1 ECX set to
/// 0x80000000, guest read 0xf6d81203).
/// ERMS, FSRM and FSRS (bit 395, which has no name) go too, for speed rather than
/// correctness: with them the kernel clears and copies pages with `rep stosb/movsb`,
/// which the emulator executes a byte at a time (measured: a 2 MiB hugetlb fault took
/// 1242 ms with them, 180 ms without). The kernel honours only the last `clearcpuid=`.
/// `clocksource=kvm-clock`: kvm_pvm ignores the VMM's writes of IA32_TSC (measured: a
/// restored vCPU read back the host's TSC, not the saved one), so a guest timing itself
/// with the TSC, which Linux prefers when it is invariant, would jump forward by the
/// time a checkpointed VM was stopped (and a 2-vCPU guest then died of RCU stall
/// NMIs); kvm-clock carries on from KVM_SET_CLOCK.
pub const SOFTWARE_KVM_CMDLINE: &str =
    "noxsave clearcpuid=cx16,popcnt,smap,erms,fsrm,395 clocksource=kvm-clock";
/// On kvm_pvm, guest user mode sees the host's CPUID and XCR0, so glibc picks AVX
/// string functions, but the guest kernel (booted `noxsave`) does not save AVX state
/// across context switches: two processes on one vCPU corrupt each other's registers.
/// This glibc tunable (given to init through the kernel command line, and to the job)
/// keeps glibc on SSE2 code. Old and new feature names both, as glibc renamed them.
pub const SOFTWARE_KVM_GLIBC_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,\
-AVX512BW,-AVX512DQ,-AVX_Fast_Unaligned_Load,-FMA,-AVX2_Usable,-AVX512F_Usable,-AVX512VL_Usable";
/// Leaf 7 features hidden on a software-KVM host.
pub const SOFTWARE_KVM_HIDDEN_LEAF7_EBX: u32 = EBX7_SMAP;

/// Builds the CPUID of the vCPU at `place` from KVM's supported set. The last-level
/// cache is shared by the package, or by `llc_sharing` vCPUs when the package is split
/// into NUMA nodes (Linux wants no LLC to span two nodes).
pub fn vcpu_cpuid(
    supported: &CpuId,
    topo: &Topology,
    place: &VcpuPlace,
    software_kvm: bool,
    llc_sharing: Option<u32>,
) -> CpuId {
    let smt_bits = id_bits(topo.threads);
    let pkg_bits = smt_bits + id_bits(topo.cores);
    let per_pkg = topo.cores * topo.threads;
    let llc = llc_sharing.unwrap_or(per_pkg).clamp(1, per_pkg);
    let amd = is_amd(supported);

    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 3);
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((per_pkg.min(255)) << 16) | (place.apic_id << 24);
                e.ecx |= ECX_HYPERVISOR;
                if per_pkg > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
                if software_kvm {
                    e.ecx &= !SOFTWARE_KVM_HIDDEN_LEAF1_ECX;
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package and who shares each
                // cache (L1/L2 per core, L3 per package or NUMA node).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { llc } else { topo.threads };
                e.eax = (e.eax & 0x3ff)
                    | ((sharing - 1).min(0xfff) << 14)
                    | ((topo.cores - 1).min(0x3f) << 26);
            }
            0x7 if e.index == 0 && software_kvm => e.ebx &= !SOFTWARE_KVM_HIDDEN_LEAF7_EBX,
            0xb | 0x1f => continue, // rebuilt below
            // AMD's cache topology: Linux derives the LLC's sharers from it.
            0x8000_001d if amd && (e.eax >> 5) & 0x7 >= 3 => {
                e.eax = (e.eax & !(0xfff << 14)) | ((llc - 1).min(0xfff) << 14);
            }
            0x8000_0008 if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (pkg_bits << 12) | (per_pkg - 1).min(0xff);
            }
            _ => {}
        }
        out.push(e);
    }
    // Extended topology: SMT level, core level, then the terminating invalid level.
    if supported.as_slice().iter().any(|e| e.function == 0xb) || max_leaf(supported) >= 0xb {
        let levels = [
            (smt_bits, topo.threads, LEVEL_SMT),
            (pkg_bits, per_pkg, LEVEL_CORE),
            (0, 0, 0),
        ];
        for (i, (shift, count, kind)) in levels.into_iter().enumerate() {
            out.push(kvm_cpuid_entry2 {
                function: 0xb,
                index: i as u32,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: count,
                ecx: (kind << 8) | i as u32,
                edx: place.apic_id,
                ..Default::default()
            });
        }
    }
    // A guest that finds no leaf 0x1F falls back to 0xB, which now has the truth.
    CpuId::from_entries(&out).expect("CPUID entry count stays within KVM's maximum")
}

fn max_leaf(c: &CpuId) -> u32 {
    c.as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax)
}

fn is_amd(c: &CpuId) -> bool {
    c.as_slice()
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::topology::place;

    fn host() -> CpuId {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69), // GenuineIntel
            e(1, 0, 0x806f8, 0x0010_0800, 0xfffa_3203, 0x178b_fbff),
            e(4, 0, 0x1c00_4121, 0, 0, 0),
            e(4, 3, 0x1c03_c163, 0, 0, 0),
            e(7, 0, 0, 0xffff_ffff, 0, 0),
            e(7, 1, 0, 0xffff_ffff, 0, 0),
            e(0xb, 0, 1, 2, 0x100, 7),
            e(0x1f, 0, 1, 2, 0x100, 7),
            e(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ])
        .unwrap()
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap_or_else(|| panic!("no leaf {f:#x}.{i}"))
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let t = Topology {
            sockets: 1,
            cores: 4,
            threads: 1,
        };
        let c = vcpu_cpuid(&host(), &t, &place(&t, 3), false, None);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn real_hardware_keeps_every_feature() {
        let t = Topology {
            sockets: 1,
            cores: 1,
            threads: 1,
        };
        let c = vcpu_cpuid(&host(), &t, &place(&t, 0), false, None);
        assert_eq!(leaf(&c, 1, 0).ecx, 0xfffa_3203 | ECX_HYPERVISOR);
        assert_eq!(leaf(&c, 7, 0).ebx, 0xffff_ffff);
        assert_eq!(leaf(&c, 1, 0).edx & EDX_HTT, 0, "one CPU: no HTT");
    }

    #[test]
    fn software_kvm_hides_what_its_emulator_lacks() {
        let t = Topology {
            sockets: 1,
            cores: 1,
            threads: 1,
        };
        let c = vcpu_cpuid(&host(), &t, &place(&t, 0), true, None);
        let ecx = leaf(&c, 1, 0).ecx;
        for (bit, name) in [
            (ECX_XSAVE, "xsave"),
            (ECX_CX16, "cx16"),
            (ECX_POPCNT, "popcnt"),
        ] {
            assert_eq!(ecx & bit, 0, "{name} still visible");
        }
        assert_eq!(leaf(&c, 7, 0).ebx & EBX7_SMAP, 0, "smap still visible");
        assert_eq!(leaf(&c, 7, 1).ebx, 0xffff_ffff, "other subleaves untouched");
        assert_eq!(
            leaf(&c, 0x4000_0000, 0).ebx,
            0x4b4d_564b,
            "KVM signature kept"
        );
    }

    #[test]
    fn extended_topology_matches_sockets_cores_threads() {
        let t = Topology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        let p = place(&t, 7); // socket 1, core 0, thread 1 -> apic 9
        let c = vcpu_cpuid(&host(), &t, &p, false, None);
        let smt = leaf(&c, 0xb, 0);
        let core = leaf(&c, 0xb, 1);
        let end = leaf(&c, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (1, 2, 0x100, 9));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 9));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        assert!(
            c.as_slice().iter().all(|e| e.function != 0x1f),
            "stale 0x1f dropped"
        );
        assert_eq!(leaf(&c, 1, 0).ebx >> 24, 9);
    }

    #[test]
    fn cache_leaf_reports_cores_and_sharing() {
        let t = Topology {
            sockets: 1,
            cores: 8,
            threads: 2,
        };
        let c = vcpu_cpuid(&host(), &t, &place(&t, 0), false, None);
        let l1 = leaf(&c, 4, 0);
        let l3 = leaf(&c, 4, 3);
        assert_eq!(l1.eax >> 26, 7);
        assert_eq!((l1.eax >> 14) & 0xfff, 1);
        assert_eq!((l3.eax >> 14) & 0xfff, 15);
        assert_eq!(l1.eax & 0x3ff, 0x121, "cache type and level kept");
    }
}
