//! Guest RAM: prefault throughput against a plain populate of the same hugetlb mapping,
//! and destroy -> exit (hugepages back in the pool) against a bare munmap of it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hpcvm_tests::hugepages::{free_2m, Reservation};

use crate::stats::{ms, ratio, stats, Table};

const GIB: usize = 1 << 30;

/// A fresh private mapping of `gib` GiB of 2M hugetlb memory, populated (MAP_POPULATE);
/// the caller unmaps it.
fn populated_hugetlb(gib: usize) -> *mut libc::c_void {
    // SAFETY: a fresh anonymous mapping, unmapped by the caller; no aliasing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            gib * GIB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_HUGETLB
                | libc::MAP_HUGE_2MB
                | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "hugetlb mmap of {gib} GiB: {}",
        std::io::Error::last_os_error()
    );
    p
}

/// The least any KVM VMM can do at destroy: a bare KVM VM whose one memory slot is
/// `gib` GiB of populated 2M hugetlb memory, closed, then the memory unmapped. On a
/// shadow-paging host KVM frees per-slot reverse maps at close (2 MiB per GiB of guest
/// RAM); with hardware KVM's TDP MMU there are none.
fn kvm_floor(gib: usize) -> Duration {
    let len = gib * GIB;
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let p = populated_hugetlb(gib);
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: len as u64,
        userspace_addr: p as u64,
    };
    // SAFETY: the region is this live mapping, which outlives the VM (unmapped after
    // the VM is closed).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let t = Instant::now();
    drop(vm);
    // SAFETY: exactly the mapping created above.
    unsafe { libc::munmap(p, len) };
    t.elapsed()
}

/// Maps `gib` GiB of 2M hugetlb memory with MAP_POPULATE; returns (populate time,
/// munmap time).
fn bare_map(gib: usize) -> (Duration, Duration) {
    let len = gib * GIB;
    let t = Instant::now();
    let p = populated_hugetlb(gib);
    let populate = t.elapsed();
    let t = Instant::now();
    // SAFETY: exactly the mapping created above.
    unsafe { libc::munmap(p, len) };
    (populate, t.elapsed())
}

/// The first line the child prints.
fn first_line(child: &mut std::process::Child) -> String {
    let mut line = String::new();
    // Empty when there is none (a child that died, or printed something unreadable):
    // callers check what they got, so that cleanup still runs.
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    line
}

/// exec -> first output of the hello guest with `memory`.
fn hello_first_output(hpcvm: &Path, memory: &str) -> Duration {
    let guest = hpcvm_tests::guest("hello");
    let t = Instant::now();
    let mut child = Command::new(hpcvm)
        .args([
            "run",
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            memory,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut child);
    let d = t.elapsed();
    assert!(
        child.wait().unwrap().success(),
        "hpcvm --memory {memory} failed"
    );
    assert!(line.contains("hello"), "{line}");
    d
}

/// QEMU microvm arguments for `gib` GiB of 2M hugetlb RAM from a memfd (no hugetlbfs
/// mount here), preallocated or not.
fn qemu_memory_args(gib: usize, prealloc: bool) -> Vec<String> {
    vec![
        "-m".into(),
        format!("{gib}G"),
        "-object".into(),
        format!(
            "memory-backend-memfd,id=ram,size={gib}G,hugetlb=on,hugetlbsize=2M,prealloc={}",
            if prealloc { "on" } else { "off" }
        ),
        "-machine".into(),
        "memory-backend=ram".into(),
    ]
}

/// exec -> first output of QEMU microvm on the hello guest with `gib` GiB.
fn qemu_hello_first_output(gib: usize, prealloc: bool) -> Option<Duration> {
    let guest = hpcvm_tests::guest("hello");
    let args = qemu_memory_args(gib, prealloc);
    let mut cmd = crate::startup::qemu_microvm(
        guest.to_str().unwrap(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let line = first_line(&mut child);
    let d = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    line.contains("hello").then_some(d)
}

/// The prefault section.
pub fn prefault(hpcvm: &Path, sizes: &[usize], reps: usize) -> String {
    let mut t = Table::new(&[
        "guest RAM (2M pages)",
        "hpcvm prefault (GiB/s)",
        "MAP_POPULATE (GiB/s)",
        "ratio",
        "target",
        "QEMU -mem-prealloc (GiB/s)",
    ]);
    for &gib in sizes {
        let _pool = Reservation::take((gib * 512) as u64);
        let mem = format!("{gib}G,hugepages=2M");
        // Warm-up: the first touch after the pool grew costs extra (seen: 2.6 s for 1 GiB).
        bare_map(gib);
        let mut hp = Vec::new();
        let mut bare = Vec::new();
        let mut qp = Vec::new();
        for _ in 0..reps {
            if let (Some(with), Some(without)) = (
                qemu_hello_first_output(gib, true),
                qemu_hello_first_output(gib, false),
            ) {
                qp.push(gib as f64 / with.saturating_sub(without).as_secs_f64().max(1e-6));
            }
            let with = hello_first_output(hpcvm, &format!("{mem},prefault=on"));
            let without = hello_first_output(hpcvm, &mem);
            hp.push(gib as f64 / with.saturating_sub(without).as_secs_f64().max(1e-6));
            bare.push(gib as f64 / bare_map(gib).0.as_secs_f64());
        }
        let (h, b) = (stats(hp).median, stats(bare).median);
        let q = if qp.is_empty() {
            "not run".into()
        } else {
            format!("{:.2}", stats(qp).median)
        };
        t.row(&[
            format!("{gib} GiB"),
            format!("{h:.2}"),
            format!("{b:.2}"),
            ratio(h, b),
            ">= 0.8x".into(),
            q,
        ]);
    }
    format!(
        "### Prefault\n\nhpcvm: (exec -> first output with `prefault=on`) minus (without), median of {reps}; \
         MAP_POPULATE: one thread populating the same size of 2M hugetlb memory.\n\n{}",
        t.finish()
    )
}

/// Starts a spinning guest on `gib` GiB of prefaulted 2M pages, destroys it through
/// the API; returns (destroy -> exit, VMM RSS while running in KiB).
fn hpcvm_destroy(hpcvm: &Path, gib: usize) -> (Duration, u64) {
    let sock =
        std::env::temp_dir().join(format!("hpcvm-bench-destroy-{}.sock", std::process::id()));
    let guest = hpcvm_tests::guest("spin");
    let before = free_2m();
    let mut child = Command::new(hpcvm)
        .args([
            "run",
            "--kernel",
            guest.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
        ])
        .arg(format!("{gib}G,hugepages=2M,prefault=on"))
        .arg("--api-socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut child);
    assert!(line.contains("spin: start"), "{line}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let rss: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let mut s = UnixStream::connect(&sock).unwrap();
    let t = Instant::now();
    s.write_all(b"{\"cmd\":\"destroy\"}\n").unwrap();
    let st = child.wait().unwrap();
    let d = t.elapsed();
    assert_eq!(st.code(), Some(169));
    assert!(
        !sock.exists(),
        "hpcvm removes its API socket when destroyed"
    );
    assert_eq!(free_2m(), before, "hugepages back in the pool at exit");
    (d, rss)
}

/// QEMU microvm running the spin guest on `gib` GiB of preallocated 2M pages, told to
/// `quit` over QMP: request -> exit.
fn qemu_quit(gib: usize) -> Option<Duration> {
    let sock = std::env::temp_dir().join(format!("hpcvm-bench-qquit-{}.sock", std::process::id()));
    let guest = hpcvm_tests::guest("spin");
    let mut args = qemu_memory_args(gib, true);
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", sock.display()));
    let mut cmd = crate::startup::qemu_microvm(
        guest.to_str().unwrap(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let quit = quit_over_qmp(&mut child, &sock);
    // Whatever went wrong, no QEMU and no QMP socket (QEMU leaves it behind when it
    // dies or is killed) outlive the measurement.
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    quit
}

/// Waits for the spin guest's first line, then times `quit` over QMP to QEMU's exit.
fn quit_over_qmp(child: &mut std::process::Child, sock: &Path) -> Option<Duration> {
    if !first_line(child).contains("spin: start") {
        return None;
    }
    let s = UnixStream::connect(sock).ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").ok()?;
    line.clear();
    r.read_line(&mut line).ok()?;
    let t = Instant::now();
    w.write_all(b"{\"execute\":\"quit\"}\n").ok()?;
    let _ = child.wait();
    Some(t.elapsed())
}

/// The destroy section.
pub fn destroy(hpcvm: &Path, sizes: &[usize], reps: usize) -> String {
    let mut t = Table::new(&[
        "guest RAM (2M pages)",
        "hpcvm destroy -> exit (ms)",
        "bare munmap (ms)",
        "ratio",
        "target",
        "bare KVM VM close + munmap (ms)",
        "ratio to that",
        "VMM RSS, guest RAM excluded (MiB)",
        "QEMU quit -> exit (ms)",
    ]);
    for &gib in sizes {
        let _pool = Reservation::take((gib * 512) as u64);
        let mut hd = Vec::new();
        let mut bm = Vec::new();
        let mut kf = Vec::new();
        let mut rss = 0;
        let mut qq = Vec::new();
        for _ in 0..reps {
            if let Some(d) = qemu_quit(gib) {
                qq.push(ms(d));
            }
            let (d, r) = hpcvm_destroy(hpcvm, gib);
            hd.push(ms(d));
            rss = rss.max(r);
            bm.push(ms(bare_map(gib).1));
            kf.push(ms(kvm_floor(gib)));
        }
        let (h, b, k) = (stats(hd).median, stats(bm).median, stats(kf).median);
        t.row(&[
            format!("{gib} GiB"),
            format!("{h:.1}"),
            format!("{b:.1}"),
            ratio(h, b),
            "<= 1.5x".into(),
            format!("{k:.1}"),
            ratio(h, k),
            format!("{:.2} (target <= 3)", rss as f64 / 1024.0),
            if qq.is_empty() {
                "not run".into()
            } else {
                format!("{:.1}", stats(qq).median)
            },
        ]);
    }
    format!(
        "### Destroy\n\nA 2-vCPU spinning guest on prefaulted 2M pages, destroyed through the API; \
         timed from the request to the process's exit (every hugepage is back in the pool \
         then, checked), median of {reps}; beside munmap of the same populated mapping, and \
         beside the floor for any KVM VMM: closing a bare KVM VM with that mapping as its \
         one memory slot, then munmap. On a shadow-paging host (software KVM) the close \
         frees KVM's reverse maps for the slot (2 MiB per GiB of guest RAM); hardware \
         KVM's TDP MMU has none.\n\n{}",
        t.finish()
    )
}
