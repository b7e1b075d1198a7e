use super::*;
use crate::vfio::host::fake::FakeHost;

const PF: &str = "0000:3b:00.0";
const VF0: &str = "0000:3b:00.2";
const VF1: &str = "0000:3b:00.3";

/// An mlx5 PF with 2 of 16 VFs: VF0 on mlx5_core (group 42), VF1 on `vf1_driver`.
fn mlx5(vf1_driver: Option<&str>) -> FakeHost {
    let h = FakeHost::new();
    let vf = (0x15b3, 0x101e, 0x020700);
    h.pci_device(
        PF,
        (0x15b3, 0x101d, 0x020700),
        Some("mlx5_core"),
        Some(40),
        0,
    )
    .pci_device(VF0, vf, Some("mlx5_core"), Some(42), 0)
    .pci_device(VF1, vf, vf1_driver, Some(43), 0)
    .vf(PF, 0, VF0)
    .vf(PF, 1, VF1)
    .write(
        &format!("sys/devices/pci0000:00/{PF}/sriov_totalvfs"),
        "16\n",
    )
    .write(&format!("sys/devices/pci0000:00/{PF}/sriov_numvfs"), "2\n");
    h.driver_dir("vfio-pci");
    h
}

fn numvfs(h: &FakeHost) -> String {
    h.read(&format!("sys/devices/pci0000:00/{PF}/sriov_numvfs"))
}

#[test]
fn list_shows_pfs_with_their_vfs_drivers_and_groups() {
    let h = mlx5(Some("vfio-pci"));
    let pfs = list(&h.paths()).unwrap();
    assert_eq!(pfs.len(), 1);
    assert_eq!((pfs[0].num_vfs, pfs[0].total_vfs), (2, 16));
    assert_eq!(pfs[0].vfs[1].driver.as_deref(), Some("vfio-pci"));
    assert_eq!(pfs[0].vfs[1].iommu_group, Some(43));
    let table = render(&pfs);
    assert!(
        table.contains("0000:3b:00.0  15b3:101d  mlx5_core     2/16"),
        "{table}"
    );
    assert!(table.contains("vf1   0000:3b:00.3  vfio-pci"), "{table}");
    assert_eq!(to_json(&pfs)[0]["vfs"][0]["address"], VF0);
    assert!(render(&[]).starts_with("No SR-IOV capable devices"));
}

#[test]
fn create_with_the_current_count_writes_nothing() {
    let h = mlx5(None);
    assert_eq!(
        create(&h.paths(), PF, 2, false).unwrap(),
        Created::Unchanged
    );
    assert_eq!(numvfs(&h), "2\n");
}

#[test]
fn create_from_zero_writes_the_count() {
    let h = mlx5(None);
    h.write(&format!("sys/devices/pci0000:00/{PF}/sriov_numvfs"), "0\n");
    let done = create(&h.paths(), "3b:00.0", 8, false).unwrap();
    assert_eq!(done, Created::Changed { from: 0 });
    assert_eq!(numvfs(&h), "8");
}

#[test]
fn create_beyond_totalvfs_names_the_limit() {
    let msg = create(&mlx5(None).paths(), PF, 17, true)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("supports at most 16 VFs, 17 asked"), "{msg}");
    assert!(msg.contains("mlxconfig"), "{msg}");
}

#[test]
fn changing_a_nonzero_count_needs_force_and_names_vfs_in_use() {
    let h = mlx5(Some("vfio-pci"));
    let msg = create(&h.paths(), PF, 4, false).unwrap_err().to_string();
    assert!(
        msg.contains("already has 2 VFs (1 bound to vfio-pci"),
        "{msg}"
    );
    assert!(msg.contains(VF1) && msg.contains("--force"), "{msg}");
    assert_eq!(numvfs(&h), "2\n");
    let msg = create(&h.paths(), PF, 0, false).unwrap_err().to_string();
    assert!(msg.contains("in use by VMs"), "{msg}");
    assert_eq!(
        create(&h.paths(), PF, 4, true).unwrap(),
        Created::Changed { from: 2 }
    );
    assert_eq!(numvfs(&h), "4");
}

#[test]
fn removing_unused_vfs_needs_no_force() {
    let h = mlx5(None);
    assert_eq!(
        create(&h.paths(), PF, 0, false).unwrap(),
        Created::Changed { from: 2 }
    );
    assert_eq!(numvfs(&h), "0");
}

#[test]
fn create_on_a_vf_says_it_is_not_a_pf() {
    let msg = create(&mlx5(None).paths(), VF0, 1, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("0000:3b:00.2 is not an SR-IOV physical function"),
        "{msg}"
    );
    assert!(msg.contains("it is a VF of 0000:3b:00.0"), "{msg}");
}

#[test]
fn bind_sets_override_unbinds_and_probes() {
    let h = mlx5(None);
    let done = bind(&h.paths(), VF0).unwrap();
    assert_eq!(
        done,
        Bound::Probed {
            previous: Some("mlx5_core".into())
        }
    );
    assert_eq!(
        h.read(&format!("sys/devices/pci0000:00/{VF0}/driver_override")),
        "vfio-pci"
    );
    assert_eq!(h.read("sys/bus/pci/drivers/mlx5_core/unbind"), VF0);
    assert_eq!(h.read("sys/bus/pci/drivers_probe"), VF0);
    // Nothing reacts in a fake tree: the device is still on mlx5_core.
    let msg = check_bound(&h.paths(), VF0).unwrap_err().to_string();
    assert!(msg.contains("on mlx5_core after the probe") && msg.contains("dmesg"));
}

#[test]
fn bind_of_an_unbound_device_only_probes() {
    let h = mlx5(None);
    assert_eq!(
        bind(&h.paths(), VF1).unwrap(),
        Bound::Probed { previous: None }
    );
    assert_eq!(h.read("sys/bus/pci/drivers_probe"), VF1);
}

#[test]
fn bind_when_already_on_vfio_pci_writes_nothing() {
    let h = mlx5(Some("vfio-pci"));
    assert_eq!(bind(&h.paths(), VF1).unwrap(), Bound::Already);
    assert_eq!(h.read("sys/bus/pci/drivers_probe"), "");
    check_bound(&h.paths(), VF1).unwrap();
}

#[test]
fn bind_without_vfio_pci_loaded_says_modprobe() {
    let h = mlx5(None);
    std::fs::remove_dir(h.driver_dir("vfio-pci")).unwrap();
    let msg = bind(&h.paths(), VF0).unwrap_err().to_string();
    assert!(msg.contains("vfio-pci is not loaded") && msg.contains("modprobe vfio-pci"));
}

#[test]
fn guids_parse_only_as_eight_hex_bytes() {
    let g: Guid = "11:22:33:44:55:66:77:AA".parse().unwrap();
    assert_eq!(g, Guid(0x1122_3344_5566_77aa));
    assert_eq!(g.to_string(), "11:22:33:44:55:66:77:aa");
    for bad in [
        "",
        "11:22:33:44:55:66:77",
        "11:22:33:44:55:66:77:8",
        "1122334455667788",
    ] {
        let msg = bad.parse::<Guid>().unwrap_err().to_string();
        assert!(
            msg.contains(&format!("'{bad}'")) && msg.contains("11:22:33"),
            "{msg}"
        );
    }
    assert!("11:22:33:44:55:66:77:+8".parse::<Guid>().is_err());
}

#[test]
fn guids_go_to_the_vfs_index_under_the_pf_then_idempotent() {
    let h = mlx5(None);
    let dir = format!("sys/devices/pci0000:00/{PF}/sriov/1");
    h.write(&format!("{dir}/policy"), "Down\n");
    let (node, port) = (Guid(0x1122_3344_5566_7788), Guid(0x1122_3344_5566_7789));
    assert!(set_guids(&h.paths(), VF1, node, port).unwrap());
    assert_eq!(h.read(&format!("{dir}/node")), "11:22:33:44:55:66:77:88");
    assert_eq!(h.read(&format!("{dir}/port")), "11:22:33:44:55:66:77:89");
    assert_eq!(h.read(&format!("{dir}/policy")), "Follow");
    h.bind(VF1, Some("vfio-pci"));
    assert!(!set_guids(&h.paths(), VF1, node, port).unwrap());
    let msg = set_guids(&h.paths(), VF1, port, node)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("already bound to vfio-pci") && msg.contains("unbind"),
        "{msg}"
    );
}

#[test]
fn guids_on_a_pf_without_sriov_dir_or_on_a_pf_itself_are_refused() {
    let h = mlx5(None);
    let g = Guid(1);
    let msg = set_guids(&h.paths(), VF0, g, g).unwrap_err().to_string();
    assert!(
        msg.contains("not an mlx5 InfiniBand PF") && msg.contains("sriov/0"),
        "{msg}"
    );
    assert!(msg.contains("ip link set"), "{msg}");
    let msg = set_guids(&h.paths(), PF, g, g).unwrap_err().to_string();
    assert!(msg.contains("not an SR-IOV virtual function"), "{msg}");
}
