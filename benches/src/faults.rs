//! Fault tolerance: checkpoint and restore of a guest holding data, beside `dd` of the
//! same bytes to and from the same disk (the limit) and QEMU's `migrate` to a file and
//! `-incoming` from it; live migration on loopback beside QEMU's, total time and
//! downtime. One guest per VMM and size: checkpointed (and resumed), then migrated.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::stats::{ratio, Table};

/// The share of guest RAM the guest fills with data before it is measured, on
/// hardware KVM. On software KVM the guest's page faults are emulated (measured:
/// 16 MiB took 80 s), so there the guest holds only what booting left in its RAM.
const FILL_SHARE: u64 = 2;
const FILLED: &str = "HPCVM-FILLED";
/// Boot plus the fill, on software KVM.
const READY_WITHIN: Duration = Duration::from_secs(300);

/// Bytes a guest of `gib` GiB fills on this host.
fn fill_bytes(gib: u64) -> u64 {
    match vmm::host::is_software_kvm() {
        true => 0,
        false => (gib << 30) / FILL_SHARE,
    }
}

/// An initramfs whose /init writes `fill` non-zero bytes into RAM (a busybox awk
/// string doubled until that long; freed pages keep their bytes), says so, and
/// idles.
fn fill_initramfs(busybox: &Path, fill: u64) -> PathBuf {
    let awk = match fill {
        0 => String::new(),
        n => format!(
            "/bin/busybox awk 'BEGIN {{ s = \"x\"; while (length(s) < {}) s = s s }}'\n",
            n / 2
        ),
    };
    let init = format!(
        "#!/bin/busybox sh\n{awk}/bin/busybox echo {FILLED}\n\
         while :; do /bin/busybox sleep 1000; done\n"
    );
    crate::guest::busybox_initramfs(busybox, "fill", &init)
}

/// A child killed and reaped when dropped, with the files it leaves.
struct Proc(Child, Vec<PathBuf>);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        for f in &self.1 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Starts `cmd` and waits for FILLED on its stdout (the rest is discarded).
fn start_filled(mut cmd: Command, leaves: Vec<PathBuf>) -> Result<Proc, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.stdout.take().unwrap();
    let p = Proc(child, leaves);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if !sent && line.contains(FILLED) {
                let _ = tx.send(());
                sent = true;
            }
        }
    });
    rx.recv_timeout(READY_WITHIN)
        .map_err(|_| "the guest never finished filling its RAM".to_string())?;
    Ok(p)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hpcvm-bench-{name}-{}", std::process::id()))
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// `hpcvm ctl` through `sock`: its JSON answer, which must be ok.
fn ctl(hpcvm: &Path, sock: &Path, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(hpcvm)
        .args(["ctl", "--api-socket"])
        .arg(sock)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "ctl {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    match v["ok"] == true {
        true => Ok(v),
        false => Err(format!("ctl {args:?}: {v}")),
    }
}

/// Waits until `sock` answers `status` (a restored VM is running then).
fn until_answers(hpcvm: &Path, sock: &Path) -> Result<(), String> {
    let until = Instant::now() + READY_WITHIN;
    while ctl(hpcvm, sock, &["status"]).is_err() {
        if Instant::now() > until {
            return Err("the restored VM never answered".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Seconds `dd` takes to write `mib` MiB to `path` (synced), then to read it back
/// from disk (caches dropped).
fn dd(path: &Path, mib: u64) -> Result<(f64, f64), String> {
    let run = |args: Vec<String>| -> Result<f64, String> {
        let t = Instant::now();
        let ok = Command::new("dd")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?
            .success();
        ok.then(|| t.elapsed().as_secs_f64())
            .ok_or_else(|| "dd failed".to_string())
    };
    let p = path.display();
    let w = run(vec![
        "if=/dev/zero".into(),
        format!("of={p}"),
        "bs=1M".into(),
        format!("count={mib}"),
        "conv=fsync".into(),
    ])?;
    drop_caches();
    let r = run(vec![
        format!("if={p}"),
        "of=/dev/null".into(),
        "bs=1M".into(),
    ])?;
    let _ = std::fs::remove_file(path);
    Ok((w, r))
}

/// What one size measured, in seconds (None: not run).
#[derive(Default)]
struct Row {
    data_mib: f64,
    ck: f64,
    restore: f64,
    dd_write: f64,
    dd_read: f64,
    mig_total: f64,
    mig_down: f64,
    q_ck: Option<f64>,
    q_restore: Option<f64>,
    q_total: Option<f64>,
    q_down: Option<f64>,
}

fn hpcvm_side(
    hpcvm: &Path,
    kernel: &Path,
    initrd: &Path,
    gib: u64,
    row: &mut Row,
) -> Result<(), String> {
    let (sock, dir) = (tmp("ft.sock"), tmp("ft-ck"));
    let mut cmd = Command::new(hpcvm);
    cmd.args([
        "run",
        "--cmdline",
        "quiet",
        "--memory",
        &format!("{gib}G"),
        "--kernel",
    ])
    .arg(kernel)
    .arg("--initramfs")
    .arg(initrd)
    .arg("--api-socket")
    .arg(&sock);
    let _vm = start_filled(cmd, vec![sock.clone()])?;
    let t = Instant::now();
    let ck = ctl(hpcvm, &sock, &["checkpoint", dir.to_str().unwrap()])?;
    row.ck = t.elapsed().as_secs_f64();
    row.data_mib = ck["data"].as_f64().unwrap_or(0.0) / f64::from(1 << 20);
    let (w, r) = dd(&dir.join("dd"), row.data_mib.ceil() as u64)?;
    (row.dd_write, row.dd_read) = (w, r);

    // Live migration of the same (resumed) VM to a receiver on this host.
    let (listen, sock_b) = (tmp("ft-listen.sock"), tmp("ft-b.sock"));
    let to = format!("unix:{}", listen.display());
    let _b = Proc(
        Command::new(hpcvm)
            .args(["receive", "--listen", &to, "--api-socket"])
            .arg(&sock_b)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
        vec![listen.clone(), sock_b.clone()],
    );
    while !listen.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let m = ctl(hpcvm, &sock, &["migrate", &to])?;
    row.mig_total = m["total_s"].as_f64().unwrap_or(f64::NAN);
    row.mig_down = m["downtime_s"].as_f64().unwrap_or(f64::NAN);
    drop(_b);

    drop_caches();
    let sock_r = tmp("ft-r.sock");
    let t = Instant::now();
    let _r = Proc(
        Command::new(hpcvm)
            .arg("restore")
            .arg(&dir)
            .arg("--api-socket")
            .arg(&sock_r)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
        vec![sock_r.clone()],
    );
    until_answers(hpcvm, &sock_r)?;
    row.restore = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A QMP connection.
struct Qmp(BufReader<UnixStream>, UnixStream);

impl Qmp {
    fn connect(path: &Path) -> Result<Self, String> {
        let s = crate::control::wait_for_socket(path)?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp(BufReader::new(s), w);
        q.line()?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        self.0.read_line(&mut l).map_err(|e| e.to_string())?;
        serde_json::from_str(&l).map_err(|e| format!("QMP {l:?}: {e}"))
    }

    /// Runs `execute` and returns its "return" (events are skipped).
    fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let req = json!({"execute": execute, "arguments": arguments});
        writeln!(self.1, "{req}").map_err(|e| e.to_string())?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {execute}: {e}"));
            }
        }
    }

    /// Polls query-migrate until it completes: its answer.
    fn migrated(&mut self) -> Result<Value, String> {
        loop {
            let m = self.cmd("query-migrate", json!({}))?;
            match m["status"].as_str() {
                Some("completed") => return Ok(m),
                Some("failed" | "cancelled") => return Err(format!("QEMU migration: {m}")),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

fn qemu(kernel: &Path, initrd: &Path, gib: u64, qmp: &Path, extra: &[&str]) -> Command {
    let mut c = crate::startup::qemu_base(&format!("{gib}G"));
    c.arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &crate::guest::cmdline()])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra);
    c
}

fn qemu_side(kernel: &Path, initrd: &Path, gib: u64, row: &mut Row) -> Result<(), String> {
    let (qmp, file) = (tmp("ft-qmp.sock"), tmp("ft-qemu.mig"));
    let _src = start_filled(qemu(kernel, initrd, gib, &qmp, &[]), vec![qmp.clone()])?;
    let mut q = Qmp::connect(&qmp)?;
    let t = Instant::now();
    q.cmd("stop", json!({}))?;
    let uri = format!("exec:cat > {}", file.display());
    q.cmd("migrate", json!({ "uri": uri }))?;
    q.migrated()?;
    std::fs::File::open(&file)
        .and_then(|f| f.sync_all())
        .map_err(|e| e.to_string())?;
    row.q_ck = Some(t.elapsed().as_secs_f64());
    q.cmd("cont", json!({}))?;

    // Live migration to a second QEMU waiting with -incoming.
    let (qmp_d, listen) = (tmp("ft-qmp-d.sock"), tmp("ft-qemu-in.sock"));
    let incoming = format!("unix:{}", listen.display());
    let _dst = Proc(
        qemu(kernel, initrd, gib, &qmp_d, &["-incoming", &incoming])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
        vec![qmp_d.clone(), listen.clone()],
    );
    let _qd = Qmp::connect(&qmp_d)?;
    q.cmd("migrate", json!({ "uri": incoming }))?;
    let m = q.migrated()?;
    row.q_total = m["total-time"].as_f64().map(|v| v / 1000.0);
    row.q_down = m["downtime"].as_f64().map(|v| v / 1000.0);
    drop(q);
    drop(_src);
    drop(_dst);

    drop_caches();
    let qmp_r = tmp("ft-qmp-r.sock");
    let t = Instant::now();
    let incoming = format!("exec:cat {}", file.display());
    let _r = Proc(
        qemu(kernel, initrd, gib, &qmp_r, &["-incoming", &incoming])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
        vec![qmp_r.clone(), file.clone()],
    );
    let mut qr = Qmp::connect(&qmp_r)?;
    while qr.cmd("query-status", json!({}))?["status"] == "inmigrate" {
        std::thread::sleep(Duration::from_millis(2));
    }
    row.q_restore = Some(t.elapsed().as_secs_f64());
    Ok(())
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("not run".into(), |v| format!("{v:.prec$}"))
}

fn opt_ratio(a: f64, b: Option<f64>) -> String {
    b.map_or("-".into(), |b| ratio(a, b))
}

/// The fault-tolerance section, for guests of `sizes` GiB.
pub fn run(hpcvm: &Path, sizes: &[usize]) -> String {
    let Some(dir) = crate::guest::guest_dir(hpcvm) else {
        return "### Checkpoint and migration\n\nSkipped: no default guest (run `make guest`).\n"
            .into();
    };
    let kernel = dir.join("vmlinux");
    let mut rows = Vec::new();
    let mut notes = String::new();
    for &gib in sizes {
        let initrd = fill_initramfs(&dir.join("busybox"), fill_bytes(gib as u64));
        let mut row = Row::default();
        if let Err(e) = hpcvm_side(hpcvm, &kernel, &initrd, gib as u64, &mut row) {
            notes.push_str(&format!("\nhpcvm, {gib} GiB: {e}\n"));
            let _ = std::fs::remove_file(&initrd);
            continue;
        }
        if let Err(e) = qemu_side(&kernel, &initrd, gib as u64, &mut row) {
            notes.push_str(&format!("\nQEMU, {gib} GiB: {e}\n"));
        }
        let _ = std::fs::remove_file(&initrd);
        rows.push((gib, row));
    }
    let mut ck = Table::new(&[
        "guest RAM",
        "data (MiB)",
        "hpcvm checkpoint (s)",
        "dd write (s)",
        "ratio",
        "QEMU migrate to file (s)",
        "ratio",
        "hpcvm restore (s)",
        "dd read (s)",
        "ratio",
        "QEMU -incoming file (s)",
        "ratio",
    ]);
    let mut mig = Table::new(&[
        "guest RAM",
        "hpcvm total (s)",
        "hpcvm downtime (ms)",
        "QEMU total (s)",
        "QEMU downtime (ms)",
        "ratio (downtime)",
    ]);
    for (gib, r) in &rows {
        ck.row(&[
            format!("{gib} GiB"),
            format!("{:.1}", r.data_mib),
            format!("{:.2}", r.ck),
            format!("{:.2}", r.dd_write),
            ratio(r.ck, r.dd_write),
            opt(r.q_ck, 2),
            opt_ratio(r.ck, r.q_ck),
            format!("{:.2}", r.restore),
            format!("{:.2}", r.dd_read),
            ratio(r.restore, r.dd_read),
            opt(r.q_restore, 2),
            opt_ratio(r.restore, r.q_restore),
        ]);
        mig.row(&[
            format!("{gib} GiB"),
            format!("{:.2}", r.mig_total),
            format!("{:.1}", r.mig_down * 1000.0),
            opt(r.q_total, 2),
            opt(r.q_down.map(|d| d * 1000.0), 1),
            opt_ratio(r.mig_down, r.q_down),
        ]);
    }
    format!(
        "### Checkpoint and migration\n\nOne guest per VMM and size (the `make guest` kernel, \
         1 vCPU), whose /init first writes half its RAM full of data (on hardware KVM; on \
         software KVM, whose emulated page faults make that take minutes, the guest holds \
         only what booting left: the data column), then idles. \
         Checkpoint: `hpcvm ctl checkpoint DIR` (the VM runs on), timed by the client, beside \
         `dd conv=fsync` of the bytes hpcvm wrote to the same disk and QEMU's `stop` + \
         `migrate \"exec:cat > FILE\"` + fsync. Restore (page cache dropped first): exec of \
         `hpcvm restore` to its API socket answering, beside `dd` reading the same bytes \
         back and QEMU `-incoming \"exec:cat FILE\"` to the end of its incoming state. \
         Live migration: the same running guest to a receiver on this host over a Unix \
         socket, hpcvm's `ctl migrate` report beside QEMU's query-migrate (total-time, \
         downtime). One run each.\n\n{}\n{}{notes}",
        ck.finish(),
        mig.finish()
    )
}
