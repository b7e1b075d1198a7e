//! VFIO passthrough: host PCI devices (InfiniBand HCAs, SR-IOV virtual functions)
//! driven directly by the guest.
//!
//! - [`host`]: finding a device in sysfs and checking it can be passed through
//!   (driver, IOMMU group, memlock limit);
//! - [`backend`]: the ioctl line (vfio-ioctls on real hosts, `fake` in tests);
//! - [`device`]: the PCI function the guest sees.
//!
//! Creating and binding SR-IOV functions and the host report are in
//! [`crate::admin`].

pub mod backend;
pub mod device;
#[cfg(any(test, feature = "fakes"))]
pub mod fake;
pub mod host;

use std::sync::Arc;

use crate::config::DeviceConfig;
use crate::pci::Passthrough;
use crate::Error;
use backend::{DmaDomain, HostDma};
use host::{HostDevice, HostError, HostPaths, Memlock, PassthroughAccess};

/// How a VM's passthrough devices are opened. All of them go the same way, into one
/// IOMMU domain, so guest RAM is DMA-mapped (and pinned) once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPath {
    /// iommufd (`/dev/iommu`): every device has a VFIO device cdev
    /// (`/dev/vfio/devices/vfioN`), the only way on hosts without the legacy container.
    Iommufd,
    /// The legacy VFIO container and group nodes (`/dev/vfio/vfio`, `/dev/vfio/<group>`).
    Container,
}

/// Devices that passed [`preflight`], and how to open them.
#[derive(Debug, Default)]
pub struct Checked {
    /// The devices, in `--device` order.
    pub devices: Vec<HostDevice>,
    /// How they are opened; `None` without devices.
    pub path: Option<OpenPath>,
}

/// Checks every `--device` can be passed through (exists, bound to vfio-pci, viable
/// IOMMU group, memlock limit covers `guest_ram`) before anything is created.
pub fn preflight(
    paths: &HostPaths,
    devices: &[DeviceConfig],
    guest_ram: u64,
) -> Result<Checked, Error> {
    let mut found = Vec::with_capacity(devices.len());
    for d in devices {
        let err = |source| Error::Passthrough {
            spec: d.host.clone(),
            source,
        };
        let dev = host::resolve(paths, &d.host).map_err(err)?;
        let access = host::check_passthrough(paths, &dev).map_err(err)?;
        found.push((dev, access));
    }
    let Some(first) = devices.first() else {
        return Ok(Checked::default());
    };
    let memlock = Memlock::read(paths)
        .and_then(|m| m.check(guest_ram).map(|()| m))
        .map_err(|source| Error::Passthrough {
            spec: first.host.clone(),
            source,
        })?;
    let path = open_path(paths, &found, memlock).map_err(|(i, source)| Error::Passthrough {
        spec: devices[i].host.clone(),
        source,
    })?;
    Ok(Checked {
        devices: found.into_iter().map(|(dev, _)| dev).collect(),
        path,
    })
}

/// How to open `found` (devices that passed [`host::check_passthrough`]), all the same
/// way:
/// - iommufd when every device has a usable cdev and `/dev/iommu` is usable, unless
///   the container works too and memlock is limited: iommufd charges pinned guest RAM
///   to the user (every hpcvm of the user together), the container to each process;
/// - else the legacy container, for which `/dev/vfio/vfio` and every device's group
///   node must be usable.
///
/// Fails with the index of the device that cannot be opened either way.
pub fn open_path(
    paths: &HostPaths,
    found: &[(HostDevice, PassthroughAccess)],
    memlock: Memlock,
) -> Result<Option<OpenPath>, (usize, HostError)> {
    if found.is_empty() {
        return Ok(None);
    }
    let all_cdev = found
        .iter()
        .all(|(_, a)| matches!(a, PassthroughAccess::Cdev { .. }));
    let iommufd = all_cdev.then(|| host::check_access(&paths.dev.join("iommu")));
    match (iommufd, container_usable(paths, found)) {
        (Some(Ok(())), Ok(())) if !memlock.unlimited() => Ok(Some(OpenPath::Container)),
        (Some(Ok(())), _) => Ok(Some(OpenPath::Iommufd)),
        (_, Ok(())) => Ok(Some(OpenPath::Container)),
        (Some(Err(e)), Err(_)) => Err((0, e)),
        (None, Err(e)) => Err(e),
    }
}

/// `/dev/vfio/vfio` and every device's group node are there and ours to open.
fn container_usable(
    paths: &HostPaths,
    found: &[(HostDevice, PassthroughAccess)],
) -> Result<(), (usize, HostError)> {
    let container = paths.dev.join("vfio/vfio");
    if !container.exists() {
        return Err((0, HostError::NoContainer { node: container }));
    }
    host::check_access(&container).map_err(|e| (0, e))?;
    for (i, (dev, access)) in found.iter().enumerate() {
        if let (PassthroughAccess::Cdev { .. }, Some(group)) = (access, dev.iommu_group) {
            host::group_node(paths, group).map_err(|e| (i, e))?;
        }
    }
    Ok(())
}

/// Opens checked devices in one IOMMU domain of `vm`.
pub fn open(vm: &kvm_ioctls::VmFd, checked: &Checked) -> Result<Vec<Passthrough>, Error> {
    let Some(path) = checked.path else {
        return Ok(Vec::new());
    };
    let io = |what| move |source| Error::Io { what, source };
    let domain = Arc::new(match path {
        OpenPath::Container => HostDma::container(vm).map_err(io("the VFIO container"))?,
        OpenPath::Iommufd => HostDma::iommufd(vm).map_err(io("the iommufd IOMMU domain"))?,
    });
    let dma: Arc<dyn DmaDomain> = domain.clone();
    checked
        .devices
        .iter()
        .map(|d| {
            let dev = domain
                .open(&d.sysfs, d.address.to_string())
                .map_err(io("a VFIO device"))?;
            Ok(Passthrough {
                backend: Arc::new(dev),
                dma: dma.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::host::fake::FakeHost;

    const MLX_VF: (u16, u16, u32) = (0x15b3, 0x101e, 0x020700);
    const UNLIMITED: Memlock = Memlock {
        limit: None,
        cap_ipc_lock: false,
    };
    const LIMITED: Memlock = Memlock {
        limit: Some(64 << 30),
        cap_ipc_lock: false,
    };

    /// VFs 3b:00.2 (group 42, cdev vfio0) and 3b:00.3 (group 43, cdev vfio1) on
    /// vfio-pci, on a host with both the legacy container and iommufd.
    fn two_vfs() -> FakeHost {
        let h = FakeHost::new();
        for (bdf, group, cdev) in [("0000:3b:00.2", 42, 0), ("0000:3b:00.3", 43, 1)] {
            h.pci_device(bdf, MLX_VF, Some("vfio-pci"), Some(group), 1)
                .write(&format!("dev/vfio/{group}"), "")
                .write(&format!("dev/vfio/devices/vfio{cdev}"), "");
            std::fs::create_dir_all(h.dev_dir(bdf).join(format!("vfio-dev/vfio{cdev}"))).unwrap();
        }
        h.write("dev/iommu", "").write("dev/vfio/vfio", "");
        h
    }

    fn checked(h: &FakeHost) -> Vec<(HostDevice, PassthroughAccess)> {
        ["3b:00.2", "3b:00.3"]
            .iter()
            .map(|spec| {
                let dev = host::resolve(&h.paths(), spec).unwrap();
                let access = host::check_passthrough(&h.paths(), &dev).unwrap();
                (dev, access)
            })
            .collect()
    }

    fn remove(h: &FakeHost, rel: &str) {
        let p = h.root.join(rel);
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn devices_all_with_a_cdev_open_through_iommufd_without_a_memlock_limit() {
        let h = two_vfs();
        let found = checked(&h);
        let path = open_path(&h.paths(), &found, UNLIMITED).unwrap();
        assert_eq!(path, Some(OpenPath::Iommufd));
        assert_eq!(open_path(&h.paths(), &[], UNLIMITED).unwrap(), None);
    }

    #[test]
    fn a_memlock_limit_prefers_the_per_process_container_when_there_is_one() {
        let h = two_vfs();
        let found = checked(&h);
        let path = open_path(&h.paths(), &found, LIMITED).unwrap();
        assert_eq!(path, Some(OpenPath::Container));
        // Without the container, iommufd it is, limit or not.
        remove(&h, "dev/vfio/vfio");
        let path = open_path(&h.paths(), &found, LIMITED).unwrap();
        assert_eq!(path, Some(OpenPath::Iommufd));
    }

    #[test]
    fn one_device_without_a_cdev_puts_all_in_the_container() {
        let h = two_vfs();
        remove(&h, "sys/devices/pci0000:00/0000:3b:00.3/vfio-dev");
        let found = checked(&h);
        assert!(matches!(
            found[1].1,
            PassthroughAccess::Group { group: 43, .. }
        ));
        let path = open_path(&h.paths(), &found, UNLIMITED).unwrap();
        assert_eq!(path, Some(OpenPath::Container));
    }

    #[test]
    fn a_cdev_only_device_cannot_join_the_container() {
        let h = two_vfs();
        remove(&h, "sys/devices/pci0000:00/0000:3b:00.3/vfio-dev");
        remove(&h, "dev/vfio/42");
        let found = checked(&h);
        let (i, e) = open_path(&h.paths(), &found, UNLIMITED).unwrap_err();
        assert_eq!(i, 0, "the cdev-only device is named");
        let msg = e.to_string();
        assert!(msg.contains("dev/vfio/42 is missing"), "{msg}");
    }

    #[test]
    fn the_container_needs_dev_vfio_vfio() {
        let h = two_vfs();
        remove(&h, "sys/devices/pci0000:00/0000:3b:00.3/vfio-dev");
        remove(&h, "dev/vfio/vfio");
        let found = checked(&h);
        let (_, e) = open_path(&h.paths(), &found, UNLIMITED).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("dev/vfio/vfio is missing and not every device has an iommufd cdev"),
            "{msg}"
        );
        assert!(msg.contains("CONFIG_VFIO_CONTAINER"), "{msg}");
    }
}
