//! `--disk PATH[,readonly=on][,serial=ID][,direct=on]` and `--image PATH`.

use std::path::PathBuf;
use std::str::FromStr;

use super::{on_off, ConfigError};

/// The serial the `--image` disk carries, by which the guest agent finds it.
pub const IMAGE_SERIAL: &str = "hpcvm-image";
/// Longest serial a virtio-blk disk reports.
pub const MAX_SERIAL: usize = 20;

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// Raw image file or host block device.
    pub path: PathBuf,
    /// The guest cannot write it (and the file is opened read-only).
    pub read_only: bool,
    /// What the guest reads as its serial (`/sys/block/vdX/serial`).
    pub serial: Option<String>,
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
    /// The job's root image (`--image`): must be ext4, shared read-only.
    pub root_image: bool,
}

impl DiskConfig {
    /// The `--image` disk for `path`.
    pub fn image(path: PathBuf) -> Self {
        Self {
            path,
            read_only: true,
            serial: Some(IMAGE_SERIAL.into()),
            direct: false,
            root_image: true,
        }
    }
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| ConfigError::Disk {
            value: s.to_string(),
            reason,
        };
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad(
                "no path (expected PATH[,readonly=on][,serial=ID][,direct=on])".into(),
            ));
        }
        let mut d = DiskConfig {
            path: PathBuf::from(path),
            read_only: false,
            serial: None,
            direct: false,
            root_image: false,
        };
        let mut keys = super::Keys::default();
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| bad(format!("'{p}' is not KEY=VALUE")))?;
            let key = match k {
                "readonly" | "ro" => "readonly",
                "direct" => "direct",
                "serial" => "serial",
                _ => "",
            };
            if !key.is_empty() {
                keys.once(key).map_err(bad)?;
            }
            match k {
                "readonly" | "ro" => d.read_only = on_off(k, v).map_err(bad)?,
                "direct" => d.direct = on_off(k, v).map_err(bad)?,
                "serial" => {
                    if v.len() > MAX_SERIAL || !v.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(bad(format!(
                            "serial '{v}' must be 1-{MAX_SERIAL} printable ASCII characters"
                        )));
                    }
                    if v == IMAGE_SERIAL {
                        return Err(bad(format!(
                            "serial '{IMAGE_SERIAL}' is reserved for --image"
                        )));
                    }
                    d.serial = Some(v.to_string());
                }
                _ => return Err(bad(format!("unknown key '{k}' (readonly, serial, direct)"))),
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_takes_readonly_serial_and_direct() {
        let d: DiskConfig = "/data/in.img,readonly=on,serial=input-1,direct=on"
            .parse()
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/data/in.img"));
        assert!(d.read_only && d.direct && !d.root_image);
        assert_eq!(d.serial.as_deref(), Some("input-1"));
        let plain: DiskConfig = "scratch.img".parse().unwrap();
        assert!(!plain.read_only && plain.serial.is_none());
    }

    #[test]
    fn bad_disk_options_are_named() {
        let err = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
        assert_eq!(
            err("a.img,readonly=yes"),
            "Invalid --disk 'a.img,readonly=yes': readonly= takes on or off, not 'yes'"
        );
        assert!(err("a.img,colour=red").contains("unknown key 'colour'"));
        assert!(err(",readonly=on").contains("no path"));
        assert!(err("a.img,serial=123456789012345678901").contains("1-20 printable"));
        assert!(err("a.img,serial=hpcvm-image").contains("reserved"));
        assert!(err("a.img,ro").contains("not KEY=VALUE"));
        assert!(err("a.img,readonly=on,ro=off").contains("readonly given twice"));
        assert!(err("a.img,serial=a,serial=b").contains("serial given twice"));
    }
}
