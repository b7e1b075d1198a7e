//! The VMM's top-level error: one variant per module's error, plus the few checks that
//! need two modules at once.

use std::io;

use thiserror::Error;

use crate::api::server::ApiError;
use crate::boot::BootError;
use crate::config::ConfigError;
use crate::memory::MemoryError;
use crate::pci::PciError;
use crate::vfio::host::HostError;
use crate::vstate::VmError;

/// Why a VM could not be built or run.
#[derive(Debug, Error)]
pub enum Error {
    /// Invalid option value.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A checkpoint could not be read or restored.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// A live migration failed.
    #[error(transparent)]
    Migration(#[from] crate::migration::MigrationError),
    /// Affinity names a CPU this process may not use.
    #[error(
        "--cpus affinity names host CPU {cpu}, which this process may not use (allowed: {allowed})"
    )]
    AffinityNotAllowed {
        /// The offending host CPU.
        cpu: usize,
        /// The process's allowed CPUs, cpulist format.
        allowed: String,
    },
    /// The API socket.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM VM setup.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Kernel, initramfs, boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The ACPI tables.
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    /// A `--device` cannot be passed through on this host.
    #[error("Cannot pass through {spec}: {source}")]
    Passthrough {
        /// The device as given.
        spec: String,
        /// What is wrong, with the fix.
        source: HostError,
    },
    /// A `--disk` or `--image` cannot be attached.
    #[error(transparent)]
    Disk(#[from] crate::virtio::disk::DiskError),
    /// A `--share` cannot be attached.
    #[error(transparent)]
    Share(#[from] crate::virtio::fs::ShareError),
    /// A thread's seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The PCI bus or a passthrough device could not be set up.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// A vCPU could not be created or configured.
    #[error("Cannot set up vCPU {vcpu}: KVM {what} failed: {source}")]
    VcpuSetup {
        /// vCPU index.
        vcpu: u32,
        /// The step.
        what: &'static str,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// KVM refused one of the boot MSRs it listed as supported.
    #[error("Cannot set up vCPU {vcpu}: KVM rejected MSR {msr:#x}")]
    MsrRejected {
        /// vCPU index.
        vcpu: u32,
        /// The MSR index.
        msr: u32,
    },
    /// A host resource the VMM itself needs (thread, eventfd, epoll) failed.
    #[error("Cannot set up {what}: {source}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}
