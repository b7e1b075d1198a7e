//! Builds the tiny test guests in `guests/` into `$OUT_DIR/<name>.elf` with
//! the system toolchain (`gcc` to preprocess and assemble, `ld` to link),
//! wraps one of them as a Linux bzImage (`$OUT_DIR/bootinfo.bzimage`, written
//! here in Rust), and exports `HPCVM_TEST_GUEST_DIR=$OUT_DIR` to the crate.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (guest name, source file in `guests/`, extra `gcc` flags)
const GUESTS: &[(&str, &str, &[&str])] = &[
    ("bootinfo", "bootinfo.S", &[]),
    ("bootinfo-linux", "bootinfo.S", &["-DBOOT_LINUX"]),
    ("hello", "hello.S", &[]),
    ("triplefault", "triplefault.S", &[]),
    ("badinsn", "badinsn.S", &[]),
    ("spin", "spin.S", &[]),
    ("smp", "smp.S", &[]),
    ("shutdown-aware", "shutdown-aware.S", &[]),
    ("ticker", "ticker.S", &[]),
    ("flood", "flood.S", &[]),
    ("pci", "pci.S", &[]),
    // Not a guest of its own: the protected-mode part of bootinfo.bzimage.
    (
        "bootinfo-bzimage",
        "bootinfo.S",
        &["-DBOOT_LINUX", "-DBZIMAGE"],
    ),
];

/// (bzImage file, the ELF in `$OUT_DIR` whose flat image it carries)
const BZIMAGES: &[(&str, &str)] = &[("bootinfo.bzimage", "bootinfo-bzimage.elf")];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("guests");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src.join("guest.ld").display());
    // Every .S file, including the shared common.S that the guests #include.
    let entries = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("cannot read guest sources in {}: {e}", src.display()));
    for entry in entries {
        let path = entry.expect("read_dir entry").path();
        if path.extension().is_some_and(|e| e == "S") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }

    check_tool("gcc");
    check_tool("ld");

    for (name, source, flags) in GUESTS {
        let obj = out.join(format!("{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        let mut gcc = Command::new("gcc");
        gcc.args(["-c", "-m64", "-nostdlib", "-ffreestanding"])
            .arg("-I")
            .arg(&src)
            .args(*flags)
            .arg("-o")
            .arg(&obj)
            .arg(src.join(source));
        run(gcc, name);

        let mut ld = Command::new("ld");
        ld.args(["-m", "elf_x86_64", "-nostdlib", "-static"])
            .args(["-z", "noexecstack", "-z", "max-page-size=0x1000"])
            .arg("-T")
            .arg(src.join("guest.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&obj);
        run(ld, name);
    }

    for (file, elf) in BZIMAGES {
        write_bzimage(&out.join(elf), &out.join(file));
    }

    println!("cargo:rustc-env=HPCVM_TEST_GUEST_DIR={}", out.display());
}

/// Where the guests are linked and where a bzImage's protected-mode part loads.
const LOAD_ADDR: u32 = 0x10_0000;
/// The 64-bit boot protocol enters a bzImage this far past its load address.
const ENTRY_64: u32 = 0x200;
/// Setup sectors after the boot sector: one is enough for the header.
const SETUP_SECTS: u8 = 1;

/// Wraps the flat image of `elf` (linked at `LOAD_ADDR`, 64-bit entry at
/// `LOAD_ADDR + ENTRY_64`) as a bzImage at `out`: boot sector and setup sector
/// carrying the boot protocol 2.12 setup header, then the protected-mode part.
/// See Documentation/arch/x86/boot.rst in Linux for the fields.
fn write_bzimage(elf: &Path, out: &Path) {
    let bytes = std::fs::read(elf).unwrap_or_else(|e| panic!("read {}: {e}", elf.display()));
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let entry = u64_at(24);
    assert_eq!(
        entry,
        u64::from(LOAD_ADDR + ENTRY_64),
        "{}: the 64-bit entry must be at load address + {ENTRY_64:#x}",
        elf.display()
    );

    // The flat image: every PT_LOAD at its address - LOAD_ADDR, .bss included
    // as zeros (a bzImage loader copies the file and clears nothing).
    let mut flat = Vec::new();
    let (phoff, phnum) = (u64_at(32) as usize, u16_at(56) as usize);
    for i in 0..phnum {
        let ph = phoff + i * 56;
        if u32_at(ph) != 1 {
            continue; // not PT_LOAD
        }
        let (off, vaddr) = (u64_at(ph + 8) as usize, u64_at(ph + 16));
        let (filesz, memsz) = (u64_at(ph + 32) as usize, u64_at(ph + 40) as usize);
        let start = usize::try_from(vaddr - u64::from(LOAD_ADDR)).unwrap();
        if flat.len() < start + memsz {
            flat.resize(start + memsz, 0);
        }
        flat[start..start + filesz].copy_from_slice(&bytes[off..off + filesz]);
    }
    let payload = u32::try_from(flat.len()).unwrap();

    let mut img = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
    let mut put = |off: usize, v: &[u8]| img[off..off + v.len()].copy_from_slice(v);
    // Real-mode code, never run by hpcvm: cli; hlt; jmp back to the hlt.
    let halt = [0xfa, 0xf4, 0xeb, 0xfd];
    put(0, &halt);
    put(0x1f1, &[SETUP_SECTS]); // setup_sects
    put(0x1f4, &payload.div_ceil(16).to_le_bytes()); // syssize (16-byte units)
    put(0x1fa, &0xffffu16.to_le_bytes()); // vid_mode: normal
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x200, &[0xeb, 0x6a]); // jump: jmp 0x26c (past the header), to `halt`
    put(0x202, b"HdrS"); // header
    put(0x206, &0x020cu16.to_le_bytes()); // version 2.12
    put(0x20c, &0x1000u16.to_le_bytes()); // start_sys_seg (obsolete, as Linux)
    put(0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(0x214, &LOAD_ADDR.to_le_bytes()); // code32_start
    put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &LOAD_ADDR.to_le_bytes()); // kernel_alignment (not relocatable)
    put(0x235, &[20]); // min_alignment: log2(1 MiB)
    put(0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(0x238, &2047u32.to_le_bytes()); // cmdline_size (hpcvm: 2 KiB with NUL)
    put(0x258, &u64::from(LOAD_ADDR).to_le_bytes()); // pref_address
    put(0x260, &payload.next_multiple_of(4096).to_le_bytes()); // init_size
    put(0x26c, &halt);
    img.extend_from_slice(&flat);
    std::fs::write(out, &img).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
}

/// Fails the build with a clear message when `tool` cannot be run.
fn check_tool(tool: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`{tool} --version` failed ({}): the hpcvm test guests need the system \
             toolchain (gcc and GNU ld for x86-64, e.g. `apt-get install gcc binutils`)",
            o.status
        ),
        Err(e) => panic!(
            "cannot run `{tool}` ({e}): the hpcvm test guests in tests/guests are built \
             with the system toolchain; install gcc and GNU ld for x86-64 \
             (e.g. `apt-get install gcc binutils`)"
        ),
    }
}

/// Runs a toolchain command, failing the build with its output on error.
fn run(mut cmd: Command, guest: &str) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("building guest `{guest}`: cannot run {shown}: {e}"));
    if !out.status.success() {
        panic!(
            "building guest `{guest}` failed ({}):\n{shown}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Surface assembler/linker warnings in cargo's output.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("cargo:warning={guest}: {line}");
    }
}
