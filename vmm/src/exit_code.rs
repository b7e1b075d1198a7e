//! hpcvm's exit status: the one place that maps outcomes to numbers.
//!
//! Codes 128-159 are left alone: shells report "killed by signal N" as 128+N, and a
//! wrapper must never mistake a VMM outcome for one.

use crate::control::Outcome;
use crate::vstate::GuestExit;
use crate::Error;

/// The guest reset or powered off: the normal way a guest ends.
pub const GUEST_EXITED: u8 = 0;
/// The command line did not parse (unknown option, missing value).
pub const USAGE: u8 = 2;
/// A configuration value cannot work (vCPU count, topology, affinity, memory size).
pub const CONFIG: u8 = 160;
/// The kernel or initramfs is missing, unreadable, corrupt or does not fit.
pub const IMAGE: u8 = 161;
/// The host cannot provide what was asked (no /dev/kvm, hugepage pool too small, more
/// memory than the host has, KVM refused a setting).
pub const HOST_RESOURCES: u8 = 162;
/// The guest triple-faulted, its kernel panicked, or it reported a crash.
pub const GUEST_CRASHED: u8 = 163;
/// KVM could not emulate a guest instruction, or another KVM internal error.
pub const EMULATION_FAILURE: u8 = 164;
/// A vCPU could not enter or keep running the guest (entry failure, KVM_RUN error).
pub const VCPU_FAILURE: u8 = 165;
/// hpcvm itself failed (a bug, or the host ran out of threads or file descriptors).
pub const INTERNAL: u8 = 166;
/// The guest stopped after a shutdown request (API `shutdown`, SIGTERM, SIGINT).
pub const SHUT_DOWN: u8 = 167;
/// The guest ignored a shutdown request for the whole grace period and was destroyed.
pub const DESTROYED_AFTER_GRACE: u8 = 168;
/// Destroyed on request (API `destroy`, a second SIGTERM or SIGINT).
pub const DESTROYED: u8 = 169;
/// The guest stopped before the agent reported the job's status (kernel panic, agent
/// crash, guest reset from inside the job).
pub const JOB_LOST: u8 = 170;
/// A `--disk` or `--image` is missing, unreadable, locked by another writer, not
/// ext4 (an image) or truncated.
pub const DISK: u8 = 171;
/// A `--share` directory is missing, or virtiofsd is missing, did not start, or
/// cannot hand over its state when `--checkpoint-on` needs it to.
pub const SHARE: u8 = 172;
/// The VM was checkpointed on request (`checkpoint --stop`, `--checkpoint-on`) and
/// stopped; `hpcvm restore` carries it on.
pub const CHECKPOINTED: u8 = 173;
/// A checkpoint to restore is missing, truncated, corrupt, of another format
/// version, from a host with other CPU features, or does not fit its configuration.
pub const CHECKPOINT: u8 = 174;
/// The VM was migrated to another hpcvm (`ctl migrate`), which runs it on.
pub const MIGRATED: u8 = 175;
/// `hpcvm receive` got no VM: bad address, a broken or damaged stream, a VM that
/// does not fit this host, or the sender gave up (the VM runs on there).
pub const MIGRATION: u8 = 176;

/// Every code with its meaning, as documented in README.md.
pub const TABLE: &[(u8, &str)] = &[
    (
        GUEST_EXITED,
        "guest reset or powered off (normal end); with `-- CMD`, the job's status",
    ),
    (USAGE, "command-line usage error"),
    (CONFIG, "invalid configuration value"),
    (IMAGE, "kernel or initramfs unusable"),
    (HOST_RESOURCES, "host cannot provide the resources"),
    (GUEST_CRASHED, "guest triple fault, kernel panic or crash"),
    (EMULATION_FAILURE, "KVM emulation failure / internal error"),
    (VCPU_FAILURE, "vCPU entry failure or KVM_RUN error"),
    (INTERNAL, "hpcvm internal error"),
    (SHUT_DOWN, "guest shut down on request"),
    (
        DESTROYED_AFTER_GRACE,
        "guest ignored shutdown, destroyed after the grace period",
    ),
    (DESTROYED, "destroyed on request"),
    (JOB_LOST, "guest stopped before the job reported its status"),
    (
        DISK,
        "disk or image unusable (missing, unreadable, in use, not ext4, truncated)",
    ),
    (
        SHARE,
        "shared directory unusable (missing, virtiofsd missing or failed, or unable to hand over its state for --checkpoint-on)",
    ),
    (CHECKPOINTED, "checkpointed on request and stopped"),
    (
        CHECKPOINT,
        "checkpoint unusable (missing, truncated, corrupt, other version or CPU)",
    ),
    (MIGRATED, "migrated to another hpcvm, which runs it on"),
    (
        MIGRATION,
        "migration not received (address, stream, or a VM this host cannot run)",
    ),
];

/// Exit status for how the guest ended.
pub fn for_exit(exit: &GuestExit) -> u8 {
    match exit {
        GuestExit::Reset | GuestExit::Poweroff | GuestExit::Halted => GUEST_EXITED,
        GuestExit::TripleFault { .. } | GuestExit::Crash { .. } | GuestExit::KernelPanic => {
            GUEST_CRASHED
        }
        GuestExit::EmulationFailure { .. } | GuestExit::InternalError { .. } => EMULATION_FAILURE,
        GuestExit::EntryFailure { .. } | GuestExit::VcpuFault { .. } => VCPU_FAILURE,
    }
}

/// Exit status for how the VM ended.
pub fn for_outcome(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::GuestExited(e) => for_exit(e),
        Outcome::ShutDown(_) => SHUT_DOWN,
        Outcome::DestroyedAfterGrace { .. } => DESTROYED_AFTER_GRACE,
        Outcome::Destroyed { .. } => DESTROYED,
        Outcome::JobExited { exit, .. } => exit.shell_status(),
        Outcome::JobFailed(e) => e.status,
        Outcome::JobLost(e) => match for_exit(e) {
            GUEST_EXITED => JOB_LOST,
            code => code,
        },
        Outcome::Checkpointed { .. } => CHECKPOINTED,
        Outcome::Migrated { .. } => MIGRATED,
    }
}

/// Who the exit status speaks for: `"job"` when it is the guest job's own status, else
/// `"vmm"` (for `--status-file`).
pub fn source(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::JobExited { .. } | Outcome::JobFailed(_) => "job",
        _ => "vmm",
    }
}

/// A short name for how the VM ended (for `--status-file`).
pub fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::GuestExited(_) => "guest-exited",
        Outcome::ShutDown(_) => "shut-down",
        Outcome::DestroyedAfterGrace { .. } => "destroyed-after-grace",
        Outcome::Destroyed { .. } => "destroyed",
        Outcome::JobExited { .. } => "job-exited",
        Outcome::JobFailed(_) => "job-failed",
        Outcome::JobLost(_) => "job-lost",
        Outcome::Checkpointed { .. } => "checkpointed",
        Outcome::Migrated { .. } => "migrated",
    }
}

/// Exit status for an error that kept the guest from running.
pub fn for_error(err: &Error) -> u8 {
    use crate::boot::BootError;
    use crate::memory::MemoryError;
    use crate::vfio::host::HostError;
    use crate::vstate::VmError;
    match err {
        Error::Config(_) | Error::AffinityNotAllowed { .. } | Error::Api(_) => CONFIG,
        Error::Boot(BootError::Cmdline(_)) => CONFIG,
        Error::Boot(_) => IMAGE,
        Error::Memory(MemoryError::Layout(_)) => INTERNAL,
        Error::Memory(MemoryError::Numa(_)) => CONFIG,
        Error::Memory(_) => HOST_RESOURCES,
        Error::Vm(VmError::OpenKvm(_) | VmError::ApiVersion(_) | VmError::TooManyVcpus { .. }) => {
            HOST_RESOURCES
        }
        Error::Vm(VmError::Kvm { .. } | VmError::OutOfGsis { .. } | VmError::OutOfSlots { .. })
        | Error::VcpuSetup { .. }
        | Error::MsrRejected { .. } => HOST_RESOURCES,
        Error::Passthrough {
            source: HostError::BadAddress { .. } | HostError::NoDevice { .. },
            ..
        } => CONFIG,
        Error::Passthrough { .. } | Error::Pci(_) => HOST_RESOURCES,
        Error::Disk(_) => DISK,
        Error::Share(_) => SHARE,
        Error::Io { .. } | Error::Acpi(_) => INTERNAL,
        Error::Seccomp(crate::seccomp::SeccompError::BadMode(_)) => CONFIG,
        Error::Seccomp(_) => INTERNAL,
        Error::Checkpoint(_) => CHECKPOINT,
        Error::Migration(crate::migration::MigrationError::BadAddress(_)) => CONFIG,
        Error::Migration(_) => MIGRATION,
    }
}

/// The `--status-file` record: one JSON line saying how the VM ended, for a wrapper.
pub fn status_record(code: u8, outcome: Option<&Outcome>, message: &str) -> String {
    let v = match outcome {
        Some(o) => serde_json::json!({
            "exit_code": code,
            "outcome": outcome_name(o),
            "source": source(o),
            "message": message,
        }),
        None => serde_json::json!({
            "exit_code": code, "outcome": "error", "source": "vmm", "message": message,
        }),
    };
    format!("{v}\n")
}

/// Writes [`status_record`] to `path`, saying on stderr if it cannot.
pub fn write_status(path: &std::path::Path, code: u8, outcome: Option<&Outcome>, message: &str) {
    if let Err(e) = std::fs::write(path, status_record(code, outcome, message)) {
        log::error!("cannot write --status-file {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_record_is_one_json_line() {
        let r = status_record(INTERNAL, None, "internal error: \"x\"\nline");
        assert_eq!(r.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v["exit_code"], 166);
        assert_eq!(v["source"], "vmm");
        assert_eq!(v["message"], "internal error: \"x\"\nline");
    }

    #[test]
    fn no_code_in_the_shells_signal_range() {
        for (code, what) in TABLE {
            assert!(
                !(128..=159).contains(code),
                "{code} ({what}) looks like a signal"
            );
        }
    }

    #[test]
    fn the_agent_reports_a_bad_workdir_as_a_config_error() {
        assert_eq!(hpcvm_agent::BAD_WORKDIR_STATUS, CONFIG);
    }

    #[test]
    fn codes_are_distinct() {
        let mut c: Vec<u8> = TABLE.iter().map(|x| x.0).collect();
        c.sort_unstable();
        c.dedup();
        assert_eq!(c.len(), TABLE.len());
    }

    #[test]
    fn readme_documents_every_code() {
        let readme = include_str!("../../README.md");
        for (code, what) in TABLE {
            let row = format!("| {code} | {what} |");
            assert!(readme.contains(&row), "README.md lacks the row `{row}`");
        }
    }

    #[test]
    fn guest_outcomes_map_to_their_codes() {
        assert_eq!(for_exit(&GuestExit::Reset), 0);
        assert_eq!(for_exit(&GuestExit::TripleFault { vcpu: 0 }), GUEST_CRASHED);
        let emu = GuestExit::EmulationFailure {
            vcpu: 1,
            rip: 0x10,
            insn: vec![0xf3],
        };
        assert_eq!(for_exit(&emu), EMULATION_FAILURE);
        assert_eq!(
            for_exit(&GuestExit::EntryFailure { vcpu: 0, reason: 7 }),
            VCPU_FAILURE
        );
        assert_eq!(for_outcome(&Outcome::ShutDown(GuestExit::Reset)), SHUT_DOWN);
        assert_eq!(for_outcome(&Outcome::GuestExited(GuestExit::Poweroff)), 0);
        let grace = std::time::Duration::from_secs(1);
        assert_eq!(for_outcome(&Outcome::DestroyedAfterGrace { grace }), 168);
        assert_eq!(for_outcome(&Outcome::Destroyed { by: "API".into() }), 169);
    }
}
