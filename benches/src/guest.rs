//! The real guest (`make guest`): boot to /init beside QEMU microvm on the same kernel,
//! initramfs and command line; and a ring-3 compute loop in the guest beside the same
//! loop on the host.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm::boot::initramfs::Cpio;

use crate::stats::{ratio, stats, Table};

const MARKER: &str = "HPCVM-INIT-REACHED";

/// The default guest directory (`target/guest`), if `make guest` has run.
pub fn guest_dir(hpcvm: &Path) -> Option<PathBuf> {
    let d = hpcvm.parent()?.parent()?.join("guest");
    (d.join("vmlinux").is_file() && d.join("busybox").is_file()).then_some(d)
}

/// A temporary initramfs `hpcvm-bench-NAME-PID.cpio` holding `busybox` and the
/// shell script `init` as /init.
pub fn busybox_initramfs(busybox: &Path, name: &str, init: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("hpcvm-bench-{name}-{}.cpio", std::process::id()));
    let mut c = Cpio::new(Vec::new());
    for d in ["bin", "dev", "proc"] {
        c.dir(d, 0o755).unwrap();
    }
    c.chardev("dev/console", 0o600, 5, 1).unwrap();
    c.file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap())
        .unwrap();
    c.file("init", 0o755, init.as_bytes()).unwrap();
    std::fs::write(&path, c.finish().unwrap()).unwrap();
    path
}

/// An initramfs whose /init prints the marker and powers off.
fn marker_initramfs(busybox: &Path) -> PathBuf {
    let init = format!("#!/bin/busybox sh\n/bin/busybox echo {MARKER}\n/bin/busybox reboot -f\n");
    busybox_initramfs(busybox, "init", &init)
}

/// The command line hpcvm gives a plain `--kernel` guest with `--cmdline quiet`.
pub fn cmdline() -> String {
    let mut c = format!("{} quiet", vmm::config::DEFAULT_CMDLINE);
    if vmm::host::is_software_kvm() {
        c.push(' ');
        c.push_str(vmm::vstate::cpuid::SOFTWARE_KVM_CMDLINE);
    }
    c
}

/// exec -> the marker line on stdout; the VMM is killed right after.
fn time_to_marker(mut cmd: Command) -> Result<Duration, String> {
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut found = None;
    for line in out.lines().map_while(Result::ok) {
        if line.contains(MARKER) {
            found = Some(t.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found.ok_or_else(|| "the guest never reached /init".into())
}

/// The boot-to-/init section.
pub fn boot(hpcvm: &Path, reps: usize) -> String {
    let Some(dir) = guest_dir(hpcvm) else {
        return "### Boot to /init\n\nSkipped: no default guest (run `make guest`).\n".into();
    };
    let kernel = dir.join("vmlinux");
    let initrd = marker_initramfs(&dir.join("busybox"));
    let (mut h, mut q) = (Vec::new(), Vec::new());
    let mut qemu_err = None;
    for _ in 0..reps {
        let mut c = Command::new(hpcvm);
        c.args([
            "run",
            "--cpus",
            "1",
            "--memory",
            "256M",
            "--cmdline",
            "quiet",
            "--kernel",
        ])
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initrd);
        h.push(time_to_marker(c).expect("hpcvm boot").as_secs_f64());
        let mut c = crate::startup::qemu_base("256M");
        c.arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &cmdline()]);
        match time_to_marker(c) {
            Ok(d) => q.push(d.as_secs_f64()),
            Err(e) => qemu_err = Some(e),
        }
    }
    let _ = std::fs::remove_file(&initrd);
    let hs = stats(h);
    let mut t = Table::new(&[
        "metric",
        "hpcvm p10 / median / p90",
        "QEMU microvm",
        "ratio",
        "target",
    ]);
    let (qc, r) = match q.is_empty() {
        true => ("not run".to_string(), "-".to_string()),
        false => {
            let qs = stats(q);
            (qs.cell(2), ratio(hs.median, qs.median))
        }
    };
    t.row(&[
        "exec -> /init (s)".into(),
        hs.cell(2),
        qc,
        r,
        "<= 0.95x".into(),
    ]);
    let mut out = format!(
        "### Boot to /init\n\nThe `make guest` kernel and one busybox initramfs, 1 vCPU, 256 MiB, \
         command line `{}`, {reps} boots each.\n\n{}",
        cmdline(),
        t.finish()
    );
    if let Some(e) = qemu_err {
        out.push_str(&format!("\nQEMU: {e}\n"));
    }
    out
}

/// A busybox-sh loop that prints its own elapsed seconds from /proc/uptime.
fn loop_script(iterations: u64) -> String {
    format!(
        "a=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt {iterations} ]; do i=$((i+1)); done; \
         b=$(cut -d' ' -f1 /proc/uptime); echo elapsed $a $b"
    )
}

fn elapsed(out: &str) -> Option<f64> {
    uptime_span(out, "elapsed ")
}

/// `b - a` of the first line of `text` that reads "`prefix`a b" (two /proc/uptime
/// readings a job printed around what it timed).
pub fn uptime_span(text: &str, prefix: &str) -> Option<f64> {
    let l = text.lines().find(|l| l.starts_with(prefix))?;
    let v: Vec<f64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some(v.get(1)? - v.first()?)
}

/// The in-guest compute section.
pub fn compute(hpcvm: &Path, reps: usize) -> String {
    let Some(dir) = guest_dir(hpcvm) else {
        return "### In-guest compute\n\nSkipped: no default guest (run `make guest`).\n".into();
    };
    let busybox = dir.join("busybox");
    let script = loop_script(3_000_000);
    let (mut h, mut g) = (Vec::new(), Vec::new());
    let mut stalled = 0;
    for _ in 0..reps {
        let host = Command::new(&busybox)
            .args(["sh", "-c", &script])
            .output()
            .unwrap();
        h.push(elapsed(&String::from_utf8_lossy(&host.stdout)).expect("host loop"));
        // A deadline, so that a guest that does not finish cannot hang the bench.
        let guest = Command::new("timeout")
            .args(["120"])
            .arg(hpcvm)
            .args(["run", "--memory", "256M", "--", "/bin/sh", "-c", &script])
            .output()
            .unwrap();
        match elapsed(&String::from_utf8_lossy(&guest.stdout)) {
            Some(e) if guest.status.success() => g.push(e),
            _ => stalled += 1,
        }
    }
    if g.is_empty() {
        return format!(
            "### In-guest compute\n\nNot measured: all {reps} guest runs missed their 120 s \
             deadline.\n"
        );
    }
    let (hs, gs) = (stats(h), stats(g));
    let mut t = Table::new(&[
        "metric",
        "in guest p10 / median / p90",
        "on host",
        "ratio (guest/host)",
    ]);
    t.row(&[
        "busybox sh loop, 3M iterations (s)".into(),
        gs.cell(2),
        hs.cell(2),
        ratio(gs.median, hs.median),
    ]);
    format!(
        "### In-guest compute\n\nA ring-3 loop timed by itself (/proc/uptime) inside `hpcvm run -- /bin/sh -c ...` \
         and with the same busybox on the host, {reps} runs each ({stalled} guest runs missed their deadline).\n\n{}",
        t.finish()
    )
}
