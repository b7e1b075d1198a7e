//! `--share HOST_DIR[:GUEST_DIR][,readonly=on]`: a host directory in the guest over
//! virtio-fs.

use std::path::PathBuf;
use std::str::FromStr;

use super::{on_off, ConfigError};

/// The tag of the share that carries the job's working directory.
pub const CWD_TAG: &str = "hpcvm-cwd";

/// One shared directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareConfig {
    /// The host directory.
    pub host_dir: PathBuf,
    /// Where the guest mounts it (absolute).
    pub guest_dir: String,
    /// The guest cannot write it.
    pub read_only: bool,
    /// The virtio-fs tag (what `mount -t virtiofs TAG` names).
    pub tag: String,
}

impl ShareConfig {
    /// The caller's working directory at the same path in the guest.
    pub fn cwd(dir: PathBuf) -> Self {
        Self {
            guest_dir: dir.display().to_string(),
            host_dir: dir,
            read_only: false,
            tag: CWD_TAG.into(),
        }
    }
}

impl FromStr for ShareConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| ConfigError::Share {
            value: s.to_string(),
            reason,
        };
        let mut parts = s.split(',');
        let dirs = parts.next().unwrap_or_default();
        let (host, guest) = match dirs.split_once(':') {
            Some((h, g)) => (h, g.to_string()),
            None => (dirs, dirs.to_string()),
        };
        if host.is_empty() {
            return Err(bad(
                "no host directory (expected HOST_DIR[:GUEST_DIR][,readonly=on])".into(),
            ));
        }
        if !guest.starts_with('/') {
            return Err(bad(format!(
                "the guest directory '{guest}' must be absolute (give HOST_DIR:/GUEST_DIR)"
            )));
        }
        let mut read_only = false;
        let mut keys = super::Keys::default();
        for p in parts {
            match p.split_once('=') {
                Some((k @ ("readonly" | "ro"), v)) => {
                    keys.once("readonly").map_err(bad)?;
                    read_only = on_off(k, v).map_err(bad)?;
                }
                _ => return Err(bad(format!("unknown option '{p}' (readonly=on|off)"))),
            }
        }
        Ok(Self {
            host_dir: PathBuf::from(host),
            guest_dir: guest,
            read_only,
            tag: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_names_host_and_guest_dirs() {
        let s: ShareConfig = "/scratch/run1:/data,readonly=on".parse().unwrap();
        assert_eq!(s.host_dir, PathBuf::from("/scratch/run1"));
        assert_eq!(s.guest_dir, "/data");
        assert!(s.read_only);
        let same: ShareConfig = "/home/u/job".parse().unwrap();
        assert_eq!(same.guest_dir, "/home/u/job");
        assert!(!same.read_only);
    }

    #[test]
    fn bad_shares_are_named() {
        let err = |s: &str| s.parse::<ShareConfig>().unwrap_err().to_string();
        assert_eq!(
            err("rel:data"),
            "Invalid --share 'rel:data': the guest directory 'data' must be absolute (give HOST_DIR:/GUEST_DIR)"
        );
        assert!(err("/a,cache=none").contains("unknown option 'cache=none'"));
        assert!(err(":/x").contains("no host directory"));
        assert!(err("/a,readonly=on,ro=off").contains("readonly given twice"));
    }
}
