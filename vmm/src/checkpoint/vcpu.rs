//! One vCPU's architectural state as KVM keeps it, saved by the vCPU's own thread
//! while it is parked, and put back into a fresh vCPU before it first runs.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Everything a vCPU needs to carry on where it stopped.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest saw (restored as-is, so the guest sees the same CPU).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (legacy 4 KiB area).
    pub xsave: kvm_xsave,
    /// XCR0, where the host has XCRs.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists that could be read (TSC, kvm-clock, syscall MSRs...).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Most MSRs read or written per KVM call.
const MSR_CHUNK: usize = 64;

fn fail(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("KVM {what} failed: {e}")
}

/// Reads the MSRs in `index` that KVM can read: GET_MSRS stops at the first it
/// cannot, which is skipped.
fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let mut out = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = fd.get_msrs(&mut msrs).map_err(fail("GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n (if any) is one KVM cannot read: skip it.
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(out)
}

/// Saves the state of the vCPU behind `fd`; pending port or MMIO I/O must have
/// been completed (a KVM_RUN with `immediate_exit` set) first.
/// `cpuid` is what hpcvm set (KVM_GET_CPUID2 on a software-KVM host reports the
/// host's own bits instead).
pub fn save(
    fd: &VcpuFd,
    cpuid: &[kvm_cpuid_entry2],
    msr_index: &[u32],
    has_xcrs: bool,
) -> Result<VcpuState, String> {
    Ok(VcpuState {
        cpuid: cpuid.to_vec(),
        mp_state: fd.get_mp_state().map_err(fail("GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(fail("GET_REGS"))?,
        sregs: fd.get_sregs().map_err(fail("GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(fail("GET_XSAVE"))?,
        xcrs: match has_xcrs {
            true => Some(fd.get_xcrs().map_err(fail("GET_XCRS"))?),
            false => None,
        },
        debugregs: fd.get_debug_regs().map_err(fail("GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(fail("GET_LAPIC"))?,
        msrs: read_msrs(fd, msr_index)?,
        events: fd.get_vcpu_events().map_err(fail("GET_VCPU_EVENTS"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Puts `state` into the fresh vCPU `fd`, in the order KVM needs (CPUID first, the
/// LAPIC before the MSRs that depend on it, pending events last).
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), String> {
    if let Some(khz) = state.tsc_khz {
        // Not every host can scale the TSC; the guest then sees the host's rate.
        if fd.get_tsc_khz().ok() != Some(khz) {
            let _ = fd.set_tsc_khz(khz);
        }
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| format!("CPUID: {e:?}"))?;
    fd.set_cpuid2(&cpuid).map_err(fail("SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(fail("SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(fail("SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(fail("SET_SREGS"))?;
    // SAFETY: a kvm_xsave read back from KVM_GET_XSAVE of a vCPU with this CPUID.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(fail("SET_XSAVE"))?;
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(fail("SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(fail("SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(fail("SET_LAPIC"))?;
    for chunk in state.msrs.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = fd.set_msrs(&msrs).map_err(fail("SET_MSRS"))?;
        if let Some(m) = chunk.get(n) {
            return Err(format!("KVM refused MSR {:#x}", m.index));
        }
    }
    fd.set_vcpu_events(&state.events)
        .map_err(fail("SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The CPUID feature words a guest may depend on: (leaf, subleaf, register name).
const FEATURE_WORDS: &[(u32, u32, usize, &str)] = &[
    (1, 0, 2, "ECX"),
    (1, 0, 3, "EDX"),
    (7, 0, 1, "EBX"),
    (7, 0, 2, "ECX"),
    (7, 0, 3, "EDX"),
    (0xd, 1, 0, "EAX"),
    (0x8000_0001, 0, 2, "ECX"),
    (0x8000_0001, 0, 3, "EDX"),
];

/// Bits that are not the CPU's features: OSXSAVE follows CR4, the hypervisor bit and
/// the x2APIC/TSC-deadline bits are KVM's, HTT is hpcvm's (set for a multi-vCPU
/// topology).
fn ignored(leaf: u32, reg: usize) -> u32 {
    match (leaf, reg) {
        (1, 2) => 1 << 27 | 1 << 31 | 1 << 21 | 1 << 24,
        (1, 3) => 1 << 28,
        _ => 0,
    }
}

/// Checks that this host offers every CPU feature the checkpointed guest saw:
/// a feature that vanished would fault the guest's next use of it.
pub fn check_features(saved: &[kvm_cpuid_entry2], host: &CpuId) -> Result<(), String> {
    let find = |c: &[kvm_cpuid_entry2], leaf: u32, sub: u32| {
        c.iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0))
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
    };
    for &(leaf, sub, reg, name) in FEATURE_WORDS {
        let Some(guest) = find(saved, leaf, sub) else {
            continue;
        };
        let have = find(host.as_slice(), leaf, sub).unwrap_or_default();
        let missing = guest[reg] & !have[reg] & !ignored(leaf, reg);
        if missing != 0 {
            return Err(format!(
                "the guest was using CPU features this host lacks: CPUID leaf {leaf:#x}.{sub} \
                 {name} bits {missing:#010x}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: 1,
            ecx,
            ..Default::default()
        }
    }

    fn cpuid(ecx: u32) -> CpuId {
        CpuId::from_entries(&[entry(ecx)]).unwrap()
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let err = check_features(&[entry(0b1001)], &cpuid(0b0001)).unwrap_err();
        assert!(err.contains("leaf 0x1.0 ECX bits 0x00000008"), "{err}");
        check_features(&[entry(0b0001)], &cpuid(0b1111)).unwrap();
        // The hypervisor bit is KVM's, not the CPU's.
        check_features(&[entry(1 << 31)], &cpuid(0)).unwrap();
        // HTT says the topology has several logical CPUs; KVM never offers it.
        let htt = kvm_cpuid_entry2 {
            function: 1,
            edx: 1 << 28,
            ..Default::default()
        };
        check_features(&[htt], &cpuid(0)).unwrap();
    }
}
