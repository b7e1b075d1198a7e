//! Guest output that vCPU threads produce (COM1 console bytes, job output relayed
//! over the agent's UART) goes to hpcvm's stdout/stderr through an [`Output`]: a
//! bounded buffer that a thread of its own writes out. A vCPU never blocks on a
//! full pipe (`hpcvm run ... | sleep 120`), so pause, destroy and signals keep
//! working; when the buffer is full the newest bytes are dropped and counted, and
//! the count is reported when the VM ends.
//!
//! (The job's own stdout on virtio-console ports is not buffered here: the device
//! thread writes it straight from guest RAM, and a full pipe holds the guest's
//! writes back, as a pipe would on the host.)

use crate::seccomp::{self, SeccompMode};
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::lock;

/// Bytes held for a slow reader before output is dropped.
pub const CAPACITY: usize = 4 << 20;
/// Most bytes handed to one write(2).
const CHUNK: usize = 64 << 10;

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    dropped: u64,
    /// Bytes the writer took from `buf` and is writing (0: it is not in write(2)).
    in_flight: usize,
    /// No more input: the writer exits once `buf` is empty.
    closed: bool,
    /// The fd failed (closed pipe): everything from then on is discarded.
    broken: bool,
    /// Chunks written so far (progress, for [`OutputThread::finish`]).
    written: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
}

/// Where guest output goes; cheap to clone, never blocks.
#[derive(Clone)]
pub struct Output(Arc<Shared>);

impl Output {
    /// Queues `data`; what does not fit in the buffer is dropped and counted.
    pub fn write(&self, data: &[u8]) {
        let mut s = lock(&self.0.state);
        if s.broken || s.closed {
            return;
        }
        let room = self.0.capacity.saturating_sub(s.buf.len());
        let take = room.min(data.len());
        s.buf.extend(&data[..take]);
        s.dropped += (data.len() - take) as u64;
        drop(s);
        if take > 0 {
            self.0.wake.notify_one();
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Output::write(self, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The thread that writes an [`Output`] to its fd.
pub struct OutputThread {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts a thread named `name` writing to `fd`, confined with `seccomp`.
pub fn start(
    fd: OwnedFd,
    name: &str,
    seccomp: SeccompMode,
) -> std::io::Result<(Output, OutputThread)> {
    start_with(fd, name, CAPACITY, seccomp)
}

fn start_with(
    fd: OwnedFd,
    name: &str,
    capacity: usize,
    seccomp: SeccompMode,
) -> std::io::Result<(Output, OutputThread)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        capacity,
    });
    let s = shared.clone();
    let mut file = File::from(fd);
    let thread = seccomp::spawn_confined(name, seccomp::Thread::Output, seccomp, move || {
        pump(&s, &mut file)
    })?;
    Ok((
        Output(shared.clone()),
        OutputThread {
            shared,
            thread: Some(thread),
        },
    ))
}

fn pump(s: &Shared, out: &mut File) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        {
            let mut st = lock(&s.state);
            if st.in_flight > 0 {
                st.in_flight = 0;
                st.written += 1;
                s.wake.notify_all();
            }
            while st.buf.is_empty() && !st.closed {
                st = s.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.buf.is_empty() {
                return;
            }
            let n = st.buf.len().min(CHUNK);
            chunk.clear();
            chunk.extend(st.buf.drain(..n));
            st.in_flight = n;
        }
        if out.write_all(&chunk).is_err() {
            let mut st = lock(&s.state);
            st.broken = true;
            st.buf.clear();
        }
    }
}

impl Drop for OutputThread {
    /// Dropped without [`OutputThread::finish`] (a VM that failed to build, or was
    /// never run): the writer ends once what is buffered is written, and is not
    /// waited for.
    fn drop(&mut self) {
        if self.thread.is_some() {
            lock(&self.shared.state).closed = true;
            self.shared.wake.notify_all();
        }
    }
}

impl OutputThread {
    /// Stops taking output and waits for what is buffered to be written, for as long
    /// as the reader keeps taking it: a reader that takes nothing for `stall` loses
    /// the rest. Returns the bytes dropped (for a full buffer, or left unwritten); a
    /// writer stuck on a reader that never reads is left behind, so this never hangs.
    pub fn finish(mut self, stall: Duration) -> u64 {
        let mut st = lock(&self.shared.state);
        st.closed = true;
        self.shared.wake.notify_all();
        let mut progress = (st.written, Instant::now());
        while !st.buf.is_empty() || st.in_flight > 0 {
            if st.written != progress.0 {
                progress = (st.written, Instant::now());
            }
            let left = stall.saturating_sub(progress.1.elapsed());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .wake
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let done = st.buf.is_empty() && st.in_flight == 0;
        // A chunk stuck in write(2) to a reader that takes nothing is lost too.
        let dropped = st.dropped + (st.buf.len() + st.in_flight) as u64;
        let broken = st.broken;
        st.buf.clear();
        drop(st);
        if done {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        // A closed stdout is the reader's choice, not data hpcvm lost.
        if broken {
            0
        } else {
            dropped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors it is given room for.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned here.
        unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn bytes_arrive_in_order_and_finish_waits_for_them() {
        let (mut r, w) = pipe();
        let (out, t) = start(w, "test-out", SeccompMode::Off).unwrap();
        for i in 0..1000u32 {
            out.write(format!("{i}\n").as_bytes());
        }
        assert_eq!(t.finish(Duration::from_secs(5)), 0);
        drop(out);
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        let want: String = (0..1000u32).map(|i| format!("{i}\n")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_reader_that_never_reads_blocks_neither_writers_nor_finish() {
        let (r, w) = pipe();
        let (out, t) = start_with(w, "test-out", 256 << 10, SeccompMode::Off).unwrap();
        let started = Instant::now();
        // Far more than the pipe (64 KiB) and the buffer hold.
        for _ in 0..64 {
            out.write(&[b'x'; 64 << 10]);
        }
        assert!(started.elapsed() < Duration::from_secs(2), "writes blocked");
        let dropped = t.finish(Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(3), "finish blocked");
        // 4 MiB written; at most the pipe and the buffer (and one chunk) went out.
        assert!(
            dropped >= (4 << 20) - (64 << 10) * 2 - (256 << 10),
            "{dropped}"
        );
        drop(r);
    }

    #[test]
    fn a_chunk_stuck_in_write_counts_as_dropped() {
        let (r, w) = pipe();
        let (out, t) = start(w, "test-out", SeccompMode::Off).unwrap();
        // The pipe's 64 KiB and 1000 bytes more: the last chunk is left in write(2)
        // with nothing in the buffer.
        out.write(&vec![b'x'; (64 << 10) + 1000]);
        std::thread::sleep(Duration::from_millis(100));
        let dropped = t.finish(Duration::from_millis(200));
        assert!((1000..=CHUNK as u64).contains(&dropped), "{dropped}");
        drop(r);
    }

    #[test]
    fn an_output_dropped_without_finish_lets_its_writer_end() {
        let (mut r, w) = pipe();
        let (out, t) = start(w, "test-out", SeccompMode::Off).unwrap();
        out.write(b"last words\n");
        drop(t);
        drop(out);
        // EOF comes once the writer has ended and closed its copy of the pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut got = String::new();
            let _ = r.read_to_string(&mut got);
            let _ = tx.send(got);
        });
        let got = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(got.as_deref(), Ok("last words\n"), "the writer never ended");
    }

    #[test]
    fn a_closed_reader_drops_output_without_counting_it() {
        let (r, w) = pipe();
        drop(r);
        let (out, t) = start(w, "test-out", SeccompMode::Off).unwrap();
        out.write(b"nobody reads this\n");
        std::thread::sleep(Duration::from_millis(50));
        out.write(b"nor this\n");
        assert_eq!(t.finish(Duration::from_secs(1)), 0);
    }
}
