//! MPI in a VM against the host: HPCC and NetPIPE from the MPI image (`make image`),
//! 2 ranks bound to 2 cores, inside `hpcvm run --image` (2 vCPUs pinned 1:1, RAM on
//! prefaulted 2M hugepages) and with the same Debian packages' binaries and the same
//! input on the host (`make mpi-deps`); and the boot to job start with `--image`
//! beside the initramfs guest.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use hpcvm_tests::hugepages::Reservation;

use crate::stats::{ratio, stats, Table};

/// The HPCC figures compared: (summary key in hpccoutf.txt, row name, higher is better).
const HPCC_KEYS: &[(&str, &str)] = &[
    ("HPL_Tflops", "HPL (Gflop/s)"),
    ("StarSTREAM_Triad", "StarSTREAM Triad (GB/s per rank)"),
    ("MPIRandomAccess_GUPs", "MPIRandomAccess (GUP/s)"),
    ("AvgPingPongLatency_usec", "PingPong latency (us)"),
    ("AvgPingPongBandwidth_GBytes", "PingPong bandwidth (GB/s)"),
];

/// NetPIPE's largest message (bytes).
const NETPIPE_MAX: usize = 8 << 20;

/// The MPI image beside the guest kernel, if `make image` has run.
fn image(hpcvm: &Path) -> Option<PathBuf> {
    let p = crate::guest::guest_dir(hpcvm)?.join("mpi.ext4");
    p.is_file().then_some(p)
}

/// Open MPI's options for both sides: 2 ranks, one per core, over shared memory;
/// single copy as hpcvm sets it for the guest on this host (see README), so that
/// both sides run the same code path.
fn mpirun_args(single_copy: &str) -> String {
    format!(
        "-np 2 --map-by core --bind-to core --mca btl self,vader \
         --mca btl_vader_single_copy_mechanism {single_copy}"
    )
}

/// The job both sides run in a directory holding hpccinf.txt; NetPIPE's table goes
/// to np.out, each program's wall time (from /proc/uptime) to times.txt.
fn job_script(single_copy: &str) -> String {
    let m = mpirun_args(single_copy);
    format!(
        "t() {{ cut -d' ' -f1 /proc/uptime; }}; \
         a=$(t); mpirun {m} hpcc >hpcc.log 2>&1 || exit 1; b=$(t); \
         mpirun {m} NPopenmpi -u {NETPIPE_MAX} -o np.out >np.log 2>&1 || exit 2; c=$(t); \
         echo \"hpcc $a $b\" > times.txt; echo \"netpipe $b $c\" >> times.txt"
    )
}

/// HPCC summary values by key.
fn hpcc_values(text: &str) -> Vec<(String, f64)> {
    HPCC_KEYS
        .iter()
        .filter_map(|(k, _)| {
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))?;
            let v: f64 = v.trim().parse().ok()?;
            // HPL in Gflop/s rather than Tflop/s.
            let v = if *k == "HPL_Tflops" { v * 1e3 } else { v };
            Some((k.to_string(), v))
        })
        .collect()
}

/// NetPIPE's (latency of the smallest message in us, peak bandwidth in Mbit/s) from
/// np.out: one line per size, "bytes Mbit/s seconds".
fn netpipe_values(text: &str) -> Option<(f64, f64)> {
    let rows: Vec<(f64, f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let v: Vec<f64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() >= 3).then(|| (v[0], v[1], v[2]))
        })
        .collect();
    let first = rows.iter().min_by(|a, b| a.0.total_cmp(&b.0))?;
    let peak = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    Some((first.2 * 1e6, peak))
}

/// One side's figures: HPCC's by key, then "NetPIPE latency" and "NetPIPE peak", and
/// the wall seconds of each program.
struct Figures {
    values: Vec<(String, f64)>,
    hpcc_s: f64,
    netpipe_s: f64,
}

fn figures(dir: &Path) -> Result<Figures, String> {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).map_err(|e| format!("{n}: {e}"));
    let mut values = hpcc_values(&read("hpccoutf.txt")?);
    if values.len() != HPCC_KEYS.len() {
        return Err(format!("hpccoutf.txt has {} of the figures", values.len()));
    }
    let (lat, peak) = netpipe_values(&read("np.out")?).ok_or("np.out has no rows")?;
    values.push(("netpipe-latency".into(), lat));
    values.push(("netpipe-peak".into(), peak));
    let times = read("times.txt")?;
    let span = |name| crate::guest::uptime_span(&times, name);
    Ok(Figures {
        values,
        hpcc_s: span("hpcc ").ok_or("times.txt: no hpcc line")?,
        netpipe_s: span("netpipe ").ok_or("times.txt: no netpipe line")?,
    })
}

/// A fresh directory with the HPCC input for problem size `n`.
fn work_dir(name: &str, n: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hpcvm-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let input = include_str!("../mpi/hpccinf.txt").replace("@N@", &format!("{n:<4}"));
    std::fs::write(dir.join("hpccinf.txt"), input).unwrap();
    dir
}

/// Open MPI refuses root unless told; the bench runs as root (hugepages).
const AS_ROOT: [(&str, &str); 2] = [
    ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
    ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
];

fn host_run(n: usize, single_copy: &str) -> Result<Figures, String> {
    let dir = work_dir("mpi-host", n);
    let st = Command::new("sh")
        .args(["-c", &job_script(single_copy)])
        .current_dir(&dir)
        .envs(AS_ROOT)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    let f = match st.success() {
        true => figures(&dir),
        false => Err(format!("host run failed: {st}")),
    };
    let _ = std::fs::remove_dir_all(&dir);
    f
}

fn vm_run(hpcvm: &Path, image: &Path, n: usize, single_copy: &str) -> Result<Figures, String> {
    let dir = work_dir("mpi-vm", n);
    let _pool = Reservation::take(512);
    let mut c = Command::new("timeout");
    c.arg("3000")
        .arg(hpcvm)
        .args(["run", "--image"])
        .arg(image)
        .args(["--cpus", "2,affinity=0-1"])
        .args(["--memory", "1G,hugepages=2M,prefault=on"]);
    for (k, v) in AS_ROOT {
        c.args(["--env", &format!("{k}={v}")]);
    }
    let out = c
        .args(["--", "sh", "-c", &job_script(single_copy)])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let f = match out.status.success() {
        true => figures(&dir),
        false => Err(format!(
            "VM run failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
    };
    let _ = std::fs::remove_dir_all(&dir);
    f
}

/// The same job under QEMU microvm: the same kernel and image (virtio-mmio blk),
/// the working directory through the same virtiofsd (vhost-user-fs), 2 vCPUs on the
/// same 2 cores, RAM on prefaulted 2M hugepages. QEMU has no guest agent, so a busybox
/// /init does what hpcvm's agent does for a job: mounts the image read-only with
/// tmpfs where Open MPI writes, sets the host name, brings up lo, and runs the job
/// chrooted in the image with the environment hpcvm gives it.
fn qemu_run(hpcvm: &Path, image: &Path, n: usize, single_copy: &str) -> Result<Figures, String> {
    let guest = crate::guest::guest_dir(hpcvm).ok_or("no default guest (make guest)")?;
    let virtiofsd_bin = vmm::virtio::fs::find_virtiofsd().ok_or("no virtiofsd")?;
    let dir = work_dir("mpi-qemu", n);
    let boot = dir.join("boot");
    std::fs::create_dir_all(&boot).map_err(|e| e.to_string())?;
    let mut env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
        "HOME=/mnt".to_string(),
    ];
    env.extend(AS_ROOT.iter().map(|(k, v)| format!("{k}={v}")));
    if vmm::host::is_software_kvm() {
        env.push(format!(
            "GLIBC_TUNABLES={}",
            vmm::vstate::cpuid::SOFTWARE_KVM_GLIBC_TUNABLES
        ));
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         mkdir -p /r; mount -t ext4 -o ro /dev/vda /r\n\
         mount -t proc proc /r/proc; mount -t sysfs sys /r/sys; mount -t devtmpfs dev /r/dev\n\
         mkdir -p /r/dev/shm; mount -t tmpfs shm /r/dev/shm\n\
         mount -t tmpfs tmp /r/tmp; mount -t tmpfs run /r/run\n\
         mount -t virtiofs work /r/mnt\n\
         hostname hpcvm; ip link set lo up\n\
         chroot /r /usr/bin/env -i {} sh -c 'cd /mnt && {}'\n\
         echo QEMU-DONE\nreboot -f\n",
        env.join(" "),
        job_script(single_copy).replace('\'', "'\\''")
    );
    let initrd = boot.join("init.cpio");
    crate::datapath::busybox_initramfs(&guest.join("busybox"), &init, &initrd)?;
    let sock = boot.join("vfs.sock");
    let mut vfs = crate::datapath::virtiofsd(&virtiofsd_bin, &sock, &dir)?;
    let _pool = Reservation::take(512);
    let mut q = crate::datapath::qemu_guest(
        &guest,
        "1G",
        "",
        ",hugetlb=on,hugetlbsize=2M,prealloc=on",
        &initrd,
    );
    q.args(["-smp", "2"]);
    let drive = format!("file={},format=raw,readonly=on", image.display());
    crate::datapath::qemu_blk_and_fs(&mut q, &drive, &sock, "work");
    let out = Command::new("taskset")
        .args(["-c", "0-1", "timeout", "3000"])
        .arg(q.get_program())
        .args(q.get_args())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string());
    let _ = vfs.kill();
    let _ = vfs.wait();
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    let f = match text.contains("QEMU-DONE") {
        true => figures(&dir),
        false => Err(format!(
            "QEMU run incomplete: {}",
            text.lines().last().unwrap_or("no output")
        )),
    };
    let _ = std::fs::remove_dir_all(&dir);
    f
}

/// exec -> exit of `hpcvm run [--image IMAGE] -- true`, `reps` times (s).
fn job_start(hpcvm: &Path, image: Option<&Path>, reps: usize) -> Vec<f64> {
    (0..reps)
        .filter_map(|_| {
            let mut c = Command::new(hpcvm);
            c.args(["run", "--memory", "512M"]);
            if let Some(i) = image {
                c.arg("--image").arg(i);
            }
            let t = Instant::now();
            let ok = c
                .args(["--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| t.elapsed().as_secs_f64())
        })
        .collect()
}

/// Whether `name` is an executable in PATH (without running it: `hpcc` given any
/// argument runs the benchmark in the current directory).
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// `x` with 3 significant digits (these figures span 1e-3 to 1e5).
fn sig(x: f64) -> String {
    let digits = if x == 0.0 {
        0
    } else {
        (2 - x.abs().log10().floor() as i32).max(0) as usize
    };
    format!("{x:.digits$}")
}

fn row_name(key: &str) -> String {
    match key {
        "netpipe-latency" => "NetPIPE latency, smallest message (us)".into(),
        "netpipe-peak" => "NetPIPE peak bandwidth (Mbit/s)".into(),
        k => HPCC_KEYS
            .iter()
            .find(|(hk, _)| *hk == k)
            .map_or(k.to_string(), |(_, name)| name.to_string()),
    }
}

/// The section: HPCC with problem size `n`, `reps` boots for the job-start row.
pub fn run(hpcvm: &Path, n: usize, reps: usize) -> String {
    let title = "### MPI in a VM against the host (HPCC, NetPIPE)\n\n";
    let Some(image) = image(hpcvm) else {
        return format!("{title}Skipped: no MPI image (run `make image`).\n");
    };
    if !on_path("hpcc") || !on_path("NPopenmpi") {
        return format!(
            "{title}Skipped: no hpcc or NPopenmpi on the host (run `make mpi-deps`).\n"
        );
    }
    let single_copy = if vmm::host::is_software_kvm() {
        "none"
    } else {
        "cma"
    };
    let host = host_run(n, single_copy);
    let vm = vm_run(hpcvm, &image, n, single_copy);
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    let qemu = match have_qemu {
        true => qemu_run(hpcvm, &image, n, single_copy),
        false => Err("no qemu-system-x86_64".into()),
    };
    let mut out = format!(
        "{title}`mpirun {}` of the image's `hpcc` (HPCC input: N={n}, NB=64, P=1 x Q=2, \
         benches/mpi/hpccinf.txt) and `NPopenmpi -u {NETPIPE_MAX}`: inside `hpcvm run --image \
         mpi.ext4 --cpus 2,affinity=0-1 --memory 1G,hugepages=2M,prefault=on`, and with the \
         host's binaries of the same Debian release on the same 2 cores. Single copy \
         `{single_copy}` on both sides: what hpcvm gives guest jobs on this host. QEMU \
         microvm: the same kernel and image (virtio-mmio blk), the working directory \
         through the same virtiofsd, 2 vCPUs on the same 2 cores, prefaulted 2M \
         hugepages; a busybox /init does what hpcvm's agent does for a job (image \
         read-only with tmpfs on /tmp, /run, /dev/shm; host name; lo up; the same \
         environment).\n\n",
        mpirun_args(single_copy)
    );
    match (&host, &vm) {
        (Ok(h), Ok(v)) => {
            let q = qemu.as_ref().ok();
            let mut t = Table::new(&[
                "metric",
                "hpcvm",
                "host",
                "ratio (hpcvm/host)",
                "QEMU microvm",
                "ratio (QEMU/host)",
            ]);
            let mut row = |name: String, vv: f64, hv: f64, qv: Option<f64>| {
                t.row(&[
                    name,
                    sig(vv),
                    sig(hv),
                    ratio(vv, hv),
                    qv.map_or("-".into(), sig),
                    qv.map_or("-".into(), |x| ratio(x, hv)),
                ]);
            };
            let get = |f: &Figures, k: &str| f.values.iter().find(|(fk, _)| fk == k).map(|x| x.1);
            for (k, hv) in &h.values {
                let qv = q.and_then(|q| get(q, k));
                row(row_name(k), get(v, k).unwrap_or(0.0), *hv, qv);
            }
            row(
                "mpirun + HPCC wall time (s)".into(),
                v.hpcc_s,
                h.hpcc_s,
                q.map(|q| q.hpcc_s),
            );
            row(
                "mpirun + NetPIPE wall time (s)".into(),
                v.netpipe_s,
                h.netpipe_s,
                q.map(|q| q.netpipe_s),
            );
            out.push_str(&t.finish());
            if let Err(e) = &qemu {
                out.push_str(&format!("\nQEMU microvm: {e}\n"));
            }
        }
        _ => {
            for (side, r) in [("host", &host), ("VM", &vm)] {
                if let Err(e) = r {
                    out.push_str(&format!("Not measured on the {side}: {e}\n"));
                }
            }
        }
    }
    let plain = job_start(hpcvm, None, reps);
    let with_image = job_start(hpcvm, Some(&image), reps);
    if !plain.is_empty() && !with_image.is_empty() {
        let (p, i) = (stats(plain), stats(with_image));
        let mut t = Table::new(&[
            "metric",
            "--image mpi.ext4 p10 / median / p90",
            "initramfs guest",
            "ratio",
        ]);
        t.row(&[
            "exec -> exit of `-- true` (s)".into(),
            i.cell(2),
            p.cell(2),
            ratio(i.median, p.median),
        ]);
        out.push_str(&format!(
            "\nBoot to job start and back: `hpcvm run --memory 512M [--image mpi.ext4] -- true`, \
             {reps} runs each.\n\n{}",
            t.finish()
        ));
    }
    out
}
