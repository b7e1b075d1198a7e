//! Start-up: exec -> first guest output and exec -> exit for the tiny PVH `hello`
//! guest, and peak RSS, hpcvm vs QEMU microvm, interleaved in one run.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::stats::{ms, ratio, stats, Table};

struct Sample {
    first_output: Duration,
    exit: Duration,
    max_rss_kib: u64,
}

/// Runs `cmd` once: time to the first stdout byte, time to exit, peak RSS (wait4).
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
    // SAFETY: rusage is plain data, zeroed is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: our unwaited child; the pointers are valid for the call.
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

/// QEMU microvm on KVM with no default devices and COM1 on stdout: the peer.
pub fn qemu_base(memory: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-accel",
        "kvm",
        "-m",
        memory,
    ])
    // The host's CPU, as hpcvm gives it (without it QEMU's qemu64 model claims AMD, and
    // the guest kernel's AMD FXSAVE-leak workaround, fnclex, kills it on software KVM).
    // Minus IA32_ARCH_CAPABILITIES: this host's KVM refuses QEMU's write of MSR 0x10a.
    .args(["-cpu", "host,-arch-capabilities"])
    .args(["-smp", "1", "-nodefaults", "-no-user-config", "-nographic"])
    .args(["-serial", "stdio"]);
    c
}

/// QEMU microvm running a tiny test guest, which leaves through isa-debug-exit.
pub fn qemu_microvm(guest: &str, extra: &[&str]) -> Command {
    let mut c = qemu_base("128M");
    c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-kernel", guest])
        .args(extra);
    c
}

/// The start-up section.
pub fn run(hpcvm: &Path, runs: usize) -> String {
    let guest = hpcvm_tests::guest("hello");
    let guest = guest.to_str().unwrap();
    let (mut h, mut q) = (Vec::new(), Vec::new());
    let mut qemu_error = None;
    // Interleaved so drift on the machine hits both alike; one warm-up run each.
    for i in 0..=runs {
        let mut cmd = Command::new(hpcvm);
        cmd.args(["run", "--kernel", guest, "--memory", "128M"]);
        let s = measure(&mut cmd, "hello from guest").expect("hpcvm run failed");
        if i > 0 {
            h.push(s);
        }
        if qemu_error.is_none() {
            match measure(&mut qemu_microvm(guest, &[]), "hello from guest") {
                Ok(s) if i > 0 => q.push(s),
                Ok(_) => {}
                Err(e) => qemu_error = Some(e),
            }
        }
    }
    let mut t = Table::new(&[
        "metric",
        "hpcvm p10 / median / p90",
        "QEMU microvm p10 / median / p90",
        "ratio (median)",
        "target",
    ]);
    type Metric = fn(&Sample) -> f64;
    let rows: [(&str, Metric, &str); 3] = [
        (
            "exec -> first guest output (ms)",
            |s| ms(s.first_output),
            "-",
        ),
        ("exec -> exit (ms)", |s| ms(s.exit), "<= 0.30x"),
        (
            "peak RSS (MiB)",
            |s| s.max_rss_kib as f64 / 1024.0,
            "<= 3 MiB",
        ),
    ];
    for (name, f, target) in rows {
        let hs = stats(h.iter().map(f).collect());
        let (qcell, r) = if q.is_empty() {
            ("not run".to_string(), "-".to_string())
        } else {
            let qs = stats(q.iter().map(f).collect());
            (qs.cell(2), ratio(hs.median, qs.median))
        };
        t.row(&[name.into(), hs.cell(2), qcell, r, target.into()]);
    }
    let mut out = format!(
        "### Start-up\n\nTiny PVH guest `hello` (128 MiB, 1 vCPU), {runs} runs each, interleaved.\n\n{}",
        t.finish()
    );
    if let Some(e) = qemu_error {
        out.push_str(&format!("\nQEMU did not run: {e}\n"));
    }
    out
}
