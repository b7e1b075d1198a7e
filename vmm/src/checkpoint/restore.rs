//! Putting a checkpoint's device state into the devices of a VM rebuilt from its
//! configuration, before any vCPU or the device thread runs.

use devices::lock;

use super::{CheckpointError, DevicesState};
use crate::legacy::LegacyDevices;
use crate::pci::PciBus;

/// Restores COM1, the i8042, the agent channel, the PCI configuration latch and
/// every virtio function; Err names the first that does not fit.
pub fn devices(
    state: &DevicesState,
    legacy: &LegacyDevices,
    pci: Option<&PciBus>,
) -> Result<(), CheckpointError> {
    let mismatch = CheckpointError::Mismatch;
    lock(&legacy.console)
        .restore(&state.com1)
        .map_err(|e| mismatch(format!("COM1: {e}")))?;
    lock(&legacy.i8042).restore(&state.i8042);
    match (&legacy.agent_port, &state.agent) {
        (Some(port), Some(s)) => lock(port)
            .restore(s)
            .map_err(|e| mismatch(format!("the agent channel: {e}")))?,
        (None, None) => {}
        _ => return Err(mismatch("the agent channel does not match the job".into())),
    }
    let virtio = pci.map(PciBus::virtio_devices).unwrap_or_default();
    if virtio.len() != state.virtio.len() {
        return Err(mismatch(format!(
            "{} virtio devices at the checkpoint, {} now",
            state.virtio.len(),
            virtio.len()
        )));
    }
    for (dev, s) in virtio.iter().zip(&state.virtio) {
        lock(dev).restore(s).map_err(mismatch)?;
    }
    if let (Some(bus), Some(address)) = (pci, state.pci_address) {
        lock(&bus.config_io()).set_address(address);
    }
    Ok(())
}
