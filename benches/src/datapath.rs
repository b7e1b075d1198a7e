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

/// The transfers, each timed by /proc/uptime; `log` redirects the timing lines, `out`
/// is where the stdout transfer writes (empty: the job's stdout).
fn dd_script(m: &str, log: &str, out: &str) -> String {
    let dd = |name: &str, args: String| {
        format!("a=$(t); dd {args} 2>/dev/null; echo T {name} $a $(t){log}; ")
    };
    [
        "t() { cut -d' ' -f1 /proc/uptime; }; ".to_string(),
        dd(
            "floor",
            format!("if=/dev/zero of=/dev/null bs=1M count={m}"),
        ),
        dd(
            "disk-read",
            format!("if=/dev/vda of=/dev/null bs=1M count={m}"),
        ),
        dd(
            "disk-write",
            format!("if=/dev/zero of=/dev/vda bs=1M count={m} seek={m} conv=fsync"),
        ),
        dd(
            "share-read",
            "if=/share/in.bin of=/dev/null bs=1M".to_string(),
        ),
        dd(
            "share-write",
            format!("if=/dev/zero of=/share/out.bin bs=1M count={m} conv=fsync"),
        ),
        dd("stdout", format!("if=/dev/zero{out} bs=1M count={m}")),
    ]
    .concat()
}

/// The same transfers under QEMU microvm, on the same kernel: virtio-mmio blk, the
/// same virtiofsd through vhost-user-fs, a virtio-serial port for stdout.
fn qemu_run(hpcvm: &Path, dir: &Path, mib: usize) -> Result<Vec<(String, f64)>, String> {
    let guest = crate::guest::guest_dir(hpcvm).ok_or("no default guest (make guest)")?;
    let virtiofsd_bin = vmm::virtio::fs::find_virtiofsd().ok_or("no virtiofsd")?;
    let m = mib.to_string();
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev\n\
         mkdir -p /share; mount -t virtiofs share /share\n\
         port=$(for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = out ] && basename $p; done)\n\
         {}\necho QEMU-DONE\nreboot -f\n",
        dd_script(&m, "", " of=/dev/$port")
    );
    let initrd = dir.join("qemu-init.cpio");
    busybox_initramfs(&guest.join("busybox"), &init, &initrd)?;
    let sock = dir.join("qemu-vfs.sock");
    let mut vfs = virtiofsd(&virtiofsd_bin, &sock, &dir.join("share"))?;
    let port_out = dir.join("qemu-stdout.bin");
    let mut q = qemu_guest(
        &guest,
        "256M",
        ",x-option-roms=off,rtc=off,acpi=off",
        "",
        &initrd,
    );
    let drive = format!("file={},format=raw", dir.join("disk.img").display());
    qemu_blk_and_fs(&mut q, &drive, &sock, "share");
    q.args(["-device", "virtio-serial-device"])
        .args([
            "-chardev",
            &format!("file,id=out,path={}", port_out.display()),
        ])
        .args(["-device", "virtserialport,chardev=out,name=out"]);
    let out = Command::new("timeout")
        .arg("400")
        .arg(q.get_program())
        .args(q.get_args())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string());
    let _ = vfs.kill();
    let _ = vfs.wait();
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    let got = std::fs::metadata(&port_out).map_or(0, |m| m.len());
    let t = parse(&text);
    if t.len() == 6 && got == (mib << 20) as u64 && text.contains("QEMU-DONE") {
        Ok(t)
    } else {
        Err(format!(
            "QEMU run incomplete ({} timings, {got} stdout bytes)",
            t.len()
        ))
    }
}

/// A busybox initramfs for QEMU whose /init is `init` (a busybox sh script), at `out`.
pub fn busybox_initramfs(busybox: &Path, init: &str, out: &Path) -> Result<(), String> {
    let e = |e: std::io::Error| e.to_string();
    let mut c = vmm::boot::initramfs::Cpio::new(Vec::new());
    for d in ["bin", "dev", "proc", "sys"] {
        c.dir(d, 0o755).map_err(e)?;
    }
    c.chardev("dev/console", 0o600, 5, 1).map_err(e)?;
    c.file("bin/busybox", 0o755, &std::fs::read(busybox).map_err(e)?)
        .map_err(e)?;
    c.file("init", 0o755, init.as_bytes()).map_err(e)?;
    std::fs::write(out, c.finish().map_err(e)?).map_err(e)
}

/// virtiofsd serving `shared` on `sock` for QEMU's vhost-user-fs, once the socket is
/// there.
pub fn virtiofsd(bin: &Path, sock: &Path, shared: &Path) -> Result<std::process::Child, String> {
    let child = Command::new(bin)
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", shared.display()))
        .args([
            "--sandbox",
            "none",
            "--cache",
            "auto",
            "--log-level",
            "error",
        ])
        .spawn()
        .map_err(|e| e.to_string())?;
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(child)
}

/// QEMU microvm (`machine`: more -M options) booting the default guest's kernel
/// with `initrd` as its /init and hpcvm's command line; `memory` of RAM from a memfd
/// (shared, as vhost-user needs; `mem_opts`: more of its options).
pub fn qemu_guest(
    guest: &Path,
    memory: &str,
    machine: &str,
    mem_opts: &str,
    initrd: &Path,
) -> Command {
    let mut q = crate::startup::qemu_base(memory);
    q.args([
        "-M",
        &format!("microvm{machine},memory-backend=mem"),
        "-no-reboot",
    ])
    .args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={memory},share=on{mem_opts}"),
    ])
    .arg("-kernel")
    .arg(guest.join("vmlinux"))
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        &format!("{} rdinit=/init", crate::guest::cmdline()),
    ]);
    q
}

/// Adds `drive` (`file=...` and its -drive options) as a virtio-blk disk and the
/// virtiofsd on `sock` as virtio-fs `tag`.
pub fn qemu_blk_and_fs(q: &mut Command, drive: &str, sock: &Path, tag: &str) {
    q.args(["-drive", &format!("{drive},if=none,id=d0")])
        .args(["-device", "virtio-blk-device,drive=d0"])
        .args([
            "-chardev",
            &format!("socket,id=vfs,path={}", sock.display()),
        ])
        .args([
            "-device",
            &format!("vhost-user-fs-device,chardev=vfs,tag={tag}"),
        ]);
}

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
    let script = dd_script(&m, " >&2", "");
    let share_arg = format!("{}:/share", share.display());
    let disk_arg = disk.display().to_string();
    let mut runs: Vec<Vec<(String, f64)>> = Vec::new();
    let mut bad = 0;
    let mut qemu: Vec<Vec<(String, f64)>> = Vec::new();
    let mut qemu_err = None;
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    // hpcvm and QEMU interleaved, so that both see the same phases of this busy host.
    for _ in 0..reps {
        if !have_qemu {
            qemu_err = Some("qemu-system-x86_64 not installed".to_string());
        } else {
            match qemu_run(hpcvm, &dir, mib) {
                Ok(t) => qemu.push(t),
                Err(e) => qemu_err = Some(e),
            }
        }
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
         the fastest any device can be there, and each VMM is best compared through its own \
         time / floor (the floors of two runs differ by this host's noise alone).\n\n",
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
        "QEMU microvm (MB/s)",
        "QEMU time / QEMU floor",
    ]);
    let mbps = |s: f64| format!("{:.1}", (mib as f64 * 1.048_576) / s);
    for (i, (name, host_s)) in host.iter().enumerate() {
        let g = stats(runs.iter().map(|r| r[i].1).collect()).median;
        let (q_cell, vs) = if qemu.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            let qm = stats(qemu.iter().map(|r| r[i].1).collect()).median;
            let qfloor = stats(qemu.iter().map(|r| r[0].1).collect()).median;
            (mbps(qm), format!("{:.2}x", qm / qfloor))
        };
        t.row(&[
            (*name).into(),
            mbps(g),
            mbps(*host_s),
            // Four decimals: on software KVM the guest is three orders slower.
            format!("{:.4}x", host_s / g),
            format!("{:.2}x", g / floor),
            q_cell,
            vs,
        ]);
    }
    let qemu_note = match (&qemu_err, qemu.len()) {
        (None, n) => format!(
            "\nQEMU microvm: the same kernel and busybox, virtio-mmio blk on the same file, \
             vhost-user-fs through the same virtiofsd, stdout into a virtio-serial port, \
             median of {n} runs.\n"
        ),
        (Some(e), n) => format!("\nQEMU microvm: {n} runs measured; {e}.\n"),
    };
    head + &t.finish() + &qemu_note
}
