//! hpcvm: a KVM hypervisor for HPC batch jobs, on the rust-vmm crates.
//!
//! The data path, one module each: [`config`] (what was asked) -> [`memory`] (guest RAM)
//! -> [`vstate`] (KVM VM and vCPUs) -> [`boot`] (kernel and boot structures) ->
//! [`legacy`] (devices; their output through [`output`]) -> [`control`] (the control loop; [`api`] is its socket) ->
//! [`exit_code`] (the status).
//! [`builder`] strings them together into a [`Vmm`], which [`Vmm::run`] runs; a
//! [`VmHandle`] controls it from any thread.

pub mod admin;
pub mod agent;
pub mod allocation;
pub mod api;
pub mod assets;
pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod error;
pub mod exit_code;
pub mod fatal;
pub mod handle;
pub mod host;
pub mod legacy;
pub mod memory;
pub mod output;
pub mod pci;
pub mod runner;
pub mod seccomp;
pub mod vfio;
pub mod virtio;
pub mod vstate;

pub use config::VmConfig;
pub use control::Outcome;
pub use control::{Answer, StateChange, Status, VmState};
pub use error::Error;
pub use handle::{HandleError, VmHandle};
pub use runner::{run, run_with, RunOptions, Vmm};
pub use vstate::GuestExit;
