//! Support code for the hpcvm integration tests.
//!
//! The tiny guest kernels in `tests/guests/` are assembled and linked by
//! `build.rs` into cargo's `OUT_DIR`; [`guest`] returns the path of one of
//! them (`<name>.elf`) and [`guest_file`] of the other images (the bzImage).
//! See `tests/guests/README.md` for what each guest does and prints.

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod fuzz;
pub mod hugepages;
pub mod mpi;
pub mod proc;
pub mod scratch;
pub mod slurm;
pub mod unprivileged;

/// Directory holding the built guests (set by `build.rs`).
pub const GUEST_DIR: &str = env!("HPCVM_TEST_GUEST_DIR");

/// Every ELF guest built by `build.rs` (`<name>.elf`).
pub const GUESTS: &[&str] = &[
    "bootinfo",
    "bootinfo-linux",
    "hello",
    "triplefault",
    "badinsn",
    "spin",
    "smp",
    "shutdown-aware",
    "ticker",
    "flood",
];

/// The guests that carry a PVH (XEN_ELFNOTE_PHYS32_ENTRY) note.
pub const PVH_GUESTS: &[&str] = &[
    "bootinfo",
    "hello",
    "triplefault",
    "badinsn",
    "spin",
    "smp",
    "shutdown-aware",
    "ticker",
    "flood",
];

/// Guest images that are not `<name>.elf` files, by file name: the bzImage
/// that `build.rs` wraps around `bootinfo-linux`'s code.
pub const GUEST_FILES: &[&str] = &["bootinfo.bzimage"];

/// Path of the built guest `<name>.elf` (e.g. `guest("hello")`).
///
/// Panics with a clear message if it does not exist.
pub fn guest(name: &str) -> PathBuf {
    let path = PathBuf::from(GUEST_DIR).join(format!("{name}.elf"));
    if !path.is_file() {
        panic!(
            "test guest `{name}` not found at {} (known guests: {}); \
             it is built by tests/build.rs from tests/guests/",
            path.display(),
            GUESTS.join(", ")
        );
    }
    path
}

/// Path of a built guest image by its file name, for images that are not
/// `<name>.elf` (e.g. `guest_file("bootinfo.bzimage")`; see [`GUEST_FILES`]).
///
/// Panics with a clear message if it does not exist.
pub fn guest_file(file: &str) -> PathBuf {
    let path = PathBuf::from(GUEST_DIR).join(file);
    if !path.is_file() {
        panic!(
            "test guest file `{file}` not found at {} (known files: {}); \
             it is built by tests/build.rs from tests/guests/",
            path.display(),
            GUEST_FILES.join(", ")
        );
    }
    path
}

/// `mkfs.ext4 -d dir` into a `size` image at `out`.
pub fn mkfs(dir: &Path, out: &Path, size: &str) {
    // An existing file keeps mkfs from announcing that it creates one.
    std::fs::File::create(out).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(dir)
        .arg(out)
        .arg(size)
        .status()
        .expect("mkfs.ext4 (e2fsprogs; make deps installs it)");
    assert!(st.success(), "mkfs.ext4 failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const PF_X: u32 = 1;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    struct Phdr {
        p_type: u32,
        p_flags: u32,
        p_offset: u64,
        p_vaddr: u64,
        p_paddr: u64,
        p_filesz: u64,
        p_memsz: u64,
    }

    struct Elf {
        bytes: Vec<u8>,
        entry: u64,
        phdrs: Vec<Phdr>,
    }

    /// Reads the ELF header and program headers, checking ELF64 x86-64.
    fn parse(name: &str) -> Elf {
        let bytes = std::fs::read(guest(name)).unwrap();
        assert!(bytes.len() >= 64, "{name}: too short for an ELF header");
        assert_eq!(&bytes[0..4], b"\x7fELF", "{name}: not ELF");
        assert_eq!(bytes[4], 2, "{name}: not ELFCLASS64");
        assert_eq!(bytes[5], 1, "{name}: not little endian");
        assert_eq!(u16_at(&bytes, 16), 2, "{name}: not ET_EXEC");
        assert_eq!(u16_at(&bytes, 18), 62, "{name}: not EM_X86_64");
        let entry = u64_at(&bytes, 24);
        let phoff = u64_at(&bytes, 32) as usize;
        let phentsize = u16_at(&bytes, 54) as usize;
        let phnum = u16_at(&bytes, 56) as usize;
        assert_eq!(phentsize, 56, "{name}: unexpected e_phentsize");
        let phdrs = (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    p_type: u32_at(&bytes, p),
                    p_flags: u32_at(&bytes, p + 4),
                    p_offset: u64_at(&bytes, p + 8),
                    p_vaddr: u64_at(&bytes, p + 16),
                    p_paddr: u64_at(&bytes, p + 24),
                    p_filesz: u64_at(&bytes, p + 32),
                    p_memsz: u64_at(&bytes, p + 40),
                }
            })
            .collect();
        Elf {
            bytes,
            entry,
            phdrs,
        }
    }

    /// Descriptors of every ("Xen", XEN_ELFNOTE_PHYS32_ENTRY) note.
    fn pvh_notes(elf: &Elf) -> Vec<Vec<u8>> {
        let align4 = |x: usize| (x + 3) & !3;
        let mut found = Vec::new();
        for ph in elf.phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
            let seg = &elf.bytes[ph.p_offset as usize..(ph.p_offset + ph.p_filesz) as usize];
            let mut off = 0;
            while off + 12 <= seg.len() {
                let namesz = u32_at(seg, off) as usize;
                let descsz = u32_at(seg, off + 4) as usize;
                let ntype = u32_at(seg, off + 8);
                let name = &seg[off + 12..off + 12 + namesz];
                let desc_off = off + 12 + align4(namesz);
                let desc = &seg[desc_off..desc_off + descsz];
                if ntype == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
                    found.push(desc.to_vec());
                }
                off = desc_off + align4(descsz);
            }
        }
        found
    }

    /// Whether `addr` lies in an executable PT_LOAD segment.
    fn in_code(elf: &Elf, addr: u64) -> bool {
        elf.phdrs.iter().any(|p| {
            p.p_type == PT_LOAD
                && p.p_flags & PF_X != 0
                && (p.p_vaddr..p.p_vaddr + p.p_filesz).contains(&addr)
        })
    }

    #[test]
    fn guests_exist() {
        for name in GUESTS {
            assert!(guest(name).is_file());
        }
    }

    #[test]
    #[should_panic(expected = "not found")]
    fn unknown_guest_panics() {
        guest("no-such-guest");
    }

    #[test]
    fn guests_are_elf64_x86_64_loaded_at_1mib() {
        for name in GUESTS {
            let elf = parse(name);
            let loads: Vec<&Phdr> = elf.phdrs.iter().filter(|p| p.p_type == PT_LOAD).collect();
            assert!(!loads.is_empty(), "{name}: no PT_LOAD");
            for p in &loads {
                assert_eq!(p.p_paddr, p.p_vaddr, "{name}: paddr != vaddr");
                assert!(p.p_paddr >= 0x100000, "{name}: segment below 1 MiB");
                assert!(p.p_memsz >= p.p_filesz, "{name}: memsz < filesz");
                assert!(
                    (p.p_offset + p.p_filesz) as usize <= elf.bytes.len(),
                    "{name}: segment past end of file"
                );
            }
            let lowest = loads.iter().map(|p| p.p_paddr).min().unwrap();
            assert_eq!(lowest, 0x100000, "{name}: not loaded at 1 MiB");
            assert!(in_code(&elf, elf.entry), "{name}: e_entry not in code");
        }
    }

    #[test]
    fn pvh_guests_have_pvh_note() {
        for name in PVH_GUESTS {
            let elf = parse(name);
            let notes = pvh_notes(&elf);
            assert_eq!(notes.len(), 1, "{name}: expected exactly one PVH note");
            let desc = &notes[0];
            // A .quad like Linux: QEMU reads 8 bytes, linux-loader 4.
            assert_eq!(desc.len(), 8, "{name}: PVH note descriptor size");
            let entry = u64_at(desc, 0);
            assert!(
                entry <= u64::from(u32::MAX),
                "{name}: PVH entry above 4 GiB"
            );
            assert!(
                in_code(&elf, entry),
                "{name}: PVH entry {entry:#x} not in code"
            );
            if *name == "bootinfo" {
                // Separate 32-bit PVH entry and 64-bit Linux entry.
                assert_ne!(entry, elf.entry, "{name}: PVH entry == e_entry");
            } else {
                assert_eq!(entry, elf.entry, "{name}: PVH entry != e_entry");
            }
        }
    }

    #[test]
    fn linux_variant_has_no_pvh_note() {
        let elf = parse("bootinfo-linux");
        assert!(pvh_notes(&elf).is_empty(), "bootinfo-linux has a PVH note");
    }

    #[test]
    fn every_guest_is_classified() {
        for name in PVH_GUESTS {
            assert!(GUESTS.contains(name));
        }
        // bootinfo-linux is the one ELF guest without a PVH note.
        assert_eq!(PVH_GUESTS.len() + 1, GUESTS.len());
    }

    #[test]
    fn guest_files_exist() {
        for file in GUEST_FILES {
            assert!(guest_file(file).is_file());
        }
    }

    #[test]
    #[should_panic(expected = "not found")]
    fn unknown_guest_file_panics() {
        guest_file("no-such-guest.bzimage");
    }

    /// The bzImage header, field by field (Linux Documentation/arch/x86/boot.rst), and
    /// what linux-loader 0.14 checks: "HdrS", version >= 2.00, LOADED_HIGH; it loads
    /// the part after the (setup_sects + 1) sectors at code32_start, and hpcvm enters it
    /// 0x200 further on with the 64-bit boot protocol.
    #[test]
    fn bzimage_has_a_64_bit_boot_protocol_header() {
        let b = std::fs::read(guest_file("bootinfo.bzimage")).unwrap();
        assert_eq!(u16_at(&b, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(&b[0x202..0x206], b"HdrS", "header");
        assert!(u16_at(&b, 0x206) >= 0x020c, "version");
        assert_eq!(b[0x211] & 0x01, 0x01, "loadflags: LOADED_HIGH");
        assert_eq!(u16_at(&b, 0x236) & 0x01, 0x01, "xloadflags: XLF_KERNEL_64");
        assert_eq!(u32_at(&b, 0x214), 0x100000, "code32_start");
        assert_eq!(u64_at(&b, 0x258), 0x100000, "pref_address");
        let align = u32_at(&b, 0x230);
        assert!(
            align.is_power_of_two() && 0x100000u32.is_multiple_of(align),
            "kernel_alignment"
        );
        assert!(u32_at(&b, 0x22c) >= 0x0fff_ffff, "initrd_addr_max");
        assert!(u32_at(&b, 0x238) >= 255, "cmdline_size");

        let setup_sects = usize::from(b[0x1f1]);
        assert!(
            setup_sects >= 1,
            "the header reaches into the first setup sector"
        );
        let pm = &b[(setup_sects + 1) * 512..];
        let syssize = u32_at(&b, 0x1f4) as usize;
        assert_eq!(syssize, pm.len().div_ceil(16), "syssize");
        let init_size = u32_at(&b, 0x260) as usize;
        assert!(
            init_size >= pm.len() && init_size.is_multiple_of(4096),
            "init_size"
        );
        // The protected-mode part is the flat image of bootinfo-bzimage.elf (bootinfo's
        // Linux build with its 64-bit entry moved to 0x100200), .bss included as zeros.
        let elf = parse("bootinfo-bzimage");
        assert_eq!(elf.entry, 0x100200, "64-bit entry at load address + 0x200");
        assert_eq!(&pm[0x200..0x202], &[0xfa, 0xfc], "cli; cld at the entry");
        for p in elf.phdrs.iter().filter(|p| p.p_type == PT_LOAD) {
            let at = (p.p_vaddr - 0x100000) as usize;
            let file = &elf.bytes[p.p_offset as usize..(p.p_offset + p.p_filesz) as usize];
            assert_eq!(
                &pm[at..at + file.len()],
                file,
                "segment at {:#x}",
                p.p_vaddr
            );
            let bss = &pm[at + file.len()..at + p.p_memsz as usize];
            assert!(bss.iter().all(|&x| x == 0), "bss at {:#x}", p.p_vaddr);
        }
    }
}
