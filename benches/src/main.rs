//! `make bench`: hpcvm measured beside a peer in the same run on the same machine,
//! printed as Markdown tables and saved to `benches/results/latest.md`.
//!
//! Environment: `HPCVM_BENCH_RUNS` (start-up runs, default 30), `HPCVM_BENCH_RTT`
//! (control requests, default 1000), `HPCVM_BENCH_PREFAULT_GIB` (default "1,4,8"),
//! `HPCVM_BENCH_DESTROY_GIB` (default "1,4,8"), `HPCVM_BENCH_REPS` (default 3),
//! `HPCVM_BENCH_IO_MIB` (data path transfer size, default 16), `HPCVM_BENCH_ONLY`
//! (comma-separated: startup, control, prefault, destroy, boot, compute, datapath,
//! mpi, checkpoint; default all), `HPCVM_BENCH_HPCC_N` (HPCC's problem size, default
//! 400), `HPCVM_BENCH_FT_GIB` (checkpoint and migration guest sizes, default "1,4").

mod control;
mod datapath;
mod faults;
mod guest;
mod memory;
mod mpi;
mod plot;
mod startup;
mod stats;

use std::path::Path;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_sizes(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "software KVM (kvm_pvm: guest ring 0 is emulated)"
    } else {
        "hardware KVM"
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} CPUs, {kvm}, host kernel {}", kernel.trim())
}

fn main() {
    let exe = std::env::current_exe().unwrap();
    let hpcvm = exe.with_file_name("hpcvm");
    let reps = env_num("HPCVM_BENCH_REPS", 3);
    let mut report = format!("## hpcvm benchmark\n\nMachine: {}\n\n", machine());
    type Section<'a> = (&'static str, Box<dyn Fn() -> String + 'a>);
    let sections: Vec<Section> = vec![
        (
            "startup",
            Box::new(|| startup::run(&hpcvm, env_num("HPCVM_BENCH_RUNS", 30))),
        ),
        (
            "control",
            Box::new(|| control::run(&hpcvm, env_num("HPCVM_BENCH_RTT", 1000))),
        ),
        (
            "prefault",
            Box::new(|| {
                memory::prefault(
                    &hpcvm,
                    &env_sizes("HPCVM_BENCH_PREFAULT_GIB", "1,4,8"),
                    reps,
                )
            }),
        ),
        (
            "destroy",
            Box::new(|| {
                memory::destroy(&hpcvm, &env_sizes("HPCVM_BENCH_DESTROY_GIB", "1,4,8"), reps)
            }),
        ),
        ("boot", Box::new(|| guest::boot(&hpcvm, reps))),
        ("compute", Box::new(|| guest::compute(&hpcvm, reps))),
        (
            "datapath",
            Box::new(|| datapath::run(&hpcvm, env_num("HPCVM_BENCH_IO_MIB", 16), reps)),
        ),
        (
            "mpi",
            Box::new(|| mpi::run(&hpcvm, env_num("HPCVM_BENCH_HPCC_N", 400), reps)),
        ),
        (
            "checkpoint",
            Box::new(|| faults::run(&hpcvm, &env_sizes("HPCVM_BENCH_FT_GIB", "1,4"))),
        ),
    ];
    let only = std::env::var("HPCVM_BENCH_ONLY").ok();
    for (name, section) in sections {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|x| x.trim() == name))
        {
            continue;
        }
        let text = section();
        println!("{text}");
        report.push_str(&text);
        report.push('\n');
    }
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    if std::fs::create_dir_all(&results).is_ok() {
        let _ = std::fs::write(results.join("latest.md"), &report);
        println!("(saved to {})", results.join("latest.md").display());
        match plot::ratios(&report, &results.join("ratios.png")) {
            Ok(p) => println!("(plot: {})", p.display()),
            Err(e) => println!("(no plot: {e})"),
        }
    }
}
