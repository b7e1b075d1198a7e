//! Sizing and pinning a VM from the job's allocation (`hpcvm run --from-allocation`):
//! the queueing system says what this job may use through the process's CPU affinity
//! (its cpuset) and its memory cgroup, never trusted environment variables for CPUs.
//!
//! - vCPUs: one per allowed host CPU, pinned 1:1, ordered socket, core, thread, with a
//!   sockets:cores:threads topology mirroring the host's where the allocation is even
//!   (else one socket of single-thread cores).
//! - memory: `--memory` if given, else the memory cgroup's limit, else
//!   `SLURM_MEM_PER_NODE` (MiB), else what `scontrol` says of the step or job (a plain
//!   `srun --mem` exports no variable), minus [`VMM_RESERVE`]; with `--per-task`,
//!   divided by the tasks on this node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use thiserror::Error;

pub mod scontrol;

use crate::config::{ConfigError, CpusConfig, MemoryConfig, Topology};

/// Memory kept for hpcvm itself (page tables, vCPU threads, device state) out of a
/// limit that covers the whole job: guest RAM = limit - reserve.
pub const VMM_RESERVE: u64 = 64 << 20;

/// Environment variables of the job's launcher passed into a `--per-task` VM's job:
/// that VM is one of the launcher's tasks.
pub const PASSED_PREFIXES: &[&str] =
    &["SLURM_", "OMPI_", "PMI_", "PMIX_", "PALS_", "FLUX_", "PBS_"];

/// What a VM sized to the whole step gets instead: who the job is, not where its
/// launcher's daemons and PMI server are. That VM is its own node; an MPI launcher
/// inside it that saw SLURM_JOBID, SLURM_NODELIST, PBS_ENVIRONMENT or PMIX_* would
/// try to start its ranks through srun or the host's PMI server, neither of which
/// the guest can reach.
pub const IDENTITY_VARS: &[&str] = &[
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_USER",
    "SLURM_CLUSTER_NAME",
    "SLURM_SUBMIT_DIR",
    "SLURM_STEP_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "PBS_JOBID",
    "PBS_JOBNAME",
    "PBS_O_WORKDIR",
    "FLUX_JOB_ID",
];

/// Errors sizing the VM from the allocation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AllocationError {
    /// Nothing says how much memory the job has.
    #[error("--from-allocation found no memory limit (no memory cgroup limit, no SLURM_MEM_PER_NODE or SLURM_MEM_PER_CPU, nothing from scontrol): give --memory")]
    NoMemoryLimit,
    /// The limit leaves no room for a guest.
    #[error("The job's memory limit ({limit_mib} MiB{per_task}) leaves no room for a guest after hpcvm's {reserve_mib} MiB reserve: give --memory")]
    TooLittleMemory {
        /// The limit in MiB.
        limit_mib: u64,
        /// Text noting the per-task division.
        per_task: String,
        /// The reserve in MiB.
        reserve_mib: u64,
    },
    /// No CPUs (cannot happen for a running process).
    #[error("This process may run on no CPU at all")]
    NoCpus,
    /// This process's CPU affinity cannot be read.
    #[error("Cannot read CPU affinity: {0}")]
    Affinity(String),
    /// `--memory` (a size or options) does not parse.
    #[error(transparent)]
    Memory(#[from] ConfigError),
}

/// Where one host CPU sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    /// CPU number.
    pub cpu: usize,
    /// physical_package_id.
    pub package: u32,
    /// core_id.
    pub core: u32,
}

/// Reads a CPU's place from a sysfs root (`/sys` normally).
pub fn host_cpu(sys: &Path, cpu: usize) -> HostCpu {
    let read = |f: &str| -> u32 {
        std::fs::read_to_string(sys.join(format!("devices/system/cpu/cpu{cpu}/topology/{f}")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    HostCpu {
        cpu,
        package: read("physical_package_id"),
        core: read("core_id"),
    }
}

/// vCPU layout mirroring `cpus`' host topology: (topology, host CPU of each vCPU).
pub fn layout(cpus: &[HostCpu]) -> Result<CpusConfig, AllocationError> {
    if cpus.is_empty() {
        return Err(AllocationError::NoCpus);
    }
    // package -> core -> threads (host CPUs), all ordered.
    let mut tree: BTreeMap<u32, BTreeMap<u32, BTreeSet<usize>>> = BTreeMap::new();
    for c in cpus {
        tree.entry(c.package)
            .or_default()
            .entry(c.core)
            .or_default()
            .insert(c.cpu);
    }
    let sockets = tree.len() as u32;
    let cores = tree.values().next().map_or(0, |c| c.len()) as u32;
    let threads = tree
        .values()
        .next()
        .and_then(|c| c.values().next())
        .map_or(0, |t| t.len()) as u32;
    let even = tree
        .values()
        .all(|c| c.len() as u32 == cores && c.values().all(|t| t.len() as u32 == threads));
    let count = cpus.len() as u32;
    if even && sockets * cores * threads == count {
        let order: Vec<usize> = tree
            .values()
            .flat_map(|c| c.values().flat_map(|t| t.iter().copied()))
            .collect();
        Ok(CpusConfig {
            count,
            topology: Topology {
                sockets,
                cores,
                threads,
            },
            affinity: Some(order),
        })
    } else {
        let mut order: Vec<usize> = cpus.iter().map(|c| c.cpu).collect();
        order.sort_unstable();
        Ok(CpusConfig {
            count,
            topology: Topology {
                sockets: 1,
                cores: count,
                threads: 1,
            },
            affinity: Some(order),
        })
    }
}

/// The memory cgroup limit of this process, if it has one (cgroup v2 or v1).
pub fn cgroup_memory_limit(proc_self_cgroup: &str, cgroup_root: &Path) -> Option<u64> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(cgroup_root.join(rel).join("memory.max"));
            candidates.push(cgroup_root.join("unified").join(rel).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(
                cgroup_root
                    .join("memory")
                    .join(rel)
                    .join("memory.limit_in_bytes"),
            );
        }
    }
    candidates.iter().find_map(|p| {
        let v = std::fs::read_to_string(p).ok()?;
        let v = v.trim();
        // "max" (v2) or a huge value near i64::MAX (v1) both mean unlimited.
        v.parse::<u64>().ok().filter(|&n| n < (1 << 60))
    })
}

/// Guest RAM for this job: the limit minus the reserve, divided among `tasks`, rounded
/// down to `align`.
pub fn guest_memory(
    limit: Option<u64>,
    slurm_mem_per_node_mib: Option<u64>,
    tasks: u64,
    align: u64,
) -> Result<u64, AllocationError> {
    let limit = limit
        .or(slurm_mem_per_node_mib.map(|m| m << 20))
        .ok_or(AllocationError::NoMemoryLimit)?;
    let tasks = tasks.max(1);
    let share = limit / tasks;
    let size = share.saturating_sub(VMM_RESERVE) / align * align;
    if size < crate::config::memory::MIN_MEMORY {
        return Err(AllocationError::TooLittleMemory {
            limit_mib: limit >> 20,
            per_task: if tasks > 1 {
                format!(", shared by {tasks} tasks")
            } else {
                String::new()
            },
            reserve_mib: VMM_RESERVE >> 20,
        });
    }
    Ok(size)
}

/// Slurm's word on the job's memory in MiB: `SLURM_MEM_PER_NODE`, or
/// `SLURM_MEM_PER_CPU` times the CPUs (srun exports only the latter).
pub fn slurm_memory_mib(env: &dyn Fn(&str) -> Option<String>, cpus: u32) -> Option<u64> {
    let num = |k| env(k).and_then(|v| v.trim().parse::<u64>().ok());
    num("SLURM_MEM_PER_NODE").or_else(|| num("SLURM_MEM_PER_CPU").map(|m| m * u64::from(cpus)))
}

/// Tasks of this job step on this node (for `--per-task`).
pub fn local_tasks(env: &dyn Fn(&str) -> Option<String>) -> u64 {
    let first_number = |v: String| {
        v.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
    };
    env("SLURM_STEP_TASKS_PER_NODE")
        .and_then(first_number)
        .or_else(|| env("SLURM_NTASKS_PER_NODE").and_then(first_number))
        .unwrap_or(1)
}

/// The launcher's variables to hand to the guest job: all of them for a VM per task,
/// the job's identity only for a VM sized to the step ([`IDENTITY_VARS`]).
pub fn passed_env(
    vars: impl Iterator<Item = (String, String)>,
    per_task: bool,
) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = vars
        .filter(|(k, _)| match per_task {
            true => PASSED_PREFIXES.iter().any(|p| k.starts_with(p)),
            false => IDENTITY_VARS.contains(&k.as_str()),
        })
        .collect();
    v.sort();
    v
}

/// A VM sized and pinned from the job's allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// One vCPU per allowed host CPU, pinned 1:1, topology mirroring the host's.
    pub cpus: CpusConfig,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// Where the memory size came from, for a log line.
    pub memory_source: String,
}

/// Sizes and pins a VM from this process's allocation (`hpcvm run --from-allocation`):
/// vCPUs from the CPU affinity and the host's sysfs topology; guest RAM from `memory`
/// when it gives a size, else from the memory cgroup limit or Slurm's memory (shared by
/// the node's tasks with `per_task`) minus [`VMM_RESERVE`], with `memory`'s options
/// (`hugepages=`, `prefault=`) applied either way.
pub fn from_allocation(
    memory: Option<&str>,
    per_task: bool,
) -> Result<Allocation, AllocationError> {
    let allowed =
        crate::host::allowed_cpus().map_err(|e| AllocationError::Affinity(e.to_string()))?;
    let sys = Path::new("/sys");
    let host: Vec<_> = allowed.iter().map(|&c| host_cpu(sys, c)).collect();
    let cpus = layout(&host)?;
    let env = |k: &str| std::env::var(k).ok();
    let tasks = if per_task { local_tasks(&env) } else { 1 };
    // `--memory` with a size wins; options alone (hugepages=2M,prefault=on) apply to
    // the allocation's size.
    let sized = memory
        .is_some_and(|m| m.starts_with(|c: char| c.is_ascii_digit()) || m.starts_with("size="));
    let (memory, source) = match memory {
        Some(m) if sized => (m.parse::<MemoryConfig>()?, "--memory".to_string()),
        options => {
            let options = options.map(|o| format!(",{o}")).unwrap_or_default();
            // The page size decides the rounding; learn it from the options first.
            let page = format!("1G{options}")
                .parse::<MemoryConfig>()?
                .hugepages
                .bytes()
                .max(2 << 20);
            let cgroup = std::fs::read_to_string("/proc/self/cgroup")
                .ok()
                .and_then(|t| cgroup_memory_limit(&t, Path::new("/sys/fs/cgroup")));
            let per_node =
                env("SLURM_MEM_PER_NODE").is_some_and(|v| v.trim().parse::<u64>().is_ok());
            let slurm = slurm_memory_mib(&env, cpus.count)
                .map(|m| match per_node {
                    true => (m, "SLURM_MEM_PER_NODE".to_string()),
                    false => (m, format!("SLURM_MEM_PER_CPU x {} CPUs", cpus.count)),
                })
                .or_else(|| match cgroup {
                    Some(_) => None,
                    None => scontrol::memory_mib(&env, cpus.count),
                });
            let size = guest_memory(cgroup, slurm.as_ref().map(|s| s.0), tasks, page)?;
            let from = match (cgroup, &slurm) {
                (Some(l), _) => format!("memory cgroup limit {} MiB", l >> 20),
                (None, Some((m, field))) => format!("Slurm's {m} MiB ({field})"),
                (None, None) => "nothing".into(),
            };
            let share = if tasks > 1 {
                format!(" / {tasks} tasks")
            } else {
                String::new()
            };
            (
                format!("{}K{options}", size >> 10).parse::<MemoryConfig>()?,
                format!("{from}{share} - {} MiB reserve", VMM_RESERVE >> 20),
            )
        }
    };
    Ok(Allocation {
        cpus,
        memory,
        memory_source: source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sized_memory_wins_and_every_allowed_cpu_gets_a_vcpu() {
        let a = from_allocation(Some("512M,hugepages=2M"), false).unwrap();
        let allowed = crate::host::allowed_cpus().unwrap();
        assert_eq!(a.cpus.count as usize, allowed.len());
        let mut pinned = a.cpus.affinity.clone().unwrap();
        pinned.sort_unstable();
        assert_eq!(pinned, allowed, "pinned 1:1 to the allowed CPUs");
        assert_eq!(a.memory.size, 512 << 20);
        assert!(a.memory.hugepages.is_hugetlb());
        assert_eq!(a.memory_source, "--memory");
    }

    #[test]
    fn bad_memory_options_are_refused_as_memory_errors() {
        for bad in ["hugepages=7M", "12Q"] {
            let e = from_allocation(Some(bad), false).unwrap_err();
            assert!(matches!(e, AllocationError::Memory(_)), "{bad}: {e:?}");
            assert!(!e.to_string().is_empty());
        }
    }

    fn cpu(cpu: usize, package: u32, core: u32) -> HostCpu {
        HostCpu { cpu, package, core }
    }

    #[test]
    fn two_sockets_of_smt_cores_are_mirrored() {
        // CPUs 0-3 socket 0 cores 0,1 with siblings 4-7; CPUs 8-11 socket 1.
        let cpus = [
            cpu(0, 0, 0),
            cpu(4, 0, 0),
            cpu(1, 0, 1),
            cpu(5, 0, 1),
            cpu(8, 1, 0),
            cpu(12, 1, 0),
            cpu(9, 1, 1),
            cpu(13, 1, 1),
        ];
        let c = layout(&cpus).unwrap();
        assert_eq!(
            c.topology,
            Topology {
                sockets: 2,
                cores: 2,
                threads: 2
            }
        );
        assert_eq!(c.affinity.unwrap(), vec![0, 4, 1, 5, 8, 12, 9, 13]);
    }

    #[test]
    fn an_uneven_allocation_becomes_one_socket_of_cores() {
        let cpus = [cpu(3, 0, 3), cpu(2, 0, 2), cpu(9, 1, 1)];
        let c = layout(&cpus).unwrap();
        assert_eq!(
            c.topology,
            Topology {
                sockets: 1,
                cores: 3,
                threads: 1
            }
        );
        assert_eq!(c.affinity.unwrap(), vec![2, 3, 9]);
        assert_eq!(layout(&[]), Err(AllocationError::NoCpus));
    }

    #[test]
    fn cgroup_v1_and_v2_limits_are_found_and_unlimited_ignored() {
        let root = std::env::temp_dir().join(format!("hpcvm-cg-{}", std::process::id()));
        let v1 = root.join("memory/slurm/uid_0/job_7/step_0");
        let v2 = root.join("system.slice/job.scope");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "2147483648\n").unwrap();
        std::fs::write(v2.join("memory.max"), "1073741824\n").unwrap();
        let v1_self = "4:memory:/slurm/uid_0/job_7/step_0\n0::/\n";
        assert_eq!(cgroup_memory_limit(v1_self, &root), Some(2 << 30));
        assert_eq!(
            cgroup_memory_limit("0::/system.slice/job.scope\n", &root),
            Some(1 << 30)
        );
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert_eq!(
            cgroup_memory_limit("0::/system.slice/job.scope\n", &root),
            None
        );
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_memory_limit(v1_self, &root), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn memory_is_the_limit_minus_the_reserve_shared_by_tasks() {
        let two_m = 2 << 20;
        assert_eq!(
            guest_memory(Some(4 << 30), None, 1, two_m),
            Ok((4 << 30) - VMM_RESERVE)
        );
        assert_eq!(
            guest_memory(None, Some(4096), 2, two_m),
            Ok((2 << 30) - VMM_RESERVE)
        );
        assert_eq!(
            guest_memory(None, None, 1, two_m),
            Err(AllocationError::NoMemoryLimit)
        );
        let e = guest_memory(Some(100 << 20), None, 4, two_m)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(100 MiB, shared by 4 tasks)"), "{e}");
        // Rounded down to the page size: 3 GiB + a bit - 64 MiB -> 2 GiB of 1G pages.
        assert_eq!(
            guest_memory(Some((3 << 30) + 12345), None, 1, 1 << 30),
            Ok(2 << 30)
        );
    }

    #[test]
    fn launcher_variables_pass_through_and_others_do_not() {
        let vars = [
            ("SLURM_PROCID", "3"),
            ("HOME", "/home/x"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("PMIX_RANK", "3"),
            ("SSH_AUTH_SOCK", "/tmp/s"),
            ("SLURM_JOBID", "42"),
            ("SLURM_JOB_ID", "42"),
        ];
        let got = |per_task| {
            let v = passed_env(
                vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
                per_task,
            );
            v.into_iter().map(|(k, _)| k).collect::<Vec<_>>()
        };
        assert_eq!(
            got(true),
            [
                "OMPI_COMM_WORLD_RANK",
                "PMIX_RANK",
                "SLURM_JOBID",
                "SLURM_JOB_ID",
                "SLURM_PROCID"
            ]
        );
        // A VM sized to the step runs its own launcher: nothing that tells it it is
        // inside a Slurm step.
        assert_eq!(got(false), ["SLURM_JOB_ID"]);
    }

    #[test]
    fn slurm_memory_per_node_or_per_cpu() {
        let env = |k: &str| (k == "SLURM_MEM_PER_CPU").then(|| "512".to_string());
        assert_eq!(slurm_memory_mib(&env, 4), Some(2048));
        let env = |k: &str| match k {
            "SLURM_MEM_PER_NODE" => Some("1000".to_string()),
            "SLURM_MEM_PER_CPU" => Some("512".to_string()),
            _ => None,
        };
        assert_eq!(slurm_memory_mib(&env, 4), Some(1000));
        assert_eq!(slurm_memory_mib(&|_| None, 4), None);
    }

    #[test]
    fn local_task_count_comes_from_slurm() {
        let env = |k: &str| match k {
            "SLURM_STEP_TASKS_PER_NODE" => Some("4(x2)".to_string()),
            _ => None,
        };
        assert_eq!(local_tasks(&env), 4);
        assert_eq!(local_tasks(&|_| None), 1);
    }
}
