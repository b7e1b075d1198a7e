//! VFIO passthrough: host PCI devices (InfiniBand HCAs, SR-IOV virtual functions)
//! driven directly by the guest.
//!
//! - [`host`]: finding a device in sysfs and checking it can be passed through
//!   (driver, IOMMU group, memlock limit);
//! - [`backend`]: the ioctl line (vfio-ioctls on real hosts, [`fake`] in tests);
//! - [`device`]: the PCI function the guest sees;
//! - [`sriov`]: creating and binding SR-IOV virtual functions (`hpcvm sriov`);
//! - [`doctor`]: the preflight report (`hpcvm doctor`).

pub mod backend;
pub mod device;
pub mod doctor;
#[cfg(any(test, feature = "fakes"))]
pub mod fake;
pub mod host;
pub mod sriov;

use std::sync::Arc;

use crate::config::DeviceConfig;
use crate::pci::Passthrough;
use crate::Error;
use backend::{DmaDomain, HostContainer};
use host::{HostDevice, HostPaths};

/// Checks every `--device` can be passed through (exists, bound to vfio-pci, viable
/// IOMMU group, memlock limit covers `guest_ram`) before anything is created.
pub fn preflight(
    paths: &HostPaths,
    devices: &[DeviceConfig],
    guest_ram: u64,
) -> Result<Vec<HostDevice>, Error> {
    let mut found = Vec::with_capacity(devices.len());
    for d in devices {
        let err = |source| Error::Passthrough {
            spec: d.host.clone(),
            source,
        };
        let dev = host::resolve(paths, &d.host).map_err(err)?;
        host::check_passthrough(paths, &dev).map_err(err)?;
        found.push(dev);
    }
    if let Some(first) = devices.first() {
        host::check_memlock(paths, guest_ram).map_err(|source| Error::Passthrough {
            spec: first.host.clone(),
            source,
        })?;
    }
    Ok(found)
}

/// Opens checked devices through one VFIO container of `vm` (one IOMMU domain).
pub fn open(vm: &kvm_ioctls::VmFd, devices: &[HostDevice]) -> Result<Vec<Passthrough>, Error> {
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let io = |what| move |source| Error::Io { what, source };
    let container = Arc::new(HostContainer::new(vm).map_err(io("the VFIO container"))?);
    let dma: Arc<dyn DmaDomain> = container.clone();
    devices
        .iter()
        .map(|d| {
            let dev = container
                .open(&d.sysfs, d.address.to_string())
                .map_err(io("a VFIO device"))?;
            Ok(Passthrough {
                backend: Arc::new(dev),
                dma: dma.clone(),
            })
        })
        .collect()
}
