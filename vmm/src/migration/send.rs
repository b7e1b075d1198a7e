//! The sending side. The control loop holds every virtio device locked for the
//! whole migration (the device thread stops, so only vCPUs write guest RAM, and
//! KVM's dirty log sees every such write), then:
//! 1. [`Sender::connect`]: greeting and configuration;
//! 2. [`Sender::precopy`], the guest running: every page that is not zero, then
//!    what the guest dirtied meanwhile, again and again until what is left would
//!    take about [`DOWNTIME_TARGET`] to send, or after [`MAX_PASSES`];
//! 3. the vCPUs paused, [`Sender::complete`]: the last dirty pages and the state,
//!    then the receiver's READY;
//! 4. [`Sender::go`]: the receiver runs the VM, this side ends.
//!
//! Anything failing before GO leaves the VM to run on here (the caller resumes it).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::wire::{self, Kind, MAX_PAGES, PAGE};
use super::{Address, MigrationError};
use crate::checkpoint::ram::is_zero;
use crate::checkpoint::{Snapshotter, VmState};

/// How long the last copy, with the guest paused, should take at the bandwidth
/// the first pass measured.
pub const DOWNTIME_TARGET: Duration = Duration::from_millis(100);
/// Most passes over the dirty log while the guest runs (a guest that dirties RAM
/// faster than the stream carries it is then stopped with what is left).
pub const MAX_PASSES: u32 = 8;

/// What a migration moved.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Guest RAM, bytes.
    pub ram: u64,
    /// Page bytes sent in all (zero pages are not sent in the first pass).
    pub sent: u64,
    /// Passes while the guest ran, the first one included.
    pub passes: u32,
    /// Page bytes sent with the guest paused.
    pub sent_paused: u64,
}

/// One bitmap per RAM slot, a bit per 4 KiB page.
pub type DirtyLog = Vec<Vec<u64>>;

/// A migration on its way out.
pub struct Sender<'a> {
    snap: &'a Snapshotter,
    out: BufWriter<File>,
    input: File,
    buf: Vec<u8>,
    logging: bool,
    stats: Stats,
}

fn encode(what: &str, v: &impl Serialize) -> Result<Vec<u8>, MigrationError> {
    serde_json::to_vec(v).map_err(|e| MigrationError::Protocol(format!("encoding {what}: {e}")))
}

impl<'a> Sender<'a> {
    /// Connects to the receiver at `to` and sends the VM's configuration.
    pub fn connect(to: &Address, snap: &'a Snapshotter) -> Result<Self, MigrationError> {
        let conn = to.connect()?;
        let input = conn
            .try_clone()
            .map_err(MigrationError::stream("connecting"))?;
        let mut out = BufWriter::with_capacity(1 << 20, conn);
        wire::write_greeting(&mut out)?;
        wire::write_frame(
            &mut out,
            Kind::Config,
            &encode("the configuration", &snap.config)?,
        )?;
        Ok(Self {
            snap,
            out,
            input,
            buf: vec![0; MAX_PAGES as usize],
            logging: false,
            stats: Stats {
                ram: snap.mem.iter().map(|r| r.len()).sum(),
                ..Stats::default()
            },
        })
    }

    /// Copies guest RAM while the guest runs; returns what it dirtied during the
    /// last pass, to be sent once it is paused.
    pub fn precopy(&mut self) -> Result<DirtyLog, MigrationError> {
        self.snap
            .vm
            .log_dirty_pages(&self.snap.mem, true)
            .map_err(|e| MigrationError::DirtyLog(e.to_string()))?;
        self.logging = true;
        let started = Instant::now();
        let starts: Vec<u64> = self.snap.mem.iter().map(|r| r.start_addr().0).collect();
        for (r, off, len) in crate::memory::touched::parts(&self.snap.mem) {
            self.send_nonzero(starts[r] + off as u64, len as u64)?;
        }
        self.stats.passes = 1;
        let rate = self.stats.sent as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let small = ((rate * DOWNTIME_TARGET.as_secs_f64()) as u64).max(1 << 20);
        loop {
            let dirty = self.fetch_dirty()?;
            let bytes = count(&dirty) * PAGE;
            if bytes <= small || self.stats.passes >= MAX_PASSES {
                return Ok(dirty);
            }
            self.send_dirty(&dirty)?;
            self.stats.passes += 1;
        }
    }

    /// With the vCPUs paused and `state` captured: the pages in `pending` and those
    /// dirtied since, then the state; waits for the receiver to say it is ready.
    pub fn complete(&mut self, pending: &DirtyLog, state: &VmState) -> Result<(), MigrationError> {
        let before = self.stats.sent;
        self.send_dirty(pending)?;
        let last = self.fetch_dirty()?;
        self.send_dirty(&last)?;
        self.stats.sent_paused = self.stats.sent - before;
        wire::write_frame(&mut self.out, Kind::State, &encode("the VM state", state)?)?;
        self.out
            .flush()
            .map_err(MigrationError::stream("sending"))?;
        wire::expect(
            &mut self.input,
            Kind::Ready,
            "receiving",
            "waiting for the receiver to restore the VM",
        )?;
        Ok(())
    }

    /// Tells the receiver to run the VM; this side must not run it again.
    pub fn go(mut self) -> Result<Stats, MigrationError> {
        wire::write_frame(&mut self.out, Kind::Go, &[])?;
        self.out
            .flush()
            .map_err(MigrationError::stream("sending GO"))?;
        Ok(self.stats.clone())
    }

    /// `e`, or the receiver's own reason when it gave up first: a receiver that
    /// refuses the VM says why and closes, which the sender sees as a broken stream.
    pub fn explain(&mut self, e: MigrationError) -> MigrationError {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        // Only a closed connection: what it still holds can be read at once.
        if !matches!(&e, MigrationError::Stream { source, .. }
            if matches!(source.kind(), BrokenPipe | ConnectionReset))
        {
            return e;
        }
        loop {
            match wire::read_header(&mut self.input, "reading the receiver's reason") {
                Ok((Kind::Error, len)) => {
                    return match wire::read_payload(&mut self.input, len, "reading") {
                        Ok(p) => MigrationError::Peer {
                            side: "receiving",
                            message: String::from_utf8_lossy(&p).into_owned(),
                        },
                        Err(_) => e,
                    }
                }
                Ok((_, len)) if wire::read_payload(&mut self.input, len, "reading").is_ok() => {}
                _ => return e,
            }
        }
    }

    /// Tells the receiver why the migration stops here (best effort).
    pub fn abort(&mut self, why: &str) {
        let _ = wire::write_frame(&mut self.out, Kind::Error, why.as_bytes());
        let _ = self.out.flush();
    }

    /// Fails with the receiver's reason if it has given up (it says so at once,
    /// then waits for this side to close).
    fn check_peer(&mut self) -> Result<(), MigrationError> {
        let mut fd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.input),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, no waiting.
        if unsafe { libc::poll(&mut fd, 1, 0) } <= 0 {
            return Ok(());
        }
        let payload = wire::expect(&mut self.input, Kind::Error, "receiving", "sending")?;
        Err(MigrationError::Peer {
            side: "receiving",
            message: String::from_utf8_lossy(&payload).into_owned(),
        })
    }

    /// Sends the pages of `[start, start + len)` that are not all zero.
    fn send_nonzero(&mut self, start: u64, len: u64) -> Result<(), MigrationError> {
        let mut at = start;
        while at < start + len {
            let n = (start + len - at).min(MAX_PAGES) as usize;
            self.check_peer()?;
            self.read(at, n)?;
            for (from, to) in nonzero_runs(&self.buf[..n]) {
                self.send_buffered(at, from, to)?;
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Sends every page set in `dirty`, in runs.
    fn send_dirty(&mut self, dirty: &DirtyLog) -> Result<(), MigrationError> {
        let starts: Vec<u64> = self.snap.mem.iter().map(|r| r.start_addr().0).collect();
        for (bitmap, base) in dirty.iter().zip(starts) {
            for (first, pages) in runs(bitmap, MAX_PAGES / PAGE) {
                self.check_peer()?;
                let gpa = base + first * PAGE;
                let n = (pages * PAGE) as usize;
                self.read(gpa, n)?;
                self.send_buffered(gpa, 0, n)?;
            }
        }
        Ok(())
    }

    /// Copies `n` bytes of guest RAM at `gpa` into the buffer.
    fn read(&mut self, gpa: u64, n: usize) -> Result<(), MigrationError> {
        self.snap
            .mem
            .read_slice(&mut self.buf[..n], GuestAddress(gpa))
            .map_err(|e| MigrationError::Protocol(format!("reading guest RAM at {gpa:#x}: {e}")))
    }

    /// Sends buffer bytes `[from, to)`, which hold guest RAM from `base`.
    fn send_buffered(&mut self, base: u64, from: usize, to: usize) -> Result<(), MigrationError> {
        let gpa = base + from as u64;
        wire::write_header(&mut self.out, Kind::Pages, 8 + (to - from) as u64)?;
        self.out
            .write_all(&gpa.to_le_bytes())
            .and_then(|()| self.out.write_all(&self.buf[from..to]))
            .map_err(MigrationError::stream("sending guest RAM"))?;
        self.stats.sent += (to - from) as u64;
        Ok(())
    }

    /// Each RAM slot's dirty log since the last call.
    fn fetch_dirty(&self) -> Result<DirtyLog, MigrationError> {
        self.snap
            .mem
            .iter()
            .enumerate()
            .map(|(slot, r)| {
                self.snap
                    .vm
                    .dirty_pages(slot as u32, r.len())
                    .map_err(|e| MigrationError::DirtyLog(e.to_string()))
            })
            .collect()
    }
}

impl Drop for Sender<'_> {
    fn drop(&mut self) {
        if self.logging {
            let _ = self.snap.vm.log_dirty_pages(&self.snap.mem, false);
        }
    }
}

/// The byte ranges of `buf` made of pages that are not all zero.
fn nonzero_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, page) in buf.chunks(PAGE as usize).enumerate() {
        if is_zero(page) {
            continue;
        }
        let (from, to) = (i * PAGE as usize, i * PAGE as usize + page.len());
        match out.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => out.push((from, to)),
        }
    }
    out
}

/// Pages set in all of `log`.
pub fn count(log: &DirtyLog) -> u64 {
    log.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// The runs of set bits in `bitmap` as (first page, pages), none longer than `max`.
fn runs(bitmap: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            match out.last_mut() {
                Some((first, n)) if *first + *n == page && *n < max => *n += 1,
                _ => out.push((page, 1)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_bits_become_runs() {
        let bitmap = [0b1110_0001u64, 1 << 63, 0b1];
        assert_eq!(runs(&bitmap, 1024), vec![(0, 1), (5, 3), (127, 2)]);
        assert_eq!(runs(&bitmap, 2), vec![(0, 1), (5, 2), (7, 1), (127, 2)]);
        assert_eq!(count(&vec![bitmap.to_vec(), vec![u64::MAX]]), 6 + 64);
        assert!(runs(&[0, 0], 8).is_empty());
        let mut buf = vec![0u8; 5 * 4096];
        buf[4096] = 1;
        buf[2 * 4096 + 4095] = 1;
        buf[4 * 4096 + 7] = 1;
        assert_eq!(
            nonzero_runs(&buf),
            vec![(4096, 3 * 4096), (4 * 4096, 5 * 4096)]
        );
    }
}
