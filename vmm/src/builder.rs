//! Turns a [`VmConfig`] into a VM ready to run: the data path config -> memory ->
//! vCPUs -> devices, in one function (`build`); [`crate::runner`] runs it.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::{self, AgentLink};
use crate::api::ApiSocket;
use crate::boot::{self, initramfs, BootImage};
use crate::checkpoint::vcpu::{self as vcpu_state, VcpuState};
use crate::checkpoint::{self, Checkpoint, CheckpointError, Snapshotter, VmState};
use crate::config::{CpusConfig, JobConfig, VmConfig};
use crate::control::{self, signals::StopSignals};
use crate::host;
use crate::legacy::LegacyDevices;
use crate::memory::{self, numa::HostNodes, numa::NumaLayout};
use crate::output;
use crate::pci::{Passthrough, PciBus, VirtioSlot};
use crate::runner::{RunOptions, VmAndMemory, Vmm};
use crate::vfio::{self, host::HostPaths};
use crate::virtio::{self, VirtioThread};
use crate::vstate::topology::{places, VcpuPlace};
use crate::vstate::vcpu::{install_kick_handler, Vcpu, VcpuShared};
use crate::vstate::{cpuid, msr, Vm};
use crate::Error;
use devices::virtio::{Console, ConsolePort, InputPort};
use devices::{MmioBus, PioBus};

/// Where a VM's first state comes from.
pub(crate) enum Restore<'a> {
    /// None: the kernel boots.
    Boot,
    /// A checkpoint, read and checked.
    Checkpoint(Box<Checkpoint>),
    /// A live migration's stream: RAM first, then the rest.
    Incoming(&'a mut crate::migration::receive::Incoming),
}

/// Refuses a state whose vCPUs used CPU features this host lacks.
fn check_cpu(state: &VmState, vm: &Vm) -> Result<(), Error> {
    for v in &state.vcpus {
        vcpu_state::check_features(&v.cpuid, &vm.supported_cpuid)
            .map_err(CheckpointError::CpuFeatures)?;
    }
    Ok(())
}

/// Builds the VM described by `config` with `extra` devices on its PCI bus beside
/// the `--device` ones (devices an embedding program opened itself, or fakes in
/// tests): everything up to the vCPUs, which [`Vmm::run`] starts. On an error
/// everything built so far is released.
pub(crate) fn build(
    config: &VmConfig,
    extra: Vec<Passthrough>,
    options: RunOptions,
    restore: Restore<'_>,
) -> Result<Vmm, Error> {
    // Passthrough devices are checked before anything is created.
    let host_devices = vfio::preflight(&HostPaths::real(), &config.devices, config.memory.size)?;
    // Disks are opened, locked and checked, and virtiofsd started for each share,
    // before anything else is created.
    let disks = config
        .disks
        .iter()
        .map(virtio::disk::open)
        .collect::<Result<Vec<_>, _>>()?;
    let shares = config
        .shares
        .iter()
        .enumerate()
        .map(|(i, s)| virtio::fs::Fs::start(s, i, config.seccomp))
        .collect::<Result<Vec<_>, _>>()?;
    if config.control.checkpoint_on.is_some() {
        // Found out now, not when the scheduler's signal comes and the job is lost.
        if let Some(fs) = shares.iter().find(|f| f.hand_over_refusal().is_some()) {
            return Err(virtio::fs::ShareError::NoHandOver {
                dir: fs.dir().to_path_buf(),
            }
            .into());
        }
    }
    let signals = if options.signals {
        // Before any thread exists, so that SIGTERM/SIGINT only reach the control loop.
        control::signals::block_stop_signals().map_err(io_err("blocking SIGTERM/SIGINT"))?;
        Some(StopSignals::new().map_err(io_err("the signalfd"))?)
    } else {
        None
    };
    // Before any thread is confined: what ends hpcvm if one makes a forbidden call.
    crate::seccomp::trap::start(config.seccomp).map_err(io_err("the seccomp reaper thread"))?;
    let out_fd = match options.stdout {
        Some(fd) => fd,
        None => dup_fd(std::io::stdout().as_fd())?,
    };
    let err_fd = match options.stderr {
        Some(fd) => fd,
        None => dup_fd(std::io::stderr().as_fd())?,
    };
    // Guest output from vCPU threads goes through bounded buffers: a full pipe
    // must never block a vCPU.
    let dup = |fd: &OwnedFd| dup_fd(fd.as_fd());
    let (stdout, stdout_thread) = output::start(dup(&out_fd)?, "stdout", config.seccomp)
        .map_err(io_err("the stdout thread"))?;
    let (stderr, stderr_thread) = output::start(dup(&err_fd)?, "stderr", config.seccomp)
        .map_err(io_err("the stderr thread"))?;
    let api = config
        .control
        .api_socket
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()?;

    let software_kvm = host::is_software_kvm();
    let allowed = host::allowed_cpus().map_err(io_err("reading this process's CPU affinity"))?;
    check_affinity(&config.cpus, &allowed)?;

    let host_nodes = HostNodes::read().usable(&allowed, HostNodes::mems_allowed().as_deref());
    let numa = memory::numa::plan(
        config.numa,
        config.cpus.count,
        config.memory.size,
        config.memory.hugepages,
        config.cpus.affinity.as_deref(),
        &host_nodes,
    )?;
    let places = places(&config.cpus.topology);
    let llc_sharing = memory::numa::llc_sharing(&numa, &places, &config.cpus.topology)?;
    let vm = Arc::new(Vm::new(config.cpus.count)?);
    if let Restore::Checkpoint(ck) = &restore {
        // Before any RAM is taken (a migration's state comes after its RAM).
        check_cpu(&ck.state, &vm)?;
    }
    // In-kernel devices on one thread, guest RAM and the kernel image on this one.
    let pci_intx = crate::pci::intx_routes(host_devices.devices.len() + extra.len());
    let (irqchip, loaded) = std::thread::scope(|s| {
        let irqchip = s.spawn(|| vm.create_irqchip());
        let loaded = prepare_memory(
            config,
            (&numa, &host_nodes),
            &places,
            &allowed,
            software_kvm,
            &pci_intx,
            restore,
        );
        (irqchip.join(), loaded)
    });
    irqchip.map_err(|_| io_err("the irqchip thread")(std::io::Error::other("panicked")))??;
    let (mem, image, restore) = loaded?;
    if let Some(state) = &restore {
        check_cpu(state, &vm)?;
    }
    // From here the VM maps guest RAM: `Vmm` drops the VM first.
    let vm = VmAndMemory { vm, mem };
    vm.vm.register_memory(&vm.mem)?;
    let agent = config.job.as_ref().map(|job| {
        AgentLink::new(
            agent::job_spec(job, &config.shares, software_kvm),
            config.verbose,
            Some((stdout.clone(), stderr.clone())),
        )
    });
    // A guest that is not running a job (a plain kernel, or an image's own init)
    // talks on its console.
    let show_console = config.verbose || config.job.as_ref().is_none_or(|j| j.argv.is_empty());
    let mut legacy = LegacyDevices::new(&vm.vm, show_console.then_some(stdout), agent.clone())?;
    let mut mmio = MmioBus::mmio();
    let mut passthrough = vfio::open(&vm.vm.fd, &host_devices)?;
    passthrough.extend(extra);
    let refusal = checkpoint::refusal(passthrough.len())
        .or_else(|| shares.iter().find_map(virtio::fs::Fs::hand_over_refusal));
    let virtio = virtio_slots(config, disks, shares, (&out_fd, &err_fd))?;
    let pci = if passthrough.is_empty() && virtio.is_empty() {
        None
    } else {
        Some(PciBus::build(
            vm.vm.clone(),
            &vm.mem,
            config.memory.size,
            passthrough,
            virtio,
            &mut legacy.pio,
            &mut mmio,
        )?)
    };
    // Written once the buses exist: the tables describe what is on them (a
    // restored guest has them in its RAM already, with its devices' state).
    if let Some(state) = &restore {
        checkpoint::restore::devices(&state.devices, &legacy, pci.as_ref())?;
    } else {
        write_acpi(
            config,
            &vm.mem,
            &places,
            &numa,
            pci.is_some(),
            &pci_intx,
            &legacy,
        )?;
    }
    let virtio_thread = match pci.as_ref().map(PciBus::virtio_devices) {
        Some(devs) if !devs.is_empty() => Some(
            VirtioThread::start(devs, config.seccomp)
                .map_err(io_err("the virtio device thread"))?,
        ),
        _ => None,
    };
    let buses = Buses {
        pio: Arc::new(std::mem::replace(&mut legacy.pio, PioBus::pio())),
        mmio: Arc::new(mmio),
    };
    let vcpu_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the vCPU exit eventfd"))?;
    let shared = Arc::new(VcpuShared::new(
        vcpu_evt
            .try_clone()
            .map_err(io_err("the vCPU exit eventfd"))?,
    ));
    let grace_timer = host::nonblocking_timer().map_err(io_err("the grace timer"))?;
    install_kick_handler().map_err(io_err("the vCPU kick signal handler"))?;
    let vcpus = create_vcpus(
        &vm.vm,
        config,
        llc_sharing,
        &places,
        (image.as_ref(), restore.as_ref().map(|s| s.vcpus.as_slice())),
        &vm.mem,
        &buses,
        &shared,
        software_kvm,
    )?;
    if let Some(state) = &restore {
        checkpoint::machine::restore(&vm.vm.fd, &state.machine)?;
    }
    let snapshot = Snapshotter {
        vm: vm.vm.clone(),
        mem: vm.mem.clone(),
        config: config.clone(),
        com1: legacy.console.clone(),
        i8042: legacy.i8042.clone(),
        agent_port: legacy.agent_port.clone(),
        pci_config: pci.as_ref().map(PciBus::config_io),
        virtio: pci.as_ref().map(PciBus::virtio_devices).unwrap_or_default(),
        refusal,
    };
    let (handle, handle_requests) = crate::handle::channel().map_err(io_err("the VM handle"))?;
    Ok(Vmm {
        snapshot: Some(snapshot),
        virtio_thread,
        pci,
        vcpus,
        buses,
        vm,
        api,
        shared,
        vcpu_evt,
        grace_timer,
        signals,
        legacy,
        agent,
        apic_ids: places.iter().map(|p| p.apic_id).collect(),
        stdout_thread,
        stderr_thread,
        handle,
        handle_requests,
        control: config.control.clone(),
        memory: config.memory,
        seccomp: config.seccomp,
        verbose: config.verbose,
        options_terminal: options.terminal,
        options_slice: options.scheduler_slice,
    })
}

/// Writes the ACPI tables of a freshly booting guest.
fn write_acpi(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    places: &[VcpuPlace],
    numa: &NumaLayout,
    pci: bool,
    pci_intx: &[boot::mptable::PciIntx],
    legacy: &LegacyDevices,
) -> Result<(), Error> {
    crate::acpi::write(
        mem,
        &crate::acpi::Machine {
            cpus: places,
            numa,
            pci: pci.then_some(crate::acpi::PciRoot {
                mmio64: (
                    memory::layout::pci_mmio64_start(config.memory.size),
                    memory::layout::PCI_MMIO64_SIZE,
                ),
                intx: pci_intx,
            }),
            com2: legacy.agent_port.is_some(),
        },
    )?;
    Ok(())
}

/// The buses the vCPUs dispatch exits on.
pub(crate) struct Buses {
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
}

/// The virtio devices the guest gets: the disks in order, the shares, then (for a
/// job) the console whose ports carry the job's stdout and stderr.
fn virtio_slots(
    config: &VmConfig,
    disks: Vec<devices::virtio::Block>,
    shares: Vec<virtio::fs::Fs>,
    (out, err): (&OwnedFd, &OwnedFd),
) -> Result<Vec<VirtioSlot>, Error> {
    let mut slots: Vec<VirtioSlot> = config
        .disks
        .iter()
        .zip(disks)
        .map(|(cfg, dev)| VirtioSlot {
            name: format!("disk {}", cfg.path.display()),
            device: Box::new(dev),
        })
        .collect();
    for fs in shares {
        slots.push(VirtioSlot {
            name: format!("share {}", fs.dir().display()),
            device: Box::new(fs),
        });
    }
    if config.job.as_ref().is_some_and(|j| j.console_stdio) {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(io_err("a copy of stdout/stderr for the job console"))
        };
        let ports = vec![
            ConsolePort {
                name: agent::STDOUT_PORT.into(),
                out: dup(out.as_fd())?,
            },
            ConsolePort {
                name: agent::STDERR_PORT.into(),
                out: dup(err.as_fd())?,
            },
        ];
        let input = match config.job.as_ref().is_some_and(|j| j.stdin) {
            true => Some(InputPort {
                name: agent::STDIN_PORT.into(),
                fd: dup(std::io::stdin().as_fd())?,
            }),
            false => None,
        };
        slots.push(VirtioSlot {
            name: "the job console".into(),
            device: Box::new(Console::with_input(ports, input)),
        });
    }
    Ok(slots)
}

/// Writes the job's initramfs into a memfd.
fn job_initramfs(job: &JobConfig) -> Result<File, Error> {
    let file = host::memfd(c"hpcvm-initramfs").map_err(io_err("the initramfs memfd"))?;
    let contents = initramfs::Contents {
        agent: &job.agent,
        busybox: job.busybox.as_deref(),
        files: &job.files,
    };
    let file = initramfs::write(&contents, std::io::BufWriter::new(file))
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(|e| {
            Error::Boot(boot::BootError::InitramfsRead {
                path: PathBuf::from("(job initramfs)"),
                source: e,
            })
        })?;
    Ok(file)
}

/// A descriptor of hpcvm's own for `fd` (stdout, stderr).
fn dup_fd(fd: std::os::fd::BorrowedFd<'_>) -> Result<std::os::fd::OwnedFd, Error> {
    fd.try_clone_to_owned()
        .map_err(io_err("a copy of stdout/stderr"))
}

/// Guest RAM the guest kernel takes before the initramfs is unpacked.
const JOB_RAM_RESERVE: u64 = 32 << 20;

/// A job initramfs must unpack whole, and the guest kernel unpacks it into a tmpfs
/// that may grow to half of the RAM free at that point, while the archive itself
/// still takes its size: the files fit if 3 x archive + the kernel's share is at
/// most guest RAM (measured: a 256 MiB guest gives the root tmpfs 89 MiB beside a
/// 60 MiB archive). Refuse one that cannot fit rather than let the guest unpack part
/// of it (the agent refuses such a job too, in case this estimate is short).
fn check_initramfs_fits(initramfs: &File, ram: u64) -> Result<(), Error> {
    let size = initramfs
        .metadata()
        .map_err(io_err("the initramfs memfd"))?
        .len();
    let needed = size.saturating_mul(3).saturating_add(JOB_RAM_RESERVE);
    if needed > ram {
        return Err(Error::Boot(boot::BootError::JobFilesTooBig {
            size,
            needed: needed.next_multiple_of(1 << 20),
            ram,
        }));
    }
    Ok(())
}

/// Guest RAM with the kernel, initramfs and boot structures in it.
fn prepare_memory(
    config: &VmConfig,
    (numa, host_nodes): (&NumaLayout, &HostNodes),
    places: &[VcpuPlace],
    allowed: &[usize],
    software_kvm: bool,
    pci_intx: &[boot::mptable::PciIntx],
    restore: Restore<'_>,
) -> Result<(GuestMemoryMmap, Option<BootImage>, Option<VmState>), Error> {
    let mem = memory::create_guest_memory(&config.memory, !config.shares.is_empty())?;
    // Before any page is touched: the policy decides where each page comes from.
    memory::numa::bind(&mem, numa, config.memory.hugepages)?;
    if config.memory.prefault {
        let affinity = config.cpus.affinity.as_deref();
        let parts = memory::numa::prefault_parts(&mem, numa, affinity, allowed, host_nodes)?;
        memory::prefault::prefault_parts(&parts, config.memory.hugepages.bytes())?;
    }
    // The kernel, its tables and everything since are in the saved RAM.
    match restore {
        Restore::Checkpoint(ck) => {
            ck.load_memory(&mem)?;
            return Ok((mem, None, Some(ck.state)));
        }
        Restore::Incoming(incoming) => {
            let state = incoming.receive_memory(&mem)?;
            return Ok((mem, None, Some(state)));
        }
        Restore::Boot => {}
    }
    let ram = config.memory.size;
    let cmdline = guest_cmdline(config, software_kvm);
    // A job's initramfs is built in memory; the loader reads it through /proc/self/fd.
    let (kernel, _initramfs_memfd) = match &config.job {
        Some(job) => {
            let fd = job_initramfs(job)?;
            check_initramfs_fits(&fd, ram)?;
            let mut k = config.kernel.clone();
            k.initramfs = Some(PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())));
            (k, Some(fd))
        }
        None => (config.kernel.clone(), None),
    };
    let image = boot::load(&kernel, &cmdline, &mem, ram)?;
    boot::params::write(&image, &mem, ram)?;
    boot::regs::write_tables(&mem, image.protocol)?;
    boot::mptable::write(&mem, places, pci_intx)?;
    Ok((mem, Some(image), None))
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// The kernel command line: hpcvm's defaults, the user's items, and on a software-KVM
/// host the switches that keep the guest kernel off instructions its emulator lacks.
/// (That KVM passes the host's CPUID feature bits through whatever the VMM sets, so
/// the CPUID filter alone cannot hide them there.)
pub fn guest_cmdline(config: &VmConfig, software_kvm: bool) -> String {
    let mut cmdline = config.kernel.full_cmdline();
    if config.job.is_some() && !config.verbose {
        // Every console byte is a VM exit; a job's guest says nothing unless asked.
        cmdline.push_str(" quiet");
    }
    if software_kvm {
        cmdline.push(' ');
        cmdline.push_str(cpuid::SOFTWARE_KVM_CMDLINE);
        if config.job.is_some() {
            // Unknown KEY=VALUE parameters become init's environment.
            cmdline.push_str(" GLIBC_TUNABLES=");
            cmdline.push_str(cpuid::SOFTWARE_KVM_GLIBC_TUNABLES);
        }
    }
    cmdline
}

/// Refuses pinning to CPUs outside this process's affinity mask (its cpuset): the
/// scheduler would refuse them anyway, after the guest had started.
fn check_affinity(cpus: &CpusConfig, allowed: &[usize]) -> Result<(), Error> {
    let Some(aff) = &cpus.affinity else {
        return Ok(());
    };
    match aff.iter().find(|c| !allowed.contains(c)) {
        Some(&cpu) => Err(Error::AffinityNotAllowed {
            cpu,
            allowed: host::fmt_cpu_list(allowed),
        }),
        None => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn create_vcpus(
    vm: &Vm,
    config: &VmConfig,
    llc_sharing: Option<u32>,
    places: &[VcpuPlace],
    (image, saved): (Option<&BootImage>, Option<&[VcpuState]>),
    mem: &GuestMemoryMmap,
    buses: &Buses,
    shared: &Arc<VcpuShared>,
    software_kvm: bool,
) -> Result<Vec<Vcpu>, Error> {
    let msrs = msr::boot_msrs(&vm.msr_index);
    let msr_index: Arc<[u32]> = vm.msr_index.clone().into();
    let has_xcrs = vm.kvm.check_extension(kvm_ioctls::Cap::Xcrs);
    let vcpu = |i: u32, fd, cpuid: &[kvm_bindings::kvm_cpuid_entry2]| Vcpu {
        index: i,
        fd,
        host_cpu: config.cpus.affinity.as_ref().map(|a| a[i as usize]),
        pio: buses.pio.clone(),
        mmio: buses.mmio.clone(),
        mem: mem.clone(),
        shared: shared.clone(),
        seccomp: config.seccomp,
        msr_index: msr_index.clone(),
        has_xcrs,
        cpuid: cpuid.into(),
    };
    let mut vcpus = Vec::with_capacity(places.len());
    for place in places {
        let i = place.index;
        let setup = |what| {
            move |source| Error::VcpuSetup {
                vcpu: i,
                what,
                source,
            }
        };
        let fd = vm
            .fd
            .create_vcpu(u64::from(place.apic_id))
            .map_err(setup("CREATE_VCPU"))?;
        if let Some(state) = saved.and_then(|s| s.get(i as usize)) {
            vcpu_state::restore(&fd, state).map_err(|error| CheckpointError::Kvm {
                what: "restore",
                error: format!("vCPU {i}: {error}"),
            })?;
            vcpus.push(vcpu(i, fd, &state.cpuid));
            continue;
        }
        let cpuid = cpuid::vcpu_cpuid(
            &vm.supported_cpuid,
            &config.cpus.topology,
            place,
            software_kvm,
            llc_sharing,
        );
        fd.set_cpuid2(&cpuid).map_err(setup("SET_CPUID2"))?;
        let set = fd.set_msrs(&msrs).map_err(setup("SET_MSRS"))?;
        if let Some(rejected) = msrs.as_slice().get(set) {
            return Err(Error::MsrRejected {
                vcpu: i,
                msr: rejected.index,
            });
        }
        boot::regs::setup_lapic(&fd).map_err(setup("SET_LAPIC"))?;
        if let (0, Some(image)) = (i, image) {
            boot::regs::setup_boot_vcpu(&fd, image).map_err(setup("SET_REGS"))?;
        }
        vcpus.push(vcpu(i, fd, cpuid.as_slice()));
    }
    Ok(vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_outside_the_allowed_set_is_named() {
        let cpus: CpusConfig = "2,affinity=0,9".parse().unwrap();
        let err = check_affinity(&cpus, &[0, 1, 2, 3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--cpus affinity names host CPU 9, which this process may not use (allowed: 0-3)"
        );
        check_affinity(&"2,affinity=3,1".parse().unwrap(), &[0, 1, 2, 3]).unwrap();
    }
}
