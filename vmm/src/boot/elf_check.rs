//! What an ELF kernel must be before linux-loader copies it into guest RAM:
//! linux-loader checks the magic, byte order and header sizes, but loads 32-bit or
//! foreign-architecture files, files without a loadable segment (the guest then runs
//! zeroed RAM), and segments outside guest RAM or over hpcvm's boot data below
//! 1 MiB. Every such file is refused here, with the reason.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::memory::layout::HIMEM_START;

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// More program headers than any kernel has: a bound on what is read.
const MAX_PHDRS: u16 = 512;

/// One PT_LOAD segment as the file gives it.
#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Checks the ELF kernel `file` against guest RAM `mem`; the reason if it cannot boot.
pub fn check(file: &mut File, mem: &GuestMemoryMmap, ram_size: u64) -> Result<(), String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut ehdr = [0u8; EHDR_LEN];
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    file.read_exact(&mut ehdr)
        .map_err(|_| "the ELF header is truncated".to_string())?;
    let (entry, phoff, phnum) = header(&ehdr)?;
    let table = u64::from(phnum) * PHDR_LEN as u64;
    if phoff.checked_add(table).is_none_or(|end| end > len) {
        return Err(format!(
            "its {phnum} program headers at offset {phoff:#x} run past the end of the file ({len} bytes)"
        ));
    }
    let mut raw = vec![0u8; table as usize];
    file.seek(SeekFrom::Start(phoff))
        .map_err(|e| e.to_string())?;
    file.read_exact(&mut raw).map_err(|e| e.to_string())?;
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let segments = load_segments(&raw);
    check_segments(
        &segments,
        entry,
        len,
        |at, size| in_ram(mem, at, size),
        ram_size,
    )
}

/// The entry point, program header offset and count of a 64-bit x86 ELF header.
fn header(h: &[u8; EHDR_LEN]) -> Result<(u64, u64, u16), String> {
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
    if h[4] != ELFCLASS64 {
        return Err(format!(
            "it is a {} ELF file; hpcvm boots 64-bit x86 kernels",
            if h[4] == 1 { "32-bit" } else { "non-64-bit" }
        ));
    }
    let machine = u16_at(18);
    if machine != EM_X86_64 {
        let name = match machine {
            3 => " (i386)",
            40 => " (ARM)",
            183 => " (aarch64)",
            243 => " (RISC-V)",
            _ => "",
        };
        return Err(format!(
            "it is built for ELF machine {machine}{name}, not x86-64 (62)"
        ));
    }
    let phnum = u16_at(56);
    if phnum == 0 {
        return Err("it has no program headers, so nothing to load".into());
    }
    if phnum > MAX_PHDRS {
        return Err(format!("it claims {phnum} program headers"));
    }
    Ok((u64_at(24), u64_at(32), phnum))
}

fn load_segments(raw: &[u8]) -> Vec<Segment> {
    raw.chunks_exact(PHDR_LEN)
        .filter(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) == PT_LOAD)
        .map(|p| {
            let at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap_or([0; 8]));
            Segment {
                offset: at(8),
                paddr: at(24),
                filesz: at(32),
                memsz: at(40),
            }
        })
        .collect()
}

fn check_segments(
    segments: &[Segment],
    entry: u64,
    file_len: u64,
    in_ram: impl Fn(u64, u64) -> bool,
    ram_size: u64,
) -> Result<(), String> {
    if !segments.iter().any(|s| s.filesz > 0) {
        return Err("it has no loadable (PT_LOAD) segment with contents".into());
    }
    for (i, s) in segments.iter().enumerate() {
        let Some(end) = s.paddr.checked_add(s.memsz.max(s.filesz)) else {
            return Err(format!(
                "load segment {i} at {:#x} ({:#x} bytes) wraps around the address space",
                s.paddr, s.memsz
            ));
        };
        if s.filesz > s.memsz {
            return Err(format!(
                "load segment {i} has more file bytes ({:#x}) than memory bytes ({:#x})",
                s.filesz, s.memsz
            ));
        }
        if s.offset.checked_add(s.filesz).is_none_or(|e| e > file_len) {
            return Err(format!(
                "load segment {i} runs past the end of the file (truncated image?)"
            ));
        }
        if s.memsz == 0 {
            continue;
        }
        if s.paddr < HIMEM_START {
            return Err(format!(
                "load segment {i} at {:#x} lies below 1 MiB, over hpcvm's boot data",
                s.paddr
            ));
        }
        if !in_ram(s.paddr, s.memsz) {
            return Err(format!(
                "load segment {i} at {:#x}-{:#x} lies outside guest RAM ({} MiB, with the \
                 PCI/IOAPIC hole below 4 GiB): a kernel that does not fit, or not a kernel",
                s.paddr,
                end - 1,
                ram_size >> 20
            ));
        }
    }
    let entry_loaded = segments
        .iter()
        .any(|s| entry >= s.paddr && entry - s.paddr < s.filesz);
    if !entry_loaded {
        return Err(format!(
            "its entry point {entry:#x} is not inside any loaded segment"
        ));
    }
    Ok(())
}

/// True if all of `[at, at + size)` is guest RAM.
fn in_ram(mem: &GuestMemoryMmap, at: u64, size: u64) -> bool {
    usize::try_from(size).is_ok_and(|n| mem.check_range(GuestAddress(at), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn seg(paddr: u64, filesz: u64, memsz: u64) -> Segment {
        Segment {
            offset: 0x1000,
            paddr,
            filesz,
            memsz,
        }
    }

    /// 256 MiB of RAM from 0.
    fn check(segs: &[Segment], entry: u64) -> Result<(), String> {
        check_segments(segs, entry, 16 * MIB, |a, n| a + n <= 256 * MIB, 256 * MIB)
    }

    fn ehdr(class: u8, machine: u16, phnum: u16) -> [u8; EHDR_LEN] {
        let mut h = [0u8; EHDR_LEN];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        h[32..40].copy_from_slice(&64u64.to_le_bytes());
        h[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        h[56..58].copy_from_slice(&phnum.to_le_bytes());
        h
    }

    #[test]
    fn a_kernel_like_layout_passes() {
        let segs = [seg(16 * MIB, 4 * MIB, 6 * MIB), seg(22 * MIB, 0, MIB)];
        assert_eq!(check(&segs, 16 * MIB), Ok(()));
        assert!(header(&ehdr(2, 62, 5)).is_ok());
    }

    #[test]
    fn headers_of_other_machines_classes_or_without_segments_are_refused() {
        assert!(header(&ehdr(1, 62, 5)).unwrap_err().contains("32-bit ELF"));
        assert!(header(&ehdr(2, 183, 5))
            .unwrap_err()
            .contains("machine 183 (aarch64), not x86-64"));
        assert!(header(&ehdr(2, 62, 0))
            .unwrap_err()
            .contains("no program headers"));
        assert!(check(&[seg(16 * MIB, 0, MIB)], 16 * MIB)
            .unwrap_err()
            .contains("no loadable"));
    }

    #[test]
    fn segments_outside_ram_or_over_boot_data_are_refused() {
        let e = |s: Segment| check(&[s], s.paddr).unwrap_err();
        assert!(e(seg(5 << 30, MIB, MIB)).contains("outside guest RAM (256 MiB"));
        assert!(e(seg(0xfec0_0000, 0x1000, 0x1000)).contains("outside guest RAM"));
        assert!(e(seg(16 * MIB, MIB, 1 << 30)).contains("outside guest RAM"));
        assert!(e(seg(u64::MAX - 0xfff, 0x1000, 0x2000)).contains("wraps around"));
        assert!(e(seg(0x7000, 0x1000, 0x1000)).contains("below 1 MiB, over hpcvm's boot data"));
        assert!(e(seg(16 * MIB, 2 * MIB, MIB)).contains("more file bytes"));
        let mut past = seg(16 * MIB, 32 * MIB, 32 * MIB);
        past.offset = 0;
        assert!(e(past).contains("past the end of the file"));
    }

    #[test]
    fn an_entry_outside_the_loaded_bytes_is_refused() {
        let segs = [seg(16 * MIB, MIB, 2 * MIB)];
        assert!(check(&segs, 8 * MIB)
            .unwrap_err()
            .contains("entry point 0x800000 is not inside"));
        assert!(check(&segs, 17 * MIB + 1).is_err());
    }
}
