//! Writing a checkpoint of a running VM: what of the VM the control loop holds for
//! it ([`Snapshotter`]), and the order that keeps the saved state consistent.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use devices::legacy::{Uart, I8042};
use devices::lock;
use devices::pci::PciConfigIo;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::vcpu::VcpuState;
use super::STATE_FILE;
use super::{format, machine, ram, CheckpointError, DevicesState, VmState, MEMORY_FILE};
use crate::agent::AgentPort;
use crate::config::VmConfig;
use crate::virtio::VirtioPciDevice;
use crate::vstate::Vm;

/// What a checkpoint reads of a VM beside its vCPUs.
pub struct Snapshotter {
    /// The KVM VM (irqchip, PIT, clock).
    pub vm: Arc<Vm>,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// COM1.
    pub com1: Arc<Mutex<Uart>>,
    /// The i8042.
    pub i8042: Arc<Mutex<I8042>>,
    /// COM2, the agent channel, when a job runs.
    pub agent_port: Option<Arc<Mutex<AgentPort>>>,
    /// The PCI configuration port, when there is a bus.
    pub pci_config: Option<Arc<Mutex<PciConfigIo>>>,
    /// The virtio functions, in bus order.
    pub virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// Why this VM cannot be checkpointed, if it cannot.
    pub refusal: Option<String>,
}

/// The virtio devices held still for a checkpoint or migration (see
/// [`Snapshotter::hold_devices`]); dropping it restarts their backends (not those
/// of devices handed over to a migration's receiver) and unlocks them.
pub struct HeldDevices<'a>(pub Vec<MutexGuard<'a, VirtioPciDevice>>);

impl Drop for HeldDevices<'_> {
    fn drop(&mut self) {
        for d in self.0.iter_mut() {
            d.resume_backend();
        }
    }
}

/// What a checkpoint wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// Guest RAM, bytes.
    pub ram: u64,
    /// Bytes of RAM that were not zero (what the memory file holds).
    pub data: u64,
    /// Seconds from the devices' quiescing to the synced state file.
    pub seconds: f64,
}

impl Snapshotter {
    /// Why a checkpoint would be refused, checked before the VM is paused.
    pub fn refused(&self) -> Result<(), CheckpointError> {
        match &self.refusal {
            Some(why) => Err(CheckpointError::Refused(why.clone())),
            None => Ok(()),
        }
    }

    /// Locks every virtio device (the device thread stops) and stops what serves
    /// queues from another process (a share's virtiofsd), which hands over its
    /// state: nothing but the vCPUs writes guest RAM until the guard is dropped.
    /// Err (a backend that cannot stop) leaves every device as it was.
    pub fn hold_devices(&self) -> Result<HeldDevices<'_>, CheckpointError> {
        let mut held = HeldDevices(self.virtio.iter().map(|d| lock(d)).collect());
        for d in held.0.iter_mut() {
            d.quiesce().map_err(CheckpointError::Refused)?;
        }
        Ok(held)
    }

    /// The paused VM's state with its devices locked: with `drain`, the queues are
    /// served once more, so that nothing the guest queued is pending (a migration
    /// does not: that would write RAM behind KVM's dirty log; the restored devices
    /// look at their queues once instead), then `save_vcpus` has the parked vCPUs
    /// save themselves (interrupts the last pass raised are in their LAPICs by
    /// then), then the machine and the devices. `memory` is left for the caller
    /// (its size only).
    pub fn capture(
        &self,
        devices: &mut [MutexGuard<'_, VirtioPciDevice>],
        drain: bool,
        save_vcpus: impl FnOnce() -> Result<Vec<VcpuState>, String>,
    ) -> Result<VmState, CheckpointError> {
        for d in devices.iter_mut().filter(|_| drain) {
            for q in 0..d.queue_count() {
                d.process(q);
            }
        }
        let virtio = devices
            .iter()
            .map(|d| d.state())
            .collect::<Result<Vec<_>, _>>()
            .map_err(CheckpointError::Refused)?;
        let vcpus = save_vcpus().map_err(|error| CheckpointError::Kvm {
            what: "save",
            error,
        })?;
        let machine = machine::save(&self.vm.fd)?;
        let devices_state = DevicesState {
            com1: lock(&self.com1).state(),
            i8042: lock(&self.i8042).state(),
            agent: self.agent_port.as_ref().map(|p| lock(p).state()),
            pci_address: self.pci_config.as_ref().map(|c| lock(c).address()),
            virtio,
        };
        Ok(VmState {
            config: self.config.clone(),
            vcpus,
            machine,
            devices: devices_state,
            memory: ram::MemoryImage {
                size: self.mem.iter().map(|r| r.len()).sum(),
                data: 0,
                crc: 0,
            },
        })
    }

    /// Writes a checkpoint of the paused VM to `dir`. Every device is locked (the
    /// device thread stops) and its queues served once more, so that nothing the
    /// guest queued is pending; then `save_vcpus` has the parked vCPUs save
    /// themselves (interrupts the last pass raised are in their LAPICs by then),
    /// then the machine, the devices and RAM are saved, and the state file last.
    /// With `stop` (the VM ends once it is written) the devices serve nothing more,
    /// a share's virtiofsd included: what the guest queued past the checkpoint is
    /// for the restored VM to do, not this one too.
    pub fn write(
        &self,
        dir: &Path,
        stop: bool,
        save_vcpus: impl FnOnce() -> Result<Vec<VcpuState>, String>,
    ) -> Result<Written, CheckpointError> {
        self.refused()?;
        let io = |what| {
            move |source| CheckpointError::Io {
                what,
                path: dir.to_path_buf(),
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io("creating"))?;
        // An older checkpoint here stops being one before any of it is overwritten.
        match std::fs::remove_file(dir.join(STATE_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("replacing the checkpoint in")(e))
            }
            _ => {}
        }
        let started = Instant::now();
        let mut devices = self.hold_devices()?;
        let mut state = self.capture(&mut devices.0, true, save_vcpus)?;
        let memory = ram::save(&self.mem, &dir.join(MEMORY_FILE))?;
        state.memory = memory;
        let payload = serde_json::to_vec(&state).map_err(|e| CheckpointError::Kvm {
            what: "save",
            error: format!("encoding: {e}"),
        })?;
        format::write(&dir.join(STATE_FILE), &payload)?;
        if stop {
            for d in devices.0.iter_mut() {
                d.hand_over();
            }
        }
        // Held to the end: stdin read now would be missing from the checkpoint.
        drop(devices);
        Ok(Written {
            ram: memory.size,
            data: memory.data,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
