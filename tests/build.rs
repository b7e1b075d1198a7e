//! Builds the tiny test guests in `guests/` into `$OUT_DIR/<name>.elf` with
//! the system toolchain (`gcc` to preprocess and assemble, `ld` to link),
//! and exports `HPCVM_GUEST_DIR=$OUT_DIR` to the crate.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// (guest name, source file in `guests/`, extra `gcc` flags)
const GUESTS: &[(&str, &str, &[&str])] = &[
    ("bootinfo", "bootinfo.S", &[]),
    ("bootinfo-linux", "bootinfo.S", &["-DBOOT_LINUX"]),
    ("hello", "hello.S", &[]),
    ("triplefault", "triplefault.S", &[]),
    ("badinsn", "badinsn.S", &[]),
    ("spin", "spin.S", &[]),
];

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

    println!("cargo:rustc-env=HPCVM_GUEST_DIR={}", out.display());
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
