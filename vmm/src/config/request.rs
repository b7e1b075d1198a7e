//! `hpcvm run`'s options as the user wrote them ([`RunRequest`], parsed by clap in
//! the binary) and their assembly into a [`VmConfig`]: the job's guest and files,
//! the shared working directory, sizing from the allocation, and the checks that
//! need several options at once. The binary only parses; this decides.
// The options' doc comments are clap's help text, where [,key=value] means optional.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::allocation;
use crate::assets;
use crate::config::{
    CheckpointOn, ControlConfig, CpusConfig, DiskConfig, JobConfig, KernelConfig, MemoryConfig,
    ShareConfig, VmConfig, DEFAULT_GRACE_PERIOD,
};
use crate::exit_code;

/// The options of `hpcvm run`, as the user wrote them.
#[derive(Debug, Clone, Args)]
pub struct RunRequest {
    /// Guest kernel: ELF vmlinux (PVH note or 64-bit entry) or bzImage. Default with
    /// `-- CMD`: the kernel built by `make guest`.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs loaded beside the kernel (uncompressed boots fastest).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended to "console=ttyS0 reboot=k panic=-1".
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// vCPUs: N[,topology=S:C:T][,affinity=LIST] with LIST as 0-3 / 2,5,7 / 0@2,1@3
    /// (default 1).
    #[arg(long, value_name = "SPEC", conflicts_with = "from_allocation")]
    pub cpus: Option<String>,
    /// Guest RAM: SIZE[,hugepages=none|2M|1G|thp][,prefault=on] (default 256M; with
    /// --from-allocation: the job's memory limit minus hpcvm's reserve).
    #[arg(long, value_name = "SPEC")]
    pub memory: Option<String>,
    /// Guest NUMA nodes: auto (one per host node the pinned vCPUs use, RAM bound to
    /// it), off, or N nodes with the vCPUs and RAM split evenly (default auto).
    #[arg(long, value_name = "auto|off|N", default_value = "auto")]
    pub numa: String,
    /// Size and pin the VM from this job's allocation: one vCPU per CPU of this
    /// process's affinity (its cpuset), pinned 1:1, topology mirroring the host; memory
    /// from the memory cgroup limit, SLURM_MEM_PER_NODE/PER_CPU or scontrol; the job's
    /// identity (SLURM_JOB_ID, ...) passed to the job, all of the launcher's SLURM_*,
    /// OMPI_*, PMI_*, PMIX_* variables with --per-task.
    #[arg(long)]
    pub from_allocation: bool,
    /// With --from-allocation: one VM per task, the node's memory shared by its tasks
    /// (for `srun -n N hpcvm run --from-allocation --per-task -- ...`).
    #[arg(long, requires = "from_allocation")]
    pub per_task: bool,
    /// Pass a host PCI function through to the guest: vfio=BDF or
    /// vfio=/sys/bus/pci/devices/BDF, bound to vfio-pci (repeatable; see docs/vfio.md).
    #[arg(long = "device", value_name = "vfio=BDF")]
    pub devices: Vec<String>,
    /// Attach a disk as virtio-blk: PATH[,readonly=on][,serial=ID][,direct=on]
    /// (repeatable; the guest sees /dev/vda, /dev/vdb, ... in this order).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// Run the job in this ext4 root image, opened read-only and shared (writes go to
    /// guest RAM); without `-- CMD`, boot the image's own /sbin/init. Needs nothing of
    /// hpcvm inside the image.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Share a host directory over virtio-fs: HOST_DIR[:GUEST_DIR][,readonly=on]
    /// (repeatable; GUEST_DIR defaults to the same path). Needs virtiofsd.
    #[arg(long = "share", value_name = "SPEC")]
    pub shares: Vec<String>,
    /// With `-- CMD`, do not share the current directory (by default it is shared at
    /// the same path and the job starts there, as `apptainer exec` does).
    #[arg(long)]
    pub no_share_cwd: bool,
    /// With `-- CMD`, run the job as root in the guest. By default it runs as the
    /// caller's uid and gid, so that what it writes in shared directories is the
    /// caller's.
    #[arg(long)]
    pub guest_root: bool,
    /// Control socket (newline-delimited JSON; see docs/api.md), created 0600.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Seconds a shutdown (API, SIGTERM, SIGINT) waits for the guest before destroying it.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_GRACE_PERIOD.as_secs_f64())]
    pub grace_period: f64,
    /// Copy a host file or directory into the job's guest (repeatable).
    #[arg(long = "file", value_name = "HOST:GUEST")]
    pub files: Vec<String>,
    /// Set a variable in the job's environment (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// The job's working directory in the guest (default: the shared current
    /// directory, or / with --no-share-cwd).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Show the guest console (kernel messages) and agent diagnostics.
    #[arg(long, short)]
    pub verbose: bool,
    /// Confine each thread with its own seccomp filter: on (a forbidden call ends
    /// hpcvm with 166, naming it), log (allowed, logged by the kernel) or off.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    pub seccomp: crate::seccomp::SeccompMode,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
    /// Command to run in the guest through the guest agent; hpcvm exits with its status.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `--checkpoint-on SIGNAL --checkpoint-dir DIR` (for `run` and `restore`).
#[derive(Debug, Clone, Default, Args)]
pub struct CheckpointArgs {
    /// On this signal (SIGUSR1, SIGUSR2 or SIGTERM), write a checkpoint of the VM to
    /// --checkpoint-dir and stop with exit status 173 (for `sbatch --signal=USR1@120
    /// --requeue`; see docs/checkpoint.md). Needs --no-share-cwd and no --share/--device.
    #[arg(long, value_name = "SIGNAL", requires = "checkpoint_dir")]
    pub checkpoint_on: Option<String>,
    /// Where --checkpoint-on writes the checkpoint (created if missing, replaced if there).
    #[arg(long, value_name = "DIR", requires = "checkpoint_on")]
    pub checkpoint_dir: Option<PathBuf>,
}

impl CheckpointArgs {
    /// The checked policy, if one was asked for.
    pub fn policy(&self) -> Result<Option<CheckpointOn>, CliError> {
        let (Some(signal), Some(dir)) = (&self.checkpoint_on, &self.checkpoint_dir) else {
            return Ok(None);
        };
        let signal = crate::config::checkpoint::parse_signal(signal)?;
        let dir = std::path::absolute(dir)
            .map_err(|e| format!("Invalid --checkpoint-dir '{}': {e}", dir.display()))?;
        Ok(Some(CheckpointOn { signal, dir }))
    }
}

/// Why the options cannot become a VM, with the exit status it gets.
#[derive(Debug)]
pub struct CliError {
    /// The exit status it gets.
    pub code: u8,
    /// What is wrong, with the fix.
    pub message: String,
}

impl From<String> for CliError {
    fn from(message: String) -> Self {
        Self {
            code: exit_code::CONFIG,
            message,
        }
    }
}

impl From<&str> for CliError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl RunRequest {
    /// Checks the options and turns them into a VM's configuration.
    pub fn into_config(self) -> Result<VmConfig, CliError> {
        config_from(self)
    }
}

fn config_from(args: RunRequest) -> Result<VmConfig, CliError> {
    let checkpoint_on = args.checkpoint.policy()?;
    if !(args.grace_period.is_finite() && (0.0..=86_400.0).contains(&args.grace_period)) {
        return Err(format!(
            "Invalid --grace-period '{}': must be from 0 to 86400 seconds",
            args.grace_period
        )
        .into());
    }
    let job = if args.command.is_empty() && args.image.is_none() {
        if !args.files.is_empty() || !args.env.is_empty() {
            return Err("--file and --env apply to a command given after --".into());
        }
        None
    } else {
        if args.initramfs.is_some() {
            return Err(
                "--initramfs cannot be combined with -- CMD: the job's initramfs is \
                        generated (add files to it with --file)"
                    .into(),
            );
        }
        let assets =
            assets::locate(&assets::guest_dir(), args.kernel.as_deref()).map_err(|e| CliError {
                code: exit_code::IMAGE,
                message: e.to_string(),
            })?;
        let env = args
            .env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(format!("Invalid --env '{kv}': must be NAME=VALUE")),
            })
            .collect::<Result<_, _>>()?;
        let files = args
            .files
            .iter()
            .map(|f| f.parse())
            .collect::<Result<_, _>>()?;
        let cwd_share = if args.no_share_cwd {
            None
        } else {
            let dir = std::env::current_dir().map_err(|e| {
                format!("Cannot share the current directory: {e} (or pass --no-share-cwd)")
            })?;
            Some(dir)
        };
        let cwd = match (&args.workdir, &cwd_share) {
            (Some(w), _) => w.clone(),
            (None, Some(d)) => d.display().to_string(),
            (None, None) => "/".into(),
        };
        Some((
            assets.kernel,
            cwd_share,
            JobConfig {
                argv: args.command,
                env,
                cwd,
                files,
                agent: assets.agent,
                busybox: assets.busybox,
                console_stdio: true,
                image: args.image.is_some(),
                user: (!args.guest_root).then(crate::config::caller_identity),
                // A terminal stays the console's; anything else (a pipe, a file,
                // /dev/null) is the job's input, as with `apptainer exec`.
                stdin: !std::io::IsTerminal::is_terminal(&std::io::stdin()),
            },
        ))
    };
    let (kernel_path, cwd_share, job) = match (job, args.kernel) {
        (Some((k, c, j)), _) => (k, c, Some(j)),
        (None, Some(k)) => (k, None, None),
        (None, None) => {
            return Err(
                "Nothing to boot: give --kernel PATH, or a command after -- \
                        (e.g. hpcvm run -- uname -a)"
                    .into(),
            )
        }
    };
    let (cpus, memory) = if args.from_allocation {
        from_allocation(args.memory.as_deref(), args.per_task, args.verbose)?
    } else {
        let cpus = args
            .cpus
            .as_deref()
            .unwrap_or("1")
            .parse()
            .map_err(|e: crate::config::ConfigError| e.to_string())?;
        let memory = args
            .memory
            .as_deref()
            .unwrap_or("256M")
            .parse()
            .map_err(|e: crate::config::ConfigError| e.to_string())?;
        (cpus, memory)
    };
    let mut job = job;
    if let (Some(job), true) = (job.as_mut(), args.from_allocation) {
        // The launcher's variables first, so that --env can override them.
        let mut env = allocation::passed_env(std::env::vars(), args.per_task);
        env.append(&mut job.env);
        job.env = env;
    }
    let cfg = || -> Result<VmConfig, crate::config::ConfigError> {
        Ok(VmConfig {
            kernel: KernelConfig {
                path: kernel_path,
                initramfs: args.initramfs,
                cmdline: args.cmdline,
            },
            cpus,
            memory,
            numa: args.numa.parse()?,
            control: ControlConfig {
                api_socket: args.api_socket,
                grace_period: Duration::from_secs_f64(args.grace_period),
                checkpoint_on: checkpoint_on.clone(),
            },
            job,
            devices: args
                .devices
                .iter()
                .map(|d| d.parse())
                .collect::<Result<_, _>>()?,
            disks: args
                .disks
                .iter()
                .map(|d| d.parse())
                .chain(args.image.iter().map(|p| Ok(DiskConfig::image(p.clone()))))
                .collect::<Result<_, _>>()?,
            shares: shares(&args.shares, cwd_share)?,
            verbose: args.verbose,
            seccomp: args.seccomp,
        })
    };
    let cfg = cfg().map_err(|e| e.to_string())?;
    if let Some(on) = &checkpoint_on {
        // Found out now, not when the scheduler's signal comes and the job is lost.
        if let Some(why) = crate::checkpoint::refusal(cfg.devices.len()) {
            return Err(format!(
                "--checkpoint-on {}: cannot checkpoint this VM: {why}",
                crate::control::signals::name(on.signal)
            )
            .into());
        }
    }
    Ok(cfg)
}

/// The `--share` directories, tagged in order, then the working directory's share.
fn shares(
    specs: &[String],
    cwd: Option<PathBuf>,
) -> Result<Vec<ShareConfig>, crate::config::ConfigError> {
    let mut out = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut share: ShareConfig = s.parse()?;
            share.tag = format!("hpcvm-share{i}");
            Ok(share)
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A --share of the working directory itself replaces the default one.
    if let Some(dir) = cwd.filter(|d| !out.iter().any(|s| s.guest_dir == d.display().to_string())) {
        out.push(ShareConfig::cwd(dir));
    }
    Ok(out)
}

/// vCPUs and memory from this job's allocation (`--from-allocation`).
fn from_allocation(
    memory: Option<&str>,
    per_task: bool,
    verbose: bool,
) -> Result<(CpusConfig, MemoryConfig), String> {
    let a = allocation::from_allocation(memory, per_task).map_err(|e| e.to_string())?;
    if verbose {
        let t = a.cpus.topology;
        log::info!(
            "from allocation: {} vCPUs ({} socket(s) x {} core(s) x {} thread(s)) pinned to host CPUs {}; {} MiB guest RAM ({})",
            a.cpus.count,
            t.sockets,
            t.cores,
            t.threads,
            crate::host::fmt_cpu_list(a.cpus.affinity.as_deref().unwrap_or(&[])),
            a.memory.size >> 20,
            a.memory_source,
        );
    }
    Ok((a.cpus, a.memory))
}
