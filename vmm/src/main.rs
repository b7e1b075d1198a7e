//! `hpcvm`: parses the command line, runs the VM (or talks to a running one), and turns
//! the outcome into an exit status (see `vmm::exit_code` and the README's table).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vmm::api::{client, Command as ApiCommand};
use vmm::config::{ControlConfig, KernelConfig, VmConfig, DEFAULT_GRACE_PERIOD};
use vmm::exit_code;

#[derive(Parser)]
#[command(name = "hpcvm", version, about = "A KVM hypervisor for HPC batch jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel and run it until it stops, is shut down or destroyed.
    Run(RunArgs),
    /// Send one request to a running hpcvm through its API socket and print the reply.
    ///
    /// Exit status: 0 the VMM answered ok, 1 it answered with an error, 2 usage error,
    /// 3 the VMM could not be reached.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: ELF vmlinux (PVH note or 64-bit entry) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs loaded beside the kernel (uncompressed boots fastest).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended to "console=ttyS0 reboot=k panic=-1".
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// vCPUs: N[,topology=S:C:T][,affinity=LIST] with LIST as 0-3 / 2,5,7 / 0@2,1@3.
    #[arg(long, value_name = "SPEC", default_value = "1")]
    cpus: String,
    /// Guest RAM: SIZE[,hugepages=none|2M|1G|thp][,prefault=on].
    #[arg(long, value_name = "SPEC", default_value = "256M")]
    memory: String,
    /// Control socket (newline-delimited JSON; see docs/api.md), created 0600.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Seconds a shutdown (API, SIGTERM, SIGINT) waits for the guest before destroying it.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_GRACE_PERIOD.as_secs_f64())]
    grace_period: f64,
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

fn config_from(args: RunArgs) -> Result<VmConfig, String> {
    if !(args.grace_period.is_finite() && (0.0..=86_400.0).contains(&args.grace_period)) {
        return Err(format!(
            "Invalid --grace-period '{}': must be from 0 to 86400 seconds",
            args.grace_period
        ));
    }
    let cfg = || -> Result<VmConfig, vmm::config::ConfigError> {
        Ok(VmConfig {
            kernel: KernelConfig {
                path: args.kernel,
                initramfs: args.initramfs,
                cmdline: args.cmdline,
            },
            cpus: args.cpus.parse()?,
            memory: args.memory.parse()?,
            control: ControlConfig {
                api_socket: args.api_socket,
                grace_period: Duration::from_secs_f64(args.grace_period),
            },
        })
    };
    cfg().map_err(|e| e.to_string())
}

fn run(args: RunArgs) -> u8 {
    let cfg = match config_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hpcvm: error: {e}");
            return exit_code::CONFIG;
        }
    };
    match vmm::run(&cfg) {
        Ok(outcome) => {
            let code = exit_code::for_outcome(&outcome);
            if code != exit_code::GUEST_EXITED {
                eprintln!("hpcvm: {outcome}");
            }
            code
        }
        Err(e) => {
            eprintln!("hpcvm: error: {e}");
            exit_code::for_error(&e)
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit_code::USAGE } else { 0 });
        }
    };
    ExitCode::from(match cli.command {
        Command::Run(args) => run(args),
        Command::Ctl(args) => ctl(args),
    })
}
