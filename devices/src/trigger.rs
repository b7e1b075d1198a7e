//! An eventfd that device models fire to raise an interrupt or signal the VMM.

use std::io;
use std::ops::Deref;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Newtype over [`EventFd`] implementing vm-superio's [`Trigger`]; as an irqfd it raises
/// a guest interrupt without a trip through the VMM.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an existing eventfd.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// Another handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}
