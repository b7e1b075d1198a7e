//! VFIO passthrough on real KVM, with the fake device standing in for a ConnectX VF
//! (these hosts have no IOMMU): the `pci` test guest enumerates the bus, maps BAR 0,
//! rings the fake's doorbell and takes MSI-X interrupts. And `--device` refusals:
//! checked before anything starts, with the fix in the message.

use std::time::Duration;

use hpcvm_tests::guest;
use hpcvm_tests::proc::{run_hpcvm, run_program, sibling_bin, Finished, DEFAULT_TIMEOUT};
use serde_json::Value;

/// Runs the pci guest under `fake-vfio-vm` with `extra` arguments; returns the run and
/// the fake's report.
fn run_fake(extra: &[&str]) -> (Finished, Value) {
    let kernel = guest("pci").display().to_string();
    let mut args = vec![kernel.as_str()];
    args.extend_from_slice(extra);
    let r = run_program(&sibling_bin("fake-vfio-vm"), &args, DEFAULT_TIMEOUT);
    let report = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("fake-vfio: "))
        .unwrap_or_else(|| panic!("no fake-vfio report in stderr: {}", r.stderr));
    let report = serde_json::from_str(report).unwrap();
    (r, report)
}

/// What the guest prints when everything works.
const GUEST_OK: &[&str] = &[
    "pci: 00:00.0 8086:0d57 class 060000",
    "pci: 00:01.0 15b3:101c class 020700",
    "ecam: 00:01.0 15b3:101c",
    "bar0: addr=c0000000 size=00010000",
    "msix: vectors=4 table=bar0+00002000 pba=bar0+00003000",
    "bar0: rw ok",
    "msix: 100 interrupts ok",
    "msix: masked vector held, delivered on unmask",
    "msix: PBA pending while held, clear once delivered",
    "pci: done",
];

#[test]
fn a_guest_drives_the_passthrough_device_without_exits_and_takes_msix_interrupts() {
    let (r, report) = run_fake(&[]);
    assert_eq!(
        r.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert_eq!(r.stdout.lines().collect::<Vec<_>>(), GUEST_OK);
    // BAR 0 is mapped around its MSI-X table and PBA pages...
    assert_eq!(
        report["bar_maps"],
        serde_json::json!([[0, 0, 0x2000], [0, 0x4000, 0xc000]])
    );
    // ...so the doorbell, the response and 8 KiB of scratch went by without one
    // access reaching the VMM.
    assert_eq!(report["trapped_bar_reads"], 0, "{report}");
    assert_eq!(report["trapped_bar_writes"], 0, "{report}");
    // INTx until the guest enabled MSI-X (4 vectors), MSI-X off again at teardown.
    assert_eq!(
        report["irqs"],
        serde_json::json!([[0, 1], [0, 0], [2, 4], [2, 0]])
    );
    // Reset once when the VM ended; guest RAM out of the IOMMU.
    assert_eq!(report["resets"], 1);
    assert_eq!(report["dma_mapped_at_exit"], serde_json::json!([]));
}

#[test]
fn a_two_vcpu_guest_takes_msix_interrupts_too() {
    let (r, _) = run_fake(&["2"]);
    assert_eq!(
        r.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.contains("msix: 100 interrupts ok"), "{}", r.stdout);
}

#[test]
fn an_unmappable_bar_still_works_but_every_access_traps() {
    // The counterpart of the zero above: the counters do see trapped accesses.
    let (r, report) = run_fake(&["1", "--no-mmap"]);
    assert_eq!(
        r.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert_eq!(r.stdout.lines().collect::<Vec<_>>(), GUEST_OK);
    assert_eq!(report["bar_maps"], serde_json::json!([]));
    // 2 x 1024 scratch dwords written and read back, plus the doorbell rounds.
    assert!(
        report["trapped_bar_writes"].as_u64().unwrap() > 2048,
        "{report}"
    );
    assert!(
        report["trapped_bar_reads"].as_u64().unwrap() > 2048,
        "{report}"
    );
}

fn refused(extra: &[&str]) -> Finished {
    let sock = std::env::temp_dir().join(format!("hpcvm-vfio-{}.sock", std::process::id()));
    let sock_s = sock.display().to_string();
    let kernel = guest("hello").display().to_string();
    let mut args = vec!["run", "--kernel", &kernel, "--api-socket", &sock_s];
    args.extend_from_slice(extra);
    let r = run_hpcvm(&args, Duration::from_secs(30));
    assert!(r.stdout.is_empty(), "no guest ran: {}", r.stdout);
    assert!(!sock.exists(), "refused before the API socket was made");
    r
}

#[test]
fn an_unknown_device_is_refused_with_how_to_list_devices() {
    let r = refused(&["--device", "vfio=0000:fe:1f.7"]);
    assert_eq!(r.code, Some(160), "{}", r.stderr);
    assert!(
        r.stderr.contains("No PCI device 0000:fe:1f.7") && r.stderr.contains("lspci -D"),
        "{}",
        r.stderr
    );
    let r = refused(&["--device", "0000:fe:1f.7"]);
    assert_eq!(r.code, Some(160), "{}", r.stderr);
    assert!(
        r.stderr.contains("Invalid --device '0000:fe:1f.7'"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_host_without_iommu_refuses_a_real_device_with_the_fix() {
    let Some(dev) = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
    else {
        eprintln!("skipped: this host has no PCI devices");
        return;
    };
    let iommu_on = std::fs::read_dir("/sys/kernel/iommu_groups")
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if iommu_on {
        eprintln!("skipped: this host has an IOMMU");
        return;
    }
    let bdf = dev.file_name().to_string_lossy().to_string();
    let r = refused(&["--device", &format!("vfio={bdf}")]);
    assert_eq!(r.code, Some(162), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{bdf} has no IOMMU group"))
            && r.stderr.contains("intel_iommu=on"),
        "{}",
        r.stderr
    );
}

#[test]
fn doctor_fails_a_requested_device_with_the_fix_and_passes_a_plain_host() {
    let r = run_hpcvm(
        &["doctor", "--device", "vfio=0000:fe:1f.7", "--memory", "64M"],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("FAIL  device 0000:fe:1f.7: No PCI device 0000:fe:1f.7")
            && r.stdout
                .contains("fix: list the host's devices with `lspci -D`"),
        "{}",
        r.stdout
    );
    // Nothing requested that cannot work: warnings (software KVM, no IOMMU) only.
    let r = run_hpcvm(&["doctor"], Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("ok    kvm: /dev/kvm opens"),
        "{}",
        r.stdout
    );
}

#[test]
fn sriov_bind_of_an_unknown_device_fails_with_how_to_list_devices() {
    let r = run_hpcvm(&["sriov", "bind", "0000:fe:1f.7"], Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("No PCI device 0000:fe:1f.7") && r.stderr.contains("hpcvm sriov list"),
        "{}",
        r.stderr
    );
}
