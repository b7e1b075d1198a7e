use super::*;
use crate::vfio::host::fake::FakeHost;

const VF: &str = "0000:3b:00.2";
const ROOMY: Memlock = Memlock {
    limit: None,
    cap_ipc_lock: false,
};

/// A hardware-KVM host with 2M and 1G pools on two nodes and an IOMMU.
fn host() -> FakeHost {
    let h = FakeHost::new();
    h.write("dev/kvm", "")
        .write("proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu vmx sse2\n")
        .hugepages(2048, 1024, 1000)
        .node_hugepages(0, 2048, 600)
        .node_hugepages(1, 2048, 400)
        .hugepages(1_048_576, 0, 0)
        .pci_device(
            VF,
            (0x15b3, 0x101e, 0x020700),
            Some("vfio-pci"),
            Some(42),
            1,
        )
        .write("dev/vfio/42", "")
        .write("dev/vfio/vfio", "");
    h.driver_dir("vfio-pci");
    h
}

fn request(devices: &[&str], memory: Option<&str>) -> Request {
    Request {
        devices: devices.iter().map(|d| d.to_string()).collect(),
        memory: memory.map(|m| m.parse().unwrap()),
    }
}

fn run(h: &FakeHost, req: &Request, memlock: Memlock) -> (String, u8) {
    let checks = checks_with(&h.paths(), req, Ok(memlock));
    (render(&checks), exit_status(&checks))
}

#[test]
fn doctor_says_how_run_would_open_the_devices() {
    let h = host();
    let req = request(&[VF], Some("512M"));
    let (report, code) = run(&h, &req, ROOMY);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("ok    vfio open: through the VFIO container"),
        "{report}"
    );
    // With iommufd and a cdev, and no memlock limit: iommufd, with its accounting.
    h.write("dev/iommu", "").write("dev/vfio/devices/vfio0", "");
    std::fs::create_dir_all(h.dev_dir(VF).join("vfio-dev/vfio0")).unwrap();
    let (report, _) = run(&h, &req, ROOMY);
    assert!(
        report.contains("ok    vfio open: through iommufd")
            && report.contains("all of the user's VMs together"),
        "{report}"
    );
    // Neither way: no container, and the device has no cdev.
    std::fs::remove_dir_all(h.dev_dir(VF).join("vfio-dev")).unwrap();
    std::fs::remove_file(h.root.join("dev/vfio/vfio")).unwrap();
    let (report, code) = run(&h, &req, ROOMY);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("FAIL  vfio open:") && report.contains("CONFIG_VFIO_CONTAINER"),
        "{report}"
    );
}

#[test]
fn a_ready_host_reports_every_check_ok() {
    let h = host();
    let (report, code) = run(&h, &request(&[VF], Some("512M,hugepages=2M")), ROOMY);
    assert_eq!(code, 0, "{report}");
    assert!(
        !report.contains("warn") && !report.contains("FAIL"),
        "{report}"
    );
    assert!(
        report.contains("ok    kvm kind: hardware (vmx)"),
        "{report}"
    );
    assert!(
        report.contains("hugepages 2M: 1000 of 1024 free, guest needs 256; node0: 600, node1: 400"),
        "{report}"
    );
    assert!(report.contains("hugepages 1G: 0 of 0 free"), "{report}");
    assert!(
        report.contains("iommu: enabled (1 IOMMU groups)"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "device {VF}: 15b3:101e on vfio-pci, IOMMU group 42 via"
        )),
        "{report}"
    );
    assert!(report.contains("NUMA node 1"), "{report}");
    assert!(
        report.contains("memlock: unlimited, VFIO may pin all 512 MiB"),
        "{report}"
    );
}

#[test]
fn software_kvm_is_a_warning_not_a_failure() {
    let h = host();
    h.write("sys/module/kvm_pvm/refcnt", "1");
    let (report, code) = run(&h, &Request::default(), ROOMY);
    assert_eq!(code, 0);
    assert!(
        report.contains("warn  kvm kind: software KVM (kvm_pvm): guest ring-0 code is emulated"),
        "{report}"
    );
    assert!(
        report.contains("      fix: run production jobs on a host with VT-x / AMD-V"),
        "{report}"
    );
}

#[test]
fn missing_dev_kvm_fails_with_modprobe() {
    let h = host();
    std::fs::remove_file(h.root.join("dev/kvm")).unwrap();
    let (report, code) = run(&h, &Request::default(), ROOMY);
    assert_eq!(code, 1);
    assert!(
        report.contains("FAIL  kvm: ") && report.contains("modprobe kvm_intel"),
        "{report}"
    );
}

#[test]
fn too_small_hugepage_pool_fails_with_pages_needed_free_and_the_echo() {
    let (report, code) = run(&host(), &request(&[], Some("4G,hugepages=2M")), ROOMY);
    assert_eq!(code, 1);
    assert!(
        report.contains("FAIL  hugepages 2M: 1000 of 1024 free, guest needs 2048"),
        "{report}"
    );
    assert!(
        report.contains("fix: echo 2072 > /proc/sys/vm/nr_hugepages"),
        "{report}"
    );
    let (report, _) = run(&host(), &request(&[], Some("2G,hugepages=1G")), ROOMY);
    assert!(
        report.contains("fix: echo 2 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"),
        "{report}"
    );
}

#[test]
fn iommu_off_warns_without_devices_and_fails_with_one() {
    let h = host();
    std::fs::remove_dir_all(h.root.join("sys/kernel/iommu_groups/42")).unwrap();
    let (report, code) = run(&h, &Request::default(), ROOMY);
    assert_eq!(code, 0);
    assert!(
        report.contains("warn  iommu: off") && report.contains("intel_iommu=on"),
        "{report}"
    );
    let (report, code) = run(&h, &request(&[VF], None), ROOMY);
    assert_eq!(code, 1);
    assert!(report.contains("FAIL  iommu: off"), "{report}");
}

#[test]
fn device_on_a_host_driver_fails_with_the_bind_command() {
    let h = host();
    h.bind(VF, Some("mlx5_core"));
    let (report, code) = run(&h, &request(&["3b:00.2"], None), ROOMY);
    assert_eq!(code, 1);
    assert!(
        report.contains("FAIL  device 3b:00.2: 0000:3b:00.2 is bound to the host driver mlx5_core"),
        "{report}"
    );
    assert!(
        report.contains("fix: run `hpcvm sriov bind 0000:3b:00.2`"),
        "{report}"
    );
    let (report, _) = run(&h, &request(&["5e:00.0"], None), ROOMY);
    assert!(
        report.contains("No PCI device 0000:5e:00.0") && report.contains("lspci -D"),
        "{report}"
    );
    // The spelling `hpcvm run --device` takes works too.
    let (report, _) = run(&h, &request(&["vfio=3b:00.2"], None), ROOMY);
    assert!(
        report.contains("FAIL  device 3b:00.2: 0000:3b:00.2 is bound"),
        "{report}"
    );
}

#[test]
fn memlock_below_guest_ram_fails_only_when_a_device_is_asked() {
    let low = Memlock {
        limit: Some(64 << 20),
        cap_ipc_lock: false,
    };
    let (report, code) = run(&host(), &request(&[], Some("1G")), low);
    assert_eq!(code, 0);
    assert!(!report.contains("memlock"), "{report}");
    let (report, code) = run(&host(), &request(&[VF], Some("1G")), low);
    assert_eq!(code, 1);
    assert!(
        report.contains(
            "FAIL  memlock: Locked-memory limit (RLIMIT_MEMLOCK) is 64 MiB, guest RAM is 1024 MiB"
        ),
        "{report}"
    );
    assert!(
        report.contains("fix: raise it: `ulimit -l unlimited`"),
        "{report}"
    );
}

#[test]
fn guest_ram_larger_than_the_devices_node_pool_warns_with_the_node_knob() {
    let h = host();
    h.write(
        "sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages",
        "400",
    );
    let (report, code) = run(&h, &request(&[VF], Some("1536M,hugepages=2M")), ROOMY);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("warn  numa 0000:3b:00.2: node1 has 400 free 2M pages, guest needs 768"),
        "{report}"
    );
    assert!(report.contains("fix: echo 768 > /sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"), "{report}");
}
