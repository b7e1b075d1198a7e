//! VFIO passthrough: host PCI devices (InfiniBand HCAs, SR-IOV virtual functions)
//! driven directly by the guest.
//!
//! - [`host`]: finding a device in sysfs and checking it can be passed through
//!   (driver, IOMMU group, memlock limit);
//! - [`sriov`]: creating and binding SR-IOV virtual functions (`hpcvm sriov`);
//! - [`doctor`]: the preflight report (`hpcvm doctor`).

pub mod backend;
pub mod device;
pub mod doctor;
#[cfg(any(test, feature = "fakes"))]
pub mod fake;
pub mod host;
pub mod sriov;
