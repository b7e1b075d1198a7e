//! Scratch directories and small ext4 images for the real-guest tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::mkfs;

/// A scratch directory for one test, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `$TMPDIR/hpcvm-SUITE-PID-TEST`, empty.
    pub fn new(suite: &str, test: &str) -> Self {
        let d = std::env::temp_dir().join(format!("hpcvm-{suite}-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// `name` inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// An 8 MiB ext4 image at `name` holding a static busybox as /bin/busybox and
    /// /bin/sh, and `init` (a shell script) as an executable /sbin/init: an image with
    /// nothing of hpcvm in it that boots its own init.
    pub fn image_with_init(&self, name: &str, init: &str) -> PathBuf {
        let root = self.path(&format!("{name}.root"));
        for d in ["bin", "sbin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        let path = root.join("sbin/init");
        std::fs::write(&path, init).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let image = self.path(name);
        mkfs(&root, &image, "8M");
        image
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
