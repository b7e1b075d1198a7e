//! Boots a guest with the fake VFIO device (`vmm::vfio::fake`) on its PCI bus, through
//! the `vmm` library as an embedding program would: the real-KVM passthrough test
//! for hosts without VFIO. The guest console goes to stdout; at exit, one JSON line
//! on stderr says what the VMM did to the device, and the exit status is hpcvm's.
//!
//! usage: fake-vfio-vm KERNEL [CPUS] [--no-mmap]

use std::process::ExitCode;
use std::sync::Arc;

use vmm::config::VmConfig;
use vmm::exit_code;
use vmm::pci::Passthrough;
use vmm::vfio::fake::{FakeDma, FakeOptions, FakeVfio};

fn main() -> ExitCode {
    vmm::log_to_stderr();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(kernel) = args.first() else {
        eprintln!("usage: fake-vfio-vm KERNEL [CPUS] [--no-mmap]");
        return ExitCode::from(exit_code::USAGE);
    };
    let cpus = args
        .get(1)
        .filter(|a| !a.starts_with("--"))
        .map_or("1", String::as_str);
    let options = FakeOptions {
        mappable: !args.iter().any(|a| a == "--no-mmap"),
        ..Default::default()
    };
    let config = VmConfig {
        cpus: cpus.parse().expect("--cpus"),
        memory: "64M".parse().expect("--memory"),
        // The fake answers BAR accesses over a socket it polls on the vCPU thread,
        // which no real device does: the vCPU filter is not for it.
        seccomp: vmm::seccomp::SeccompMode::Off,
        ..VmConfig::new(kernel)
    };
    let fake = Arc::new(FakeVfio::new(options).expect("the fake device's memfd"));
    let dma = Arc::new(FakeDma::default());
    let responder = fake.start_responder();
    let result = vmm::run_with(
        &config,
        vec![Passthrough {
            backend: fake.clone(),
            dma: dma.clone(),
        }],
    );
    drop(responder);
    let log = fake.log();
    let report = serde_json::json!({
        "trapped_bar_reads": log.reads.len(),
        "trapped_bar_writes": log.writes.len(),
        "bar_maps": log.maps,
        "irqs": log.irqs,
        "resets": log.resets,
        "dma_mapped_at_exit": *dma.mapped.lock().unwrap(),
    });
    eprintln!("fake-vfio: {report}");
    ExitCode::from(match result {
        Ok(outcome) => exit_code::for_outcome(&outcome),
        Err(e) => {
            eprintln!("fake-vfio-vm: error: {e}");
            exit_code::for_error(&e)
        }
    })
}
