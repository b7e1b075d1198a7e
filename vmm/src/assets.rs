//! Where `hpcvm run -- CMD` finds its default guest: the kernel built by `make guest`,
//! the static guest agent and busybox, all in one "guest directory":
//! `$HPCVM_GUEST_DIR`, else `guest/` beside the hpcvm binary or one level up (the
//! Makefile's `target/guest/` serves both `target/release/hpcvm` and
//! `target/debug/hpcvm`).

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The default guest kernel's file name.
pub const KERNEL: &str = "vmlinux";
/// The guest agent's file name.
pub const AGENT: &str = "hpcvm-agent";
/// The static busybox's file name.
pub const BUSYBOX: &str = "busybox";

/// A missing default guest.
#[derive(Debug, Error)]
#[error("No {what} at {path}: run `make guest` to build the default guest{hint}")]
pub struct AssetError {
    what: &'static str,
    path: PathBuf,
    hint: &'static str,
}

/// The files a job's guest is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest agent (becomes /init).
    pub agent: PathBuf,
    /// busybox, if present (gives the job a shell and tools).
    pub busybox: Option<PathBuf>,
}

/// The guest directory in use.
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HPCVM_GUEST_DIR") {
        return d.into();
    }
    let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    else {
        return PathBuf::from("guest");
    };
    let beside = exe_dir.join("guest");
    match exe_dir.parent() {
        Some(up) if !beside.is_dir() && up.join("guest").is_dir() => up.join("guest"),
        _ => beside,
    }
}

/// Finds the assets in `dir`; `kernel` overrides the default kernel.
pub fn locate(dir: &Path, kernel: Option<&Path>) -> Result<GuestAssets, AssetError> {
    let need = |what, file: &str, hint| {
        let p = dir.join(file);
        if p.is_file() {
            Ok(p)
        } else {
            Err(AssetError {
                what,
                path: p,
                hint,
            })
        }
    };
    let kernel = match kernel {
        Some(k) => k.to_path_buf(),
        None => need("guest kernel", KERNEL, " (or pass --kernel)")?,
    };
    let agent = need("guest agent", AGENT, "")?;
    let busybox = Some(dir.join(BUSYBOX)).filter(|p| p.is_file());
    Ok(GuestAssets {
        kernel,
        agent,
        busybox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pieces_say_how_to_get_them() {
        let dir = std::env::temp_dir().join(format!("hpcvm-assets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = locate(&dir, None).unwrap_err().to_string();
        assert!(e.starts_with("No guest kernel at "), "{e}");
        assert!(
            e.ends_with("run `make guest` to build the default guest (or pass --kernel)"),
            "{e}"
        );
        std::fs::write(dir.join(KERNEL), b"k").unwrap();
        let e = locate(&dir, None).unwrap_err().to_string();
        assert!(e.starts_with("No guest agent at "), "{e}");
        std::fs::write(dir.join(AGENT), b"a").unwrap();
        let a = locate(&dir, None).unwrap();
        assert_eq!(a.busybox, None);
        let a = locate(&dir, Some(Path::new("/my/kernel"))).unwrap();
        assert_eq!(a.kernel, PathBuf::from("/my/kernel"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
