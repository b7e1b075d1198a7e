//! hpcvm: a KVM hypervisor for HPC batch jobs, on the rust-vmm crates.
//!
//! # Holding a VM
//! [`Vmm::build`] makes a VM from a [`VmConfig`], [`Vmm::handle`] gives a [`VmHandle`]
//! to control it from any thread (status, pause, resume, shutdown, destroy), and
//! [`Vmm::run`] runs it to its end and returns the [`Outcome`], which
//! [`exit_code::for_outcome`] turns into hpcvm's exit status. What changes the whole
//! process (signal handling, the terminal, the scheduler slice) is asked for in
//! [`RunOptions`]; the `hpcvm` binary asks for all of it. `examples/embed.rs` is a
//! complete program.
//!
//! ```no_run
//! use vmm::{RunOptions, VmConfig, Vmm};
//! let config = VmConfig {
//!     memory: "128M".parse()?,
//!     ..VmConfig::new("vmlinux")
//! };
//! let vmm = Vmm::build(&config, RunOptions::default())?;
//! let handle = vmm.handle();
//! let vm = std::thread::spawn(move || vmm.run());
//! println!("{:?}", handle.status()?.state);
//! handle.destroy()?;
//! let outcome = vm.join().expect("the VM thread")?;
//! println!("{outcome:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! With `seccomp` on (the default), [`Vmm::run`] confines the thread it runs on with
//! the control thread's filter, for good: run it on a thread of its own, as above.
//! The vCPU threads are kicked with a real-time signal (SIGRTMIN), whose handler is
//! installed once per process. Every error is an [`Error`], whose variants hold the
//! error types re-exported here. Warnings and notes go through the `log` crate
//! ([`log_to_stderr`] prints them as the `hpcvm` binary does).
//!
//! # Inside
//! The data path, one module each under `vmm/src/`: `config` (what was asked) ->
//! `memory` (guest RAM, NUMA binding, prefault) -> `vstate` (KVM VM and vCPUs) ->
//! `boot` and `acpi` (kernel, boot structures, ACPI tables) -> `legacy`, `pci`,
//! `virtio`, `vfio` (devices; their output through `output`) -> `control` (the control
//! loop; `api` is its socket) -> `exit_code` (the status). `builder` strings them
//! together into a [`Vmm`]; `runner` runs it.

// The embedding API: what a program that holds a VM needs.
pub mod checkpoint;
pub mod config;
pub mod control;
pub mod error;
pub mod exit_code;
pub mod migration;
pub mod pci;
pub mod seccomp;
pub mod vfio;

// Used by the `hpcvm` binary, its tests, benchmarks and fuzz targets; not an API.
#[doc(hidden)]
pub mod admin;
#[doc(hidden)]
pub mod agent;
#[doc(hidden)]
pub mod api;
#[doc(hidden)]
pub mod boot;
#[doc(hidden)]
pub mod fatal;
#[doc(hidden)]
pub mod host;
#[doc(hidden)]
pub mod output;
#[doc(hidden)]
pub mod virtio;
#[doc(hidden)]
pub mod vstate;

// Internals.
pub(crate) mod acpi;
pub(crate) mod allocation;
pub(crate) mod assets;
pub(crate) mod builder;
pub(crate) mod handle;
pub(crate) mod legacy;
pub(crate) mod memory;
pub(crate) mod runner;
pub(crate) mod stderr_log;

pub use config::VmConfig;
pub use control::Outcome;
pub use control::{Answer, StateChange, Status, VmState};
pub use error::Error;
pub use handle::{HandleError, VmHandle};
pub use runner::{run, run_with, RestoreHost, RunOptions, Vmm};
pub use stderr_log::log_to_stderr;
pub use vstate::GuestExit;

// Every error a build or run can end with, nameable from the crate root.
pub use acpi::AcpiError;
pub use api::server::ApiError;
pub use boot::BootError;
pub use memory::MemoryError;
pub use pci::PciError;
pub use vfio::host::HostError;
pub use virtio::disk::DiskError;
pub use virtio::fs::ShareError;
pub use vstate::VmError;
