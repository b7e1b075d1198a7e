//! A handle on a VM for the program that embeds the `vmm` crate: the same requests
//! as the control socket (both go through [`crate::control::Controller::apply`]),
//! typed, from any thread. Requests travel over a channel to the control loop, which
//! an eventfd wakes.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::protocol::MAX_TIMEOUT_S;
use crate::api::Command;
use crate::control::{Answer, Controller, StateChange, Status};

type Reply = Result<Answer, String>;
type Request = (Command, mpsc::SyncSender<Reply>);

/// Why a request through a [`VmHandle`] got no answer it could use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandleError {
    /// The VM has ended (or its [`crate::Vmm`] was dropped without running).
    #[error("the VM has ended")]
    Ended,
    /// The controller refused the request (e.g. `pause` during a shutdown).
    #[error("{0}")]
    Refused(String),
}

/// Controls one VM from any thread: `Send`, `Sync` and cheap to clone. A request
/// made before [`crate::Vmm::run`] starts the VM waits for it.
#[derive(Clone)]
pub struct VmHandle {
    tx: mpsc::Sender<Request>,
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle").finish_non_exhaustive()
    }
}

impl VmHandle {
    fn call(&self, command: Command) -> Result<Answer, HandleError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.tx
            .send((command, reply))
            .map_err(|_| HandleError::Ended)?;
        // A full eventfd counter still wakes the loop; nothing else can fail here.
        let _ = self.wake.write(1);
        answer
            .recv()
            .map_err(|_| HandleError::Ended)?
            .map_err(HandleError::Refused)
    }

    fn change(&self, command: Command) -> Result<StateChange, HandleError> {
        match self.call(command)? {
            Answer::Changed(c) => Ok(c),
            Answer::Status(s) => Ok(StateChange {
                state: s.state,
                grace_left_s: s.grace_left_s,
            }),
            Answer::Checkpointed(_) | Answer::Migrated(_) => {
                Err(HandleError::Refused("unexpected answer".into()))
            }
        }
    }

    /// Writes a checkpoint of the VM to `dir` (see docs/checkpoint.md), then lets
    /// it run on, or with `stop` ends it ([`crate::Outcome::Checkpointed`]).
    pub fn checkpoint(
        &self,
        dir: &std::path::Path,
        stop: bool,
    ) -> Result<crate::control::report::CheckpointReport, HandleError> {
        match self.call(Command::Checkpoint {
            dir: dir.to_path_buf(),
            stop,
        })? {
            Answer::Checkpointed(r) => Ok(r),
            _ => Err(HandleError::Refused("no checkpoint in the answer".into())),
        }
    }

    /// Live-migrates the VM to the `hpcvm receive` listening at `to` (`unix:PATH` or
    /// `tcp:HOST:PORT`; see docs/migration.md); on success the VM ends here
    /// ([`crate::Outcome::Migrated`]), on failure it runs on here.
    pub fn migrate(
        &self,
        to: &str,
    ) -> Result<crate::control::report::MigrationReport, HandleError> {
        match self.call(Command::Migrate { to: to.to_string() })? {
            Answer::Migrated(r) => Ok(r),
            _ => Err(HandleError::Refused("no migration in the answer".into())),
        }
    }

    /// State, uptime, vCPUs and memory.
    pub fn status(&self) -> Result<Status, HandleError> {
        match self.call(Command::Status)? {
            Answer::Status(s) => Ok(s),
            _ => Err(HandleError::Refused("no status in the answer".into())),
        }
    }

    /// Asks the guest to stop (the job gets SIGTERM, a plain guest Ctrl-Alt-Del); it
    /// is destroyed after `grace` (default: the configured grace period).
    pub fn shutdown(&self, grace: Option<Duration>) -> Result<StateChange, HandleError> {
        if grace.is_some_and(|g| g.as_secs_f64() > MAX_TIMEOUT_S) {
            return Err(HandleError::Refused(format!(
                "a grace period must be from 0 to {MAX_TIMEOUT_S} seconds"
            )));
        }
        self.change(Command::Shutdown {
            timeout_s: grace.map(|g| g.as_secs_f64()),
        })
    }

    /// Stops the VM now.
    pub fn destroy(&self) -> Result<StateChange, HandleError> {
        self.change(Command::Destroy)
    }

    /// Parks every vCPU outside the guest.
    pub fn pause(&self) -> Result<StateChange, HandleError> {
        self.change(Command::Pause)
    }

    /// Runs paused vCPUs again.
    pub fn resume(&self) -> Result<StateChange, HandleError> {
        self.change(Command::Resume)
    }
}

/// The control loop's end of the handles.
pub(crate) struct HandleRequests {
    rx: mpsc::Receiver<Request>,
    wake: Arc<EventFd>,
}

/// A new handle and the end the control loop serves.
pub(crate) fn channel() -> std::io::Result<(VmHandle, HandleRequests)> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        VmHandle {
            tx,
            wake: wake.clone(),
        },
        HandleRequests { rx, wake },
    ))
}

impl HandleRequests {
    /// The subscriber that answers requests with `ctl`.
    pub(crate) fn serve(self, ctl: Rc<RefCell<Controller>>) -> HandleServer {
        HandleServer { end: self, ctl }
    }
}

/// Answers handle requests in the control loop.
pub(crate) struct HandleServer {
    end: HandleRequests,
    ctl: Rc<RefCell<Controller>>,
}

impl MutEventSubscriber for HandleServer {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&*self.end.wake, EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.end.wake.read();
        while let Ok((command, reply)) = self.end.rx.try_recv() {
            let answer = self.ctl.borrow_mut().apply(&command);
            let _ = reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_goes_to_any_thread_and_says_when_the_vm_is_gone() {
        fn shareable<T: Send + Sync + Clone>() {}
        shareable::<VmHandle>();
        let (handle, requests) = channel().unwrap();
        drop(requests);
        assert_eq!(handle.status().unwrap_err(), HandleError::Ended);
        assert_eq!(
            handle.destroy().unwrap_err().to_string(),
            "the VM has ended"
        );
    }
}
