//! Real /dev/kvm: tiny guests boot through both entry protocols and report what the
//! VMM told them (command line, memory map, MP table, CPUID topology); the way they end
//! becomes hpcvm's exit status.

use std::path::Path;

use hpcvm_tests::guest_file;
use hpcvm_tests::proc::{run_guest, run_hpcvm, software_kvm, Finished, DEFAULT_TIMEOUT};

fn boot(guest_name: &str, extra: &[&str]) -> Finished {
    run_guest(guest_name, extra)
}

fn boot_file(kernel: &Path, extra: &[&str]) -> Finished {
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_hpcvm(&args, DEFAULT_TIMEOUT)
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in guest output:\n{out}"))
}

fn e820(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("e820: ")).collect()
}

/// The memory map of a guest with 128 MiB: base memory, the BIOS hole, RAM from 1 MiB.
const E820_128M: [&str; 3] = [
    "e820: 0000000000000000 000000000009fc00 1",
    "e820: 000000000009fc00 0000000000060400 2",
    "e820: 0000000000100000 0000000007f00000 1",
];

#[test]
fn pvh_guest_sees_cmdline_memory_map_and_all_vcpus_then_exits_0() {
    let r = boot(
        "bootinfo",
        &[
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--cmdline",
            "job=42 hpcvm.test",
        ],
    );
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(line(&r.stdout, "boot:"), "boot: pvh");
    let cmdline = line(&r.stdout, "cmdline:");
    assert!(
        cmdline.starts_with("cmdline: console=ttyS0 reboot=k panic=-1 job=42 hpcvm.test"),
        "{cmdline}"
    );
    assert_eq!(e820(&r.stdout), E820_128M);
    assert_eq!(
        line(&r.stdout, "mptable:"),
        "mptable: cpus=2 apic_ids=0,1 bsp=0 ioapic=1"
    );
    assert!(!r.stdout.contains("module:"), "no initramfs was given");
    assert!(r.stdout.contains("bootinfo: done"));
    assert!(
        r.stderr.is_empty(),
        "clean exit prints nothing: {}",
        r.stderr
    );
}

#[test]
fn linux_boot_protocol_passes_boot_params_and_initramfs() {
    let dir = std::env::temp_dir().join(format!("hpcvm-initrd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, vec![0x5a; 12345]).unwrap();
    let r = boot(
        "bootinfo-linux",
        &["--memory", "128M", "--initramfs", initrd.to_str().unwrap()],
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(line(&r.stdout, "boot:"), "boot: linux");
    assert!(line(&r.stdout, "cmdline:").starts_with("cmdline: console=ttyS0 reboot=k panic=-1"));
    assert_eq!(e820(&r.stdout), E820_128M);
    // The initramfs sits page-aligned at the top of RAM.
    let module = line(&r.stdout, "module:");
    let f: Vec<u64> = module
        .split_whitespace()
        .skip(1)
        .map(|x| u64::from_str_radix(x, 16).unwrap())
        .collect();
    assert_eq!(f[1], 12345, "{module}");
    assert_eq!(f[0] % 4096, 0, "{module}");
    assert!(
        f[0] + f[1] <= 128 << 20 && f[0] + f[1] > (128 << 20) - 8192,
        "{module}"
    );
    assert_eq!(
        line(&r.stdout, "mptable:"),
        "mptable: cpus=1 apic_ids=0 bsp=0 ioapic=1"
    );
}

#[test]
fn pvh_guest_gets_the_initramfs_as_a_module() {
    let path = std::env::temp_dir().join(format!("hpcvm-pvh-initrd-{}", std::process::id()));
    std::fs::write(&path, vec![1u8; 5000]).unwrap();
    let r = boot(
        "bootinfo",
        &["--memory", "64M", "--initramfs", path.to_str().unwrap()],
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let module = line(&r.stdout, "module:");
    assert!(module.ends_with(" 0000000000001388"), "{module}");
    assert!(module.starts_with("module: 0000000003ffe000"), "{module}");
}

#[test]
fn topology_reaches_mp_table_and_cpuid() {
    let r = boot(
        "bootinfo",
        &["--cpus", "6,topology=1:3:2", "--memory", "64M"],
    );
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    // Threads take 1 APIC-id bit, 3 cores take 2 bits.
    assert_eq!(
        line(&r.stdout, "mptable:"),
        "mptable: cpus=6 apic_ids=0,1,2,3,4,5 bsp=0 ioapic=1"
    );
    // Leaf 0xB as seen by vCPU 0: SMT level (shift 1, 2 threads), core level (shift 3,
    // 6 logical CPUs per package).
    assert_eq!(
        line(&r.stdout, "cpuidb0:"),
        "cpuidb0: eax=00000001 ebx=00000002 ecx=00000100 edx=00000000"
    );
    assert_eq!(
        line(&r.stdout, "cpuidb1:"),
        "cpuidb1: eax=00000003 ebx=00000006 ecx=00000201 edx=00000000"
    );
    // Leaf 1 EBX[23:16]: logical processors per package.
    let ebx = line(&r.stdout, "cpuid1:").split("ebx=").nth(1).unwrap();
    assert_eq!(&ebx[2..4], "06", "{ebx}");
}

#[test]
fn two_sockets_get_disjoint_apic_id_ranges() {
    let r = boot(
        "bootinfo",
        &["--cpus", "4,topology=2:2:1", "--memory", "64M"],
    );
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(
        line(&r.stdout, "mptable:"),
        "mptable: cpus=4 apic_ids=0,1,2,3 bsp=0 ioapic=1"
    );
    let r = boot(
        "bootinfo",
        &["--cpus", "6,topology=2:3:1", "--memory", "64M"],
    );
    assert_eq!(
        line(&r.stdout, "mptable:"),
        "mptable: cpus=6 apic_ids=0,1,2,4,5,6 bsp=0 ioapic=1"
    );
}

#[test]
fn software_kvm_hides_missing_instructions_on_the_cmdline_only_there() {
    let r = boot("bootinfo", &["--memory", "64M"]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let cmdline = line(&r.stdout, "cmdline:");
    assert_eq!(
        cmdline.contains("noxsave clearcpuid=cx16,popcnt,smap"),
        software_kvm(),
        "{cmdline}"
    );
    // The hypervisor leaf is always there.
    assert_eq!(line(&r.stdout, "hypervisor:"), "hypervisor: KVMKVMKVM");
}

#[test]
fn triple_fault_exits_163_and_names_the_vcpu() {
    let r = boot("triplefault", &["--memory", "32M"]);
    assert!(r.stdout.contains("triplefault: start"), "{}", r.stdout);
    assert_eq!(r.code, Some(163), "stderr: {}", r.stderr);
    assert_eq!(
        r.stderr.trim(),
        "hpcvm: vCPU 0 triple-faulted (KVM shutdown exit)"
    );
}

#[test]
fn unemulated_instruction_exits_164_with_vcpu_rip_and_bytes() {
    let r = boot("badinsn", &["--memory", "32M"]);
    assert!(r.stdout.contains("badinsn: start"), "{}", r.stdout);
    assert_eq!(r.code, Some(164), "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .starts_with("hpcvm: KVM emulation failure on vCPU 0 at RIP 0x"),
        "{}",
        r.stderr
    );
    if software_kvm() {
        // popcnt %eax,%eax, which this host's emulator lacks.
        assert!(
            r.stderr.contains("instruction bytes: f3 0f b8 c0"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn hello_guest_output_is_exactly_what_it_printed() {
    let r = boot("hello", &["--memory", "16M"]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "hello from guest\n");
}

#[test]
fn bzimage_boots_with_the_64_bit_protocol_and_gets_cmdline_and_initramfs() {
    let path = std::env::temp_dir().join(format!("hpcvm-bz-initrd-{}", std::process::id()));
    std::fs::write(&path, vec![0xa5u8; 12345]).unwrap();
    let r = boot_file(
        &guest_file("bootinfo.bzimage"),
        &[
            "--memory",
            "128M",
            "--initramfs",
            path.to_str().unwrap(),
            "--cmdline",
            "job=7 bz.test",
        ],
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(line(&r.stdout, "boot:"), "boot: linux");
    let cmdline = line(&r.stdout, "cmdline:");
    assert!(
        cmdline.starts_with("cmdline: console=ttyS0 reboot=k panic=-1 job=7 bz.test"),
        "{cmdline}"
    );
    assert_eq!(e820(&r.stdout), E820_128M);
    // Page-aligned at the top of RAM, as for the ELF kernel (initrd_addr_max is 2 GiB).
    let module = line(&r.stdout, "module:");
    assert_eq!(
        module, "module: 0000000007ffc000 0000000000003039",
        "{module}"
    );
    assert_eq!(
        line(&r.stdout, "mptable:"),
        "mptable: cpus=1 apic_ids=0 bsp=0 ioapic=1"
    );
    assert!(r.stdout.contains("bootinfo: done"));
}

/// The APIC ids in the `smp: ap up apic=<id>` lines, sorted, checking the first and
/// last lines on the way.
fn smp_ap_ids(out: &str, cpus: usize) -> Vec<u32> {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"smp: bsp up"), "{out}");
    assert_eq!(
        lines.last().copied(),
        Some(format!("smp: {cpus} cpus up").as_str()),
        "{out}"
    );
    assert_eq!(lines.len(), cpus + 1, "one line per AP: {out}");
    let mut ids: Vec<u32> = lines[1..cpus]
        .iter()
        .map(|l| {
            l.strip_prefix("smp: ap up apic=")
                .unwrap_or_else(|| panic!("unexpected line {l:?} in:\n{out}"))
                .parse()
                .unwrap()
        })
        .collect();
    ids.sort();
    ids
}

/// Secondary vCPUs start the way Linux starts them: INIT, then two STARTUP IPIs from
/// the BSP's LAPIC ICR, into a real-mode trampoline at 0x10000; each AP prints its APIC
/// id from real mode. The APIC ids come from the MP table, so a two-socket topology
/// (ids 0,1,2 and 4,5,6) proves the guest targets what hpcvm advertised.
///
/// This also runs on the software-KVM (kvm_pvm) test host: there, as on hardware KVM,
/// the in-kernel LAPIC delivers INIT/SIPI and the APs' real-mode code is emulated.
#[test]
fn smp_guest_wakes_every_ap_with_init_sipi_sipi() {
    let r = boot("smp", &["--cpus", "4", "--memory", "64M"]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(smp_ap_ids(&r.stdout, 4), [1, 2, 3]);
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    let r = boot("smp", &["--cpus", "6,topology=2:3:1", "--memory", "64M"]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(smp_ap_ids(&r.stdout, 6), [1, 2, 4, 5, 6]);

    let r = boot("smp", &["--cpus", "1", "--memory", "64M"]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "smp: bsp up\nsmp: 1 cpus up\n");
}

#[test]
fn a_kernel_panic_on_the_console_is_a_crash_not_a_clean_exit() {
    // bootinfo echoes its command line to COM1, so this puts Linux's panic line on the
    // console right before the guest resets, as panic=-1 does after a real panic.
    let r = boot(
        "bootinfo",
        &[
            "--memory",
            "32M",
            "--cmdline",
            "Kernel panic - not syncing: test",
        ],
    );
    assert_eq!(r.code, Some(163), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("Guest kernel panicked"), "{}", r.stderr);
}
