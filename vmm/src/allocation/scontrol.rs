//! The job's memory as Slurm's controller knows it: a plain `srun --mem=512M` (no
//! sbatch or salloc around it) exports neither SLURM_MEM_PER_NODE nor
//! SLURM_MEM_PER_CPU, and without a cgroup plugin sets no memory limit, so the size
//! is asked of `scontrol show step` (the step's TRES), else `scontrol show job`.

use std::process::{Command, Stdio};

/// The step's (else the job's) memory on this node in MiB, with where it was read.
pub fn memory_mib(env: &dyn Fn(&str) -> Option<String>, cpus: u32) -> Option<(u64, String)> {
    let job = env("SLURM_JOB_ID")?;
    let mut queries = Vec::new();
    if let Some(step) = env("SLURM_STEP_ID") {
        queries.push(("step", format!("{job}.{step}")));
    }
    queries.push(("job", job));
    queries.into_iter().find_map(|(what, id)| {
        let out = Command::new("scontrol")
            .args(["show", what, "-o", &id])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let (mib, field) = parse(&String::from_utf8_lossy(&out.stdout), cpus)?;
        Some((mib, format!("scontrol show {what} {id}: {field}")))
    })
}

/// The memory in `scontrol show -o` output: `MinMemoryNode=`, `MinMemoryCPU=` times
/// `cpus`, or the `mem=` of `TRES=`; with the field as written.
pub fn parse(text: &str, cpus: u32) -> Option<(u64, String)> {
    let mut tres = None;
    for token in text.split_whitespace() {
        if let Some(v) = token.strip_prefix("MinMemoryNode=") {
            if let Some(m) = size_mib(v).filter(|&m| m > 0) {
                return Some((m, token.to_string()));
            }
        } else if let Some(v) = token.strip_prefix("MinMemoryCPU=") {
            if let Some(m) = size_mib(v).filter(|&m| m > 0) {
                return Some((m * u64::from(cpus.max(1)), format!("{token} x {cpus} CPUs")));
            }
        } else if let Some(list) = token.strip_prefix("TRES=") {
            tres = list
                .split(',')
                .find_map(|kv| kv.strip_prefix("mem="))
                .and_then(|v| {
                    size_mib(v)
                        .filter(|&m| m > 0)
                        .map(|m| (m, format!("TRES mem={v}")))
                });
        }
    }
    tres
}

/// Slurm's sizes: a number of MiB, or with a K, M, G or T suffix.
fn size_mib(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, unit) = match v
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit() && *c != '.')
    {
        Some((i, _)) => v.split_at(i),
        None => (v, "M"),
    };
    let n: f64 = num.parse().ok()?;
    let mib = match unit.to_ascii_uppercase().as_str() {
        "K" => n / 1024.0,
        "M" => n,
        "G" => n * 1024.0,
        "T" => n * 1024.0 * 1024.0,
        _ => return None,
    };
    (0.0..1e12).contains(&mib).then_some(mib as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_s_tres_memory_is_read() {
        let step = "StepId=12.0 UserId=0 StartTime=2026-12-03T06:00:00 TimeLimit=UNLIMITED \
                    State=RUNNING Partition=debug NodeList=n1 Nodes=1 CPUs=2 Tasks=1 \
                    TRES=cpu=2,mem=512M,node=1 ResvPorts=(null)";
        assert_eq!(parse(step, 2), Some((512, "TRES mem=512M".into())));
    }

    #[test]
    fn a_job_s_minimum_per_node_or_per_cpu_is_read() {
        let job = "JobId=12 JobName=x MinCPUsNode=2 MinMemoryNode=2G MinTmpDiskNode=0 \
                   TRES=cpu=2,mem=2G,node=1,billing=2";
        assert_eq!(parse(job, 2), Some((2048, "MinMemoryNode=2G".into())));
        let per_cpu = "JobId=13 MinMemoryCPU=300M TRES=cpu=4,mem=1200M,node=1";
        assert_eq!(
            parse(per_cpu, 4),
            Some((1200, "MinMemoryCPU=300M x 4 CPUs".into()))
        );
    }

    #[test]
    fn no_memory_or_nonsense_is_none() {
        assert_eq!(parse("StepId=1.0 TRES=cpu=1,node=1", 1), None);
        assert_eq!(parse("MinMemoryNode=0 TRES=cpu=1,mem=0,node=1", 1), None);
        assert_eq!(parse("MinMemoryNode=12Q", 1), None);
        assert_eq!(parse("", 1), None);
        assert_eq!(size_mib("1024K"), Some(1));
        assert_eq!(size_mib("1.5G"), Some(1536));
        assert_eq!(size_mib("700"), Some(700));
        assert_eq!(size_mib("1e400G"), None);
    }
}
