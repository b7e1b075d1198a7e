//! `--cpus N[,topology=S:C:T][,affinity=LIST]`: vCPU count, topology and 1:1 pinning.
//!
//! LIST is either host CPUs in vCPU order (`0-3`, `2,5,7`; vCPU i runs on the i-th) or
//! explicit pairs (`0@2,1@3`: vCPU 0 on host CPU 2). Brackets are allowed around LIST.

use super::ConfigError;

/// Most vCPUs a guest may have: xAPIC IDs are 8 bits, 0xff is broadcast, and the
/// IOAPIC takes one more ID.
pub const MAX_VCPUS: u32 = 254;

/// Sockets x cores per socket x threads per core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    /// Packages.
    pub sockets: u32,
    /// Cores in each package.
    pub cores: u32,
    /// Hardware threads in each core.
    pub threads: u32,
}

impl Topology {
    /// Number of vCPUs this topology holds.
    pub fn vcpus(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }
}

/// The vCPU part of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpusConfig {
    /// Number of vCPUs.
    pub count: u32,
    /// How the vCPUs are laid out; defaults to one socket of `count` single-thread cores.
    pub topology: Topology,
    /// `affinity[i]` is the host CPU vCPU i is pinned to; `None` leaves vCPUs unpinned.
    pub affinity: Option<Vec<usize>>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            count: 1,
            topology: Topology {
                sockets: 1,
                cores: 1,
                threads: 1,
            },
            affinity: None,
        }
    }
}

impl std::str::FromStr for CpusConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        parse(s).map_err(|reason| ConfigError::Cpus {
            value: s.to_string(),
            reason,
        })
    }
}

fn parse(s: &str) -> Result<CpusConfig, String> {
    let mut count: Option<u32> = None;
    let mut topology = None;
    let mut affinity_src: Option<String> = None;
    let mut in_affinity = false;
    let mut in_brackets = false;
    let mut keys = super::Keys::default();

    for (i, tok) in s.split(',').map(str::trim).enumerate() {
        if in_affinity && (in_brackets || !tok.contains('=')) {
            let list = affinity_src.get_or_insert_with(String::new);
            list.push(',');
            list.push_str(tok);
            if in_brackets && tok.ends_with(']') {
                in_brackets = false;
                in_affinity = false;
            }
            continue;
        }
        in_affinity = false;
        let key = match tok.split_once('=') {
            None if i == 0 => "boot",
            Some(("boot", _)) => "boot",
            Some(("topology", _)) => "topology",
            _ => "",
        };
        if !key.is_empty() {
            keys.once(key)?;
        }
        match tok.split_once('=') {
            None if i == 0 => count = Some(parse_count(tok)?),
            None => return Err(format!("'{tok}' is not a key=value item")),
            Some(("boot", v)) => count = Some(parse_count(v)?),
            Some(("topology", v)) => topology = Some(parse_topology(v)?),
            Some(("affinity", v)) => {
                if affinity_src.is_some() {
                    return Err("affinity given twice".into());
                }
                in_affinity = true;
                in_brackets = v.starts_with('[') && !v.ends_with(']');
                affinity_src = Some(v.to_string());
            }
            Some((k, _)) => {
                return Err(format!(
                    "unknown key '{k}' (expected boot, topology, affinity)"
                ))
            }
        }
    }

    let count = match (count, topology) {
        (Some(n), _) => n,
        (None, Some(t)) => t.vcpus(),
        (None, None) => return Err("no vCPU count given".into()),
    };
    if count == 0 {
        return Err("a guest needs at least 1 vCPU".into());
    }
    if count > MAX_VCPUS {
        return Err(format!(
            "{count} vCPUs is more than the {MAX_VCPUS} hpcvm supports"
        ));
    }
    let topology = topology.unwrap_or(Topology {
        sockets: 1,
        cores: count,
        threads: 1,
    });
    if topology.vcpus() != count {
        return Err(format!(
            "topology {}:{}:{} holds {} vCPUs, not {count}",
            topology.sockets,
            topology.cores,
            topology.threads,
            topology.vcpus()
        ));
    }
    // APIC IDs leave gaps when a level's count is not a power of two; the largest
    // (the last vCPU's) must still be an xAPIC ID below the broadcast ID and the IOAPIC's.
    let top = crate::vstate::topology::place(&topology, count - 1).apic_id;
    if top > MAX_VCPUS - 1 {
        return Err(format!(
            "topology {}:{}:{} numbers its last vCPU with APIC ID {top}, past the {} \
             hpcvm supports: use powers of two for cores and threads",
            topology.sockets,
            topology.cores,
            topology.threads,
            MAX_VCPUS - 1
        ));
    }
    let affinity = affinity_src
        .map(|src| parse_affinity(&src, count as usize))
        .transpose()?;
    Ok(CpusConfig {
        count,
        topology,
        affinity,
    })
}

fn parse_count(v: &str) -> Result<u32, String> {
    v.parse().map_err(|_| format!("'{v}' is not a vCPU count"))
}

fn parse_topology(v: &str) -> Result<Topology, String> {
    let parts: Vec<&str> = v.split(':').collect();
    let [s, c, t] = parts[..] else {
        return Err(format!(
            "topology '{v}' must be SOCKETS:CORES:THREADS, e.g. 2:8:1"
        ));
    };
    let num = |x: &str| -> Result<u32, String> {
        match x.parse::<u32>() {
            Ok(n) if n > 0 && n <= MAX_VCPUS => Ok(n),
            _ => Err(format!(
                "topology '{v}': '{x}' is not a count from 1 to {MAX_VCPUS}"
            )),
        }
    };
    Ok(Topology {
        sockets: num(s)?,
        cores: num(c)?,
        threads: num(t)?,
    })
}

/// Parses a host CPU list in the kernel's cpulist format (`0-3,8,10-11`).
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for item in list.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{x}' is not a host CPU number"))
        };
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("host CPU range '{item}' runs backwards"));
                }
                if b - a >= 4096 {
                    return Err(format!("host CPU range '{item}' is implausibly large"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(item)?),
        }
    }
    Ok(cpus)
}

fn parse_affinity(src: &str, count: usize) -> Result<Vec<usize>, String> {
    let list = src.trim().trim_start_matches('[').trim_end_matches(']');
    let host: Vec<usize> = if list.contains('@') {
        let mut slots: Vec<Option<usize>> = vec![None; count];
        for pair in list.split(',').map(str::trim) {
            let (v, h) = pair
                .split_once('@')
                .ok_or_else(|| format!("affinity item '{pair}' is not VCPU@HOSTCPU"))?;
            let v: usize = v
                .parse()
                .map_err(|_| format!("affinity item '{pair}': '{v}' is not a vCPU index"))?;
            let h: usize = h
                .parse()
                .map_err(|_| format!("affinity item '{pair}': '{h}' is not a host CPU"))?;
            let slot = slots
                .get_mut(v)
                .ok_or_else(|| format!("affinity names vCPU {v}, but there are only {count}"))?;
            if slot.replace(h).is_some() {
                return Err(format!("affinity pins vCPU {v} twice"));
            }
        }
        slots
            .iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| format!("affinity does not pin vCPU {i}")))
            .collect::<Result<_, _>>()?
    } else {
        let cpus = parse_cpu_list(list)?;
        if cpus.len() != count {
            return Err(format!(
                "affinity lists {} host CPUs for {count} vCPUs; pinning is 1:1",
                cpus.len()
            ));
        }
        cpus
    };
    let mut seen = host.clone();
    seen.sort_unstable();
    if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!(
            "host CPU {} is given to two vCPUs; pinning is 1:1",
            w[0]
        ));
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> CpusConfig {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn err(s: &str) -> String {
        s.parse::<CpusConfig>().unwrap_err().to_string()
    }

    #[test]
    fn count_alone_is_one_socket_of_single_thread_cores() {
        let c = ok("4");
        assert_eq!(c.count, 4);
        assert_eq!(
            c.topology,
            Topology {
                sockets: 1,
                cores: 4,
                threads: 1
            }
        );
        assert_eq!(c.affinity, None);
        assert_eq!(ok("boot=2").count, 2);
    }

    #[test]
    fn affinity_list_pins_in_vcpu_order() {
        assert_eq!(ok("4,affinity=0-3").affinity, Some(vec![0, 1, 2, 3]));
        assert_eq!(ok("3,affinity=2,5,7").affinity, Some(vec![2, 5, 7]));
        assert_eq!(ok("3,affinity=[7,5,2]").affinity, Some(vec![7, 5, 2]));
        assert_eq!(ok("2,affinity=1@3,0@2").affinity, Some(vec![2, 3]));
        assert_eq!(
            ok("boot=2,affinity=[0@4,1@6],topology=1:1:2").affinity,
            Some(vec![4, 6])
        );
    }

    #[test]
    fn topology_must_hold_the_vcpu_count() {
        let c = ok("8,topology=2:2:2");
        assert_eq!(
            c.topology,
            Topology {
                sockets: 2,
                cores: 2,
                threads: 2
            }
        );
        assert_eq!(ok("topology=1:2:2").count, 4);
        assert!(err("6,topology=2:2:2").contains("holds 8 vCPUs, not 6"));
        assert!(err("2,topology=2:1").contains("SOCKETS:CORES:THREADS"));
        assert!(err("2,topology=0:2:1").contains("'0' is not a count"));
        // 3 cores take 2 bits: socket s core c has APIC ID 4s+c.
        assert_eq!(ok("topology=63:3:1").count, 189);
        assert!(err("topology=64:3:1").contains("APIC ID 254, past the 253"));
    }

    #[test]
    fn rejects_zero_too_many_and_garbage() {
        assert!(err("0").contains("at least 1 vCPU"));
        assert!(err("255").contains("more than the 254"));
        assert!(err("two").contains("'two' is not a vCPU count"));
        assert!(err("2,pin=1").contains("unknown key 'pin'"));
        assert!(err("").contains("is not a vCPU count"));
    }

    #[test]
    fn affinity_must_be_one_to_one_and_complete() {
        assert!(err("4,affinity=0-2").contains("lists 3 host CPUs for 4 vCPUs"));
        assert!(err("2,affinity=1,1").contains("host CPU 1 is given to two vCPUs"));
        assert!(err("2,affinity=0@1").contains("does not pin vCPU 1"));
        assert!(err("2,affinity=0@1,0@2").contains("pins vCPU 0 twice"));
        assert!(err("2,affinity=0@1,2@2").contains("names vCPU 2, but there are only 2"));
        assert!(err("2,affinity=3-1").contains("runs backwards"));
        assert!(err("1,affinity=x").contains("'x' is not a host CPU number"));
    }

    #[test]
    fn a_key_given_twice_is_refused_not_overridden() {
        assert!(err("2,boot=4").contains("boot given twice"));
        assert!(err("2,topology=1:2:1,topology=2:1:1").contains("topology given twice"));
        assert!(err("2,3").contains("not a key=value item"));
    }

    #[test]
    fn error_names_the_option_and_value() {
        assert_eq!(
            err("0"),
            "Invalid --cpus '0': a guest needs at least 1 vCPU"
        );
    }

    #[test]
    fn cpu_list_format_matches_the_kernels() {
        assert_eq!(
            parse_cpu_list("0-2,8,10-11").unwrap(),
            vec![0, 1, 2, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("5\n").unwrap(), vec![5]);
    }
}
