//! `hpcvm sriov`: list SR-IOV physical functions, create their virtual functions, set
//! an mlx5 VF's InfiniBand GUIDs and bind a VF to vfio-pci. Every step is idempotent.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{json, Value};
use thiserror::Error;

use crate::vfio::host::{self, HostDevice, HostError, HostPaths, PciAddress};

/// Why an `hpcvm sriov` step failed; every message ends with the fix.
#[derive(Debug, Error)]
pub enum SriovError {
    /// The device could not be found or read.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The device has no SR-IOV capability.
    #[error(
        "{address} is not an SR-IOV physical function (no sriov_totalvfs){}: give the PF's \
         address (`hpcvm sriov list` shows them), or enable SR-IOV in the adapter's \
         firmware (mlx5: mlxconfig -d {address} set SRIOV_EN=1 NUM_OF_VFS=N) and BIOS",
        physfn.map(|p| format!("; it is a VF of {p}")).unwrap_or_default()
    )]
    NotPf {
        /// The device given.
        address: PciAddress,
        /// Its PF when it is a VF.
        physfn: Option<PciAddress>,
    },
    /// More VFs than the PF supports.
    #[error(
        "{address} supports at most {total} VFs, {asked} asked: ask for {total} or fewer \
         (mlx5: raise NUM_OF_VFS with mlxconfig and reboot)"
    )]
    TooMany {
        /// The PF.
        address: PciAddress,
        /// VFs asked for.
        asked: u32,
        /// sriov_totalvfs.
        total: u32,
    },
    /// Changing a nonzero VF count would destroy the existing VFs.
    #[error(
        "{address} already has {current} VFs ({}), and the kernel changes the count only \
         through 0, which destroys them all: rerun with --force to replace them with {asked}",
        if in_use.is_empty() { "none bound to vfio-pci".to_string() }
        else { format!("{} bound to vfio-pci, likely in use by VMs: {}", in_use.len(), in_use.join(", ")) }
    )]
    WouldDestroy {
        /// The PF.
        address: PciAddress,
        /// sriov_numvfs now.
        current: u32,
        /// VFs asked for.
        asked: u32,
        /// Its VFs bound to vfio-pci.
        in_use: Vec<String>,
    },
    /// A sysfs write was refused.
    #[error(
        "Cannot write '{value}' to {}: {source}: sysfs writes need root; `dmesg | tail` \
         says why the kernel refused",
        path.display()
    )]
    Write {
        /// The attribute.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A sysfs number did not parse.
    #[error("{} reads '{text}', not a number: check that sysfs is mounted", path.display())]
    BadNumber {
        /// The attribute.
        path: PathBuf,
        /// Its contents.
        text: String,
    },
    /// vfio-pci is not loaded.
    #[error("vfio-pci is not loaded ({} is missing): run `modprobe vfio-pci`", path.display())]
    NoVfioPci {
        /// `<sys>/bus/pci/drivers/vfio-pci`.
        path: PathBuf,
    },
    /// The probe left the device on another driver.
    #[error(
        "{address} is on {driver} after the probe, not vfio-pci: check that its \
         driver_override reads vfio-pci and see `dmesg | tail`"
    )]
    NotBoundAfterProbe {
        /// The device.
        address: PciAddress,
        /// Its driver now.
        driver: String,
    },
    /// GUIDs belong to VFs.
    #[error(
        "{address} is not an SR-IOV virtual function (no physfn link): GUIDs are set per VF \
         (`hpcvm sriov list` shows them)"
    )]
    NotVf {
        /// The device given.
        address: PciAddress,
    },
    /// The PF has no mlx5 per-VF GUID directory.
    #[error(
        "{pf} has no {}: it is not an mlx5 InfiniBand PF, or its driver lacks the sriov \
         sysfs (upstream mlx5): set GUIDs with `ip link set <ib netdev> vf N node_guid G \
         port_guid G` instead",
        path.display()
    )]
    NoGuidDir {
        /// The PF.
        pf: PciAddress,
        /// The missing directory.
        path: PathBuf,
    },
    /// The PF lists no virtfnN link to the VF.
    #[error("{pf} has no virtfnN link to {vf}: recreate the VFs (`hpcvm sriov create`)")]
    VfNotListed {
        /// The PF.
        pf: PciAddress,
        /// The VF.
        vf: PciAddress,
    },
    /// GUIDs may change only while no VM holds the VF.
    #[error(
        "{address} is already bound to vfio-pci (maybe in use by a VM) and its GUIDs can \
         change only before that: stop the VM, `echo {address} > \
         /sys/bus/pci/drivers/vfio-pci/unbind`, and rerun"
    )]
    GuidWhileBound {
        /// The VF.
        address: PciAddress,
    },
    /// Not a GUID.
    #[error("'{0}' is not a GUID: write 8 hex bytes as 11:22:33:44:55:66:77:88")]
    BadGuid(String),
}

/// A virtual function of a [`PfInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfInfo {
    /// N in the PF's `virtfnN` link.
    pub index: u32,
    /// Its address.
    pub address: PciAddress,
    /// Its driver.
    pub driver: Option<String>,
    /// Its IOMMU group.
    pub iommu_group: Option<u32>,
}

/// An SR-IOV capable device and its virtual functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfInfo {
    /// Its address.
    pub address: PciAddress,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// Its driver.
    pub driver: Option<String>,
    /// sriov_numvfs.
    pub num_vfs: u32,
    /// sriov_totalvfs.
    pub total_vfs: u32,
    /// Its VFs, by index.
    pub vfs: Vec<VfInfo>,
}

/// An InfiniBand GUID (`11:22:33:44:55:66:77:88`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub u64);

impl FromStr for Guid {
    type Err = SriovError;

    fn from_str(s: &str) -> Result<Self, SriovError> {
        let bytes: Vec<&str> = s.trim().split(':').collect();
        let ok = bytes.len() == 8 && bytes.iter().all(|b| b.len() == 2);
        let hex = bytes.concat();
        match u64::from_str_radix(&hex, 16) {
            Ok(v) if ok && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(Guid(v)),
            _ => Err(SriovError::BadGuid(s.to_string())),
        }
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0.to_be_bytes();
        let parts: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        f.write_str(&parts.join(":"))
    }
}

/// What [`create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The PF already had that many VFs.
    Unchanged,
    /// The count changed from `from`.
    Changed {
        /// The previous count.
        from: u32,
    },
}

/// What [`bind`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// Already on vfio-pci.
    Already,
    /// driver_override set, unbound from `previous`, probed (see [`check_bound`]).
    Probed {
        /// The driver it was taken from.
        previous: Option<String>,
    },
}

fn write(path: &Path, value: &str) -> Result<(), SriovError> {
    std::fs::write(path, value).map_err(|source| SriovError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read_u32(path: &Path) -> Result<u32, SriovError> {
    let text = host::read_attr(path)?;
    text.parse().map_err(|_| SriovError::BadNumber {
        path: path.to_path_buf(),
        text,
    })
}

/// The `virtfnN` links of a PF, by N.
fn vfs_of(pf: &Path) -> Vec<VfInfo> {
    let mut vfs: Vec<VfInfo> = std::fs::read_dir(pf)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let index = e
                .file_name()
                .to_str()?
                .strip_prefix("virtfn")?
                .parse()
                .ok()?;
            let link = e.path();
            Some(VfInfo {
                index,
                address: host::link_name(&link)?.parse().ok()?,
                driver: host::driver_of(&link),
                iommu_group: host::link_name(&link.join("iommu_group"))?.parse().ok(),
            })
        })
        .collect();
    vfs.sort_by_key(|v| v.index);
    vfs
}

/// Every SR-IOV capable device (one with `sriov_totalvfs`), by address.
pub fn list(paths: &HostPaths) -> Result<Vec<PfInfo>, SriovError> {
    let dir = paths.sys.join("bus/pci/devices");
    let entries = std::fs::read_dir(&dir).map_err(|source| HostError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut pfs = Vec::new();
    for e in entries.flatten() {
        if !e.path().join("sriov_totalvfs").exists() {
            continue;
        }
        let dev = host::resolve(paths, &e.file_name().to_string_lossy())?;
        pfs.push(PfInfo {
            address: dev.address,
            vendor: dev.vendor,
            device: dev.device,
            num_vfs: read_u32(&dev.sysfs.join("sriov_numvfs"))?,
            total_vfs: read_u32(&dev.sysfs.join("sriov_totalvfs"))?,
            vfs: vfs_of(&dev.sysfs),
            driver: dev.driver,
        });
    }
    pfs.sort_by_key(|p| p.address);
    Ok(pfs)
}

/// `hpcvm sriov list` as a table.
pub fn render(pfs: &[PfInfo]) -> String {
    if pfs.is_empty() {
        return "No SR-IOV capable devices (none has sriov_totalvfs)\n".into();
    }
    let none = || "-".to_string();
    let mut out = format!("{:<14}{:<11}{:<14}VFS\n", "PF", "ID", "DRIVER");
    for pf in pfs {
        let id = format!("{:04x}:{:04x}", pf.vendor, pf.device);
        let driver = pf.driver.clone().unwrap_or_else(none);
        let counts = format!("{}/{}", pf.num_vfs, pf.total_vfs);
        out += &format!(
            "{:<14}{id:<11}{driver:<14}{counts}\n",
            pf.address.to_string()
        );
        for vf in &pf.vfs {
            let driver = vf.driver.clone().unwrap_or_else(none);
            let group = vf.iommu_group.map_or_else(none, |g| g.to_string());
            out += &format!(
                "  vf{:<4}{}  {driver:<14}group {group}\n",
                vf.index, vf.address
            );
        }
    }
    out
}

/// `hpcvm sriov list --json`.
pub fn to_json(pfs: &[PfInfo]) -> Value {
    let vf = |v: &VfInfo| {
        json!({"index": v.index, "address": v.address.to_string(), "driver": v.driver,
               "iommu_group": v.iommu_group})
    };
    Value::Array(
        pfs.iter()
            .map(|p| {
                json!({"address": p.address.to_string(),
                       "id": format!("{:04x}:{:04x}", p.vendor, p.device),
                       "driver": p.driver, "num_vfs": p.num_vfs, "total_vfs": p.total_vfs,
                       "vfs": p.vfs.iter().map(vf).collect::<Vec<_>>()})
            })
            .collect(),
    )
}

/// Gives `pf` exactly `n` VFs. Replacing a nonzero count (or removing VFs a VM may
/// hold) destroys the existing VFs, so it needs `force`.
pub fn create(paths: &HostPaths, pf: &str, n: u32, force: bool) -> Result<Created, SriovError> {
    let dev = host::resolve(paths, pf)?;
    let total_path = dev.sysfs.join("sriov_totalvfs");
    if !total_path.exists() {
        return Err(SriovError::NotPf {
            address: dev.address,
            physfn: dev.physfn,
        });
    }
    let total = read_u32(&total_path)?;
    let num_path = dev.sysfs.join("sriov_numvfs");
    let current = read_u32(&num_path)?;
    if n > total {
        return Err(SriovError::TooMany {
            address: dev.address,
            asked: n,
            total,
        });
    }
    if n == current {
        return Ok(Created::Unchanged);
    }
    if current != 0 {
        let in_use: Vec<String> = vfs_of(&dev.sysfs)
            .into_iter()
            .filter(|v| v.driver.as_deref() == Some("vfio-pci"))
            .map(|v| v.address.to_string())
            .collect();
        if !force && (n != 0 || !in_use.is_empty()) {
            return Err(SriovError::WouldDestroy {
                address: dev.address,
                current,
                asked: n,
                in_use,
            });
        }
        write(&num_path, "0")?;
    }
    if n != 0 {
        write(&num_path, &n.to_string())?;
    }
    Ok(Created::Changed { from: current })
}

/// Binds `vf` (any PCI function) to vfio-pci: driver_override, unbind, drivers_probe.
pub fn bind(paths: &HostPaths, vf: &str) -> Result<Bound, SriovError> {
    let dev = host::resolve(paths, vf)?;
    if dev.driver.as_deref() == Some("vfio-pci") {
        return Ok(Bound::Already);
    }
    let vfio = paths.sys.join("bus/pci/drivers/vfio-pci");
    if !vfio.is_dir() {
        return Err(SriovError::NoVfioPci { path: vfio });
    }
    let bdf = dev.address.to_string();
    write(&dev.sysfs.join("driver_override"), "vfio-pci")?;
    if dev.driver.is_some() {
        write(&dev.sysfs.join("driver/unbind"), &bdf)?;
    }
    write(&paths.sys.join("bus/pci/drivers_probe"), &bdf)?;
    Ok(Bound::Probed {
        previous: dev.driver,
    })
}

/// Errors unless `vf` is now bound to vfio-pci (after [`bind`] probed it).
pub fn check_bound(paths: &HostPaths, vf: &str) -> Result<HostDevice, SriovError> {
    let dev = host::resolve(paths, vf)?;
    match dev.driver.as_deref() {
        Some("vfio-pci") => Ok(dev),
        d => Err(SriovError::NotBoundAfterProbe {
            address: dev.address,
            driver: d.unwrap_or("no driver").to_string(),
        }),
    }
}

/// Sets an mlx5 VF's node and port GUIDs (policy Follow) through
/// `<pf>/sriov/<index>/`; returns false when they already were. Must run before the
/// VF is bound to vfio-pci.
pub fn set_guids(paths: &HostPaths, vf: &str, node: Guid, port: Guid) -> Result<bool, SriovError> {
    let dev = host::resolve(paths, vf)?;
    let pf = dev.physfn.ok_or(SriovError::NotVf {
        address: dev.address,
    })?;
    let pf_dir = paths.pci_device(pf);
    let index = vfs_of(&pf_dir)
        .into_iter()
        .find(|v| v.address == dev.address)
        .ok_or(SriovError::VfNotListed {
            pf,
            vf: dev.address,
        })?
        .index;
    let dir = pf_dir.join(format!("sriov/{index}"));
    if !dir.is_dir() {
        return Err(SriovError::NoGuidDir { pf, path: dir });
    }
    let current = |f: &str| host::read_attr(&dir.join(f)).unwrap_or_default();
    let set = current("node").parse().ok() == Some(node)
        && current("port").parse().ok() == Some(port)
        && current("policy").eq_ignore_ascii_case("follow");
    if set {
        return Ok(false);
    }
    if dev.driver.as_deref() == Some("vfio-pci") {
        return Err(SriovError::GuidWhileBound {
            address: dev.address,
        });
    }
    write(&dir.join("node"), &node.to_string())?;
    write(&dir.join("port"), &port.to_string())?;
    write(&dir.join("policy"), "Follow")?;
    Ok(true)
}

#[cfg(test)]
mod tests;
