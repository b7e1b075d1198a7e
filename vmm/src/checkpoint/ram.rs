//! Guest RAM in a checkpoint: one sparse file holding the RAM regions back to back,
//! in which pages of zeros are holes (a job's untouched RAM costs no disk and no
//! time), and a CRC-32 over every page of data and its offset.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::CheckpointError;

/// The unit a zero page is skipped in.
const PAGE: usize = 4096;
/// Most bytes written or read per call.
const CHUNK: usize = 8 << 20;

/// What the state file records about the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    /// Guest RAM in bytes (the file's length).
    pub size: u64,
    /// Bytes of pages that are not all zero (what the file stores).
    pub data: u64,
    /// CRC-32 over (offset, bytes) of every such page, in order.
    pub crc: u32,
}

/// True if `page` is all zero bytes.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

/// Each region's host bytes, with its offset in the file.
fn regions(mem: &GuestMemoryMmap) -> Vec<(u64, *mut u8, usize)> {
    let mut at = 0u64;
    mem.iter()
        .map(|r| {
            let entry = (at, r.as_ptr(), r.len() as usize);
            at += r.len();
            entry
        })
        .collect()
}

/// Writes guest RAM to `path`; the vCPUs and devices must not touch it meanwhile.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<MemoryImage, CheckpointError> {
    let io = |what| {
        move |source| CheckpointError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let f = File::create(path).map_err(io("creating"))?;
    let mut crc = crc32fast::Hasher::new();
    let (mut size, mut data) = (0u64, 0u64);
    let regions = regions(mem);
    for (r, part, part_len) in crate::memory::touched::parts(mem) {
        let (base, ptr, _) = regions[r];
        // SAFETY: the part lies in a live mapping owned by `mem`, and nothing writes
        // it while the VM is paused and its devices locked.
        let ram = unsafe { std::slice::from_raw_parts(ptr.cast_const(), part + part_len) };
        let mut run: Option<usize> = None;
        for (i, page) in ram[part..].chunks(PAGE).enumerate() {
            let off = part + i * PAGE;
            if is_zero(page) {
                if let Some(start) = run.take() {
                    f.write_all_at(&ram[start..off], base + start as u64)
                        .map_err(io("writing"))?;
                }
                continue;
            }
            crc.update(&(base + off as u64).to_le_bytes());
            crc.update(page);
            data += page.len() as u64;
            match run {
                Some(start) if off - start >= CHUNK => {
                    f.write_all_at(&ram[start..off], base + start as u64)
                        .map_err(io("writing"))?;
                    run = Some(off);
                }
                Some(_) => {}
                None => run = Some(off),
            }
        }
        if let Some(start) = run {
            f.write_all_at(&ram[start..], base + start as u64)
                .map_err(io("writing"))?;
        }
    }
    for &(base, _, len) in &regions {
        size = base + len as u64;
    }
    f.set_len(size).map_err(io("sizing"))?;
    f.sync_all().map_err(io("syncing"))?;
    Ok(MemoryImage {
        size,
        data,
        crc: crc.finalize(),
    })
}

/// `lseek` with `whence` (SEEK_DATA, SEEK_HOLE) from `at`; None past the last data.
fn seek(f: &File, at: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an open fd moves only its offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Reads the memory file at `path` into fresh (all-zero) guest RAM, reading only
/// the file's data, and checks it against `image`.
pub fn load(
    mem: &GuestMemoryMmap,
    path: &Path,
    image: &MemoryImage,
) -> Result<(), CheckpointError> {
    let io = |what| {
        move |source| CheckpointError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let f = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::Missing {
            path: path.to_path_buf(),
        },
        _ => io("opening")(source),
    })?;
    let len = f.metadata().map_err(io("reading"))?.len();
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    if len != image.size || ram != image.size {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            len,
            expected: image.size,
        });
    }
    let mut crc = crc32fast::Hasher::new();
    for (base, ptr, rlen) in regions(mem) {
        // SAFETY: a live mapping of `rlen` bytes owned by `mem`; no vCPU runs yet.
        let ram = unsafe { std::slice::from_raw_parts_mut(ptr, rlen) };
        let end = base + rlen as u64;
        let mut at = base;
        while at < end {
            let Some(start) = seek(&f, at, libc::SEEK_DATA).map_err(io("reading"))? else {
                break;
            };
            if start >= end {
                break;
            }
            let stop = seek(&f, start, libc::SEEK_HOLE)
                .map_err(io("reading"))?
                .unwrap_or(len)
                .min(end);
            let (from, to) = ((start - base) as usize, (stop - base) as usize);
            // Page-aligned, so pages hash as they were saved.
            let (from, to) = (from / PAGE * PAGE, to.div_ceil(PAGE) * PAGE).min_max(rlen);
            for chunk_start in (from..to).step_by(CHUNK) {
                let chunk_end = (chunk_start + CHUNK).min(to);
                let buf = &mut ram[chunk_start..chunk_end];
                f.read_exact_at(buf, base + chunk_start as u64)
                    .map_err(io("reading"))?;
                for (i, page) in buf.chunks(PAGE).enumerate() {
                    if !is_zero(page) {
                        let off = base + (chunk_start + i * PAGE) as u64;
                        crc.update(&off.to_le_bytes());
                        crc.update(page);
                    }
                }
            }
            at = base + to as u64;
        }
    }
    if crc.finalize() != image.crc {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            what: "guest RAM does not match its checksum".into(),
        });
    }
    Ok(())
}

/// Clamps a (from, to) range to `[0, max]`.
trait MinMax {
    fn min_max(self, max: usize) -> Self;
}

impl MinMax for (usize, usize) {
    fn min_max(self, max: usize) -> Self {
        (self.0.min(max), self.1.min(max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn ram_round_trips_sparsely_and_a_flipped_byte_is_caught() {
        let dir = std::env::temp_dir().join(format!("hpcvm-ram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let ranges = [(GuestAddress(0), 4 << 20), (GuestAddress(8 << 20), 2 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        mem.write_slice(&[7u8; 9000], GuestAddress(0x30_0ffc))
            .unwrap();
        mem.write_slice(b"end", GuestAddress((10 << 20) - 3))
            .unwrap();
        let image = save(&mem, &path).unwrap();
        assert_eq!(image.size, 6 << 20);
        assert_eq!(image.data, 6 * 4096);

        let fresh = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        load(&fresh, &path, &image).unwrap();
        let mut buf = [0u8; 5];
        fresh.read_slice(&mut buf, GuestAddress(0x1234)).unwrap();
        assert_eq!(&buf, b"hello");
        let mut tail = [0u8; 3];
        fresh
            .read_slice(&mut tail, GuestAddress((10 << 20) - 3))
            .unwrap();
        assert_eq!(&tail, b"end");

        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[8], 0x30_1000).unwrap();
        let e = load(
            &GuestMemoryMmap::from_ranges(&ranges).unwrap(),
            &path,
            &image,
        );
        assert!(matches!(e, Err(CheckpointError::Corrupt { .. })), "{e:?}");
        f.set_len(4 << 20).unwrap();
        let e = load(&fresh, &path, &image).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
