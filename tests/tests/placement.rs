//! Real /dev/kvm: vCPU threads are pinned as asked and guest RAM is backed as asked
//! (hugetlb pages, prefaulted), and the pool is whole again after the VM is gone.

use std::time::Duration;

use hpcvm_tests::guest;
use hpcvm_tests::hugepages::{free_2m, Reservation};
use hpcvm_tests::proc::{allowed_cpus, thread_affinities, RunningVm};

const BOOT: Duration = Duration::from_secs(60);

fn spin(cpus: &str, memory: &str) -> RunningVm {
    let kernel = guest("spin");
    let mut vm = RunningVm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpus",
        cpus,
        "--memory",
        memory,
    ]);
    vm.wait_for_line("spin: start", BOOT);
    vm
}

fn vcpu_affinities(pid: u32) -> Vec<(String, String)> {
    thread_affinities(pid)
        .into_iter()
        .filter(|(name, _)| name.starts_with("vcpu"))
        .collect()
}

#[test]
fn vcpu_threads_are_named_and_pinned_in_list_order() {
    let cpus = allowed_cpus();
    let (a, b) = (cpus[cpus.len() - 1], cpus[0]);
    let mut vm = spin(&format!("2,affinity={a},{b}"), "32M");
    let got = vcpu_affinities(vm.pid());
    vm.kill();
    assert_eq!(
        got,
        vec![
            ("vcpu0".into(), a.to_string()),
            ("vcpu1".into(), b.to_string())
        ]
    );
}

#[test]
fn per_vcpu_affinity_pairs_pin_each_vcpu() {
    let cpus = allowed_cpus();
    let (a, b) = (cpus[0], cpus[cpus.len() - 1]);
    let mut vm = spin(&format!("2,affinity=1@{a},0@{b}"), "32M");
    let got = vcpu_affinities(vm.pid());
    vm.kill();
    assert_eq!(
        got,
        vec![
            ("vcpu0".into(), b.to_string()),
            ("vcpu1".into(), a.to_string())
        ]
    );
}

#[test]
fn without_affinity_vcpus_may_run_anywhere_allowed() {
    let mut vm = spin("2", "32M");
    let got = vcpu_affinities(vm.pid());
    let own = thread_affinities(std::process::id())
        .into_iter()
        .next()
        .unwrap()
        .1;
    vm.kill();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(_, cpus)| *cpus == own), "{got:?} vs {own}");
}

/// (size kB, KernelPageSize kB, Private_Hugetlb kB) of each mapping in smaps.
fn smaps(pid: u32) -> Vec<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = Vec::new();
    let mut cur: Option<(u64, u64, u64)> = None;
    let kb = |l: &str| -> u64 { l.split_whitespace().nth(1).unwrap().parse().unwrap() };
    for l in text.lines() {
        if l.starts_with("Size:") {
            if let Some(c) = cur.take() {
                out.push(c);
            }
            cur = Some((kb(l), 0, 0));
        } else if let Some(c) = cur.as_mut() {
            if l.starts_with("KernelPageSize:") {
                c.1 = kb(l);
            } else if l.starts_with("Private_Hugetlb:") {
                c.2 = kb(l);
            }
        }
    }
    out.extend(cur);
    out
}

#[test]
fn hugepage_guest_ram_is_hugetlb_backed_prefaulted_and_returned() {
    let pool = Reservation::take(40);
    let before = free_2m();
    let mut vm = spin("1", "64M,hugepages=2M,prefault=on");
    let maps = smaps(vm.pid());
    let during = free_2m();
    vm.kill();
    let after = free_2m();
    drop(pool);

    let ram: Vec<_> = maps.iter().filter(|m| m.0 == 64 << 10).collect();
    assert_eq!(ram.len(), 1, "one 64 MiB mapping expected: {maps:?}");
    assert_eq!(ram[0].1, 2048, "KernelPageSize of guest RAM");
    assert_eq!(ram[0].2, 64 << 10, "prefault=on populates all of it");
    assert_eq!(before - during, 32, "32 pages taken from the pool");
    assert_eq!(after, before, "every hugepage back in the pool");
}

#[test]
fn anonymous_guest_ram_uses_ordinary_pages() {
    let mut vm = spin("1", "48M");
    let maps = smaps(vm.pid());
    vm.kill();
    let ram: Vec<_> = maps.iter().filter(|m| m.0 == 48 << 10).collect();
    assert_eq!(ram.len(), 1, "{maps:?}");
    assert_eq!(ram[0].1, 4, "KernelPageSize of guest RAM");
    assert_eq!(ram[0].2, 0);
}
