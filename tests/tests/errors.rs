//! Bad input never starts a guest: each gets a message naming the problem and its own
//! documented exit code, and leaves nothing behind (hugepages included).

use hpcvm_tests::guest;
use hpcvm_tests::hugepages::{free_2m, Reservation};
use hpcvm_tests::proc::{allowed_cpus, run_guest, run_hpcvm, Finished, DEFAULT_TIMEOUT};

const CONFIG: i32 = 160;
const IMAGE: i32 = 161;
const HOST: i32 = 162;
const USAGE: i32 = 2;

fn hpcvm(args: &[&str]) -> Finished {
    run_hpcvm(args, DEFAULT_TIMEOUT)
}

fn run_hello(extra: &[&str]) -> Finished {
    run_guest("hello", extra)
}

fn assert_fails(r: &Finished, code: i32, message: &str) {
    assert_eq!(r.code, Some(code), "stderr: {}", r.stderr);
    assert!(
        r.stderr.starts_with("hpcvm: error: ") && r.stderr.contains(message),
        "expected {message:?} in stderr: {}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "no guest ran: {}", r.stdout);
}

fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("hpcvm-err-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_kernel_is_named() {
    let r = hpcvm(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_fails(
        &r,
        IMAGE,
        "Cannot read kernel image /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn non_kernel_file_is_refused_with_what_it_is() {
    let p = temp("script", b"#!/bin/sh\necho not a kernel\n");
    let r = hpcvm(&["run", "--kernel", p.to_str().unwrap()]);
    std::fs::remove_file(&p).unwrap();
    assert_fails(
        &r,
        IMAGE,
        "is neither an ELF vmlinux nor a bzImage (it starts with bytes 23 21 2f 62)",
    );
    let empty = temp("empty", b"");
    let r = hpcvm(&["run", "--kernel", empty.to_str().unwrap()]);
    std::fs::remove_file(&empty).unwrap();
    assert_fails(&r, IMAGE, "(the file is empty)");
}

#[test]
fn truncated_elf_kernel_is_refused() {
    let whole = std::fs::read(guest("hello")).unwrap();
    let p = temp("truncated", &whole[..100]);
    let r = hpcvm(&["run", "--kernel", p.to_str().unwrap()]);
    std::fs::remove_file(&p).unwrap();
    assert_fails(&r, IMAGE, "Cannot load kernel image");
}

#[test]
fn missing_initramfs_is_named() {
    let r = run_hello(&["--initramfs", "/nonexistent/initrd"]);
    assert_fails(
        &r,
        IMAGE,
        "Cannot read initramfs /nonexistent/initrd: No such file or directory",
    );
}

#[test]
fn initramfs_larger_than_guest_ram_is_refused() {
    let p = temp("bigrd", &vec![0u8; 20 << 20]);
    let r = run_hello(&["--memory", "16M", "--initramfs", p.to_str().unwrap()]);
    std::fs::remove_file(&p).unwrap();
    assert_fails(&r, IMAGE, "does not fit in guest RAM");
}

#[test]
fn zero_and_too_many_vcpus_are_config_errors() {
    assert_fails(
        &run_hello(&["--cpus", "0"]),
        CONFIG,
        "Invalid --cpus '0': a guest needs at least 1 vCPU",
    );
    assert_fails(
        &run_hello(&["--cpus", "300"]),
        CONFIG,
        "Invalid --cpus '300': 300 vCPUs is more than the 254 hpcvm supports",
    );
}

#[test]
fn affinity_outside_the_allowed_cpus_is_refused() {
    let beyond = allowed_cpus().iter().max().unwrap() + 1;
    let r = run_hello(&["--cpus", &format!("1,affinity={beyond}")]);
    assert_fails(
        &r,
        CONFIG,
        &format!("--cpus affinity names host CPU {beyond}, which this process may not use"),
    );
}

#[test]
fn affinity_that_is_not_one_to_one_is_refused() {
    let r = run_hello(&["--cpus", "2,affinity=0,0"]);
    assert_fails(
        &r,
        CONFIG,
        "host CPU 0 is given to two vCPUs; pinning is 1:1",
    );
}

#[test]
fn memory_beyond_the_host_is_refused() {
    let r = run_hello(&["--memory", "64T"]);
    assert_fails(&r, HOST, "Guest memory 64T is more than this host's");
}

#[test]
fn bad_memory_syntax_is_a_config_error() {
    assert_fails(
        &run_hello(&["--memory", "lots"]),
        CONFIG,
        "Invalid --memory 'lots'",
    );
    assert_fails(
        &run_hello(&["--memory", "33M,hugepages=2M"]),
        CONFIG,
        "33M is not a multiple of the 2M page size",
    );
}

#[test]
fn too_long_cmdline_is_a_config_error() {
    let long = "x".repeat(3000);
    let r = run_hello(&["--cmdline", &long]);
    assert_fails(&r, CONFIG, "Kernel command line rejected");
}

#[test]
fn unknown_option_is_a_usage_error() {
    let r = hpcvm(&["run", "--kernel", "k", "--frobnicate"]);
    assert_eq!(r.code, Some(USAGE), "{}", r.stderr);
    let last = r.stderr.trim_end().lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "hpcvm: error: unexpected argument '--frobnicate' found; see 'hpcvm run --help'"
    );
    // A negative value: clap's own tip ("use '-- -1'") would make it the guest command.
    let r = hpcvm(&["run", "--memory", "-1", "--", "true"]);
    assert_eq!(r.code, Some(USAGE), "{}", r.stderr);
    let last = r.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("hpcvm: error: unexpected argument '-1' found")
            && last.contains("--OPTION=VALUE")
            && !r.stderr.contains("'-- -1'"),
        "{}",
        r.stderr
    );
    let r = hpcvm(&[]);
    assert_eq!(r.code, Some(USAGE), "{}", r.stderr);
    assert!(
        r.stderr
            .trim_end()
            .ends_with("hpcvm: error: no command given; see 'hpcvm --help'"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_option_key_given_twice_is_refused() {
    assert_fails(
        &run_hello(&["--memory", "256M,hugepages=2M,hugepages=none"]),
        CONFIG,
        "hugepages given twice",
    );
    assert_fails(
        &run_hello(&["--memory", "65537K"]),
        CONFIG,
        "65537K is not a multiple of the 4K page size",
    );
}

#[test]
fn hugepage_pool_too_small_fails_before_boot_and_leaks_nothing() {
    let pool = Reservation::take(8);
    pool.set_free(5);
    let before = free_2m();
    let r = run_hello(&["--memory", "64M,hugepages=2M"]);
    let after = free_2m();
    drop(pool);
    assert_fails(
        &r,
        HOST,
        "Hugepage pool has 5 free 2M pages, guest needs 32: raise /proc/sys/vm/nr_hugepages",
    );
    assert_eq!(after, before, "no hugepage kept");
}

#[test]
fn a_job_without_a_built_guest_says_how_to_build_one() {
    let out = std::process::Command::new(hpcvm_tests::proc::hpcvm_bin())
        .args(["run", "--", "true"])
        .env("HPCVM_GUEST_DIR", "/nonexistent/guest")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(IMAGE), "{err}");
    assert!(
        err.contains("No guest kernel at /nonexistent/guest/vmlinux: run `make guest`"),
        "{err}"
    );
}

#[test]
fn initramfs_and_a_job_do_not_mix() {
    let r = hpcvm(&["run", "--initramfs", "/x", "--", "true"]);
    assert_fails(&r, CONFIG, "--initramfs cannot be combined with -- CMD");
}

/// `hello.elf` with `patch` applied to its bytes, as a file of its own.
fn patched_hello(name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
    let mut bytes = std::fs::read(guest("hello")).unwrap();
    patch(&mut bytes);
    temp(name, &bytes)
}

/// The first PT_LOAD program header's offset in an ELF64 file.
fn first_load(bytes: &[u8]) -> usize {
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes([bytes[56], bytes[57]]) as usize;
    (0..phnum)
        .map(|i| phoff + 56 * i)
        .find(|&p| u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) == 1)
        .unwrap()
}

/// A change to a kernel file's bytes.
type Patch = Box<dyn FnOnce(&mut Vec<u8>)>;

#[test]
fn kernels_the_loader_cannot_place_are_refused_before_they_run() {
    let set_u64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let cases: Vec<(&str, Patch, &str)> = vec![
        (
            "phnum0",
            Box::new(|b| b[56..58].copy_from_slice(&[0, 0])),
            "no program headers",
        ),
        (
            "aarch64",
            Box::new(|b| b[18..20].copy_from_slice(&183u16.to_le_bytes())),
            "machine 183 (aarch64), not x86-64",
        ),
        ("class32", Box::new(|b| b[4] = 1), "32-bit ELF"),
        (
            "past4g",
            Box::new(move |b| {
                let p = first_load(b);
                set_u64(b, p + 24, 5 << 30);
            }),
            "lies outside guest RAM",
        ),
        (
            "hole",
            Box::new(move |b| {
                let p = first_load(b);
                set_u64(b, p + 24, 0xfec0_0000);
            }),
            "lies outside guest RAM",
        ),
        (
            "huge",
            Box::new(move |b| {
                let p = first_load(b);
                set_u64(b, p + 40, 1 << 30);
            }),
            "lies outside guest RAM (256 MiB",
        ),
        (
            "wrap",
            Box::new(move |b| {
                let p = first_load(b);
                set_u64(b, p + 24, u64::MAX - 0xf);
            }),
            "wraps around",
        ),
        (
            "bootdata",
            Box::new(move |b| {
                let p = first_load(b);
                set_u64(b, p + 24, 0x7000);
            }),
            "below 1 MiB, over hpcvm's boot data",
        ),
    ];
    for (name, patch, message) in cases {
        let k = patched_hello(name, patch);
        let r = hpcvm(&["run", "--memory", "256M", "--kernel", k.to_str().unwrap()]);
        std::fs::remove_file(&k).unwrap();
        assert_fails(&r, IMAGE, message);
    }
}

#[test]
fn a_kernel_or_initramfs_that_is_a_fifo_is_refused_without_waiting() {
    let fifo = std::env::temp_dir().join(format!("hpcvm-err-{}-fifo", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let r = hpcvm(&["run", "--kernel", fifo.to_str().unwrap()]);
    let hello = guest("hello");
    let r2 = hpcvm(&[
        "run",
        "--kernel",
        hello.to_str().unwrap(),
        "--initramfs",
        fifo.to_str().unwrap(),
    ]);
    std::fs::remove_file(&fifo).unwrap();
    assert_fails(&r, IMAGE, "not a regular file (a FIFO)");
    assert_fails(&r2, IMAGE, "not a regular file (a FIFO)");
}
