//! Putting a kernel into guest RAM and describing the machine to it.
//!
//! ELF kernels with a PVH note are entered through it (32-bit, paging off, RBX pointing
//! at `hvm_start_info`); other ELF kernels and bzImages through the 64-bit Linux boot
//! protocol (long mode, identity-mapped page tables, RSI pointing at `boot_params`).

mod elf_check;
pub mod initramfs;
pub mod loader;
pub mod mptable;
pub mod params;
pub mod regs;

use std::path::PathBuf;

use thiserror::Error;

pub use loader::{load, BootImage, Protocol};

/// Errors loading the kernel or initramfs and writing boot structures.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("Cannot read kernel image {path}: {source}")]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel file is neither ELF nor bzImage.
    #[error("Kernel image {path} is neither an ELF vmlinux nor a bzImage ({detail})")]
    KernelFormat {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// linux-loader rejected the kernel.
    #[error("Cannot load kernel image {path}: {detail}")]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// linux-loader's message.
        detail: String,
    },
    /// The initramfs cannot be opened or read.
    #[error("Cannot read initramfs {path}: {source}")]
    InitramfsRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initramfs does not fit in guest RAM beside the kernel.
    #[error("The job's files make a {} MiB initramfs, which needs at least {} MiB of guest RAM to unpack (the guest has {} MiB): give it more --memory, or pass big files with --share or --disk", .size >> 20, .needed >> 20, .ram >> 20)]
    JobFilesTooBig {
        /// The archive's size.
        size: u64,
        /// Guest RAM it needs.
        needed: u64,
        /// Guest RAM there is.
        ram: u64,
    },
    /// The initramfs does not fit in guest RAM beside the kernel.
    #[error("Initramfs {path} ({size} bytes) does not fit in guest RAM below {limit:#x} after the kernel (ends at {kernel_end:#x}); give the guest more memory")]
    InitramfsTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest address it may reach.
        limit: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
    },
    /// The command line does not fit or has a forbidden character.
    #[error("Kernel command line rejected: {0}")]
    Cmdline(String),
    /// Writing a boot structure into guest RAM failed (RAM too small for the layout).
    #[error("Cannot write {what} into guest RAM: {detail}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Why.
        detail: String,
    },
}
