//! KVM objects: the VM, its vCPUs, and what they are told about the CPU (CPUID, MSRs).

pub mod cpuid;
pub mod irq;
pub mod msix;
pub mod msr;
pub mod topology;
pub mod vcpu;
pub mod vm;

pub use irq::DeviceVm;
pub use vcpu::{GuestExit, VcpuHandle};
pub use vm::{Vm, VmError};
