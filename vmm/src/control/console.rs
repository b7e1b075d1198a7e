//! Terminal input for the guest console: raw mode while the VM runs, keystrokes to COM1.

use std::io::Read;
use std::sync::{Arc, Mutex};

use devices::legacy::Uart;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

/// Feeds a terminal's keystrokes to the guest console, in raw mode while the VM runs.
pub struct ConsoleInput {
    console: Arc<Mutex<Uart>>,
}

impl ConsoleInput {
    /// Feeds stdin to `console`.
    pub fn new(console: Arc<Mutex<Uart>>) -> Self {
        Self { console }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&std::io::stdin(), EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let mut console = devices::lock(&self.console);
        let room = console.input_room().min(buf.len());
        if room == 0 {
            return; // the guest has not drained its FIFO yet; try on the next wake-up
        }
        match std::io::stdin().lock().read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                // EOF or a dead terminal: stop listening rather than spin.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let _ = console.enqueue_input(&buf[..n]);
            }
        }
    }
}

/// Puts the terminal back in canonical mode when dropped.
pub struct RawTerminal;

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal.
    pub fn enter() -> Option<Self> {
        use std::io::IsTerminal;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        stdin.lock().set_raw_mode().ok()?;
        crate::fatal::TERMINAL_RAW.store(true, std::sync::atomic::Ordering::Release);
        Some(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
        crate::fatal::TERMINAL_RAW.store(false, std::sync::atomic::Ordering::Release);
    }
}
