//! `--memory SIZE[,hugepages=none|2M|1G|thp][,prefault=on|off]`: guest RAM size and backing.

use super::ConfigError;

/// Smallest guest hpcvm will build: room for the boot structures and a tiny kernel.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest RAM accepted by the parser (the host check comes later).
pub const MAX_MEMORY: u64 = 1 << 46;

/// Page size backing guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HugePageSize {
    /// Ordinary anonymous memory (THP only if the host's policy is `always`).
    None,
    /// Anonymous memory advised for transparent hugepages (MADV_HUGEPAGE): large pages
    /// where the kernel can find them, no pool needed, no guarantee.
    Thp,
    /// hugetlb 2 MiB pages.
    Size2M,
    /// hugetlb 1 GiB pages.
    Size1G,
}

impl HugePageSize {
    /// Page size in bytes (4 KiB for ordinary memory).
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::None | HugePageSize::Thp => 4 << 10,
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    /// True for the hugetlb sizes, which come from a reserved pool.
    pub fn is_hugetlb(self) -> bool {
        matches!(self, HugePageSize::Size2M | HugePageSize::Size1G)
    }

    /// Short name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HugePageSize::None => "none",
            HugePageSize::Thp => "thp",
            HugePageSize::Size2M => "2M",
            HugePageSize::Size1G => "1G",
        }
    }
}

/// The memory part of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Backing page size.
    pub hugepages: HugePageSize,
    /// Populate all guest RAM before the first vCPU runs.
    pub prefault: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: 256 << 20,
            hugepages: HugePageSize::None,
            prefault: false,
        }
    }
}

impl std::str::FromStr for MemoryConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        parse(s).map_err(|reason| ConfigError::Memory {
            value: s.to_string(),
            reason,
        })
    }
}

fn parse(s: &str) -> Result<MemoryConfig, String> {
    let mut cfg = MemoryConfig::default();
    let mut size = None;
    let mut keys = super::Keys::default();
    for (i, tok) in s.split(',').map(str::trim).enumerate() {
        let key = match tok.split_once('=') {
            None if i == 0 => "size",
            Some(("size", _)) => "size",
            Some(("hugepages", _)) => "hugepages",
            Some(("prefault", _)) => "prefault",
            _ => "",
        };
        if !key.is_empty() {
            keys.once(key)?;
        }
        match tok.split_once('=') {
            None if i == 0 => size = Some(parse_size(tok)?),
            None => return Err(format!("'{tok}' is not a key=value item")),
            Some(("size", v)) => size = Some(parse_size(v)?),
            Some(("hugepages", v)) => {
                cfg.hugepages = match v.to_ascii_lowercase().as_str() {
                    "none" | "off" | "no" => HugePageSize::None,
                    "2m" | "on" | "yes" => HugePageSize::Size2M,
                    "1g" => HugePageSize::Size1G,
                    "thp" => HugePageSize::Thp,
                    _ => return Err(format!("hugepages '{v}' must be none, 2M, 1G or thp")),
                }
            }
            Some(("prefault", v)) => {
                cfg.prefault = match v {
                    "on" | "yes" | "true" => true,
                    "off" | "no" | "false" => false,
                    _ => return Err(format!("prefault '{v}' must be on or off")),
                }
            }
            Some((k, _)) => {
                return Err(format!(
                    "unknown key '{k}' (expected size, hugepages, prefault)"
                ))
            }
        }
    }
    cfg.size = size.ok_or("no size given")?;
    if cfg.size < MIN_MEMORY {
        return Err(format!(
            "{} is below the {} MiB minimum",
            fmt_size(cfg.size),
            MIN_MEMORY >> 20
        ));
    }
    if cfg.size > MAX_MEMORY {
        return Err(format!("{} is beyond 64 TiB", fmt_size(cfg.size)));
    }
    let page = cfg.hugepages.bytes();
    if cfg.size % page != 0 {
        return Err(format!(
            "{} is not a multiple of the {} page size",
            fmt_size(cfg.size),
            fmt_size(page)
        ));
    }
    Ok(cfg)
}

/// Parses `512M`, `4G`, `1T`, `65536K`; a bare number means MiB, as in QEMU.
pub fn parse_size(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{v}' is not a size (e.g. 512M, 4G)"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "'{v}': unknown size unit '{unit}' (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{v}' is too large"))
}

/// Formats a byte count the way users write it (`512M`, `4G`, `1536K`).
pub fn fmt_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> MemoryConfig {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn err(s: &str) -> String {
        s.parse::<MemoryConfig>().unwrap_err().to_string()
    }

    #[test]
    fn sizes_with_units_and_bare_mib() {
        assert_eq!(ok("512M").size, 512 << 20);
        assert_eq!(ok("512").size, 512 << 20);
        assert_eq!(ok("2G").size, 2 << 30);
        assert_eq!(ok("2GiB").size, 2 << 30);
        assert_eq!(ok("65536K").size, 64 << 20);
        assert_eq!(ok("size=1G").size, 1 << 30);
    }

    #[test]
    fn hugepages_and_prefault_options() {
        let m = ok("1G,hugepages=2M,prefault=on");
        assert_eq!(m.hugepages, HugePageSize::Size2M);
        assert!(m.prefault);
        assert_eq!(ok("2G,hugepages=1G").hugepages, HugePageSize::Size1G);
        assert_eq!(ok("64M,hugepages=none").hugepages, HugePageSize::None);
        assert_eq!(ok("64M,hugepages=thp").hugepages, HugePageSize::Thp);
        assert!(!ok("64M").prefault);
    }

    #[test]
    fn rejects_bad_sizes_and_keys() {
        assert!(err("8M").contains("below the 16 MiB minimum"));
        assert!(err("lots").contains("'lots' is not a size"));
        assert!(err("5Q").contains("unknown size unit 'Q'"));
        assert!(err("1G,hugepages=4M").contains("must be none, 2M, 1G or thp"));
        assert!(err("1G,prefault=maybe").contains("must be on or off"));
        assert!(err("1G,numa=0").contains("unknown key 'numa'"));
        assert!(err("99999999999999999999G").contains("is not a size"));
        assert!(err("100000T").contains("beyond 64 TiB"));
        assert!(err("1000000000T").contains("is too large"));
    }

    #[test]
    fn size_must_be_a_multiple_of_the_page_size() {
        assert!(err("1025M,hugepages=2M").contains("1025M is not a multiple of the 2M page size"));
        assert!(err("1536M,hugepages=1G").contains("not a multiple of the 1G page size"));
    }

    #[test]
    fn a_key_given_twice_is_refused_not_overridden() {
        assert!(err("256M,hugepages=2M,hugepages=none").contains("hugepages given twice"));
        assert!(err("256M,size=512M").contains("size given twice"));
        assert!(err("256M,prefault=on,prefault=off").contains("prefault given twice"));
        assert!(err("65537K").contains("65537K is not a multiple of the 4K page size"));
        assert!(err("65537K,hugepages=thp").contains("of the 4K page size"));
    }

    #[test]
    fn formats_sizes_back() {
        assert_eq!(fmt_size(512 << 20), "512M");
        assert_eq!(fmt_size(3 << 30), "3G");
        assert_eq!(fmt_size(1536 << 10), "1536K");
        assert_eq!(fmt_size(100), "100 bytes");
    }
}
