use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use super::HostPaths;

pub(crate) struct FakeHost {
    pub root: PathBuf,
}

impl FakeHost {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "hpcvm-vfio-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        for d in [
            "sys/bus/pci/devices",
            "sys/kernel/iommu_groups",
            "dev",
            "proc",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        Self { root }
    }

    pub fn paths(&self) -> HostPaths {
        HostPaths::under(&self.root)
    }

    /// Writes `rel` (parents created).
    pub fn write(&self, rel: &str, text: &str) -> &Self {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        self
    }

    /// `rel`'s contents, "" when missing.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap_or_default()
    }

    pub fn driver_dir(&self, name: &str) -> PathBuf {
        let d = self.root.join("sys/bus/pci/drivers").join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    pub fn dev_dir(&self, bdf: &str) -> PathBuf {
        self.root.join("sys/devices/pci0000:00").join(bdf)
    }

    /// Binds (or unbinds, with `None`) `bdf` to `driver`.
    pub fn bind(&self, bdf: &str, driver: Option<&str>) -> &Self {
        let link = self.dev_dir(bdf).join("driver");
        let _ = std::fs::remove_file(&link);
        if let Some(d) = driver {
            symlink(self.driver_dir(d), link).unwrap();
        }
        self
    }

    /// A PCI function; `numa` -1 means no affinity.
    pub fn pci_device(
        &self,
        bdf: &str,
        ids: (u16, u16, u32),
        driver: Option<&str>,
        group: Option<u32>,
        numa: i32,
    ) -> &Self {
        let dir = self.dev_dir(bdf);
        std::fs::create_dir_all(&dir).unwrap();
        let (vendor, device, class) = ids;
        std::fs::write(dir.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
        std::fs::write(dir.join("device"), format!("0x{device:04x}\n")).unwrap();
        std::fs::write(dir.join("class"), format!("0x{class:06x}\n")).unwrap();
        std::fs::write(dir.join("numa_node"), format!("{numa}\n")).unwrap();
        symlink(&dir, self.root.join("sys/bus/pci/devices").join(bdf)).unwrap();
        self.bind(bdf, driver);
        if let Some(g) = group {
            let gdir = self.root.join(format!("sys/kernel/iommu_groups/{g}"));
            std::fs::create_dir_all(gdir.join("devices")).unwrap();
            symlink(&gdir, dir.join("iommu_group")).unwrap();
            symlink(&dir, gdir.join("devices").join(bdf)).unwrap();
        }
        self
    }

    /// Makes `vf` the `n`-th virtual function of `pf` (both already created).
    pub fn vf(&self, pf: &str, n: u32, vf: &str) -> &Self {
        symlink(
            self.dev_dir(vf),
            self.dev_dir(pf).join(format!("virtfn{n}")),
        )
        .unwrap();
        symlink(self.dev_dir(pf), self.dev_dir(vf).join("physfn")).unwrap();
        self
    }

    /// A hugepage pool of `kib`-sized pages.
    pub fn hugepages(&self, kib: u64, nr: u64, free: u64) -> &Self {
        let d = format!("sys/kernel/mm/hugepages/hugepages-{kib}kB");
        self.write(&format!("{d}/nr_hugepages"), &format!("{nr}\n"))
            .write(&format!("{d}/free_hugepages"), &format!("{free}\n"))
            .write(&format!("{d}/resv_hugepages"), "0\n")
    }

    /// Free pages of a pool on one NUMA node.
    pub fn node_hugepages(&self, node: u32, kib: u64, free: u64) -> &Self {
        let d = format!("sys/devices/system/node/node{node}/hugepages/hugepages-{kib}kB");
        self.write(&format!("{d}/free_hugepages"), &format!("{free}\n"))
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
