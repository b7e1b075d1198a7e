//! Control-socket round trip: `status` requests on one connection to a running hpcvm,
//! beside QMP `query-status` to QEMU, p50/p99.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stats::{ms, ratio, stats, Table};

/// Connects to the Unix socket at `path` once it listens (within 30 s).
pub fn wait_for_socket(path: &Path) -> Result<UnixStream, String> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > until => return Err(format!("{}: {e}", path.display())),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Round-trip times of `n` request lines whose replies contain `ok`.
fn round_trips(s: UnixStream, req: &[u8], ok: &str, n: usize) -> Result<Vec<f64>, String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(req).map_err(|e| e.to_string())?;
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        v.push(ms(t.elapsed()));
        if !line.contains(ok) {
            return Err(format!("unexpected reply {line:?}"));
        }
    }
    Ok(v)
}

/// A VMM killed (and its socket file removed: SIGKILL leaves it) when dropped.
struct Killed(Child, std::path::PathBuf);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn hpcvm_rtt(hpcvm: &Path, n: usize) -> Result<Vec<f64>, String> {
    let sock = std::env::temp_dir().join(format!("hpcvm-bench-{}.sock", std::process::id()));
    let guest = hpcvm_tests::guest("spin");
    let _vm = Killed(
        Command::new(hpcvm)
            .args([
                "run",
                "--kernel",
                guest.to_str().unwrap(),
                "--memory",
                "64M",
                "--api-socket",
            ])
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
        sock.clone(),
    );
    let s = wait_for_socket(&sock)?;
    round_trips(s, b"{\"cmd\":\"status\"}\n", "\"ok\":true", n)
}

fn qemu_rtt(n: usize) -> Result<Vec<f64>, String> {
    let sock = std::env::temp_dir().join(format!("hpcvm-bench-qmp-{}.sock", std::process::id()));
    let guest = hpcvm_tests::guest("spin");
    let mut cmd = crate::startup::qemu_microvm(guest.to_str().unwrap(), &["-qmp"]);
    cmd.arg(format!("unix:{},server=on,wait=off", sock.display()));
    let _vm = Killed(
        cmd.stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
        sock.clone(),
    );
    let s = wait_for_socket(&sock)?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut greeting = String::new();
    r.read_line(&mut greeting).map_err(|e| e.to_string())?;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .map_err(|e| e.to_string())?;
    let mut ack = String::new();
    r.read_line(&mut ack).map_err(|e| e.to_string())?;
    drop(r);
    round_trips(s, b"{\"execute\":\"query-status\"}\n", "\"return\"", n)
}

/// The control-socket section.
pub fn run(hpcvm: &Path, n: usize) -> String {
    let h = hpcvm_rtt(hpcvm, n).expect("hpcvm control socket");
    let hs = stats(h);
    let q = qemu_rtt(n);
    let mut t = Table::new(&[
        "metric",
        "hpcvm",
        "QEMU QMP query-status",
        "ratio",
        "target",
    ]);
    let (qp50, qp99, r50, r99) = match &q {
        Ok(v) => {
            let qs = stats(v.clone());
            (
                format!("{:.3}", qs.median),
                format!("{:.3}", qs.p99),
                ratio(hs.median, qs.median),
                ratio(hs.p99, qs.p99),
            )
        }
        Err(_) => ("not run".into(), "not run".into(), "-".into(), "-".into()),
    };
    t.row(&[
        "round trip p50 (ms)".into(),
        format!("{:.3}", hs.median),
        qp50,
        r50,
        "-".into(),
    ]);
    t.row(&[
        "round trip p99 (ms)".into(),
        format!("{:.3}", hs.p99),
        qp99,
        r99,
        "<= 1 ms".into(),
    ]);
    let mut out = format!(
        "### Control socket\n\n{n} `status` requests on one connection to a running guest.\n\n{}",
        t.finish()
    );
    if let Err(e) = q {
        out.push_str(&format!("\nQEMU QMP did not run: {e}\n"));
    }
    out
}
