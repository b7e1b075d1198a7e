//! Checkpoint and restore of a whole VM: the vCPUs ([`vcpu`]), the in-kernel
//! interrupt controllers, PIT and clock ([`machine`]), every device model, the
//! configuration and guest RAM ([`ram`]), written to a directory ([`format`]) while
//! the vCPUs are parked and the devices locked, and read back by `hpcvm restore`.
//!
//! A checkpoint directory holds `memory` (guest RAM, sparse) and `vm.state` (the
//! rest, written last: a directory with a `vm.state` holds a whole checkpoint).

pub mod capture;
pub mod format;
pub mod machine;
pub mod ram;
pub mod restore;
pub mod vcpu;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::agent::AgentState;
use crate::config::VmConfig;
use crate::virtio::pci::VirtioPciState;
use devices::legacy::UartState;

pub use capture::Snapshotter;

/// The state file's name in a checkpoint directory.
pub const STATE_FILE: &str = "vm.state";
/// The memory file's name in a checkpoint directory.
pub const MEMORY_FILE: &str = "memory";

/// Why a checkpoint could not be written or restored.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// No checkpoint where one was expected.
    #[error("No checkpoint at {}: the file is missing", path.display())]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// A file could not be read or written.
    #[error("Cannot checkpoint: {what} {} failed: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state file is not one.
    #[error("{} is not an hpcvm checkpoint (bad magic)", path.display())]
    NotACheckpoint {
        /// The file.
        path: PathBuf,
    },
    /// Another format version.
    #[error("The checkpoint is in format version {found}; this hpcvm reads version {supported}")]
    Version {
        /// The file's version.
        found: u32,
        /// The version this hpcvm reads.
        supported: u32,
    },
    /// A file is shorter (or longer) than its header says.
    #[error("{} is truncated or damaged: {len} bytes, expected {expected}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What it should be.
        expected: u64,
    },
    /// A checksum or the contents are wrong.
    #[error("{} is corrupt: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// This host's CPU lacks what the guest was using.
    #[error("Cannot restore on this host: {0}")]
    CpuFeatures(String),
    /// The saved state does not fit the VM rebuilt from its configuration.
    #[error("Cannot restore: {0}")]
    Mismatch(String),
    /// This VM cannot be checkpointed (passthrough devices, shares).
    #[error("Cannot checkpoint this VM: {0}")]
    Refused(String),
    /// KVM would not give or take a vCPU's or the machine's state.
    #[error("Cannot {what} the VM state: {error}")]
    Kvm {
        /// "save" or "restore".
        what: &'static str,
        /// What failed.
        error: String,
    },
}

/// Everything about a VM that a checkpoint holds besides its RAM.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The configuration it was built from (the new process rebuilds it).
    pub config: VmConfig,
    /// Each vCPU, by index.
    pub vcpus: Vec<vcpu::VcpuState>,
    /// Interrupt controllers, PIT and clock.
    pub machine: machine::MachineState,
    /// The device models.
    pub devices: DevicesState,
    /// The memory file's size and checksum.
    pub memory: ram::MemoryImage,
}

/// The device models' state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub com1: UartState,
    /// Keystrokes waiting in the i8042.
    pub i8042: Vec<u8>,
    /// The guest agent channel (COM2), when a job runs.
    pub agent: Option<AgentState>,
    /// The address latched in the PCI configuration port, when there is a bus.
    pub pci_address: Option<u32>,
    /// Each virtio function, in bus order.
    pub virtio: Vec<VirtioPciState>,
}

/// A checkpoint read back and checked, ready to restore.
pub struct Checkpoint {
    /// Where it lives.
    pub dir: PathBuf,
    /// Its state.
    pub state: VmState,
}

impl Checkpoint {
    /// Reads the checkpoint in `dir` (its state file; the memory file is read into
    /// the new VM's RAM by [`Checkpoint::load_memory`]).
    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(STATE_FILE);
        let payload = format::read(&path)?;
        let state: VmState =
            serde_json::from_slice(&payload).map_err(|e| CheckpointError::Corrupt {
                path: path.clone(),
                what: format!("its contents do not parse: {e}"),
            })?;
        if state.vcpus.len() != state.config.cpus.count as usize {
            return Err(CheckpointError::Corrupt {
                path,
                what: format!(
                    "{} vCPU states for {} vCPUs",
                    state.vcpus.len(),
                    state.config.cpus.count
                ),
            });
        }
        if state.memory.size != state.config.memory.size {
            return Err(CheckpointError::Corrupt {
                path,
                what: "its memory size does not match its configuration".into(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
        })
    }

    /// True if `dir` holds a checkpoint's state file (for `--resume-from`).
    pub fn exists(dir: &Path) -> bool {
        dir.join(STATE_FILE).is_file()
    }

    /// Reads guest RAM into `mem` (fresh, all zero) and checks it.
    pub fn load_memory(&self, mem: &vm_memory::GuestMemoryMmap) -> Result<(), CheckpointError> {
        ram::load(mem, &self.dir.join(MEMORY_FILE), &self.state.memory)
    }
}

/// Why a VM with `passthrough` devices cannot be checkpointed. (A share's
/// virtiofsd hands over its state; see [`crate::virtio::fs`].)
pub fn refusal(passthrough: usize) -> Option<String> {
    if passthrough > 0 {
        return Some(
            "it has passthrough (VFIO) devices, whose state cannot be saved; run it \
             without --device to checkpoint or migrate it"
                .into(),
        );
    }
    None
}
