//! `make bench`: hpcvm measured beside a peer VMM in the same run, on the same guest.
//!
//! Start-up: exec -> first byte of guest output, and exec -> process exit, for the tiny
//! PVH `hello` guest, hpcvm vs `qemu-system-x86_64 -M microvm -accel kvm`; peak RSS of
//! each VMM process (from wait4). Runs: `HPCVM_BENCH_RUNS` (default 30).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Sample {
    first_output: Duration,
    exit: Duration,
    max_rss_kib: u64,
}

/// Runs `cmd` once: time to the first stdout byte, time to exit, peak RSS.
fn measure(cmd: &mut Command, expect: &str) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    let n = out.read(&mut first).map_err(|e| e.to_string())?;
    let first_output = start.elapsed();
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    let mut status = 0;
    // SAFETY: rusage is plain data, zeroed is valid; wait4 on our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our unwaited child; the pointers are valid for the call.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let exit = start.elapsed();
    if rc < 0 {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let text = format!("{}{rest}", String::from_utf8_lossy(&first[..n]));
    if !text.contains(expect) {
        return Err(format!("unexpected output {text:?}"));
    }
    Ok(Sample {
        first_output,
        exit,
        max_rss_kib: ru.ru_maxrss as u64,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

struct Stats {
    p10: f64,
    median: f64,
    p90: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
        p10: percentile(&v, 0.1),
        median: percentile(&v, 0.5),
        p90: percentile(&v, 0.9),
    }
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
        "software KVM (kvm_pvm: guest ring 0 emulated)"
    } else {
        "hardware KVM"
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} CPUs, {kvm}")
}

fn main() {
    let runs: usize = std::env::var("HPCVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let exe = std::env::current_exe().unwrap();
    let hpcvm: PathBuf = exe.with_file_name("hpcvm");
    let guest = hpcvm_tests::guest("hello");
    let guest = guest.to_str().unwrap();
    let qemu = "qemu-system-x86_64";

    let hpcvm_cmd = || {
        let mut c = Command::new(&hpcvm);
        c.args(["run", "--kernel", guest, "--memory", "128M"]);
        c
    };
    let qemu_cmd = || {
        let mut c = Command::new(qemu);
        c.args([
            "-M",
            "microvm,x-option-roms=off,rtc=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel",
            guest,
        ]);
        c
    };

    let mut h = Vec::new();
    let mut q = Vec::new();
    let mut qemu_error = None;
    // Interleave the two so drift on the machine hits both alike; one warm-up each.
    for i in 0..=runs {
        let hs = measure(&mut hpcvm_cmd(), "hello from guest").expect("hpcvm run failed");
        if i > 0 {
            h.push(hs);
        }
        if qemu_error.is_none() {
            match measure(&mut qemu_cmd(), "hello from guest") {
                Ok(s) if i > 0 => q.push(s),
                Ok(_) => {}
                Err(e) => qemu_error = Some(e),
            }
        }
    }

    let mut table = String::new();
    table.push_str(&format!("Machine: {}\n\n", machine()));
    table.push_str(&format!(
        "Start-up of the tiny PVH guest `hello` (128 MiB, 1 vCPU), {runs} runs each, interleaved.\n\n"
    ));
    table.push_str("| metric | hpcvm p10 / median / p90 | QEMU microvm p10 / median / p90 | ratio (median) | target |\n");
    table.push_str("|---|---|---|---|---|\n");
    type Metric = fn(&Sample) -> f64;
    let rows: [(&str, Metric, &str); 3] = [
        (
            "exec -> first guest output (ms)",
            |s| ms(&s.first_output),
            "-",
        ),
        ("exec -> exit (ms)", |s| ms(&s.exit), "<= 0.30x"),
        (
            "peak RSS (MiB)",
            |s| s.max_rss_kib as f64 / 1024.0,
            "<= 3 MiB",
        ),
    ];
    for (name, f, target) in rows {
        let hs = stats(h.iter().map(f).collect());
        let cell = |s: &Stats| format!("{:.2} / {:.2} / {:.2}", s.p10, s.median, s.p90);
        let (qcell, ratio) = if q.is_empty() {
            ("not run".to_string(), "-".to_string())
        } else {
            let qs = stats(q.iter().map(f).collect());
            (cell(&qs), format!("{:.2}x", hs.median / qs.median))
        };
        table.push_str(&format!(
            "| {name} | {} | {qcell} | {ratio} | {target} |\n",
            cell(&hs)
        ));
    }
    if let Some(e) = qemu_error {
        table.push_str(&format!("\nQEMU did not run: {e}\n"));
    }
    print!("{table}");
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    if std::fs::create_dir_all(&results).is_ok() {
        let _ = std::fs::write(results.join("startup.md"), &table);
        println!("\n(saved to {})", results.join("startup.md").display());
    }
}
