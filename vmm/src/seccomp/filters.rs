//! What each thread may call once it runs, found by running every path of the test
//! suite under `--seccomp log` and reading the kernel's log, then cut to the calls
//! each thread's own work needs.
//!
//! * `vcpuN`: KVM_RUN and what the exit handlers do (device registers, MSI-X routes,
//!   ioeventfds and irqfds the guest's drivers set up, passthrough register access);
//!   its ioctls are checked by request number.
//! * `virtio` (and `virtio-drain`): the device thread: rings, disk I/O, the console,
//!   the vhost-user messages of a share whose virtiofsd ended.
//! * `stdout`, `stderr`: the output pumps: write, and wait for more.
//! * the control thread (`main`): the control loop, the API socket, signals, checkpoints, and the
//!   whole teardown (guest RAM, passthrough devices, virtiofsd, the socket file,
//!   the status record); it starts the drain thread, which inherits its filter.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqfd,
    kvm_lapic_state, kvm_mp_state, kvm_msi, kvm_msrs, kvm_regs, kvm_sregs, kvm_translation,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The threads that carry a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// A vCPU.
    Vcpu,
    /// The virtio device thread.
    Device,
    /// A stdout or stderr pump.
    Output,
    /// The control loop and teardown.
    Control,
}

impl Thread {
    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Thread::Vcpu => "vCPU",
            Thread::Device => "virtio device",
            Thread::Output => "output",
            Thread::Control => "control",
        }
    }
}

ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
// What a parked vCPU reads of itself for a checkpoint.
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
// VFIO's ioctls carry no size in their number.
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE as u32, VFIO_BASE + 9);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// What any thread of a Rust program does: memory, locks, its own end.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    // Descriptor flags (and debug builds' check of every descriptor they close).
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The device thread's work (also the control thread's: the drain pass).
const DEVICE: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_readv,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    // Whether a virtiofsd that ended has been reaped (a share's backend watch).
    libc::SYS_wait4,
    libc::SYS_waitid,
];

/// The vCPU's calls besides its ioctls.
const VCPU: &[libc::c_long] = &[
    // Passthrough register access.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    // vhost-user set-up when the guest activates a share, and its error path.
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_eventfd2,
    libc::SYS_wait4,
    libc::SYS_waitid,
    // An MSI-X pending bit is an eventfd that may hold an interrupt (PBA reads).
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The control thread's own calls besides the device work.
const CONTROL: &[libc::c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_timerfd_create,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_getsockopt,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_tgkill,
    libc::SYS_kill,
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_ftruncate,
    libc::SYS_dup,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_getuid,
    // Writing a checkpoint (and reading MSI-X pending bits for it).
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rename,
    // Live migration: connecting to the receiver (by numeric address: no resolver).
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    // The pipe a share's virtiofsd sends its state through, and, when its rings
    // restart, a loose interrupt eventfd for a queue the driver gave no vector.
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
];

/// The ioctls a vCPU thread may make, by request number.
fn vcpu_ioctls() -> Vec<u64> {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_CPUID2(),
        KVM_GET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
        // The instruction bytes of an emulation failure, on kernels that do not
        // report them.
        KVM_TRANSLATE(),
        // The memory slot count, when the guest moves a mappable passthrough BAR.
        KVM_CHECK_EXTENSION(),
        KVM_IRQ_LINE(),
        KVM_SET_GSI_ROUTING(),
        KVM_IRQFD(),
        KVM_IOEVENTFD(),
        KVM_SIGNAL_MSI(),
        KVM_SET_USER_MEMORY_REGION(),
        VFIO_DEVICE_GET_REGION_INFO(),
        VFIO_DEVICE_GET_IRQ_INFO(),
        VFIO_DEVICE_SET_IRQS(),
        VFIO_DEVICE_RESET(),
        libc::FIONBIO,
    ]
    .to_vec()
}

/// The syscalls `thread` may make: each with its rules (none: any arguments).
fn rules(thread: Thread) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error> {
    let lists: &[&[libc::c_long]] = match thread {
        Thread::Vcpu => &[COMMON, VCPU],
        Thread::Device => &[COMMON, DEVICE],
        Thread::Output => &[COMMON],
        Thread::Control => &[COMMON, DEVICE, CONTROL],
    };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = lists
        .iter()
        .flat_map(|l| l.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    if thread == Thread::Vcpu {
        map.insert(libc::SYS_ioctl, ioctl_rules(&vcpu_ioctls())?);
    }
    Ok(map)
}

/// One rule per allowed request: ioctl's second argument equal to it.
fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::Error> {
    requests
        .iter()
        .map(|&req| {
            let eq = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)?;
            Ok(SeccompRule::new(vec![eq])?)
        })
        .collect()
}

/// `thread`'s filter, with `mismatch` for any other call.
pub fn program(thread: Thread, mismatch: SeccompAction) -> Result<BpfProgram, seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let filter = SeccompFilter::new(rules(thread)?, mismatch, SeccompAction::Allow, arch)?;
    Ok(filter.try_into()?)
}
