//! The control socket under bad and heavy use: malformed, unknown and oversized
//! requests, random bytes, vanished and slow clients, many clients at once, and
//! clients of another uid, idle and trickling clients past the cap. The VMM must
//! answer or hang up, never crash or stall, and always serve `destroy`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hpcvm_tests::proc::{ctl, hpcvm_bin, socket_path, start_guest, RunningVm};
use vmm::api::server::{MAX_CLIENTS, REQUEST_TIMEOUT};

struct Vm {
    vm: RunningVm,
    sock: PathBuf,
}

impl Vm {
    fn start(test: &str) -> Self {
        let sock = socket_path(test);
        let mut vm = start_guest(
            "spin",
            &["--memory", "32M", "--api-socket", sock.to_str().unwrap()],
        );
        vm.wait_for_line("spin: start", Duration::from_secs(60));
        Self { vm, sock }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Still alive and answering.
    fn assert_healthy(&mut self) {
        assert!(self.vm.child.try_wait().unwrap().is_none(), "VMM exited");
        let r = ctl(&self.sock, &["status"]);
        assert_eq!(r.code, Some(0), "status failed: {} {}", r.stdout, r.stderr);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.vm.kill();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn exchange(s: &mut UnixStream, line: &[u8]) -> String {
    s.write_all(line).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut out = String::new();
    r.read_line(&mut out).unwrap();
    out
}

#[test]
fn malformed_requests_get_errors_and_the_connection_keeps_working() {
    let mut vm = Vm::start("malformed");
    let mut s = vm.connect();
    let cases: [(&[u8], &str); 6] = [
        (b"not json\n", r#""ok":false"#),
        (
            b"{\"id\":3,\"cmd\":\"reboot\"}\n",
            "unknown command \\\"reboot\\\"",
        ),
        (b"{\"id\":4}\n", "missing \\\"cmd\\\""),
        (b"[1,2,3]\n", "must be a JSON object"),
        (
            b"{\"cmd\":\"shutdown\",\"timeout_s\":\"soon\"}\n",
            "must be a number",
        ),
        (b"\xff\xfe\x00garbage\n", "invalid JSON"),
    ];
    for (req, want) in cases {
        let reply = exchange(&mut s, req);
        assert!(
            reply.contains(r#""ok":false"#) && reply.contains(want),
            "{req:?} -> {reply}"
        );
    }
    let reply = exchange(&mut s, b"{\"id\":\"again\",\"cmd\":\"status\"}\n");
    assert!(
        reply.contains(r#""ok":true"#) && reply.contains(r#""id":"again""#),
        "{reply}"
    );
    vm.assert_healthy();
}

#[test]
fn an_overlong_line_is_refused_and_the_client_dropped() {
    let mut vm = Vm::start("overlong");
    let mut s = vm.connect();
    let huge = vec![b'x'; 100 * 1024];
    let _ = s.write_all(&huge);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        reply.contains("request line longer than 65536 bytes"),
        "{reply}"
    );
    vm.assert_healthy();
}

#[test]
fn random_bytes_never_crash_the_vmm() {
    let mut vm = Vm::start("fuzz");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut s = vm.connect();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for _ in 0..300 {
        let len = (rand() % 200) as usize;
        let mut line: Vec<u8> = (0..len)
            .map(|_| (rand() % 256) as u8)
            .filter(|&b| b != b'\n')
            .collect();
        if rand() % 3 == 0 {
            // Near-misses: valid JSON shapes with odd contents.
            line = format!(
                r#"{{"cmd":"{}","timeout_s":{}}}"#,
                rand() % 7,
                rand() as i64
            )
            .into_bytes();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        line.push(b'\n');
        s.write_all(&line).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        assert!(
            reply.ends_with('\n') && reply.contains(r#""ok":false"#),
            "{line:?} -> {reply}"
        );
    }
    vm.assert_healthy();
}

#[test]
fn vanished_and_half_finished_clients_are_forgotten() {
    let mut vm = Vm::start("vanish");
    for _ in 0..20 {
        drop(vm.connect());
        let mut s = vm.connect();
        s.write_all(b"{\"cmd\":\"sta").unwrap();
        drop(s);
    }
    vm.assert_healthy();
}

#[test]
fn a_client_that_never_reads_cannot_stall_or_bloat_the_vmm() {
    let mut vm = Vm::start("slow");
    let mut s = vm.connect();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = b"{\"cmd\":\"status\"}\n".repeat(2000);
    // Keep sending, never read: the VMM must drop us rather than buffer forever.
    let mut sent = 0usize;
    while sent < 200 {
        if s.write_all(&req).is_err() {
            break;
        }
        sent += 1;
    }
    vm.assert_healthy();
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.vm.pid())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(rss_kb < 32 * 1024, "VMM RSS grew to {rss_kb} kB");
}

#[test]
fn many_clients_at_once_all_get_answers() {
    let mut vm = Vm::start("concurrent");
    let sock = vm.sock.clone();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                for i in 0..50 {
                    let id = t * 1000 + i;
                    s.write_all(format!("{{\"id\":{id},\"cmd\":\"status\"}}\n").as_bytes())
                        .unwrap();
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    assert!(line.contains(&format!("\"id\":{id},")), "{line}");
                    assert!(line.contains(r#""ok":true"#), "{line}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    vm.assert_healthy();
}

fn ctl_as(uid: u32, sock: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(hpcvm_bin())
        .args(["ctl", "--api-socket", sock.to_str().unwrap(), "status"])
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn clients_of_another_uid_are_refused() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: needs root to act as another uid");
        return;
    }
    let mut vm = Vm::start("uid");
    // The 0600 socket file keeps other users out...
    let (code, _, err) = ctl_as(65534, &vm.sock);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    // ...and were it opened up, SO_PEERCRED still refuses them.
    std::fs::set_permissions(&vm.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out, err) = ctl_as(65534, &vm.sock);
    assert_eq!(code, Some(1), "{out} {err}");
    assert!(
        out.contains("refused: uid 65534 may not control this VM"),
        "{out}"
    );
    vm.assert_healthy();
}

#[test]
fn idle_and_trickling_clients_never_lock_out_destroy() {
    let mut vm = Vm::start("lockout");
    // The cap's worth of idle connections, and more.
    let idle: Vec<UnixStream> = (0..MAX_CLIENTS + 16).map(|_| vm.connect()).collect();
    // Slow clients sending a request at 1 byte per second.
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let mut s = vm.connect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for b in b"{\"cmd\":\"status\"}\n" {
                    if s.write_all(&[*b]).is_err() {
                        return;
                    }
                    for _ in 0..10 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(vm.vm.child.try_wait().unwrap().is_none(), "VMM exited");

    let asked = Instant::now();
    let r = ctl(&vm.sock, &["destroy"]);
    assert_eq!(r.code, Some(0), "destroy failed: {} {}", r.stdout, r.stderr);
    let (code, err, _) = vm.vm.wait_exit(Duration::from_secs(10));
    let took = asked.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in slow {
        t.join().unwrap();
    }
    drop(idle);
    assert_eq!(code, Some(169), "{err}");
    assert!(err.contains("Destroyed on request (API)"), "{err}");
    assert!(took < Duration::from_secs(5), "destroy took {took:?}");
    assert!(!vm.sock.exists(), "socket file removed");
    assert!(err.lines().count() <= 3, "quiet about evictions: {err}");
}

#[test]
fn a_request_left_unfinished_is_dropped_after_the_timeout() {
    let mut vm = Vm::start("unfinished");
    let mut stalled = vm.connect();
    let idle = vm.connect();
    stalled.write_all(b"{\"cmd\":\"sta").unwrap();
    let sent = Instant::now();
    let mut reply = String::new();
    let _ = stalled.read_to_string(&mut reply);
    let took = sent.elapsed();
    assert!(
        reply.contains("request line not completed within 5 s"),
        "{reply}"
    );
    assert!(
        took >= REQUEST_TIMEOUT - Duration::from_millis(100)
            && took < REQUEST_TIMEOUT + Duration::from_secs(3),
        "dropped after {took:?}"
    );
    // An idle connection owes nothing and stays.
    idle.set_nonblocking(true).unwrap();
    let e = (&idle).read(&mut [0u8; 64]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
    vm.assert_healthy();
}
