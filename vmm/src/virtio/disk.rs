//! Opening `--disk` and `--image` files before the guest starts: the right access
//! mode, a lock that keeps two writers (or a writer and readers) off one disk, its
//! size, and for a root image a check that it is a whole ext4 filesystem. Every
//! refusal names the file and the reason.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

use devices::virtio::{Block, BlockOptions};
use thiserror::Error;

use crate::config::DiskConfig;

/// Why a disk cannot be attached.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The file could not be opened.
    #[error("Cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("Disk {path} is not a regular file or block device")]
    NotADisk {
        /// The file.
        path: PathBuf,
    },
    /// Another process holds a conflicting lock.
    #[error("Disk {path} is in use: {holder} (a disk opened for writing is never shared; open it with readonly=on everywhere to share it)")]
    Locked {
        /// The file.
        path: PathBuf,
        /// Who holds it.
        holder: &'static str,
    },
    /// Smaller than one sector.
    #[error("Disk {path} is {size} bytes: smaller than one 512-byte sector")]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A root image that is not ext4.
    #[error("Image {path} is not an ext4 filesystem (no ext4 superblock at byte 1024); build it with mkfs.ext4 -d DIR")]
    NotExt4 {
        /// The file.
        path: PathBuf,
    },
    /// A root image shorter than its filesystem.
    #[error(
        "Image {path} is truncated: its ext4 filesystem needs {needed} bytes, the file has {size}"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the filesystem spans.
        needed: u64,
        /// Bytes the file has.
        size: u64,
    },
    /// Reading the image failed.
    #[error("Cannot read image {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// ext4 superblock fields (offsets within the superblock at byte 1024).
const SB_OFFSET: u64 = 1024;
const SB_MAGIC: usize = 0x38;
const EXT4_MAGIC: u16 = 0xef53;

/// Opens, locks and checks the disk `cfg` describes; returns the device model.
pub fn open(cfg: &DiskConfig) -> Result<Block, DiskError> {
    let path = cfg.path.clone();
    // A directory or socket named by mistake gets its own message, not EISDIR.
    if let Ok(meta) = std::fs::metadata(&path) {
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::NotADisk { path });
        }
    }
    let mut flags = libc::O_CLOEXEC;
    if cfg.direct {
        flags |= libc::O_DIRECT;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(!cfg.read_only)
        .custom_flags(flags)
        .open(&path)
        .map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
    let kind = file
        .metadata()
        .map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?
        .file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(DiskError::NotADisk { path });
    }
    lock(&file, cfg.read_only).map_err(|holder| DiskError::Locked {
        path: path.clone(),
        holder,
    })?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
    if size < devices::virtio::block::SECTOR_SIZE {
        return Err(DiskError::TooSmall { path, size });
    }
    if cfg.root_image {
        check_ext4(&mut file, &path, size)?;
    }
    let opts = BlockOptions {
        read_only: cfg.read_only,
        serial: cfg.serial.clone().unwrap_or_default(),
        discard: kind.is_file(),
    };
    Ok(Block::new(file, size, opts))
}

/// A shared lock for a read-only disk, an exclusive one for a writable disk, both
/// without waiting; Err names who holds the conflicting one.
fn lock(file: &File, read_only: bool) -> Result<(), &'static str> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    Err(if read_only {
        "another process has it open for writing"
    } else {
        "another process has it open"
    })
}

/// Checks for an ext4 superblock and that the file holds the whole filesystem.
fn check_ext4(file: &mut File, path: &std::path::Path, size: u64) -> Result<(), DiskError> {
    let read = |source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut sb = [0u8; 1024];
    file.seek(SeekFrom::Start(SB_OFFSET)).map_err(read)?;
    if file.read_exact(&mut sb).is_err() {
        return Err(DiskError::NotExt4 {
            path: path.to_path_buf(),
        });
    }
    let u32_at = |o: usize| u64::from(u32::from_le_bytes(sb[o..o + 4].try_into().expect("4")));
    if u16::from_le_bytes([sb[SB_MAGIC], sb[SB_MAGIC + 1]]) != EXT4_MAGIC {
        return Err(DiskError::NotExt4 {
            path: path.to_path_buf(),
        });
    }
    let log_block = u32_at(0x18);
    if log_block > 6 {
        return Err(DiskError::NotExt4 {
            path: path.to_path_buf(),
        });
    }
    let block_size = 1024u64 << log_block;
    let incompat_64bit = u32_at(0x60) & 0x80 != 0;
    let blocks = u32_at(0x04)
        | if incompat_64bit {
            u32_at(0x150) << 32
        } else {
            0
        };
    let needed = blocks.saturating_mul(block_size);
    if needed > size {
        return Err(DiskError::Truncated {
            path: path.to_path_buf(),
            needed,
            size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
