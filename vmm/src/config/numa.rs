//! `--numa auto|off|N`: the guest's NUMA nodes.

use super::ConfigError;

/// Most guest NUMA nodes hpcvm describes (Linux's default MAX_NUMNODES on x86-64).
pub const MAX_NODES: u32 = 64;

/// How the guest's NUMA nodes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum NumaConfig {
    /// One guest node per host node the pinned vCPUs run on, each node's RAM bound to
    /// its host node; one node (its RAM bound to the host node, if pinned) otherwise.
    #[default]
    Auto,
    /// One node, RAM placed by first touch: no SRAT, no binding.
    Off,
    /// This many nodes, vCPUs and RAM split evenly in order; each node's RAM is bound to
    /// the host node of its first vCPU's pinned CPU (else spread over the host's nodes).
    Nodes(u32),
}

impl std::str::FromStr for NumaConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::Numa {
            value: s.to_string(),
            reason,
        };
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "off" | "none" => Ok(Self::Off),
            n => match n.parse::<u32>() {
                Ok(0) => Err(err("a guest needs at least one node".into())),
                Ok(n) if n > MAX_NODES => Err(err(format!("at most {MAX_NODES} nodes"))),
                Ok(n) => Ok(Self::Nodes(n)),
                Err(_) => Err(err("expected auto, off or a node count".into())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_auto_and_off_parse() {
        assert_eq!("2".parse(), Ok(NumaConfig::Nodes(2)));
        assert_eq!("auto".parse(), Ok(NumaConfig::Auto));
        assert_eq!("off".parse(), Ok(NumaConfig::Off));
    }

    #[test]
    fn bad_counts_are_named() {
        let msg = |s: &str| s.parse::<NumaConfig>().unwrap_err().to_string();
        assert_eq!(
            msg("0"),
            "Invalid --numa '0': a guest needs at least one node"
        );
        assert_eq!(msg("65"), "Invalid --numa '65': at most 64 nodes");
        assert_eq!(
            msg("two"),
            "Invalid --numa 'two': expected auto, off or a node count"
        );
    }
}
