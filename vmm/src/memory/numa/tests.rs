use super::*;

fn host2() -> HostNodes {
    HostNodes(vec![(0, vec![0, 1]), (1, vec![2, 3])])
}

#[test]
fn two_nodes_split_vcpus_and_ram_in_order() {
    let l = plan(
        NumaConfig::Nodes(2),
        2,
        512 << 20,
        HugePageSize::None,
        None,
        &HostNodes(vec![(0, vec![0, 1])]),
    )
    .unwrap();
    assert_eq!(l.nodes.len(), 2);
    assert_eq!(l.nodes[0].vcpus, [0]);
    assert_eq!(l.nodes[1].vcpus, [1]);
    assert_eq!(l.nodes[0].ram, [(0, 256 << 20)]);
    assert_eq!(l.nodes[1].ram, [(256 << 20, 256 << 20)]);
    // One host node: both guest nodes live on it.
    assert_eq!(l.nodes[1].host_node, Some(0));
    assert_eq!(l.node_of(1), 1);
}

#[test]
fn auto_follows_the_pinned_cpus_host_nodes() {
    let l = plan(
        NumaConfig::Auto,
        4,
        1 << 30,
        HugePageSize::Size2M,
        Some(&[2, 3, 0, 1]),
        &host2(),
    )
    .unwrap();
    let got: Vec<_> = l
        .nodes
        .iter()
        .map(|n| (n.vcpus.clone(), n.host_node))
        .collect();
    assert_eq!(got, [(vec![0, 1], Some(1)), (vec![2, 3], Some(0))]);
    // Unpinned, auto is one node placed by first touch.
    let flat = plan(
        NumaConfig::Auto,
        4,
        1 << 30,
        HugePageSize::None,
        None,
        &host2(),
    )
    .unwrap();
    assert_eq!(flat.nodes.len(), 1);
    assert_eq!(flat.nodes[0].host_node, None);
}

#[test]
fn a_node_straddling_the_mmio_gap_gets_both_ranges() {
    let l = plan(
        NumaConfig::Nodes(2),
        2,
        4 << 30,
        HugePageSize::Size1G,
        None,
        &HostNodes::default(),
    )
    .unwrap();
    assert_eq!(l.nodes[0].ram, [(0, 2 << 30)]);
    assert_eq!(l.nodes[1].ram, [(2 << 30, 1 << 30), (4 << 30, 1 << 30)]);
    assert_eq!(l.nodes[1].host_node, None);
}

#[test]
fn impossible_splits_are_refused_with_the_reason() {
    let e = plan(
        NumaConfig::Nodes(3),
        2,
        512 << 20,
        HugePageSize::None,
        None,
        &host2(),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot lay out guest NUMA nodes: --numa 3 needs at least 3 vCPUs (one per node); the guest has 2"
    );
    let e = plan(
        NumaConfig::Nodes(2),
        2,
        1 << 30,
        HugePageSize::Size1G,
        None,
        &host2(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot make 2 nodes of whole 1G units"),
        "{e}"
    );
}

#[test]
fn host_nodes_are_read_from_sysfs() {
    let h = HostNodes::read();
    // Every Linux host with NUMA has node 0 holding CPU 0.
    if !h.0.is_empty() {
        assert_eq!(h.node_of(0), Some(0));
    }
}

#[test]
fn bound_ram_reports_the_policy_in_numa_maps() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    if HostNodes::read().0.is_empty() {
        return;
    }
    let layout = NumaLayout {
        nodes: vec![NumaNode {
            vcpus: vec![0],
            ram: vec![(0, 8 << 20)],
            host_node: Some(0),
        }],
    };
    bind(&mem, &layout, HugePageSize::None).unwrap();
    let addr = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
    let line = maps
        .lines()
        .find(|l| l.starts_with(&format!("{addr:x} ")))
        .expect("the mapping in numa_maps");
    assert!(line.contains(" bind:0"), "{line}");
}

#[test]
fn uneven_auto_groups_share_ram_without_overflowing() {
    // 6/1/1/1/1 vCPUs over five host nodes, five 1G pages: each node gets one page
    // (before, the four small nodes' "at least one" pushed the total past the RAM).
    let host = HostNodes((0..5).map(|n| (n, vec![n as usize])).collect());
    let affinity = [0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
    let l = plan(
        NumaConfig::Auto,
        10,
        5 << 30,
        HugePageSize::Size1G,
        Some(&affinity),
        &host,
    )
    .unwrap();
    let sizes: Vec<u64> = l.nodes.iter().map(NumaNode::ram_bytes).collect();
    assert_eq!(sizes, [1 << 30; 5]);
    // With RAM to spare, the big node gets the spare in proportion.
    let l = plan(
        NumaConfig::Auto,
        10,
        15 << 30,
        HugePageSize::Size1G,
        Some(&affinity),
        &host,
    )
    .unwrap();
    let sizes: Vec<u64> = l.nodes.iter().map(|n| n.ram_bytes() >> 30).collect();
    assert_eq!(sizes, [7, 2, 2, 2, 2]);
    assert_eq!(sizes.iter().sum::<u64>(), 15);
}

#[test]
fn hugepages_are_counted_per_host_node() {
    let node = |start: u64, host_node| NumaNode {
        vcpus: vec![0],
        ram: vec![(start, 1 << 30)],
        host_node,
    };
    let layout = NumaLayout {
        nodes: vec![
            node(0, Some(0)),
            node(1 << 30, Some(1)),
            node(2 << 30, Some(0)),
            node(3 << 30, None),
        ],
    };
    assert_eq!(
        pool_needs(&layout, HugePageSize::Size2M),
        [(0, 1024), (1, 512)]
    );
}

#[test]
fn only_nodes_with_allowed_cpus_and_memory_are_used() {
    // Node 2 has no CPUs (memory only), node 1 is outside the cpuset's mems, and
    // CPU 1 is not in this process's affinity.
    let host = HostNodes(vec![
        (0, vec![0, 1]),
        (1, vec![2, 3]),
        (2, vec![]),
        (3, vec![4, 5]),
    ]);
    let usable = host.usable(&[0, 2, 3, 4, 5], Some(&[0, 2, 3]));
    assert_eq!(usable, HostNodes(vec![(0, vec![0]), (3, vec![4, 5])]));
    // Unpinned --numa 4 spreads over those two only.
    let l = plan(
        NumaConfig::Nodes(4),
        4,
        1 << 30,
        HugePageSize::None,
        None,
        &usable,
    )
    .unwrap();
    let hosts: Vec<_> = l.nodes.iter().map(|n| n.host_node).collect();
    assert_eq!(hosts, [Some(0), Some(3), Some(0), Some(3)]);
    // Unknown mems: only the CPUs decide.
    assert_eq!(host.usable(&[4], None), HostNodes(vec![(3, vec![4])]));
}

fn topo(sockets: u32, cores: u32, threads: u32) -> Topology {
    Topology {
        sockets,
        cores,
        threads,
    }
}

fn llc(t: Topology, numa: u32) -> Result<Option<u32>, MemoryError> {
    let places = crate::vstate::topology::places(&t);
    let l = plan(
        NumaConfig::Nodes(numa),
        t.vcpus(),
        1 << 30,
        HugePageSize::None,
        None,
        &HostNodes::default(),
    )
    .unwrap();
    llc_sharing(&l, &places, &t)
}

#[test]
fn the_llc_never_spans_two_nodes() {
    // One node: the package's LLC.
    assert_eq!(llc(topo(1, 4, 1), 1).unwrap(), None);
    // Equal power-of-two nodes: one LLC each.
    assert_eq!(llc(topo(1, 8, 1), 2).unwrap(), Some(4));
    // 6 vCPUs in 2 nodes of 3 (APIC IDs 0-2, 3-5): aligned blocks of 4 would mix
    // them, blocks of 2 would too (2-3), so each vCPU is its own LLC.
    assert_eq!(llc(topo(1, 6, 1), 2).unwrap(), Some(1));
    // 3 vCPUs in nodes of 1 and 2 (IDs 0 | 1-2): blocks of 2 would put 0 with 1.
    assert_eq!(llc(topo(1, 3, 1), 2).unwrap(), Some(1));
    // Nodes of whole packages with 3 cores (IDs 0-2, 4-6): a package-wide LLC.
    assert_eq!(llc(topo(2, 3, 1), 2).unwrap(), Some(4));
    // 2 cores x 2 threads in 2 nodes: one core per node, threads together.
    assert_eq!(llc(topo(1, 2, 2), 2).unwrap(), Some(2));
}

#[test]
fn a_core_split_over_two_nodes_is_refused() {
    // 3 cores x 2 threads in 2 nodes of 3 vCPUs: core 1's threads would be split.
    let e = llc(topo(1, 3, 2), 2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot lay out guest NUMA nodes: vCPUs 2 and 3 are threads of one core but \
         would be on guest nodes 0 and 1: give each node whole cores"
    );
}
