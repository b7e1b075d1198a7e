//! A host PCI device seen through sysfs, and whether it can be passed to a guest: its
//! driver, its IOMMU group, the VFIO node to open and the locked-memory limit.
//!
//! Every path is taken relative to a [`HostPaths`] so that tests run on a fake tree.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

/// CAP_IPC_LOCK's bit in the capability sets (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

/// Drivers that may hold the other members of a passed-through device's IOMMU group
/// (the kernel's own viability rule: bridges on pcieport are harmless).
const VIABLE_DRIVERS: &[&str] = &["vfio-pci", "pci-stub", "pcieport"];

/// How to turn the IOMMU on.
pub(crate) const IOMMU_FIX: &str = "boot the host with intel_iommu=on iommu=pt (Intel) or \
     amd_iommu=on (AMD), enable VT-d / AMD-Vi in the firmware, and check \
     `dmesg | grep -i iommu`";

/// Where the host's sysfs, devtmpfs and procfs are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// Device nodes (`/dev`).
    pub dev: PathBuf,
    /// procfs (`/proc`).
    pub proc_dir: PathBuf,
}

impl HostPaths {
    /// The running host's `/sys`, `/dev` and `/proc`.
    pub fn real() -> Self {
        Self::under(Path::new("/"))
    }

    /// `root/sys`, `root/dev` and `root/proc`: a fake host for tests.
    pub fn under(root: &Path) -> Self {
        Self {
            sys: root.join("sys"),
            dev: root.join("dev"),
            proc_dir: root.join("proc"),
        }
    }

    /// `<sys>/bus/pci/devices/<address>`.
    pub fn pci_device(&self, address: PciAddress) -> PathBuf {
        self.sys.join("bus/pci/devices").join(address.to_string())
    }
}

/// A PCI function's address (domain:bus:device.function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// PCI segment.
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0-31.
    pub device: u8,
    /// Function number, 0-7.
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            domain,
            bus,
            device,
            function,
        } = self;
        write!(f, "{domain:04x}:{bus:02x}:{device:02x}.{function:x}")
    }
}

impl FromStr for PciAddress {
    type Err = HostError;

    /// Parses `0000:3b:00.2` or `3b:00.2` (domain 0).
    fn from_str(s: &str) -> Result<Self, HostError> {
        let bad = |reason: &str| HostError::BadAddress {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        let (domain, bus, slot) = match parts[..] {
            [d, b, s] => (d, b, s),
            [b, s] => ("0", b, s),
            _ => return Err(bad("expected domain:bus:device.function")),
        };
        let (device, function) = slot.split_once('.').ok_or_else(|| bad("no '.function'"))?;
        let hex = |v: &str, max: u16, what: &str| {
            u16::from_str_radix(v, 16)
                .ok()
                .filter(|n| *n <= max && !v.is_empty() && !v.starts_with('+'))
                .ok_or_else(|| bad(&format!("{what} '{v}' is not hex up to {max:#x}")))
        };
        let byte = |v: &str, max: u8, what: &str| {
            hex(v, max.into(), what).map(|n| u8::try_from(n).unwrap_or(max))
        };
        Ok(Self {
            domain: hex(domain, 0xffff, "domain")?,
            bus: byte(bus, 0xff, "bus")?,
            device: byte(device, 0x1f, "device")?,
            function: byte(function, 7, "function")?,
        })
    }
}

/// A host PCI function as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    /// Its address.
    pub address: PciAddress,
    /// `<sys>/bus/pci/devices/<address>`.
    pub sysfs: PathBuf,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// PCI class code (class, subclass, prog-if).
    pub class: u32,
    /// The bound driver's name, if any.
    pub driver: Option<String>,
    /// Its IOMMU group; `None` when the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// Its NUMA node; `None` when sysfs says -1 (no affinity) or does not say.
    pub numa_node: Option<u32>,
    /// For an SR-IOV virtual function: its physical function.
    pub physfn: Option<PciAddress>,
}

/// How a device that passed [`check_passthrough`] is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassthroughAccess {
    /// Legacy VFIO group container: open `<dev>/vfio/<group>`.
    Group {
        /// The IOMMU group number.
        group: u32,
        /// `<dev>/vfio/<group>`.
        node: PathBuf,
    },
    /// iommufd with a VFIO device cdev: open `<dev>/vfio/devices/vfioN`.
    Cdev {
        /// `<dev>/vfio/devices/vfioN`.
        node: PathBuf,
    },
}

/// Why a host device cannot be passed through; every message ends with the fix.
#[derive(Debug, Error)]
pub enum HostError {
    /// Not a PCI address.
    #[error("{}: {}", self.problem(), self.fix())]
    BadAddress {
        /// As given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// No such device in sysfs.
    #[error("{}: {}", self.problem(), self.fix())]
    NoDevice {
        /// The address looked up.
        address: PciAddress,
    },
    /// A sysfs attribute could not be read.
    #[error("{}: {}", self.problem(), self.fix())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The device has no IOMMU group: the IOMMU is off.
    #[error("{}: {}", self.problem(), self.fix())]
    NoIommuGroup {
        /// The device.
        address: PciAddress,
    },
    /// The device is bound to a host driver, or to none.
    #[error("{}: {}", self.problem(), self.fix())]
    NotVfio {
        /// The device.
        address: PciAddress,
        /// Its driver, `None` when unbound.
        driver: Option<String>,
    },
    /// Another member of the IOMMU group is in use by the host.
    #[error("{}: {}", self.problem(), self.fix())]
    GroupNotViable {
        /// The device asked for.
        address: PciAddress,
        /// Its IOMMU group.
        group: u32,
        /// The offending member.
        member: String,
        /// The member's driver.
        driver: String,
    },
    /// No VFIO node for the group.
    #[error("{}: {}", self.problem(), self.fix())]
    NoVfioNode {
        /// The missing node.
        node: PathBuf,
    },
    /// No legacy VFIO container, and the devices cannot all go through iommufd.
    #[error("{}: {}", self.problem(), self.fix())]
    NoContainer {
        /// The missing `/dev/vfio/vfio`.
        node: PathBuf,
    },
    /// The VFIO node exists but this user may not open it.
    #[error("{}: {}", self.problem(), self.fix())]
    NoAccess {
        /// The node.
        node: PathBuf,
    },
    /// Guest RAM exceeds the locked-memory limit VFIO pinning is charged to.
    #[error("{}: {}", self.problem(), self.fix())]
    MemlockTooLow {
        /// RLIMIT_MEMLOCK in bytes.
        limit: u64,
        /// Guest RAM in bytes.
        guest_ram: u64,
    },
    /// getrlimit failed.
    #[error("{}: {}", self.problem(), self.fix())]
    Rlimit(io::Error),
}

impl HostError {
    /// What is wrong, without the fix.
    pub fn problem(&self) -> String {
        match self {
            HostError::BadAddress { value, reason } => {
                format!("'{value}' is not a PCI address ({reason})")
            }
            HostError::NoDevice { address } => format!("No PCI device {address} on this host"),
            HostError::Read { path, source } => {
                format!("Cannot read {}: {source}", path.display())
            }
            HostError::NoIommuGroup { address } => {
                format!("{address} has no IOMMU group: the host's IOMMU is off")
            }
            HostError::NotVfio {
                address,
                driver: Some(d),
            } => format!("{address} is bound to the host driver {d}, not vfio-pci"),
            HostError::NotVfio { address, .. } => {
                format!("{address} is bound to no driver, not vfio-pci")
            }
            HostError::GroupNotViable {
                address,
                group,
                member,
                driver,
            } => format!(
                "IOMMU group {group} of {address} is not viable: its member {member} is \
                 bound to {driver}, and a group goes to a VM whole"
            ),
            HostError::NoVfioNode { node } => format!("{} is missing", node.display()),
            HostError::NoContainer { node } => format!(
                "{} is missing and not every device has an iommufd cdev",
                node.display()
            ),
            HostError::NoAccess { node } => {
                format!(
                    "{} is not readable and writable by this user",
                    node.display()
                )
            }
            HostError::MemlockTooLow { limit, guest_ram } => format!(
                "Locked-memory limit (RLIMIT_MEMLOCK) is {}, guest RAM is {} and VFIO \
                 pins all of it",
                fmt_mib(*limit),
                fmt_mib(*guest_ram)
            ),
            HostError::Rlimit(e) => format!("Cannot read RLIMIT_MEMLOCK: {e}"),
        }
    }

    /// What to do about it.
    pub fn fix(&self) -> String {
        match self {
            HostError::BadAddress { .. } => "write it as 0000:3b:00.2 or 3b:00.2".into(),
            HostError::NoDevice { .. } => {
                "list the host's devices with `lspci -D` or `hpcvm sriov list`".into()
            }
            HostError::Read { .. } | HostError::Rlimit(_) => {
                "check that sysfs and procfs are mounted".into()
            }
            HostError::NoIommuGroup { .. } => IOMMU_FIX.into(),
            HostError::NotVfio { address: a, driver } => {
                let unbind = match driver {
                    Some(_) => format!("echo {a} > /sys/bus/pci/devices/{a}/driver/unbind; "),
                    None => String::new(),
                };
                format!(
                    "run `hpcvm sriov bind {a}` as root, or: echo vfio-pci > \
                     /sys/bus/pci/devices/{a}/driver_override; {unbind}echo {a} > \
                     /sys/bus/pci/drivers_probe"
                )
            }
            HostError::GroupNotViable { member, .. } => format!(
                "bind {member} to vfio-pci too (`hpcvm sriov bind {member}`) or unbind it, \
                 or move the card to a slot with its own IOMMU group (ACS)"
            ),
            HostError::NoVfioNode { .. } => "load vfio-pci (`modprobe vfio-pci`); in a \
                 container, pass /dev/vfio in"
                .into(),
            HostError::NoContainer { .. } => "load vfio-pci; the kernel needs the VFIO \
                 container (CONFIG_VFIO_CONTAINER or CONFIG_IOMMUFD_VFIO_CONTAINER), or \
                 iommufd with a VFIO cdev (/dev/vfio/devices/vfioN) for every device; in a \
                 container, pass /dev/vfio and /dev/iommu in"
                .into(),
            HostError::NoAccess { node } => format!(
                "run as root or give the job's user the node (chown $USER {}, or a udev \
                 rule)",
                node.display()
            ),
            HostError::MemlockTooLow { .. } => "raise it: `ulimit -l unlimited` (hard limit: \
                 memlock in /etc/security/limits.conf), LimitMEMLOCK=infinity for a systemd \
                 service; under Slurm, PropagateResourceLimitsExcept=MEMLOCK in slurm.conf \
                 and LimitMEMLOCK=infinity in slurmd's unit; or give hpcvm CAP_IPC_LOCK"
                .into(),
        }
    }
}

/// `512 MiB`, or `64 KiB` below a MiB.
pub(crate) fn fmt_mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// The file name a symlink points at (`driver` -> `.../drivers/vfio-pci` gives `vfio-pci`).
pub(crate) fn link_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The driver bound to the device at `sysfs`, if any.
pub(crate) fn driver_of(sysfs: &Path) -> Option<String> {
    link_name(&sysfs.join("driver"))
}

/// A sysfs attribute, trimmed.
pub(crate) fn read_attr(path: &Path) -> Result<String, HostError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| HostError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn read_hex<T: TryFrom<u32>>(path: &Path) -> Result<T, HostError> {
    let text = read_attr(path)?;
    u32::from_str_radix(text.trim_start_matches("0x"), 16)
        .ok()
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| HostError::Read {
            path: path.to_path_buf(),
            source: io::Error::other(format!("'{text}' is not a hex ID of the expected width")),
        })
}

/// Finds a device by BDF (`0000:3b:00.2`, `3b:00.2`) or sysfs path (its last component
/// is the BDF, looked up under `paths.sys`).
pub fn resolve(paths: &HostPaths, spec: &str) -> Result<HostDevice, HostError> {
    let bdf = if spec.contains('/') {
        Path::new(spec)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        spec.to_string()
    };
    let address: PciAddress = bdf.parse().map_err(|_| HostError::BadAddress {
        value: spec.to_string(),
        reason: "expected a BDF or a sysfs device path".into(),
    })?;
    let sysfs = paths.pci_device(address);
    if !sysfs.is_dir() {
        return Err(HostError::NoDevice { address });
    }
    let vendor = read_hex(&sysfs.join("vendor"))?;
    let device = read_hex(&sysfs.join("device"))?;
    let class = read_hex(&sysfs.join("class"))?;
    let numa_node = std::fs::read_to_string(sysfs.join("numa_node"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    Ok(HostDevice {
        address,
        vendor,
        device,
        class,
        driver: driver_of(&sysfs),
        iommu_group: link_name(&sysfs.join("iommu_group")).and_then(|g| g.parse().ok()),
        numa_node,
        physfn: link_name(&sysfs.join("physfn")).and_then(|p| p.parse().ok()),
        sysfs,
    })
}

/// True when the host's IOMMU is on: some IOMMU group or IOMMU device exists.
pub fn iommu_enabled(paths: &HostPaths) -> bool {
    let non_empty = |d: PathBuf| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some());
    non_empty(paths.sys.join("kernel/iommu_groups")) || non_empty(paths.sys.join("class/iommu"))
}

/// Checks that `dev` can be handed to a guest now and says which node to open.
pub fn check_passthrough(
    paths: &HostPaths,
    dev: &HostDevice,
) -> Result<PassthroughAccess, HostError> {
    let address = dev.address;
    let group = dev.iommu_group.ok_or(HostError::NoIommuGroup { address })?;
    if dev.driver.as_deref() != Some("vfio-pci") {
        return Err(HostError::NotVfio {
            address,
            driver: dev.driver.clone(),
        });
    }
    let members = paths
        .sys
        .join(format!("kernel/iommu_groups/{group}/devices"));
    let mut names: Vec<_> = std::fs::read_dir(&members)
        .map_err(|source| HostError::Read {
            path: members.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| *n != address.to_string())
        .collect();
    names.sort();
    for member in names {
        if let Some(driver) = driver_of(&members.join(&member)) {
            if !VIABLE_DRIVERS.contains(&driver.as_str()) {
                return Err(HostError::GroupNotViable {
                    address,
                    group,
                    member,
                    driver,
                });
            }
        }
    }
    if paths.dev.join("iommu").exists() {
        let cdev = std::fs::read_dir(dev.sysfs.join("vfio-dev"))
            .ok()
            .and_then(|mut e| e.find_map(|e| e.ok()))
            .map(|e| paths.dev.join("vfio/devices").join(e.file_name()));
        if let Some(node) = cdev.filter(|n| n.exists()) {
            if check_access(&node).is_ok() {
                return Ok(PassthroughAccess::Cdev { node });
            }
            // Not ours to open; the group node may be.
            return group_node(paths, group)
                .map(|group_node| PassthroughAccess::Group {
                    group,
                    node: group_node,
                })
                .map_err(|_| HostError::NoAccess { node });
        }
    }
    let node = group_node(paths, group)?;
    Ok(PassthroughAccess::Group { group, node })
}

/// The legacy VFIO node of IOMMU group `group` (`/dev/vfio/<group>`), checked to exist
/// and to be open to us.
pub fn group_node(paths: &HostPaths, group: u32) -> Result<PathBuf, HostError> {
    let node = paths.dev.join(format!("vfio/{group}"));
    if !node.exists() {
        return Err(HostError::NoVfioNode { node });
    }
    check_access(&node)?;
    Ok(node)
}

/// Fails with [`HostError::NoAccess`] unless we may open `node` read-write.
pub fn check_access(node: &Path) -> Result<(), HostError> {
    let denied = || HostError::NoAccess {
        node: node.to_path_buf(),
    };
    let c = CString::new(node.as_os_str().as_bytes()).map_err(|_| denied())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; access(2) only reads it.
    let rc = unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) };
    if rc == 0 {
        Ok(())
    } else {
        Err(denied())
    }
}

/// What VFIO's pinning of guest RAM is charged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memlock {
    /// RLIMIT_MEMLOCK (soft) in bytes; `None` when unlimited.
    pub limit: Option<u64>,
    /// The process has CAP_IPC_LOCK, which lifts the limit.
    pub cap_ipc_lock: bool,
}

impl Memlock {
    /// True when nothing limits how much memory this process may pin.
    pub fn unlimited(&self) -> bool {
        self.limit.is_none() || self.cap_ipc_lock
    }

    /// This process's limit (getrlimit) and capability (`<proc>/self/status` CapEff).
    pub fn read(paths: &HostPaths) -> Result<Self, HostError> {
        // SAFETY: rlimit is plain data; all zeroes is a valid value.
        let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: `rl` is a valid, writable rlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 {
            return Err(HostError::Rlimit(io::Error::last_os_error()));
        }
        let status = std::fs::read_to_string(paths.proc_dir.join("self/status"));
        let cap_eff = status.ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        });
        Ok(Self {
            limit: (rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur),
            cap_ipc_lock: cap_eff.is_some_and(|c| c & (1 << CAP_IPC_LOCK) != 0),
        })
    }

    /// Errors unless `guest_ram` bytes may be pinned.
    pub fn check(&self, guest_ram: u64) -> Result<(), HostError> {
        match self.limit {
            Some(limit) if !self.cap_ipc_lock && limit < guest_ram => {
                Err(HostError::MemlockTooLow { limit, guest_ram })
            }
            _ => Ok(()),
        }
    }
}

/// A fake host tree (sysfs, /dev, /proc) in a temp dir, removed on drop, laid out like
/// the real one: devices under `sys/devices`, symlinks for driver, IOMMU group, virtfnN
/// and physfn.
#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod tests;
