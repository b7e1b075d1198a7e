//! `hpcvm`: parses the command line, runs the VM (or talks to a running one), and turns
//! the outcome into an exit status (see `vmm::exit_code` and the README's table).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vmm::admin::sriov::{bind, check_bound, create, list, render, set_guids, to_json};
use vmm::admin::sriov::{Bound, Created, Guid};
use vmm::allocation;
use vmm::api::{client, Command as ApiCommand};
use vmm::assets;
use vmm::config::{
    ControlConfig, CpusConfig, DiskConfig, JobConfig, KernelConfig, MemoryConfig, ShareConfig,
    VmConfig, DEFAULT_GRACE_PERIOD,
};
use vmm::vfio::host::HostPaths;
use vmm::{exit_code, Outcome};

#[derive(Parser)]
#[command(name = "hpcvm", version, about = "A KVM hypervisor for HPC batch jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it stops, is shut down or destroyed; with
    /// `-- CMD`, run CMD in the default guest and exit with its status.
    Run(Box<RunArgs>),
    /// Send one request to a running hpcvm through its API socket and print the reply.
    ///
    /// Exit status: 0 the VMM answered ok, 1 it answered with an error, 2 usage error,
    /// 3 the VMM could not be reached.
    Ctl(CtlArgs),
    /// List SR-IOV devices, create virtual functions, set mlx5 VF GUIDs, bind VFs to
    /// vfio-pci (see docs/vfio.md).
    ///
    /// Exit status: 0 done or nothing to do, 1 failed (reason on stderr), 2 usage error.
    Sriov(SriovArgs),
    /// Check whether this host can run what is asked: KVM, hugepages, IOMMU, passthrough
    /// devices, memlock (see docs/vfio.md).
    ///
    /// Exit status: 0 everything asked can work (warnings allowed), 1 something cannot,
    /// 2 usage error.
    Doctor(DoctorArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: ELF vmlinux (PVH note or 64-bit entry) or bzImage. Default with
    /// `-- CMD`: the kernel built by `make guest`.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs loaded beside the kernel (uncompressed boots fastest).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended to "console=ttyS0 reboot=k panic=-1".
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// vCPUs: N[,topology=S:C:T][,affinity=LIST] with LIST as 0-3 / 2,5,7 / 0@2,1@3
    /// (default 1).
    #[arg(long, value_name = "SPEC", conflicts_with = "from_allocation")]
    cpus: Option<String>,
    /// Guest RAM: SIZE[,hugepages=none|2M|1G|thp][,prefault=on] (default 256M; with
    /// --from-allocation: the job's memory limit minus hpcvm's reserve).
    #[arg(long, value_name = "SPEC")]
    memory: Option<String>,
    /// Size and pin the VM from this job's allocation: one vCPU per CPU of this
    /// process's affinity (its cpuset), pinned 1:1, topology mirroring the host; memory
    /// from the memory cgroup limit or SLURM_MEM_PER_NODE; the launcher's SLURM_*,
    /// OMPI_*, PMI_*, PMIX_* variables passed to the job.
    #[arg(long)]
    from_allocation: bool,
    /// With --from-allocation: one VM per task, the node's memory shared by its tasks
    /// (for `srun -n N hpcvm run --from-allocation --per-task -- ...`).
    #[arg(long, requires = "from_allocation")]
    per_task: bool,
    /// Pass a host PCI function through to the guest: vfio=BDF or
    /// vfio=/sys/bus/pci/devices/BDF, bound to vfio-pci (repeatable; see docs/vfio.md).
    #[arg(long = "device", value_name = "vfio=BDF")]
    devices: Vec<String>,
    /// Attach a disk as virtio-blk: PATH[,readonly=on][,serial=ID][,direct=on]
    /// (repeatable; the guest sees /dev/vda, /dev/vdb, ... in this order).
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,
    /// Run the job in this ext4 root image, opened read-only and shared (writes go to
    /// guest RAM); without `-- CMD`, boot the image's own /sbin/init. Needs nothing of
    /// hpcvm inside the image.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Share a host directory over virtio-fs: HOST_DIR[:GUEST_DIR][,readonly=on]
    /// (repeatable; GUEST_DIR defaults to the same path). Needs virtiofsd.
    #[arg(long = "share", value_name = "SPEC")]
    shares: Vec<String>,
    /// With `-- CMD`, do not share the current directory (by default it is shared at
    /// the same path and the job starts there, as `apptainer exec` does).
    #[arg(long)]
    no_share_cwd: bool,
    /// Control socket (newline-delimited JSON; see docs/api.md), created 0600.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Seconds a shutdown (API, SIGTERM, SIGINT) waits for the guest before destroying it.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_GRACE_PERIOD.as_secs_f64())]
    grace_period: f64,
    /// Copy a host file or directory into the job's guest (repeatable).
    #[arg(long = "file", value_name = "HOST:GUEST")]
    files: Vec<String>,
    /// Set a variable in the job's environment (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// The job's working directory in the guest (default: the shared current
    /// directory, or / with --no-share-cwd).
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// Show the guest console (kernel messages) and agent diagnostics.
    #[arg(long, short)]
    verbose: bool,
    /// Confine each thread with its own seccomp filter: on (a forbidden call ends
    /// hpcvm with 166, naming it), log (allowed, logged by the kernel) or off.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    seccomp: vmm::seccomp::SeccompMode,
    /// Write how the VM ended as JSON (outcome, exit code, whether it is the job's).
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// Command to run in the guest through the guest agent; hpcvm exits with its status.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
struct CtlArgs {
    /// The running VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    request: CtlRequest,
}

#[derive(Subcommand)]
enum CtlRequest {
    /// State, uptime, vCPUs (host CPU, thread id) and memory.
    Status,
    /// Ask the guest to stop; destroy it after the grace period.
    Shutdown {
        /// Grace period in seconds (default: the VMM's --grace-period).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
    /// Stop the VM now.
    Destroy,
    /// Stop the vCPUs until resumed.
    Pause,
    /// Run paused vCPUs again.
    Resume,
}

#[derive(Args)]
struct SriovArgs {
    #[command(subcommand)]
    action: SriovAction,
}

#[derive(Subcommand)]
enum SriovAction {
    /// SR-IOV capable devices with their VFs, drivers and IOMMU groups.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Give a physical function exactly COUNT virtual functions.
    Create {
        /// The PF: BDF (0000:3b:00.0) or sysfs path.
        pf: String,
        /// Number of VFs (0 removes them).
        count: u32,
        /// Replace existing VFs (the kernel destroys them first, even ones VMs use).
        #[arg(long)]
        force: bool,
    },
    /// Bind a VF to vfio-pci; with GUIDs, set an mlx5 VF's InfiniBand GUIDs first.
    Bind {
        /// The VF: BDF or sysfs path.
        vf: String,
        /// Node GUID (11:22:33:44:55:66:77:88).
        #[arg(long, value_name = "GUID", requires = "port_guid")]
        node_guid: Option<Guid>,
        /// Port GUID (11:22:33:44:55:66:77:88).
        #[arg(long, value_name = "GUID", requires = "node_guid")]
        port_guid: Option<Guid>,
    },
}

#[derive(Args)]
struct DoctorArgs {
    /// A device to pass through: BDF or sysfs path (repeatable).
    #[arg(long = "device", value_name = "SPEC")]
    devices: Vec<String>,
    /// Guest RAM to check against hugepage pools and memlock: SIZE[,hugepages=2M|1G].
    #[arg(long, value_name = "SPEC")]
    memory: Option<MemoryConfig>,
}

/// Why the command line cannot become a VM, with the exit status it gets.
struct CliError {
    code: u8,
    message: String,
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

fn config_from(args: RunArgs) -> Result<VmConfig, CliError> {
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
            .map_err(|e: vmm::config::ConfigError| e.to_string())?;
        let memory = args
            .memory
            .as_deref()
            .unwrap_or("256M")
            .parse()
            .map_err(|e: vmm::config::ConfigError| e.to_string())?;
        (cpus, memory)
    };
    let mut job = job;
    if let (Some(job), true) = (job.as_mut(), args.from_allocation) {
        // The launcher's variables first, so that --env can override them.
        let mut env = allocation::passed_env(std::env::vars());
        env.append(&mut job.env);
        job.env = env;
    }
    let cfg = || -> Result<VmConfig, vmm::config::ConfigError> {
        Ok(VmConfig {
            kernel: KernelConfig {
                path: kernel_path,
                initramfs: args.initramfs,
                cmdline: args.cmdline,
            },
            cpus,
            memory,
            control: ControlConfig {
                api_socket: args.api_socket,
                grace_period: Duration::from_secs_f64(args.grace_period),
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
    Ok(cfg().map_err(|e| e.to_string())?)
}

/// The `--share` directories, tagged in order, then the working directory's share.
fn shares(
    specs: &[String],
    cwd: Option<PathBuf>,
) -> Result<Vec<ShareConfig>, vmm::config::ConfigError> {
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
        eprintln!(
            "hpcvm: from allocation: {} vCPUs ({} socket(s) x {} core(s) x {} thread(s)) pinned to host CPUs {}; {} MiB guest RAM ({})",
            a.cpus.count,
            t.sockets,
            t.cores,
            t.threads,
            vmm::host::fmt_cpu_list(a.cpus.affinity.as_deref().unwrap_or(&[])),
            a.memory.size >> 20,
            a.memory_source,
        );
    }
    Ok((a.cpus, a.memory))
}

fn run(args: RunArgs) -> u8 {
    let status_file = args.status_file.clone();
    let on_panic = status_file.clone();
    vmm::fatal::on_panic(move |message| {
        if let Some(p) = &on_panic {
            exit_code::write_status(p, exit_code::INTERNAL, None, message);
        }
    });
    if let Some(p) = &status_file {
        vmm::seccomp::trap::set_status_file(p);
    }
    let report = |code: u8, outcome: Option<&Outcome>, message: &str| {
        if let Some(p) = &status_file {
            exit_code::write_status(p, code, outcome, message);
        }
        code
    };
    let cfg = match config_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hpcvm: error: {}", e.message);
            return report(e.code, None, &e.message);
        }
    };
    match vmm::run(&cfg) {
        Ok(outcome) => {
            let code = exit_code::for_outcome(&outcome);
            let message = outcome.to_string();
            let quiet = matches!(outcome, Outcome::JobExited { .. })
                || (code == exit_code::GUEST_EXITED && cfg.job.is_none());
            if !quiet {
                eprintln!("hpcvm: {message}");
            }
            report(code, Some(&outcome), &message)
        }
        Err(e) => {
            eprintln!("hpcvm: error: {e}");
            report(exit_code::for_error(&e), None, &e.to_string())
        }
    }
}

fn ctl(args: CtlArgs) -> u8 {
    let command = match args.request {
        CtlRequest::Status => ApiCommand::Status,
        CtlRequest::Shutdown { timeout } => ApiCommand::Shutdown { timeout_s: timeout },
        CtlRequest::Destroy => ApiCommand::Destroy,
        CtlRequest::Pause => ApiCommand::Pause,
        CtlRequest::Resume => ApiCommand::Resume,
    };
    match client::call(&args.api_socket, &command) {
        Ok((line, ok)) => {
            println!("{line}");
            if ok {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("hpcvm ctl: {e}");
            3
        }
    }
}

fn sriov(action: SriovAction) -> u8 {
    let paths = HostPaths::real();
    let done = || -> Result<String, vmm::admin::sriov::SriovError> {
        Ok(match action {
            SriovAction::List { json: true } => format!("{}\n", to_json(&list(&paths)?)),
            SriovAction::List { json: false } => render(&list(&paths)?),
            SriovAction::Create { pf, count, force } => match create(&paths, &pf, count, force)? {
                Created::Unchanged => format!("{pf}: already has {count} VFs, nothing to do\n"),
                Created::Changed { from } => format!("{pf}: {from} -> {count} VFs\n"),
            },
            SriovAction::Bind {
                vf,
                node_guid,
                port_guid,
            } => {
                let mut out = String::new();
                if let (Some(node), Some(port)) = (node_guid, port_guid) {
                    let verb = if set_guids(&paths, &vf, node, port)? {
                        "set"
                    } else {
                        "already"
                    };
                    out += &format!("{vf}: GUIDs {verb} node {node} port {port} (policy Follow)\n");
                }
                out += &match bind(&paths, &vf)? {
                    Bound::Already => format!("{vf}: already bound to vfio-pci\n"),
                    Bound::Probed { previous } => {
                        check_bound(&paths, &vf)?;
                        let was = previous.unwrap_or_else(|| "no driver".into());
                        format!("{vf}: bound to vfio-pci (was {was})\n")
                    }
                };
                out
            }
        })
    };
    match done() {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            eprintln!("hpcvm sriov: {e}");
            1
        }
    }
}

fn doctor(args: DoctorArgs) -> u8 {
    let request = vmm::admin::doctor::Request {
        devices: args.devices,
        memory: args.memory,
    };
    let mut checks = vmm::admin::doctor::checks(&HostPaths::real(), &request);
    checks.push(vmm::admin::doctor::virtiofsd(
        vmm::virtio::fs::find_virtiofsd(),
    ));
    print!("{}", vmm::admin::doctor::render(&checks));
    vmm::admin::doctor::exit_status(&checks)
}

fn main() -> ExitCode {
    // First thing: a SIGTERM while hpcvm starts must reach the control loop (as a
    // shutdown), not end the process before it can write a status or clean up.
    let _ = vmm::control::signals::block_stop_signals();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::from(0);
        }
        Err(e) => {
            eprintln!("{}", usage_error(&e));
            return ExitCode::from(exit_code::USAGE);
        }
    };
    if !matches!(cli.command, Command::Run(_)) {
        let _ = vmm::control::signals::unblock_stop_signals();
    }
    ExitCode::from(match cli.command {
        Command::Run(args) => run(*args),
        Command::Ctl(args) => ctl(args),
        Command::Sriov(args) => sriov(args.action),
        Command::Doctor(args) => doctor(args),
    })
}

/// A usage error as hpcvm says it: clap's usage line, then one `hpcvm: error:` line
/// with what is wrong and where help is (clap's own tips assume `--` ends options,
/// which for hpcvm starts the guest command).
fn usage_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = e.render().to_string();
    let usage = text
        .lines()
        .find(|l| l.starts_with("Usage: "))
        .unwrap_or("Usage: hpcvm <COMMAND>");
    // "hpcvm run", "hpcvm ctl": the words before the first option or placeholder.
    let command = usage
        .trim_start_matches("Usage: ")
        .split(' ')
        .take_while(|w| !w.starts_with(['-', '[', '<']))
        .collect::<Vec<_>>()
        .join(" ");
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return format!(
            "{}\nhpcvm: error: no command given; see '{command} --help'",
            text.trim_end()
        );
    }
    let what = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    let mut tips = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix("tip: a similar") {
            tips.push_str(&format!(" (a similar{t})"));
        }
    }
    if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
        let mut c = arg.chars();
        if c.next() == Some('-') && c.next().is_some_and(|d| d.is_ascii_digit() || d == '.') {
            tips.push_str(" (a value that starts with '-' goes after '=': --OPTION=VALUE)");
        }
    }
    format!("{usage}\nhpcvm: error: {what}{tips}; see '{command} --help'")
}
