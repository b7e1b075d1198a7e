//! `--device`: host devices passed through to the guest.

use std::str::FromStr;

use super::ConfigError;

/// One `--device vfio=SPEC`: a host PCI function by BDF or sysfs path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceConfig {
    /// The BDF (`0000:3b:00.2`, `3b:00.2`) or sysfs path, as given.
    pub host: String,
}

impl FromStr for DeviceConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some(("vfio", host)) if !host.is_empty() && !host.contains(',') => Ok(Self {
                host: host.to_string(),
            }),
            _ => Err(ConfigError::Device {
                value: s.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_devices_by_bdf_or_path() {
        assert_eq!(
            "vfio=0000:3b:00.2".parse::<DeviceConfig>().unwrap().host,
            "0000:3b:00.2"
        );
        assert_eq!(
            "vfio=/sys/bus/pci/devices/0000:3b:00.2"
                .parse::<DeviceConfig>()
                .unwrap()
                .host,
            "/sys/bus/pci/devices/0000:3b:00.2"
        );
        for bad in ["0000:3b:00.2", "vfio=", "nvme=0000:01:00.0", "vfio=a,b"] {
            let e = bad.parse::<DeviceConfig>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("vfio=BDF"), "{e}");
        }
    }
}
