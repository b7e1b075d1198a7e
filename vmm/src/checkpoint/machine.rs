//! The VM-wide state KVM keeps: the two PICs, the IOAPIC, the PIT and the guest
//! clock (kvm-clock), so that guest time carries on from where it stopped.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::CheckpointError;

/// Interrupt controllers, PIT and clock.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// The master and slave 8259s and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The 8254.
    pub pit: kvm_pit_state2,
    /// kvm-clock's value.
    pub clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

fn kvm(
    what: &'static str,
    step: &'static str,
) -> impl FnOnce(kvm_ioctls::Error) -> CheckpointError {
    move |e| CheckpointError::Kvm {
        what,
        error: format!("KVM {step} failed: {e}"),
    }
}

/// Reads the VM-wide state; the vCPUs must be parked.
pub fn save(fd: &VmFd) -> Result<MachineState, CheckpointError> {
    let mut irqchips = Vec::with_capacity(CHIPS.len());
    for chip_id in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip)
            .map_err(kvm("save", "GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    Ok(MachineState {
        irqchips,
        pit: fd.get_pit2().map_err(kvm("save", "GET_PIT2"))?,
        clock: fd.get_clock().map_err(kvm("save", "GET_CLOCK"))?,
    })
}

/// Puts the VM-wide state back (after the vCPUs are restored, before they run).
pub fn restore(fd: &VmFd, state: &MachineState) -> Result<(), CheckpointError> {
    if state.irqchips.len() != CHIPS.len()
        || state
            .irqchips
            .iter()
            .zip(CHIPS)
            .any(|(c, id)| c.chip_id != id)
    {
        return Err(CheckpointError::Mismatch(
            "the interrupt controller state is not PIC, PIC, IOAPIC".into(),
        ));
    }
    for chip in &state.irqchips {
        fd.set_irqchip(chip)
            .map_err(kvm("restore", "SET_IRQCHIP"))?;
    }
    fd.set_pit2(&state.pit)
        .map_err(kvm("restore", "SET_PIT2"))?;
    // The clock goes on from the saved value: no jump backwards, and none forwards
    // by the time the VM was stopped (KVM_CLOCK_REALTIME would add it).
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(kvm("restore", "SET_CLOCK"))
}
