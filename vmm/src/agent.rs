//! The host side of the guest agent channel on COM2: hands the agent its job, routes
//! the job's stdout/stderr to hpcvm's own, forwards signals, and keeps how the job
//! ended. Frames are decoded in the vCPU thread that writes the UART (see
//! `hpcvm_agent` for the wire format).

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use devices::legacy::Uart;
use devices::{lock, BusDevice};
use hpcvm_agent::{
    frame, kind, Decoder, JobError, JobExit, JobSpec, RootImage, ShareMount, StdioPorts,
};

use crate::config::disk::IMAGE_SERIAL;
use crate::config::{JobConfig, ShareConfig};

/// The virtio-console port that carries the job's stdout.
pub const STDOUT_PORT: &str = "hpcvm.stdout";
/// The virtio-console port that carries the job's stderr.
pub const STDERR_PORT: &str = "hpcvm.stderr";
/// The virtio-console port that carries hpcvm's stdin to the job.
pub const STDIN_PORT: &str = "hpcvm.stdin";
use crate::output::Output;
use crate::vstate::cpuid;

/// What a job gets on a software-KVM host, unless it sets the variable itself.
fn software_kvm_env() -> [(&'static str, &'static str); 2] {
    [
        // glibc kept off the CPU features the guest kernel cannot save.
        ("GLIBC_TUNABLES", cpuid::SOFTWARE_KVM_GLIBC_TUNABLES),
        // Open MPI's shared-memory BTL copies large messages through a shared
        // buffer in user mode instead of with process_vm_readv (CMA): the guest
        // kernel's copy is emulated there, at about 2 MB/s (measured: HPCC's
        // PingPong bandwidth 0.002 GB/s with CMA), while user mode runs natively.
        ("OMPI_MCA_btl_vader_single_copy_mechanism", "none"),
    ]
}

/// What the agent is told to run for `job`: its argv, environment and working
/// directory, and on a software-KVM host [`software_kvm_env`].
pub fn job_spec(job: &JobConfig, shares: &[ShareConfig], software_kvm: bool) -> JobSpec {
    let mut env = job.environment();
    if software_kvm {
        for (k, v) in software_kvm_env() {
            if !env.iter().any(|(ek, _)| ek == k) {
                env.push((k.into(), v.into()));
            }
        }
    }
    JobSpec {
        argv: job.argv.clone(),
        env,
        cwd: job.cwd.clone(),
        stdio: job.console_stdio.then(|| StdioPorts {
            stdout: STDOUT_PORT.into(),
            stderr: STDERR_PORT.into(),
            stdin: job.stdin.then(|| STDIN_PORT.into()),
        }),
        root: job.image.then(|| RootImage {
            serial: IMAGE_SERIAL.into(),
            fstype: "ext4".into(),
            boot_init: job.argv.is_empty(),
        }),
        mounts: shares
            .iter()
            .map(|s| ShareMount {
                tag: s.tag.clone(),
                path: s.guest_dir.clone(),
                read_only: s.read_only,
            })
            .collect(),
        user: job.user,
    }
}

/// The frame that carries `spec` to the agent, byte for byte as sent.
pub fn job_frame(spec: &JobSpec) -> Vec<u8> {
    frame(
        kind::JOB,
        &serde_json::to_vec(spec).expect("JobSpec serializes"),
    )
}

/// What the control loop needs to know about the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobReport {
    /// The agent is up (it said READY).
    pub ready: bool,
    /// How the job ended, once reported.
    pub exit: Option<JobExit>,
    /// Why the job could not start, if it could not.
    pub error: Option<JobError>,
    /// The channel broke (garbage on the wire).
    pub protocol_error: Option<String>,
    /// The agent handed the guest over to the image's own init.
    pub handed_over: bool,
}

/// State shared by the vCPU thread decoding frames and the control loop.
pub struct AgentLink {
    job: JobSpec,
    verbose: bool,
    /// Where relayed job output goes (hpcvm's stdout and stderr); written
    /// directly without.
    outputs: Option<(Output, Output)>,
    report: Mutex<JobReport>,
    to_guest: Mutex<Vec<u8>>,
    held_signals: Mutex<Vec<u8>>,
}

impl AgentLink {
    /// A link that will hand `job` to the agent once it is up; output the agent
    /// relays (when the guest has no console ports) goes to `outputs`.
    pub fn new(job: JobSpec, verbose: bool, outputs: Option<(Output, Output)>) -> Arc<Self> {
        Arc::new(Self {
            job,
            verbose,
            outputs,
            report: Mutex::new(JobReport::default()),
            to_guest: Mutex::new(Vec::new()),
            held_signals: Mutex::new(Vec::new()),
        })
    }

    /// What has been reported so far.
    pub fn report(&self) -> JobReport {
        lock(&self.report).clone()
    }

    /// Asks for `sig` to be delivered to the job's process group; held until the agent
    /// is up (then sent right after the job, which starts and gets it at once).
    pub fn signal(&self, sig: u8) {
        let ready = lock(&self.report).ready;
        if ready {
            lock(&self.to_guest).extend(frame(kind::SIGNAL, &[sig]));
        } else {
            lock(&self.held_signals).push(sig);
        }
    }

    fn on_frame(&self, k: u8, payload: &[u8]) {
        match k {
            kind::READY => {
                lock(&self.report).ready = true;
                let mut out = lock(&self.to_guest);
                out.extend(job_frame(&self.job));
                for sig in lock(&self.held_signals).drain(..) {
                    out.extend(frame(kind::SIGNAL, &[sig]));
                }
            }
            kind::STDOUT => match &self.outputs {
                Some((out, _)) => out.write(payload),
                None => write_fd(io::stdout().as_fd(), payload),
            },
            kind::STDERR => match &self.outputs {
                Some((_, err)) => err.write(payload),
                None => write_fd(io::stderr().as_fd(), payload),
            },
            kind::EXIT => {
                let parsed = serde_json::from_slice::<JobExit>(payload);
                let mut r = lock(&self.report);
                match parsed {
                    Ok(e) => r.exit = Some(e),
                    Err(e) => r.protocol_error = Some(format!("bad EXIT report: {e}")),
                }
            }
            kind::ERROR => {
                let parsed = serde_json::from_slice::<JobError>(payload);
                let mut r = lock(&self.report);
                match parsed {
                    Ok(e) => r.error = Some(e),
                    Err(e) => r.protocol_error = Some(format!("bad ERROR report: {e}")),
                }
            }
            kind::HANDOVER => lock(&self.report).handed_over = true,
            kind::LOG if self.verbose => {
                log::info!("agent: {}", String::from_utf8_lossy(payload));
            }
            _ => {}
        }
    }
}

/// Writes all of `data` to `fd` unbuffered; a closed stdout/stderr drops the data (the
/// job's status still counts).
fn write_fd(fd: std::os::fd::BorrowedFd<'_>, data: &[u8]) {
    if let Ok(owned) = fd.try_clone_to_owned() {
        let _ = std::fs::File::from(owned).write_all(data);
    }
}

/// Bytes the guest writes to COM2, decoded into frames.
struct FrameSink {
    link: Arc<AgentLink>,
    dec: Arc<Mutex<(Decoder, bool)>>,
}

/// The agent channel's state in a checkpoint: COM2, the decoder's partial frame,
/// and the link (the job's report, frames not yet sent, signals held).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentState {
    /// COM2.
    pub uart: devices::legacy::UartState,
    /// Guest bytes that do not make a frame yet.
    pub partial: Vec<u8>,
    /// The channel broke (garbage on the wire).
    pub broken: bool,
    /// What the agent reported so far.
    pub report: JobReport,
    /// Frames for the agent not yet in COM2.
    pub to_guest: Vec<u8>,
    /// Signals held until the agent is up.
    pub held_signals: Vec<u8>,
}

impl Write for FrameSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut guard = lock(&self.dec);
        let (dec, broken) = &mut *guard;
        if *broken {
            return Ok(buf.len());
        }
        dec.push(buf);
        loop {
            match dec.next_frame() {
                Ok(Some((k, payload))) => self.link.on_frame(k, &payload),
                Ok(None) => break,
                Err(e) => {
                    lock(&self.link.report).protocol_error = Some(e.0);
                    *broken = true;
                    break;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// COM2 as the agent's channel: a UART whose output is decoded as frames and whose
/// input is fed from the link's outgoing queue.
pub struct AgentPort {
    uart: Uart,
    link: Arc<AgentLink>,
    /// The sink's decoder, shared so that a checkpoint can see it.
    dec: Arc<Mutex<(Decoder, bool)>>,
}

impl AgentPort {
    /// A port raising `irq` and speaking for `link`.
    pub fn new(irq: devices::EventFdTrigger, link: Arc<AgentLink>) -> Self {
        let dec = Arc::new(Mutex::new((Decoder::default(), false)));
        let sink = FrameSink {
            link: link.clone(),
            dec: dec.clone(),
        };
        Self {
            uart: Uart::new(irq, Box::new(sink)),
            link,
            dec,
        }
    }

    /// The channel's state, for a checkpoint.
    pub fn state(&self) -> AgentState {
        let dec = lock(&self.dec);
        AgentState {
            uart: self.uart.state(),
            partial: dec.0.pending().to_vec(),
            broken: dec.1,
            report: self.link.report(),
            to_guest: lock(&self.link.to_guest).clone(),
            held_signals: lock(&self.link.held_signals).clone(),
        }
    }

    /// Puts back what [`AgentPort::state`] saved (the job spec is the link's own).
    pub fn restore(&mut self, state: &AgentState) -> io::Result<()> {
        self.uart.restore(&state.uart)?;
        let mut dec = Decoder::default();
        dec.push(&state.partial);
        *lock(&self.dec) = (dec, state.broken);
        *lock(&self.link.report) = state.report.clone();
        *lock(&self.link.to_guest) = state.to_guest.clone();
        *lock(&self.link.held_signals) = state.held_signals.clone();
        Ok(())
    }

    /// Moves queued host->agent frames into the UART.
    pub fn flush_to_guest(&mut self) {
        let mut out = lock(&self.link.to_guest);
        if !out.is_empty() && self.uart.queue_input(&out).is_ok() {
            out.clear();
        }
    }
}

impl BusDevice for AgentPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.uart.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.uart.write(offset, data);
        self.flush_to_guest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn port() -> (AgentPort, Arc<AgentLink>) {
        let job = JobSpec {
            argv: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
            stdio: None,
            root: None,
            mounts: Vec::new(),
            user: None,
        };
        let link = AgentLink::new(job, false, None);
        let irq = devices::EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
        (AgentPort::new(irq, link.clone()), link)
    }

    /// Plays the guest: writes bytes to THR.
    fn guest_sends(p: &mut AgentPort, bytes: &[u8]) {
        for b in bytes {
            p.write(0, &[*b]);
        }
    }

    /// Plays the guest: reads everything waiting in the receive FIFO.
    fn guest_reads(p: &mut AgentPort) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            let mut lsr = [0];
            p.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return got;
            }
            let mut b = [0];
            p.read(0, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn ready_brings_the_job_then_held_signals() {
        let (mut p, link) = port();
        link.signal(15);
        assert!(guest_reads(&mut p).is_empty(), "nothing before READY");
        guest_sends(&mut p, &frame(kind::READY, b"0.1"));
        let mut dec = Decoder::default();
        dec.push(&guest_reads(&mut p));
        let (k, payload) = dec.next_frame().unwrap().unwrap();
        assert_eq!(k, kind::JOB);
        let spec: JobSpec = serde_json::from_slice(&payload).unwrap();
        assert_eq!(spec.argv, ["true"]);
        assert_eq!(dec.next_frame().unwrap(), Some((kind::SIGNAL, vec![15])));
        link.signal(9);
        p.flush_to_guest();
        assert_eq!(guest_reads(&mut p), frame(kind::SIGNAL, &[9]));
    }

    #[test]
    fn exit_and_error_reports_are_kept() {
        let (mut p, link) = port();
        guest_sends(&mut p, &frame(kind::EXIT, br#"{"signal":9}"#));
        assert_eq!(link.report().exit, Some(JobExit::Signal(9)));
        guest_sends(
            &mut p,
            &frame(kind::ERROR, br#"{"error":"nope","status":127}"#),
        );
        assert_eq!(link.report().error.unwrap().status, 127);
    }

    #[test]
    fn garbage_marks_the_channel_broken() {
        let (mut p, link) = port();
        guest_sends(&mut p, &[0x11, 0xff, 0xff, 0xff, 0xff]);
        assert!(link.report().protocol_error.unwrap().contains("limit"));
    }
}
