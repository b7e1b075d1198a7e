//! The virtio data path: sequential reads and writes of a virtio-blk disk and of a
//! virtio-fs share inside the guest, and job stdout through the virtio console,
//! each beside the same transfer on the host (`dd` on the same file, a host pipe)
//! and beside the guest's own floor (the same `dd` into its /dev/null). Timed inside
//! the guest with /proc/uptime around each `dd`.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::stats::{stats, Table};

/// One guest run's timings, in seconds, by name.
fn parse(stderr: &str) -> Vec<(String, f64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("T ")?.split_whitespace();
            let name = w.next()?.to_string();
            let a: f64 = w.next()?.parse().ok()?;
            let b: f64 = w.next()?.parse().ok()?;
            Some((name, b - a))
        })
        .collect()
}

fn host_dd(args: &[&str]) -> f64 {
    let t = Instant::now();
    let ok = Command::new("dd")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "host dd {args:?}");
    t.elapsed().as_secs_f64()
}

/// The section: `mib` MiB per transfer, `reps` guest runs.
pub fn run(hpcvm: &Path, mib: usize, reps: usize) -> String {
    let dir = std::env::temp_dir().join(format!("hpcvm-bench-io-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let disk = dir.join("disk.img");
    let data: Vec<u8> = (0..mib << 20).map(|i| (i * 31 + i / 4096) as u8).collect();
    std::fs::write(share.join("in.bin"), &data).unwrap();
    let mut img = data.clone();
    img.resize(2 * (mib << 20), 0);
    std::fs::write(&disk, &img).unwrap();
    drop(img);
    let m = mib.to_string();
    let script = format!(
        "t() {{ cut -d' ' -f1 /proc/uptime; }}; \
         a=$(t); dd if=/dev/zero of=/dev/null bs=1M count={m} 2>/dev/null; echo T floor $a $(t) >&2; \
         a=$(t); dd if=/dev/vda of=/dev/null bs=1M count={m} 2>/dev/null; echo T disk-read $a $(t) >&2; \
         a=$(t); dd if=/dev/zero of=/dev/vda bs=1M count={m} seek={m} conv=fsync 2>/dev/null; echo T disk-write $a $(t) >&2; \
         a=$(t); dd if=/share/in.bin of=/dev/null bs=1M 2>/dev/null; echo T share-read $a $(t) >&2; \
         a=$(t); dd if=/dev/zero of=/share/out.bin bs=1M count={m} conv=fsync 2>/dev/null; echo T share-write $a $(t) >&2; \
         a=$(t); dd if=/dev/zero bs=1M count={m} 2>/dev/null; echo T stdout $a $(t) >&2"
    );
    let share_arg = format!("{}:/share", share.display());
    let disk_arg = disk.display().to_string();
    let mut runs: Vec<Vec<(String, f64)>> = Vec::new();
    let mut bad = 0;
    for _ in 0..reps {
        let mut child = Command::new("timeout")
            .arg("300")
            .arg(hpcvm)
            .args([
                "run",
                "--memory",
                "256M",
                "--no-share-cwd",
                "--disk",
                &disk_arg,
            ])
            .args(["--share", &share_arg, "--", "/bin/sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let counter = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let (mut n, mut zeros) = (0usize, true);
            while let Ok(k) = out.read(&mut buf) {
                if k == 0 {
                    break;
                }
                zeros &= buf[..k].iter().all(|&b| b == 0);
                n += k;
            }
            (n, zeros)
        });
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        let ok = child.wait().is_ok_and(|s| s.success());
        let (n, zeros) = counter.join().unwrap();
        let t = parse(&err);
        if ok && n == mib << 20 && zeros && t.len() == 6 {
            runs.push(t);
        } else {
            bad += 1;
        }
    }
    // The host, on the same files.
    let img = disk.display().to_string();
    let host = [
        (
            "floor",
            host_dd(&[
                "if=/dev/zero",
                "of=/dev/null",
                "bs=1M",
                &format!("count={m}"),
            ]),
        ),
        (
            "disk-read",
            host_dd(&[
                &format!("if={img}"),
                "of=/dev/null",
                "bs=1M",
                &format!("count={m}"),
            ]),
        ),
        (
            "disk-write",
            host_dd(&[
                "if=/dev/zero",
                &format!("of={img}"),
                "bs=1M",
                &format!("count={m}"),
                &format!("seek={m}"),
                "conv=fsync,notrunc",
            ]),
        ),
        (
            "share-read",
            host_dd(&[
                &format!("if={}", share.join("in.bin").display()),
                "of=/dev/null",
                "bs=1M",
            ]),
        ),
        (
            "share-write",
            host_dd(&[
                "if=/dev/zero",
                &format!("of={}", share.join("host.bin").display()),
                "bs=1M",
                &format!("count={m}"),
                "conv=fsync",
            ]),
        ),
        ("stdout", {
            let t = Instant::now();
            let ok = Command::new("sh")
                .args([
                    "-c",
                    &format!("dd if=/dev/zero bs=1M count={m} 2>/dev/null | cat >/dev/null"),
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "host pipe");
            t.elapsed().as_secs_f64()
        }),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    let head = format!(
        "### Data path\n\n{mib} MiB sequential transfers with `dd bs=1M` inside `hpcvm run` \
         (virtio-blk `--disk` of a raw file, virtio-fs `--share` through virtiofsd, job stdout \
         through the virtio console, counted and checked on the host), timed by /proc/uptime \
         in the guest, median of {} runs ({bad} runs failed their checks); beside `dd` on the \
         host on the same files and a host pipe. `floor` is the guest's `dd` from /dev/zero to \
         its own /dev/null: on software KVM the guest kernel's copies are emulated, so that is \
         the fastest any device can be there.\n\n",
        runs.len()
    );
    if runs.is_empty() {
        return head + "Not measured: every guest run failed.\n";
    }
    let floor = stats(runs.iter().map(|r| r[0].1).collect()).median;
    let mut t = Table::new(&[
        "transfer",
        "in guest (MB/s)",
        "on host (MB/s)",
        "ratio guest/host",
        "guest time / guest floor",
    ]);
    let mbps = |s: f64| format!("{:.1}", (mib as f64 * 1.048_576) / s);
    for (i, (name, host_s)) in host.iter().enumerate() {
        let g = stats(runs.iter().map(|r| r[i].1).collect()).median;
        t.row(&[
            (*name).into(),
            mbps(g),
            mbps(*host_s),
            // Four decimals: on software KVM the guest is three orders slower.
            format!("{:.4}x", host_s / g),
            format!("{:.2}x", g / floor),
        ]);
    }
    head + &t.finish()
}
