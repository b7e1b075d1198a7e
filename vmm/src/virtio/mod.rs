//! hpcvm's virtio devices: the virtio-pci transport ([`pci`]), the host side of disks
//! and images ([`disk`]), and the device thread that serves every virtqueue off the
//! vCPU threads ([`VirtioThread`]).

pub mod disk;
pub mod fs;
pub mod pci;

use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::lock;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use pci::VirtioPciDevice;

/// Wakes one device's queues: each queue's notifier, registered with its index, and
/// the device's input fd (stdin) while the device has room for input.
struct QueueEvents {
    dev: Arc<Mutex<VirtioPciDevice>>,
    notifiers: Vec<EventFd>,
    input: Option<std::os::fd::RawFd>,
    input_armed: bool,
}

/// Event data of a device's input fd.
const INPUT: u32 = u32::MAX - 1;

impl QueueEvents {
    /// Waits on the input fd exactly while the device wants input (a level-triggered
    /// fd it cannot take would wake the thread for ever).
    fn arm_input(&mut self, want: bool, ops: &mut EventOps) {
        let Some(fd) = self.input else {
            return;
        };
        if want == self.input_armed {
            return;
        }
        let ev = Events::with_data_raw(fd, INPUT, EventSet::IN);
        let done = if want { ops.add(ev) } else { ops.remove(ev) };
        if done.is_ok() {
            self.input_armed = want;
        }
    }
}

impl MutEventSubscriber for QueueEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.notifiers.iter().enumerate() {
            let _ = ops.add(Events::with_data(evt, i as u32, EventSet::IN));
        }
        let want = lock(&self.dev).wants_input();
        self.arm_input(want, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        let want = {
            let mut dev = lock(&self.dev);
            if data == INPUT {
                dev.input_ready();
            } else {
                let i = data as usize;
                if let Some(evt) = self.notifiers.get(i) {
                    let _ = evt.read();
                }
                dev.process(i);
            }
            dev.wants_input()
        };
        self.arm_input(want, ops);
    }
}

/// Event data of a backend's pidfd (queue kicks use their index).
const BACKEND_EXIT: u32 = u32::MAX;

/// Watches the process that serves a device's queues (virtiofsd); when it ends,
/// hands the queues back to the device model and serves their kicks from then on.
struct BackendWatch {
    dev: Arc<Mutex<VirtioPciDevice>>,
    pidfd: OwnedFd,
    kicks: Vec<EventFd>,
}

impl MutEventSubscriber for BackendWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(&self.pidfd, BACKEND_EXIT, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data != BACKEND_EXIT {
            let i = data as usize;
            if let Some(evt) = self.kicks.get(i) {
                let _ = evt.read();
            }
            lock(&self.dev).process(i);
            return;
        }
        let _ = ops.remove(Events::with_data(&self.pidfd, BACKEND_EXIT, EventSet::IN));
        // Kicks first, so that none is missed between the takeover and the wait.
        for (i, evt) in self.kicks.iter().enumerate() {
            let _ = ops.add(Events::with_data(evt, i as u32, EventSet::IN));
        }
        lock(&self.dev).backend_ended();
    }
}

/// Ends the loop when signalled.
struct Stop {
    evt: EventFd,
    stopped: Rc<Cell<bool>>,
}

impl MutEventSubscriber for Stop {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.set(true);
    }
}

/// How long [`VirtioThread::stop`] waits for the device thread.
pub const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The thread ("virtio") that serves every device's queues.
pub struct VirtioThread {
    devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
    seccomp: crate::seccomp::SeccompMode,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl VirtioThread {
    /// Starts serving `devices`.
    pub fn start(
        devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
        seccomp: crate::seccomp::SeccompMode,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let mut subs: Vec<Box<dyn MutEventSubscriber + Send>> = Vec::with_capacity(devices.len());
        for d in &devices {
            let dev = lock(d);
            let notifiers = dev.notifiers()?;
            if let Some(pidfd) = dev.backend_exit() {
                subs.push(Box::new(BackendWatch {
                    dev: d.clone(),
                    pidfd,
                    kicks: notifiers,
                }));
            } else if !dev.served_elsewhere() {
                subs.push(Box::new(QueueEvents {
                    dev: d.clone(),
                    notifiers,
                    input: dev.input_fd(),
                    input_armed: false,
                }));
            }
        }
        let stop_evt = stop.try_clone()?;
        let thread = crate::seccomp::spawn_confined(
            "virtio",
            crate::seccomp::Thread::Device,
            seccomp,
            move || serve(subs, stop_evt),
        )?;
        Ok(Self {
            devices,
            seccomp,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread, then serves every queue once more on this one, so that what
    /// the guest queued before it stopped (the job's last output) is not lost. The
    /// vCPUs must be stopped.
    /// Later calls (the drop after an explicit stop) do nothing.
    ///
    /// A device thread stuck in a write to a reader that takes nothing (the job's
    /// stdout into a full pipe) is left behind after [`STOP_WAIT`], and the final
    /// pass skipped: the VM must end whatever its output's reader does.
    pub fn stop(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        let _ = self.stop.write(1);
        let deadline = std::time::Instant::now() + STOP_WAIT;
        if !wait_until_finished(&t, deadline) {
            log::warn!(
                "the virtio device thread is stuck (stdout not read?); the \
                 job's last output may be lost"
            );
            return;
        }
        let _ = t.join();
        // The last pass writes output too, so it runs on a thread of its own that is
        // left behind like the first if the reader takes nothing.
        let devices = self.devices.clone();
        let seccomp = self.seccomp;
        let drain = std::thread::Builder::new()
            .name("virtio-drain".into())
            .spawn(move || {
                // Started by the control thread, under its filter.
                crate::seccomp::inherited(crate::seccomp::Thread::Control, seccomp);
                for d in &devices {
                    let mut d = lock(d);
                    for q in 0..d.queue_count() {
                        d.process(q);
                    }
                }
            });
        match drain {
            Ok(t) if wait_until_finished(&t, deadline) => {
                let _ = t.join();
            }
            Ok(_) => log::warn!("the job's last output could not be written (stdout not read?)"),
            Err(e) => log::warn!("the virtio drain thread: {e}"),
        }
    }
}

/// Waits for `t` to finish, until `deadline`; false if it did not.
fn wait_until_finished(t: &JoinHandle<()>, deadline: std::time::Instant) -> bool {
    while !t.is_finished() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

impl Drop for VirtioThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(subs: Vec<Box<dyn MutEventSubscriber + Send>>, stop: EventFd) {
    let Ok(mut em) = EventManager::<Box<dyn MutEventSubscriber>>::new() else {
        log::error!("virtio: cannot create the device thread's epoll");
        return;
    };
    let stopped = Rc::new(Cell::new(false));
    em.add_subscriber(Box::new(Stop {
        evt: stop,
        stopped: stopped.clone(),
    }));
    for s in subs {
        em.add_subscriber(s);
    }
    while !stopped.get() {
        match em.run() {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => {
                log::error!("virtio: device thread: {e}");
                return;
            }
        }
    }
}
