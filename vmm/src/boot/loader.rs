//! Loads the kernel (linux-loader), the initramfs and the command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::BootError;
use crate::config::KernelConfig;
use crate::memory::layout::{self, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// PVH: 32-bit protected mode at the note's entry, RBX = `hvm_start_info`.
    Pvh,
    /// 64-bit Linux boot protocol, RSI = `boot_params`.
    Linux64,
}

/// A kernel in guest RAM and what the boot structures must say about it.
#[derive(Debug, Clone)]
pub struct BootImage {
    /// Entry protocol.
    pub protocol: Protocol,
    /// Entry point (guest-physical).
    pub entry: u64,
    /// First byte after the kernel.
    pub kernel_end: u64,
    /// bzImage setup header, copied into `boot_params`.
    pub setup_header: Option<setup_header>,
    /// Initramfs location and size.
    pub initramfs: Option<(u64, u64)>,
    /// Length of the command line written at `CMDLINE_START`, without its NUL.
    pub cmdline_len: usize,
}

/// Loads the kernel and initramfs of `cfg` and the command line `cmdline` into `mem`
/// (of `ram_size` bytes).
pub fn load(
    cfg: &KernelConfig,
    cmdline: &str,
    mem: &GuestMemoryMmap,
    ram_size: u64,
) -> Result<BootImage, BootError> {
    let path = &cfg.path;
    let read_err = |source| BootError::KernelRead {
        path: path.clone(),
        source,
    };
    let mut file = open_regular(path).map_err(read_err)?;
    let kind = sniff(&mut file).map_err(read_err)?;
    let himem = Some(GuestAddress(HIMEM_START));
    if kind == Kind::Elf {
        super::elf_check::check(&mut file, mem, ram_size).map_err(|detail| {
            BootError::KernelLoad {
                path: path.clone(),
                detail,
            }
        })?;
    }
    let result = match kind {
        Kind::Elf => Elf::load(mem, None, &mut file, himem),
        Kind::BzImage => BzImage::load(mem, None, &mut file, himem),
        Kind::Unknown(detail) => {
            return Err(BootError::KernelFormat {
                path: path.clone(),
                detail,
            })
        }
    }
    .map_err(|e| BootError::KernelLoad {
        path: path.clone(),
        detail: describe_loader_error(&e, ram_size),
    })?;

    let (protocol, entry) = match (kind, result.pvh_boot_cap) {
        (Kind::Elf, PvhBootCapability::PvhEntryPresent(a)) => (Protocol::Pvh, a.0),
        // A bzImage's 64-bit entry is 0x200 past where its protected-mode code loads.
        (Kind::BzImage, _) => (Protocol::Linux64, result.kernel_load.0 + 0x200),
        _ => (Protocol::Linux64, result.kernel_load.0),
    };
    let kernel_end = result.kernel_end.max(result.kernel_load.0);

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| {
        BootError::Cmdline(format!(
            "{e} ({} bytes; the limit is {})",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        ))
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(|e| BootError::GuestWrite {
        what: "the command line",
        detail: e.to_string(),
    })?;

    let initrd_max = result
        .setup_header
        .map_or(u64::from(u32::MAX), |h| u64::from(h.initrd_addr_max));
    let initramfs = match &cfg.initramfs {
        Some(p) => Some(load_initramfs(
            p,
            mem,
            kernel_end,
            initrd_max.min(layout::low_ram_end(ram_size)),
        )?),
        None => None,
    };

    Ok(BootImage {
        protocol,
        entry,
        kernel_end,
        setup_header: result.setup_header,
        initramfs,
        cmdline_len: cmdline.len(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Elf,
    BzImage,
    Unknown(String),
}

/// Tells ELF from bzImage by their magic numbers.
fn sniff(f: &mut File) -> std::io::Result<Kind> {
    let mut head = [0u8; 0x206];
    let n = read_up_to(f, &mut head)?;
    f.seek(SeekFrom::Start(0))?;
    Ok(classify(&head[..n]))
}

fn classify(head: &[u8]) -> Kind {
    if head.starts_with(b"\x7fELF") {
        Kind::Elf
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        Kind::BzImage
    } else if head.is_empty() {
        Kind::Unknown("the file is empty".into())
    } else {
        let shown: Vec<String> = head.iter().take(4).map(|b| format!("{b:02x}")).collect();
        Kind::Unknown(format!("it starts with bytes {}", shown.join(" ")))
    }
}

/// Opens `path` for reading if it is a regular file. The open does not wait (a FIFO
/// would block it until someone writes), and anything but a file is refused.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let t = f.metadata()?.file_type();
    if t.is_file() {
        // O_NONBLOCK means nothing for a regular file's reads.
        return Ok(f);
    }
    let what = if t.is_fifo() {
        "a FIFO"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a file"
    };
    Err(std::io::Error::other(format!(
        "not a regular file ({what})"
    )))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn describe_loader_error(e: &linux_loader::loader::Error, ram_size: u64) -> String {
    let msg = e.to_string();
    if msg.contains("kernel image") || msg.contains("program header address") {
        format!(
            "{msg} (truncated image, or a kernel that does not fit in {} MiB of guest RAM?)",
            ram_size >> 20
        )
    } else {
        msg
    }
}

/// Reads the initramfs into the highest page-aligned spot below `limit` that clears the
/// kernel.
fn load_initramfs(
    path: &Path,
    mem: &GuestMemoryMmap,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::InitramfsRead {
        path: path.to_path_buf(),
        source,
    };
    let mut f = open_regular(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let too_big = || BootError::InitramfsTooBig {
        path: path.to_path_buf(),
        size,
        limit,
        kernel_end,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    let mut slice_err = |e: vm_memory::GuestMemoryError| BootError::GuestWrite {
        what: "the initramfs",
        detail: e.to_string(),
    };
    use vm_memory::GuestMemoryBackend;
    let mut off = 0u64;
    while off < size {
        let want = (size - off).min(1 << 20) as usize;
        let mut slice = mem
            .get_slice(GuestAddress(addr + off), want)
            .map_err(&mut slice_err)?;
        let got = f
            .read_volatile(&mut slice)
            .map_err(|e| BootError::InitramfsRead {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
        if got == 0 {
            return Err(read_err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while loading",
            )));
        }
        off += got as u64;
    }
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_magic() {
        assert_eq!(classify(b"\x7fELF\x02\x01"), Kind::Elf);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(classify(&bz), Kind::BzImage);
        assert_eq!(classify(b""), Kind::Unknown("the file is empty".into()));
        assert_eq!(
            classify(b"#!/bin/sh\n"),
            Kind::Unknown("it starts with bytes 23 21 2f 62".into())
        );
    }
}
