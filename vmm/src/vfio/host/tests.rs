use super::fake::FakeHost;
use super::*;

const MLX_VF: (u16, u16, u32) = (0x15b3, 0x101e, 0x020700);

/// A VF 0000:3b:00.2 in IOMMU group 42 on NUMA node 1, bound to vfio-pci.
fn vfio_vf() -> FakeHost {
    let h = FakeHost::new();
    h.pci_device("0000:3b:00.2", MLX_VF, Some("vfio-pci"), Some(42), 1)
        .write("dev/vfio/42", "");
    h
}

fn passthrough(h: &FakeHost, spec: &str) -> Result<PassthroughAccess, HostError> {
    check_passthrough(&h.paths(), &resolve(&h.paths(), spec)?)
}

#[test]
fn pci_addresses_parse_with_or_without_domain_and_print_in_full() {
    let a: PciAddress = "3b:00.2".parse().unwrap();
    assert_eq!(a.to_string(), "0000:3b:00.2");
    let b: PciAddress = "0001:AF:1f.7".parse().unwrap();
    assert_eq!((b.domain, b.bus, b.device, b.function), (1, 0xaf, 0x1f, 7));
    for bad in [
        "",
        "3b",
        "3b:00",
        "3b:20.0",
        "3b:00.8",
        "zz:00.0",
        "1:2:3:4.0",
    ] {
        let msg = bad.parse::<PciAddress>().unwrap_err().to_string();
        assert!(msg.contains(&format!("'{bad}'")), "{msg}");
        assert!(msg.contains("0000:3b:00.2 or 3b:00.2"), "{msg}");
    }
}

#[test]
fn resolve_reads_ids_driver_group_numa_and_physfn() {
    let h = vfio_vf();
    h.pci_device(
        "0000:3b:00.0",
        (0x15b3, 0x101d, 0x020700),
        Some("mlx5_core"),
        Some(40),
        -1,
    )
    .vf("0000:3b:00.0", 0, "0000:3b:00.2");
    let vf = resolve(&h.paths(), "3b:00.2").unwrap();
    assert_eq!((vf.vendor, vf.device, vf.class), MLX_VF);
    assert_eq!(vf.driver.as_deref(), Some("vfio-pci"));
    assert_eq!((vf.iommu_group, vf.numa_node), (Some(42), Some(1)));
    assert_eq!(vf.physfn, Some("0000:3b:00.0".parse().unwrap()));
    let pf = resolve(&h.paths(), "0000:3b:00.0").unwrap();
    assert_eq!((pf.numa_node, pf.physfn), (None, None));
}

#[test]
fn resolve_takes_the_bdf_from_a_sysfs_path() {
    let h = vfio_vf();
    for spec in [
        "/sys/bus/pci/devices/0000:3b:00.2",
        "/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.2/",
    ] {
        assert_eq!(resolve(&h.paths(), spec).unwrap().address.bus, 0x3b);
    }
}

#[test]
fn unknown_device_is_named_with_how_to_list_devices() {
    let msg = passthrough(&vfio_vf(), "0000:5e:00.0")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("No PCI device 0000:5e:00.0"), "{msg}");
    assert!(
        msg.contains("lspci -D") && msg.contains("hpcvm sriov list"),
        "{msg}"
    );
}

#[test]
fn vfio_bound_device_in_its_own_group_opens_the_group_node() {
    let h = vfio_vf();
    let access = passthrough(&h, "3b:00.2").unwrap();
    let node = h.root.join("dev/vfio/42");
    assert_eq!(access, PassthroughAccess::Group { group: 42, node });
}

#[test]
fn iommufd_hosts_open_the_device_cdev() {
    let h = vfio_vf();
    h.write("dev/iommu", "")
        .write("dev/vfio/devices/vfio3", "")
        .write("sys/devices/pci0000:00/0000:3b:00.2/vfio-dev/vfio3/dev", "");
    let node = h.root.join("dev/vfio/devices/vfio3");
    assert_eq!(
        passthrough(&h, "3b:00.2").unwrap(),
        PassthroughAccess::Cdev { node }
    );
}

#[test]
fn no_iommu_group_says_how_to_turn_the_iommu_on() {
    let h = FakeHost::new();
    h.pci_device("0000:3b:00.2", MLX_VF, Some("mlx5_core"), None, 0);
    let msg = passthrough(&h, "3b:00.2").unwrap_err().to_string();
    assert!(msg.contains("0000:3b:00.2 has no IOMMU group"), "{msg}");
    assert!(msg.contains("intel_iommu=on iommu=pt") && msg.contains("amd_iommu=on"));
    assert!(msg.contains("dmesg | grep -i iommu"), "{msg}");
    assert!(!iommu_enabled(&h.paths()));
}

#[test]
fn host_driver_is_named_with_the_bind_commands() {
    let h = vfio_vf();
    h.bind("0000:3b:00.2", Some("mlx5_core"));
    let msg = passthrough(&h, "3b:00.2").unwrap_err().to_string();
    assert!(msg.contains("bound to the host driver mlx5_core"), "{msg}");
    assert!(msg.contains("hpcvm sriov bind 0000:3b:00.2"), "{msg}");
    assert!(
        msg.contains("driver_override") && msg.contains("driver/unbind"),
        "{msg}"
    );
    assert!(msg.contains("drivers_probe"), "{msg}");
    h.bind("0000:3b:00.2", None);
    let msg = passthrough(&h, "3b:00.2").unwrap_err().to_string();
    assert!(
        msg.contains("bound to no driver") && !msg.contains("unbind"),
        "{msg}"
    );
}

#[test]
fn group_member_on_a_host_driver_makes_the_group_not_viable() {
    let h = vfio_vf();
    h.pci_device("0000:3b:00.3", MLX_VF, Some("mlx5_core"), None, 1);
    std::os::unix::fs::symlink(
        h.dev_dir("0000:3b:00.3"),
        h.root
            .join("sys/kernel/iommu_groups/42/devices/0000:3b:00.3"),
    )
    .unwrap();
    let msg = passthrough(&h, "3b:00.2").unwrap_err().to_string();
    assert!(
        msg.contains("IOMMU group 42 of 0000:3b:00.2 is not viable"),
        "{msg}"
    );
    assert!(msg.contains("0000:3b:00.3 is bound to mlx5_core"), "{msg}");
    assert!(msg.contains("hpcvm sriov bind 0000:3b:00.3"), "{msg}");
    for harmless in [Some("pcieport"), Some("pci-stub"), Some("vfio-pci"), None] {
        h.bind("0000:3b:00.3", harmless);
        passthrough(&h, "3b:00.2").unwrap();
    }
}

#[test]
fn missing_group_node_says_to_load_vfio_pci() {
    let h = vfio_vf();
    std::fs::remove_file(h.root.join("dev/vfio/42")).unwrap();
    let msg = passthrough(&h, "3b:00.2").unwrap_err().to_string();
    assert!(msg.contains("dev/vfio/42 is missing"), "{msg}");
    assert!(msg.contains("modprobe vfio-pci"), "{msg}");
}

#[test]
fn iommu_is_on_when_a_group_exists() {
    assert!(iommu_enabled(&vfio_vf().paths()));
}

#[test]
fn memlock_allows_unlimited_capable_or_large_enough() {
    let gib = 1 << 30;
    let ok = |limit, cap| {
        Memlock {
            limit,
            cap_ipc_lock: cap,
        }
        .check(4 * gib)
    };
    ok(None, false).unwrap();
    ok(Some(64 << 10), true).unwrap();
    ok(Some(4 * gib), false).unwrap();
    let msg = ok(Some(8 << 20), false).unwrap_err().to_string();
    assert!(msg.contains("is 8 MiB, guest RAM is 4096 MiB"), "{msg}");
    for fix in ["ulimit -l unlimited", "LimitMEMLOCK=infinity", "MEMLOCK"] {
        assert!(msg.contains(fix), "{msg}");
    }
    let msg = ok(Some(64 << 10), false).unwrap_err().to_string();
    assert!(msg.contains("is 64 KiB"), "{msg}");
}

#[test]
fn memlock_reads_cap_ipc_lock_from_capeff() {
    let h = FakeHost::new();
    h.write(
        "proc/self/status",
        "Name:\thpcvm\nCapEff:\t0000000000004000\n",
    );
    assert!(Memlock::read(&h.paths()).unwrap().cap_ipc_lock);
    h.write("proc/self/status", "CapEff:\t0000000000003fff\n");
    assert!(!Memlock::read(&h.paths()).unwrap().cap_ipc_lock);
    Memlock::read(&h.paths()).unwrap().check(0).unwrap();
}
