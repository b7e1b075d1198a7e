//! The host's hugetlb pools, read from sysfs (no hugetlbfs mount needed).

use std::path::{Path, PathBuf};

use super::MemoryError;
use crate::config::HugePageSize;

/// Counters of one hugepage pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugePagePool {
    /// Page size.
    pub size: HugePageSize,
    /// Pages in the pool.
    pub total: u64,
    /// Free pages, reserved ones included.
    pub free: u64,
    /// Free pages already promised to existing mappings.
    pub reserved: u64,
    /// The pool's sysfs directory.
    pub dir: PathBuf,
}

impl HugePagePool {
    /// Reads the pool for `size` from `/sys/kernel/mm/hugepages`.
    pub fn read(size: HugePageSize) -> Result<Self, MemoryError> {
        Self::read_from(Path::new("/sys/kernel/mm/hugepages"), size)
    }

    /// Reads the pool for `size` from a sysfs-like tree rooted at `root`.
    pub fn read_from(root: &Path, size: HugePageSize) -> Result<Self, MemoryError> {
        let (name, kib) = match size {
            HugePageSize::Size2M => ("2M", 2048),
            HugePageSize::Size1G => ("1G", 1_048_576),
            HugePageSize::None | HugePageSize::Thp => ("4K", 4),
        };
        let dir = root.join(format!("hugepages-{kib}kB"));
        if !dir.is_dir() {
            return Err(MemoryError::NoPool(name, dir.display().to_string()));
        }
        let read = |f: &str| -> Result<u64, MemoryError> {
            let p = dir.join(f);
            let text = std::fs::read_to_string(&p)
                .map_err(|e| MemoryError::PoolRead(p.display().to_string(), e))?;
            text.trim().parse().map_err(|_| {
                MemoryError::PoolRead(
                    p.display().to_string(),
                    std::io::Error::other(format!("'{}' is not a number", text.trim())),
                )
            })
        };
        Ok(Self {
            size,
            total: read("nr_hugepages")?,
            free: read("free_hugepages")?,
            reserved: read("resv_hugepages")?,
            dir: dir.clone(),
        })
    }

    /// Free pages nobody has reserved.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// The file an administrator writes to grow this pool (the system-wide one for the
    /// default 2M size).
    pub fn knob(&self) -> String {
        match self.size {
            HugePageSize::Size2M => "/proc/sys/vm/nr_hugepages".into(),
            _ => format!(
                "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
                self.size.bytes() >> 10
            ),
        }
    }

    /// Errors with what to raise unless `bytes` of guest RAM fit in the available pages.
    pub fn check_can_supply(&self, bytes: u64) -> Result<(), MemoryError> {
        let needed = bytes.div_ceil(self.size.bytes());
        if self.available() >= needed {
            return Ok(());
        }
        Err(MemoryError::PoolTooSmall {
            size: self.size.name(),
            free: self.available(),
            needed,
            knob: self.knob(),
            want: self.total + needed - self.available(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_pool(kib: u64, total: u64, free: u64, resv: u64) -> tempdir::TempTree {
        let t = tempdir::TempTree::new();
        let d = t.0.join(format!("hugepages-{kib}kB"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("nr_hugepages"), format!("{total}\n")).unwrap();
        std::fs::write(d.join("free_hugepages"), format!("{free}\n")).unwrap();
        std::fs::write(d.join("resv_hugepages"), format!("{resv}\n")).unwrap();
        t
    }

    #[test]
    fn pool_too_small_says_free_needed_and_the_fix() {
        let t = fake_pool(2048, 20, 16, 4);
        let pool = HugePagePool::read_from(&t.0, HugePageSize::Size2M).unwrap();
        assert_eq!(pool.available(), 12);
        pool.check_can_supply(24 << 20).unwrap();
        let msg = pool.check_can_supply(8 << 30).unwrap_err().to_string();
        assert_eq!(
            msg,
            "Hugepage pool has 12 free 2M pages, guest needs 4096: raise \
             /proc/sys/vm/nr_hugepages (e.g. echo 4104 > /proc/sys/vm/nr_hugepages)"
        );
    }

    #[test]
    fn one_gig_pool_points_at_its_own_knob() {
        let t = fake_pool(1_048_576, 0, 0, 0);
        let pool = HugePagePool::read_from(&t.0, HugePageSize::Size1G).unwrap();
        let msg = pool.check_can_supply(2 << 30).unwrap_err().to_string();
        assert!(msg.contains("has 0 free 1G pages, guest needs 2"), "{msg}");
        assert!(
            msg.contains("echo 2 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"),
            "{msg}"
        );
    }

    #[test]
    fn missing_pool_is_named() {
        let t = tempdir::TempTree::new();
        let msg = HugePagePool::read_from(&t.0, HugePageSize::Size1G)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("This host has no 1G hugepage support"),
            "{msg}"
        );
    }

    /// A throwaway directory removed on drop (no extra crate for this).
    mod tempdir {
        pub struct TempTree(pub std::path::PathBuf);
        impl TempTree {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "hpcvm-hp-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for TempTree {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
