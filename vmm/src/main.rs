//! `hpcvm`: parses the command line, runs the VM (or talks to a running one), and turns
//! the outcome into an exit status (see `vmm::exit_code` and the README's table).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::admin::sriov::{bind, check_bound, create, list, render, set_guids, to_json};
use vmm::admin::sriov::{Bound, Created, Guid};
use vmm::api::{client, Command as ApiCommand};
use vmm::config::request::RunRequest;
use vmm::config::MemoryConfig;
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
    /// Carry on a VM from a checkpoint (`hpcvm ctl checkpoint`): the job goes on
    /// where it was, its output on this process's stdout, its exit status this
    /// process's, as with `run` (see docs/checkpoint.md).
    Restore(RestoreArgs),
    /// Wait for a VM live-migrated from another hpcvm (`hpcvm ctl migrate`) and run
    /// it on: the job carries on, its output on this process's stdout, its exit
    /// status this process's (see docs/migration.md).
    Receive(ReceiveArgs),
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
    #[command(flatten)]
    request: RunRequest,
    /// Write how the VM ended as JSON (outcome, exit code, whether it is the job's).
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// If DIR holds a checkpoint, carry that VM on instead of booting (a requeued
    /// job); its vCPUs are pinned as this run's, and this run's --api-socket,
    /// --grace-period and --checkpoint-on apply. Otherwise boot as usual.
    #[arg(long, value_name = "DIR")]
    resume_from: Option<PathBuf>,
}

#[derive(Args)]
struct RestoreArgs {
    /// The checkpoint directory.
    dir: PathBuf,
    /// Where to create the API socket (the checkpointed VM's is not reused).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Write how the VM ended as JSON (outcome, exit code, whether it is the job's).
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// Show the guest console (kernel messages) and agent diagnostics.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    checkpoint: vmm::config::request::CheckpointArgs,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Where to wait for the sender: unix:PATH or tcp:HOST:PORT (one sender).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Where to create the API socket (the sender's is not reused).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Write how the VM ended as JSON (outcome, exit code, whether it is the job's).
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// Pin vCPU i to the i-th host CPU of LIST (0-3, 2,5,7), one per vCPU; by
    /// default the vCPUs are not pinned (the sender's CPUs are its host's).
    #[arg(long, value_name = "LIST")]
    affinity: Option<String>,
    /// Show the guest console (kernel messages) and agent diagnostics.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    checkpoint: vmm::config::request::CheckpointArgs,
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
    /// Write a checkpoint of the VM to DIR, then let it run on (see docs/checkpoint.md).
    Checkpoint {
        /// The checkpoint directory (created if missing; a checkpoint in it is replaced).
        dir: PathBuf,
        /// Stop the VM once the checkpoint is written (exit status 173).
        #[arg(long)]
        stop: bool,
    },
    /// Live-migrate the VM to an `hpcvm receive` (unix:PATH or tcp:HOST:PORT); on
    /// success this VMM exits with 175 and the receiver runs the VM on (see
    /// docs/migration.md).
    Migrate {
        /// The receiver's --listen address.
        to: String,
    },
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

/// Sets up the reporting of a command that runs a VM: a panic or a seccomp kill
/// writes `status_file` too; the function returned records an ending there and
/// gives back its exit status.
fn reporting(status_file: Option<PathBuf>) -> impl Fn(u8, Option<&Outcome>, &str) -> u8 {
    let on_panic = status_file.clone();
    vmm::fatal::on_panic(move |message| {
        if let Some(p) = &on_panic {
            exit_code::write_status(p, exit_code::INTERNAL, None, message);
        }
    });
    if let Some(p) = &status_file {
        vmm::seccomp::trap::set_status_file(p);
    }
    move |code, outcome, message| {
        if let Some(p) = &status_file {
            exit_code::write_status(p, code, outcome, message);
        }
        code
    }
}

fn run(args: RunArgs) -> u8 {
    let report = reporting(args.status_file.clone());
    let cfg = match args.request.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hpcvm: error: {}", e.message);
            return report(e.code, None, &e.message);
        }
    };
    let is_job = cfg.job.is_some();
    if let Some(dir) = args
        .resume_from
        .filter(|d| vmm::checkpoint::Checkpoint::exists(d))
    {
        eprintln!("hpcvm: resuming the VM checkpointed in {}", dir.display());
        let host = vmm::RestoreHost {
            api_socket: cfg.control.api_socket,
            grace_period: Some(cfg.control.grace_period),
            checkpoint_on: cfg.control.checkpoint_on,
            affinity: Some(cfg.cpus.affinity),
            verbose: cfg.verbose,
        };
        let result =
            vmm::Vmm::restore(&dir, host, vmm::RunOptions::process()).and_then(vmm::Vmm::run);
        return finish(result, true, report);
    }
    finish(vmm::run(&cfg), is_job, report)
}

fn restore(args: RestoreArgs) -> u8 {
    let report = reporting(args.status_file.clone());
    let checkpoint_on = match args.checkpoint.policy() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hpcvm: error: {}", e.message);
            return report(e.code, None, &e.message);
        }
    };
    let host = vmm::RestoreHost {
        api_socket: args.api_socket,
        checkpoint_on,
        verbose: args.verbose,
        ..Default::default()
    };
    let result =
        vmm::Vmm::restore(&args.dir, host, vmm::RunOptions::process()).and_then(vmm::Vmm::run);
    finish(result, true, report)
}

fn receive(args: ReceiveArgs) -> u8 {
    let report = reporting(args.status_file.clone());
    let fail = |code: u8, message: String| {
        eprintln!("hpcvm: error: {message}");
        report(code, None, &message)
    };
    let checkpoint_on = match args.checkpoint.policy() {
        Ok(p) => p,
        Err(e) => return fail(e.code, e.message),
    };
    let affinity = match args.affinity.as_deref().map(vmm::config::parse_cpu_list) {
        None => None,
        Some(Ok(list)) => Some(list),
        Some(Err(e)) => return fail(exit_code::CONFIG, format!("Invalid --affinity: {e}")),
    };
    let host = vmm::RestoreHost {
        api_socket: args.api_socket,
        checkpoint_on,
        affinity: Some(affinity),
        verbose: args.verbose,
        ..Default::default()
    };
    let listener = match vmm::migration::Address::parse(&args.listen).and_then(|a| a.listen()) {
        Ok(l) => l,
        Err(e) => {
            let e = vmm::Error::from(e);
            return fail(exit_code::for_error(&e), e.to_string());
        }
    };
    eprintln!("hpcvm: waiting for a migration on {}", listener.local());
    let result = vmm::Vmm::receive(&listener, host, vmm::RunOptions::process());
    drop(listener);
    finish(result.and_then(vmm::Vmm::run), true, report)
}

/// Reports how the VM ended (stderr unless it is the job's own status, and the
/// status file through `report`) and returns the exit status.
fn finish(
    result: Result<Outcome, vmm::Error>,
    is_job: bool,
    report: impl Fn(u8, Option<&Outcome>, &str) -> u8,
) -> u8 {
    match result {
        Ok(outcome) => {
            let code = exit_code::for_outcome(&outcome);
            let message = outcome.to_string();
            let quiet = matches!(outcome, Outcome::JobExited { .. })
                || (code == exit_code::GUEST_EXITED && !is_job);
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
        // Relative to where `ctl` runs, not where the VMM does.
        CtlRequest::Checkpoint { dir, stop } => ApiCommand::Checkpoint {
            dir: std::path::absolute(&dir).unwrap_or(dir),
            stop,
        },
        // The VMM does no name lookups: a TCP host name is resolved here.
        CtlRequest::Migrate { to } => {
            match vmm::migration::Address::parse(&to).and_then(|a| a.resolve()) {
                Ok(a) => ApiCommand::Migrate { to: a.to_string() },
                Err(e) => {
                    eprintln!("hpcvm ctl: {e}");
                    return 1;
                }
            }
        }
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
    vmm::log_to_stderr();
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
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Restore(_) | Command::Receive(_)
    ) {
        let _ = vmm::control::signals::unblock_stop_signals();
    }
    ExitCode::from(match cli.command {
        Command::Run(args) => run(*args),
        Command::Restore(args) => restore(args),
        Command::Receive(args) => receive(args),
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
