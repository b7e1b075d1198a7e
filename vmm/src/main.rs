//! `hpcvm`: parses the command line, runs the VM, and turns the outcome into an exit
//! status (see `vmm::exit_code` and the README's table).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{KernelConfig, VmConfig};
use vmm::exit_code;

#[derive(Parser)]
#[command(name = "hpcvm", version, about = "A KVM hypervisor for HPC batch jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel and run it until it resets or powers off.
    Run(RunArgs),
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
}

fn config_from(args: RunArgs) -> Result<VmConfig, vmm::Error> {
    Ok(VmConfig {
        kernel: KernelConfig {
            path: args.kernel,
            initramfs: args.initramfs,
            cmdline: args.cmdline,
        },
        cpus: args.cpus.parse()?,
        memory: args.memory.parse()?,
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit_code::USAGE } else { 0 });
        }
    };
    let Command::Run(args) = cli.command;
    let outcome = config_from(args).and_then(|cfg| vmm::run(&cfg));
    match outcome {
        Ok(exit) => {
            let code = exit_code::for_exit(&exit);
            if code != exit_code::GUEST_EXITED {
                eprintln!("hpcvm: {exit}");
            }
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("hpcvm: error: {e}");
            ExitCode::from(exit_code::for_error(&e))
        }
    }
}
