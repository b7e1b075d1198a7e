//! Fuzz targets: the parsers that take bytes hpcvm does not control, with the
//! properties each must keep for any input. `fuzz/` runs them under libFuzzer
//! (`make fuzz`, cargo-fuzz on nightly); `tests/tests/fuzz.rs` runs a short
//! mutation pass over the same seeds on every `make test`.
//!
//! * [`api_request`]: a control-socket request line (any local client of the uid).
//! * [`agent_stream`]: what the guest writes to the agent channel (the guest is
//!   untrusted: a job may overwrite the agent's channel with anything).
//! * [`agent_frames`]: the agent's frame decoder itself, as the guest agent runs it on
//!   what the host sends (the job spec), in any chunking.
//! * [`config_option`]: the values of `--cpus`, `--memory`, `--disk`, `--share`,
//!   `--device` and `--file`.

use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};
use vmm::agent::{AgentLink, AgentPort};
use vmm::api::protocol::{error_line, ok_line, parse_request, request_line, Command};
use vmm::config::{CpusConfig, DeviceConfig, DiskConfig, MemoryConfig, ShareConfig};
use vmm::output::Output;

/// One response line: a JSON object, `ok` as expected, exactly one newline, at the end.
fn assert_one_line(line: &[u8], ok: bool) {
    assert_eq!(line.last(), Some(&b'\n'), "response ends its line");
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one line: {}",
        String::from_utf8_lossy(line)
    );
    let v: Value = serde_json::from_slice(line).expect("a response is JSON");
    assert_eq!(v["ok"], json!(ok), "{v}");
}

/// A request line: parsed or refused, never a panic; what is accepted round-trips
/// through the client's own encoding, and every answer is one JSON line.
pub fn api_request(data: &[u8]) {
    match parse_request(data) {
        Ok(req) => {
            let again = request_line(7, &req.command);
            let back = parse_request(&again[..again.len() - 1]).expect("our own line parses");
            // serde_json reads decimal floats to within an ulp, not always exactly.
            let close = |a: f64, b: f64| (a - b).abs() <= a.abs().max(b.abs()) * 1e-12;
            match (&back.command, &req.command) {
                (
                    Command::Shutdown { timeout_s: Some(a) },
                    Command::Shutdown { timeout_s: Some(b) },
                ) => assert!(close(*a, *b), "round trip: {a} vs {b}"),
                (a, b) => assert_eq!(a, b, "round trip"),
            }
            assert_one_line(&ok_line(&req.id, json!({"state": "running"})), true);
        }
        Err(bad) => {
            assert!(!bad.error.is_empty(), "a refusal says why");
            assert_one_line(&error_line(&bad.id, &bad.error), false);
        }
    }
}

/// Outputs that go to /dev/null, shared by every run (starting threads per input
/// would make the fuzzer measure thread creation).
fn null_outputs() -> (Output, Output) {
    static OUTS: OnceLock<(Output, Output)> = OnceLock::new();
    OUTS.get_or_init(|| {
        let open = || -> std::os::fd::OwnedFd {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .expect("/dev/null")
                .into()
        };
        let mode = vmm::seccomp::SeccompMode::Off;
        let (o, t1) = vmm::output::start(open(), "fuzz-out", mode).expect("output thread");
        let (e, t2) = vmm::output::start(open(), "fuzz-err", mode).expect("output thread");
        // The pumps run for the life of the process.
        std::mem::forget((t1, t2));
        (o, e)
    })
    .clone()
}

fn agent_port() -> (AgentPort, Arc<AgentLink>) {
    let job = hpcvm_agent::JobSpec {
        argv: vec!["true".into()],
        env: Vec::new(),
        cwd: "/".into(),
        stdio: None,
        root: None,
        mounts: Vec::new(),
        user: None,
    };
    let link = AgentLink::new(job, false, Some(null_outputs()));
    let evt = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
        .expect("an eventfd");
    (
        AgentPort::new(devices::EventFdTrigger::new(evt), link.clone()),
        link,
    )
}

/// The frame kinds a guest may send.
const GUEST_KINDS: [u8; 7] = [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16];

/// Bytes the guest writes to COM2. The first byte chooses: even, the rest goes out
/// raw (no panic, no hang, memory bounded by the frame limit); odd, the rest is
/// read as (kind, length, payload) triples and sent as well-formed frames, which
/// must never break the channel (only a payload that is not the JSON report a
/// kind needs may be called bad) and must be taken exactly once each.
pub fn agent_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (mut port, link) = agent_port();
    let send = |port: &mut AgentPort, bytes: &[u8]| {
        use devices::BusDevice;
        for b in bytes {
            port.write(0, std::slice::from_ref(b));
        }
    };
    if mode % 2 == 0 {
        send(&mut port, rest);
        let _ = link.report();
        return;
    }
    let mut i = 0;
    let mut saw_ready = false;
    let mut wire = Vec::new();
    while i + 2 <= rest.len() {
        let kind = GUEST_KINDS[usize::from(rest[i]) % GUEST_KINDS.len()];
        let len = usize::from(rest[i + 1]).min(rest.len() - i - 2);
        let payload = &rest[i + 2..i + 2 + len];
        saw_ready |= kind == 0x10;
        wire.extend(hpcvm_agent::frame(kind, payload));
        i += 2 + len;
    }
    send(&mut port, &wire);
    let r = link.report();
    if let Some(e) = &r.protocol_error {
        assert!(
            e.starts_with("bad EXIT report") || e.starts_with("bad ERROR report"),
            "well-formed frames broke the channel: {e}"
        );
    }
    assert_eq!(r.ready, saw_ready, "READY taken iff sent");
}

/// The frame decoder on `data[1..]`, fed in chunks of `data[0]` bytes (at least 1):
/// the frames and the error, if any, are the same as when it is fed all at once, a
/// frame never claims more than the limit, and a job spec payload is parsed or
/// refused without a panic.
pub fn agent_frames(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let decode = |chunk: usize| {
        let mut d = hpcvm_agent::Decoder::default();
        let mut frames = Vec::new();
        for piece in rest.chunks(chunk.max(1)) {
            d.push(piece);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e)),
                }
            }
        }
        (frames, None)
    };
    let (whole, whole_err) = decode(rest.len());
    let (pieces, pieces_err) = decode(usize::from(chunk));
    assert_eq!(whole, pieces, "chunking changed the frames");
    assert_eq!(whole_err, pieces_err, "chunking changed the error");
    for (kind, payload) in &whole {
        assert!(payload.len() <= hpcvm_agent::MAX_PAYLOAD);
        if *kind == hpcvm_agent::kind::JOB {
            let _ = serde_json::from_slice::<hpcvm_agent::JobSpec>(payload);
        }
    }
}

/// An option value: parsed or refused with a one-line message, never a panic.
pub fn config_option(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let s = String::from_utf8_lossy(rest);
    let err = match which % 6 {
        0 => s.parse::<CpusConfig>().err().map(|e| e.to_string()),
        1 => s.parse::<MemoryConfig>().err().map(|e| e.to_string()),
        2 => s.parse::<DiskConfig>().err().map(|e| e.to_string()),
        3 => s.parse::<ShareConfig>().err().map(|e| e.to_string()),
        4 => s.parse::<DeviceConfig>().err().map(|e| e.to_string()),
        _ => s
            .parse::<vmm::boot::initramfs::FileSpec>()
            .err()
            .map(|e| e.to_string()),
    };
    if let Some(e) = err {
        assert!(!e.is_empty(), "a refusal says why");
    }
}

/// Inputs each target starts from (`fuzz/corpus` holds the same).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let strs: &[&str] = match target {
        "api_request" => &[
            r#"{"cmd":"status"}"#,
            r#"{"id":1,"cmd":"shutdown","timeout_s":10}"#,
            r#"{"id":"x","cmd":"destroy"}"#,
            r#"{"cmd":"pause","id":[1,{"a":null}]}"#,
            r#"{"cmd":"resume"}"#,
            r#"{"cmd":"shutdown","timeout_s":1e-10}"#,
            r#"{"cmd":"status","cmd":"destroy"}"#,
        ],
        "config_option" => &[
            "\x004,topology=1:2:2,affinity=0-3",
            "\x002,affinity=0@2,1@3",
            "\x01512M,hugepages=2M,prefault=on",
            "\x014G,hugepages=1G",
            "\x02/tmp/disk.img,readonly=on,serial=abc,direct=on",
            "\x03/home/u/data:/data,readonly=on",
            "\x04vfio=0000:3b:00.1",
            "\x05/etc/hostname:/etc/hostname",
        ],
        _ => &[],
    };
    let mut out: Vec<Vec<u8>> = strs.iter().map(|s| s.as_bytes().to_vec()).collect();
    if target == "agent_frames" {
        let job =
            serde_json::json!({"argv": ["sh", "-c", "true"], "env": [["A", "1"]], "cwd": "/"});
        let mut v = vec![3u8];
        v.extend(hpcvm_agent::frame(
            hpcvm_agent::kind::JOB,
            job.to_string().as_bytes(),
        ));
        v.extend(hpcvm_agent::frame(hpcvm_agent::kind::SIGNAL, &[15]));
        out.push(v);
    }
    if target == "agent_stream" {
        // Odd mode: READY, a STDOUT line, an EXIT report.
        let mut v = vec![1u8, 0, 0, 1, 6];
        v.extend(b"hello\n");
        let exit = br#"{"code":3}"#;
        v.extend([3, exit.len() as u8]);
        v.extend(exit);
        out.push(v);
        // Even mode: a raw stream with a frame that claims too much.
        out.push(vec![0, 0x11, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3]);
    }
    out
}

/// A small deterministic mutator (xorshift), for the short runs in the test suite.
pub struct Mutator {
    state: u64,
}

impl Mutator {
    /// Seeded, so that a failing run can be repeated.
    pub fn new(seed: u64) -> Self {
        Self { state: seed.max(1) }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `seed` changed in one to four ways, sometimes spliced with `other`.
    pub fn mutate(&mut self, seed: &[u8], other: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            match self.below(6) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] ^= 1 << self.below(8);
                }
                1 => {
                    let i = self.below(v.len() + 1);
                    v.insert(i, self.next() as u8);
                }
                2 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v.remove(i);
                }
                3 => {
                    let i = self.below(v.len() + 1);
                    v.truncate(i);
                }
                4 if !other.is_empty() => {
                    let at = self.below(v.len() + 1);
                    let from = self.below(other.len());
                    v.splice(at..at, other[from..].iter().copied());
                }
                _ => {
                    let i = self.below(v.len() + 1);
                    let special: &[&[u8]] = &[
                        b"\"", b"\\u0000", b"1e999", b"-0", b"{", b"}", b",", b"\xff", b"\n",
                    ];
                    let s = special[self.below(special.len())];
                    v.splice(i..i, s.iter().copied());
                }
            }
        }
        v
    }
}
