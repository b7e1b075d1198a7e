//! What the controller reports, as typed values: an embedder gets these from a
//! [`crate::VmHandle`], and the control socket's JSON is their serialisation (see
//! docs/api.md).

use serde::Serialize;

/// Where the VM is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// The vCPUs run the guest.
    Running,
    /// Every vCPU is parked outside the guest.
    Paused,
    /// The guest was asked to stop and has until the grace period ends.
    ShuttingDown,
    /// It has ended; hpcvm is tearing it down.
    Stopping,
}

/// One vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuStatus {
    /// Index in creation order.
    pub index: u32,
    /// Its initial APIC id (the topology's).
    pub apic_id: u32,
    /// The host CPU it is pinned to, if any.
    pub host_cpu: Option<usize>,
    /// Its thread id (0 until the thread runs).
    pub tid: i32,
}

/// Guest RAM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryStatus {
    /// Bytes.
    pub size: u64,
    /// `none`, `2M`, `1G` or `thp`.
    pub backing: &'static str,
    /// Populated before the first vCPU ran.
    pub prefault: bool,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Lifecycle state.
    pub state: VmState,
    /// Seconds since the vCPUs started.
    pub uptime_s: f64,
    /// hpcvm's process id.
    pub pid: u32,
    /// Every vCPU.
    pub vcpus: Vec<VcpuStatus>,
    /// Guest RAM.
    pub memory: MemoryStatus,
    /// While shutting down: seconds left of the grace period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_left_s: Option<f64>,
}

/// The answer to `shutdown`, `destroy`, `pause` and `resume`: the state it led to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StateChange {
    /// The state now.
    pub state: VmState,
    /// After a shutdown: seconds left of the grace period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_left_s: Option<f64>,
}

impl StateChange {
    /// A change to `state` with no grace period to report.
    pub fn to(state: VmState) -> Self {
        Self {
            state,
            grace_left_s: None,
        }
    }
}

/// What one request got.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// For `status`.
    Status(Status),
    /// For the others.
    Changed(StateChange),
    /// For `checkpoint`.
    Checkpointed(CheckpointReport),
    /// For `migrate`.
    Migrated(MigrationReport),
}

/// What a live migration moved, and how long it took.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MigrationReport {
    /// Where the VM went.
    pub to: String,
    /// Guest RAM, bytes.
    pub ram: u64,
    /// Page bytes sent in all.
    pub sent: u64,
    /// Passes over RAM while the guest ran.
    pub passes: u32,
    /// Page bytes sent with the guest paused.
    pub sent_paused: u64,
    /// Seconds from the request to GO.
    pub total_s: f64,
    /// Seconds the guest was paused before GO (the receiver resumes it at once).
    pub downtime_s: f64,
}

/// What a checkpoint wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CheckpointReport {
    /// The directory.
    pub dir: String,
    /// Guest RAM, bytes.
    pub ram: u64,
    /// Bytes of RAM that were not zero, written to the memory file.
    pub data: u64,
    /// Seconds the VM was held for it (devices quiesced to state file synced).
    pub seconds: f64,
    /// The VM stops now.
    pub stopped: bool,
}

impl Answer {
    /// The socket's JSON fields for this answer.
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Answer::Status(s) => serde_json::to_value(s),
            Answer::Changed(c) => serde_json::to_value(c),
            Answer::Checkpointed(c) => serde_json::to_value(c),
            Answer::Migrated(m) => serde_json::to_value(m),
        };
        // Plain data with string keys: serialising it cannot fail.
        v.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_json_is_what_the_socket_always_sent() {
        let s = Status {
            state: VmState::ShuttingDown,
            uptime_s: 1.5,
            pid: 42,
            vcpus: vec![VcpuStatus {
                index: 0,
                apic_id: 0,
                host_cpu: Some(3),
                tid: 77,
            }],
            memory: MemoryStatus {
                size: 256 << 20,
                backing: "2M",
                prefault: true,
            },
            grace_left_s: Some(2.0),
        };
        assert_eq!(
            Answer::Status(s).to_json(),
            json!({
                "state": "shutting-down", "uptime_s": 1.5, "pid": 42,
                "vcpus": [{"index": 0, "apic_id": 0, "host_cpu": 3, "tid": 77}],
                "memory": {"size": 268435456u64, "backing": "2M", "prefault": true},
                "grace_left_s": 2.0,
            })
        );
        assert_eq!(
            Answer::Changed(StateChange::to(VmState::Paused)).to_json(),
            json!({"state": "paused"})
        );
    }
}
