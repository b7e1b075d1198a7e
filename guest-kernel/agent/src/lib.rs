//! The wire protocol between hpcvm and its guest agent, spoken over the guest's second
//! serial port (COM2, `/dev/ttyS1` in raw mode) so it works before and without any
//! virtio transport.
//!
//! A frame is `kind: u8`, `len: u32` little-endian, then `len` payload bytes.
//!
//! ```text
//! agent -> host   READY (version)  STDOUT/STDERR (bytes)  EXIT (JSON)  ERROR (JSON)  LOG (text)
//!                 HANDOVER (empty: the image's init takes over as PID 1)
//! host  -> agent  JOB (JSON)       SIGNAL (one byte: the signal number)
//! ```
//! The agent says READY once the channel is open; the host answers with the JOB; the
//! agent streams the job's output, forwards SIGNALs to the job's process group, reports
//! EXIT (or ERROR if the job could not start), then syncs and resets the VM.

use serde::{Deserialize, Serialize};

/// Frame kinds.
pub mod kind {
    /// Agent is up; payload: its version.
    pub const READY: u8 = 0x10;
    /// Job stdout bytes.
    pub const STDOUT: u8 = 0x11;
    /// Job stderr bytes.
    pub const STDERR: u8 = 0x12;
    /// Job finished; payload: JSON [`super::JobExit`].
    pub const EXIT: u8 = 0x13;
    /// Job could not start; payload: JSON [`super::JobError`].
    pub const ERROR: u8 = 0x14;
    /// Agent diagnostics (shown with `hpcvm run --verbose`).
    pub const LOG: u8 = 0x15;
    /// The agent is about to exec the image's own init (`RootImage::boot_init`): from
    /// now on the guest ends like any guest, with no job status.
    pub const HANDOVER: u8 = 0x16;
    /// Host -> agent: the job to run; payload: JSON [`super::JobSpec`].
    pub const JOB: u8 = 0x01;
    /// Host -> agent: deliver a signal to the job's process group; payload: 1 byte.
    pub const SIGNAL: u8 = 0x02;
}

/// The guest's host name: the agent sets it, and hpcvm puts it in every job's
/// `HOSTNAME`.
pub const GUEST_HOSTNAME: &str = "hpcvm";

/// Largest payload either side sends or accepts.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 5;

/// The job the host asks the agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Program and arguments; `argv[0]` is looked up in `PATH` if it has no slash.
    pub argv: Vec<String>,
    /// The job's whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// Where the job's stdout and stderr go: virtio-console ports, or (when absent)
    /// pipes the agent relays over this channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdio: Option<StdioPorts>,
    /// A disk to switch root into before the job starts (`hpcvm run --image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<RootImage>,
    /// virtio-fs shares to mount (after any root switch), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<ShareMount>,
    /// Who the job runs as; absent: root (the agent's own identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<JobUser>,
}

/// The identity a job runs under in the guest: the caller's on the host, so that
/// files it writes in a shared directory are the caller's and tools that refuse root
/// (Open MPI's `mpirun`) run unchanged. Supplementary groups are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobUser {
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
}

/// A virtio-fs share the agent mounts before the job starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMount {
    /// The device's tag (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// Where it goes (created if missing).
    pub path: String,
    /// Mount it read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// The virtio-console ports (by name, as the guest sees in
/// `/sys/class/virtio-ports/*/name`) that become the job's stdout and stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioPorts {
    /// Port for the job's stdout.
    pub stdout: String,
    /// Port for the job's stderr.
    pub stderr: String,
    /// Port the job's stdin comes from (else /dev/null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// The job's root filesystem: a read-only virtio-blk disk, found by its serial
/// (`/sys/block/vd*/serial`), overlaid with a tmpfs in guest RAM for writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootImage {
    /// The disk's virtio-blk serial.
    pub serial: String,
    /// Its filesystem type (`ext4`).
    pub fstype: String,
    /// Replace the agent with the image's own init (`/sbin/init`) instead of running
    /// `argv` as a job: `hpcvm run --image` without a command.
    #[serde(default)]
    pub boot_init: bool,
}

/// How the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobExit {
    /// Exited with this status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl JobExit {
    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_status(self) -> u8 {
        match self {
            JobExit::Code(c) => (c & 0xff) as u8,
            JobExit::Signal(s) => (128 + s).clamp(0, 255) as u8,
        }
    }
}

/// Why the job could not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// What went wrong, for humans.
    pub error: String,
    /// The status a shell would give: 127 not found, 126 not executable; or
    /// [`BAD_WORKDIR_STATUS`].
    pub status: u8,
}

/// The last entry of the job initramfs. The kernel stops unpacking at its first
/// error (guest RAM full: "Initramfs unpacking failed: write error"), so without
/// it some job file is missing or cut short, and the job must not start.
pub const UNPACKED_MARKER: &str = "/.hpcvm-unpacked";

/// The job initramfs did not unpack whole: hpcvm's exit code 161 (kernel or
/// initramfs unusable).
pub const INCOMPLETE_INITRAMFS_STATUS: u8 = 161;

/// The job's working directory is missing or cannot be entered in the guest: a
/// configuration error (hpcvm's exit code 160), not a command that cannot run.
pub const BAD_WORKDIR_STATUS: u8 = 160;

/// Encodes one frame.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.push(kind);
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Incremental frame decoder: feed bytes as they arrive, take frames out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

/// A stream that cannot be framed any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(pub String);

impl Decoder {
    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received that do not make a whole frame yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError(format!(
                "frame of kind {:#x} claims {len} bytes (limit {MAX_PAYLOAD})",
                self.buf[0]
            )));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let kind = self.buf[0];
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some((kind, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_any_chunking() {
        let mut wire = frame(kind::STDOUT, b"hello\n");
        wire.extend(frame(kind::EXIT, br#"{"code":3}"#));
        wire.extend(frame(kind::READY, b""));
        for chunk in [1, 2, 5, 7, wire.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                d.push(c);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(
                got,
                vec![
                    (kind::STDOUT, b"hello\n".to_vec()),
                    (kind::EXIT, br#"{"code":3}"#.to_vec()),
                    (kind::READY, vec![])
                ]
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut d = Decoder::default();
        d.push(&[kind::STDOUT, 0xff, 0xff, 0xff, 0x7f]);
        assert!(d.next_frame().unwrap_err().0.contains("limit"));
    }

    #[test]
    fn exit_json_and_shell_status() {
        assert_eq!(
            serde_json::to_string(&JobExit::Code(3)).unwrap(),
            r#"{"code":3}"#
        );
        assert_eq!(
            serde_json::to_string(&JobExit::Signal(9)).unwrap(),
            r#"{"signal":9}"#
        );
        assert_eq!(JobExit::Code(3).shell_status(), 3);
        assert_eq!(JobExit::Code(256 + 7).shell_status(), 7);
        assert_eq!(JobExit::Signal(9).shell_status(), 137);
        assert_eq!(JobExit::Signal(15).shell_status(), 143);
    }
}
