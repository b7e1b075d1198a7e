//! A share in a checkpoint or migration. virtiofsd serves the queues from its own
//! process and writes guest RAM behind KVM's dirty log, so while the VM is saved
//! its rings are stopped (vhost-user GET_VRING_BASE: it finishes the request in
//! hand, hpcvm runs it with `--thread-pool-size=0`, and says where it stopped), and
//! it hands over what it knows of the guest's files (SET_DEVICE_STATE_FD: the
//! inodes the guest looked up and the files it holds open, by path). A restored VM's
//! new virtiofsd takes that state before its rings start from the saved indexes; the
//! VM that goes on (a checkpoint without --stop, a failed migration) restarts its
//! rings where they stopped. The guest sees its open files carry on.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use devices::virtio::{ActivateContext, DeviceState, FsState};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

use super::Fs;

/// How long virtiofsd may take to send its state (it walks its inode table).
const STATE_WAIT: Duration = Duration::from_secs(60);

impl Fs {
    /// Stops every ring virtiofsd serves; where each stopped (0 where none ran).
    /// Err: virtiofsd did not answer (gone, or stuck past the reply timeout).
    pub(super) fn stop_rings(&mut self) -> vhost::Result<Vec<u16>> {
        let mut bases = vec![0; self.running.len()];
        let mut failed = None;
        for (i, running) in self.running.iter_mut().enumerate() {
            if std::mem::take(running) {
                match self.backend.frontend.get_vring_base(i) {
                    Ok(base) => bases[i] = base as u16,
                    Err(e) => failed = Some(e),
                }
            }
        }
        match failed {
            None => Ok(bases),
            Some(e) => Err(e),
        }
    }

    /// Stops the rings and takes virtiofsd's state (see the module comment).
    pub(super) fn quiesce_backend(&mut self) -> Result<(), String> {
        if self.backend.ended {
            return Err(format!(
                "virtiofsd for {} ended during the run, and the guest's files there \
                 with it",
                self.dir.display()
            ));
        }
        if let Some(why) = self.hand_over_refusal() {
            return Err(why);
        }
        if self.stopped.is_none() {
            match self.stop_rings() {
                Ok(bases) => self.stopped = Some(bases),
                Err(e) => {
                    // Where a ring stopped is unknown: restarting it could replay
                    // requests. virtiofsd is ended and the device thread fails the
                    // guest's requests from here on.
                    let _ = self.backend.child.0.kill();
                    return Err(self.failed(
                        "stopping the rings (the guest's I/O to that directory fails \
                         from now on)",
                        e,
                    ));
                }
            }
        }
        let saved = self
            .save()
            .map_err(|e| self.failed("saving the state", e))?;
        self.saved = Some(saved);
        Ok(())
    }

    /// Restarts the rings [`Self::quiesce_backend`] stopped. If virtiofsd will not,
    /// it is ended: the device thread then fails the guest's requests with EIO
    /// rather than leave them waiting.
    pub(super) fn resume_backend(&mut self, ctx: &ActivateContext<'_>) -> Result<(), String> {
        self.saved = None;
        let Some(bases) = self.stopped.take() else {
            return Ok(());
        };
        self.start_rings(ctx, &bases).map_err(|e| {
            let _ = self.backend.child.0.kill();
            self.failed(
                "restarting the rings (the guest's I/O to that directory fails from now on)",
                e,
            )
        })
    }

    /// The device's part of a checkpoint (taken while quiesced).
    pub(super) fn backend_state(&self) -> Result<DeviceState, String> {
        if self.backend.ended {
            return Err(format!("virtiofsd for {} has ended", self.dir.display()));
        }
        match (&self.stopped, &self.saved) {
            (Some(bases), Some(backend)) => Ok(DeviceState::Fs(FsState {
                bases: bases.clone(),
                backend: backend.clone(),
            })),
            // The driver never started the device: nothing to carry over.
            _ if !self.running.iter().any(|&r| r) => Ok(DeviceState::Fs(FsState {
                bases: Vec::new(),
                backend: Vec::new(),
            })),
            _ => Err("virtiofsd was not stopped for the checkpoint".into()),
        }
    }

    /// Keeps a checkpoint's state for the activation that follows (the new
    /// virtiofsd can take it only once the driver's features and RAM are set).
    pub(super) fn restore_backend(&mut self, state: &DeviceState) -> Result<(), String> {
        let DeviceState::Fs(state) = state else {
            return Err("the checkpoint holds another kind of device here".into());
        };
        self.incoming = None;
        if state.bases.is_empty() {
            return Ok(());
        }
        if state.bases.len() != self.running.len() {
            return Err(format!(
                "the checkpoint has {} share queues, this device {}",
                state.bases.len(),
                self.running.len()
            ));
        }
        self.incoming = Some(state.clone());
        Ok(())
    }

    /// Has the new virtiofsd take `backend` (what the old one handed over).
    pub(super) fn load(&mut self, backend: &[u8]) -> Result<(), String> {
        if let Some(why) = self.hand_over_refusal() {
            return Err(why);
        }
        let loaded = (|| {
            let (theirs, ours) = std::io::pipe()?;
            let mut to = self.transfer(VhostTransferStateDirection::LOAD, ours, theirs)?;
            to.write_all(backend)?;
            drop(to);
            self.backend.frontend.check_device_state().map_err(|e| {
                std::io::Error::other(format!(
                    "{e}; it refused the state (see its message above: a file the \
                     guest had open may have been moved or removed)"
                ))
            })
        })();
        loaded.map_err(|e| self.failed("handing over the checkpoint's state", e))
    }

    /// virtiofsd's state, read through a pipe (its rings must be stopped).
    fn save(&self) -> std::io::Result<Vec<u8>> {
        let (ours, theirs) = std::io::pipe()?;
        let from = self.transfer(VhostTransferStateDirection::SAVE, ours, theirs)?;
        let bytes = read_to_end_within(from, STATE_WAIT)?;
        self.backend
            .frontend
            .check_device_state()
            .map_err(std::io::Error::other)?;
        Ok(bytes)
    }

    /// Starts a state transfer in `direction`, handing virtiofsd `theirs` (one end
    /// of a pipe); the end to use here: `ours`, or the descriptor virtiofsd gave
    /// back instead.
    fn transfer(
        &self,
        direction: VhostTransferStateDirection,
        ours: impl Into<OwnedFd>,
        theirs: impl Into<OwnedFd>,
    ) -> std::io::Result<File> {
        let other = self
            .backend
            .frontend
            .set_device_state_fd(direction, VhostTransferStatePhase::STOPPED, theirs.into())
            .map_err(std::io::Error::other)?;
        Ok(other.unwrap_or_else(|| File::from(ours.into())))
    }
}

/// Reads `r` to its end, waiting at most `limit` in all (a virtiofsd that stops
/// sending must not hang the checkpoint).
fn read_to_end_within(mut r: impl Read + AsRawFd, limit: Duration) -> std::io::Result<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("it sent no end of its state in {limit:?}"),
            ));
        }
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        match r.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
