//! The receiving side: greets the sender and reads the VM's configuration
//! ([`Incoming::start`]); the builder then creates the VM and has
//! [`Incoming::receive_memory`] fill its fresh RAM from the stream until the state
//! arrives, restores vCPUs, machine and devices from that state, and
//! [`Incoming::ready`] tells the sender so and waits for GO.

use std::fs::File;
use std::io::{BufReader, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::wire::{self, Kind, PAGE};
use super::MigrationError;
use crate::checkpoint::VmState;
use crate::config::VmConfig;

/// Longest a refusing receiver waits for the sender to read its reason and close.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// A migration on its way in.
pub struct Incoming {
    input: BufReader<File>,
    output: File,
    /// The VM's configuration, as the sender ran it.
    pub config: VmConfig,
    /// Page bytes received.
    pub received: u64,
}

impl Incoming {
    /// Reads the sender's greeting and configuration from `conn`.
    pub fn start(conn: File) -> Result<Self, MigrationError> {
        let output = conn
            .try_clone()
            .map_err(MigrationError::stream("accepting"))?;
        let mut input = BufReader::with_capacity(1 << 20, conn);
        wire::read_greeting(&mut input)?;
        let payload = wire::expect(
            &mut input,
            Kind::Config,
            "sending",
            "reading the configuration",
        )?;
        let config = serde_json::from_slice(&payload).map_err(|e| {
            MigrationError::Protocol(format!("the configuration does not parse: {e}"))
        })?;
        Ok(Self {
            input,
            output,
            config,
            received: 0,
        })
    }

    /// Reads pages into `mem` (fresh, all zero) until the state comes; returns it,
    /// checked against the configuration.
    pub fn receive_memory(&mut self, mem: &GuestMemoryMmap) -> Result<VmState, MigrationError> {
        let mut buf = Vec::new();
        loop {
            let (kind, len) = wire::read_header(&mut self.input, "receiving guest RAM")?;
            match kind {
                Kind::Pages => {
                    let Some(bytes) = len.checked_sub(8).filter(|b| b % PAGE == 0 && *b > 0) else {
                        return Err(MigrationError::Protocol(format!(
                            "a page frame of {len} bytes"
                        )));
                    };
                    let head = wire::read_payload(&mut self.input, 8, "receiving guest RAM")?;
                    let gpa = u64::from_le_bytes(head[..].try_into().expect("8 bytes"));
                    if gpa % PAGE != 0
                        || !GuestMemoryBackend::check_range(mem, GuestAddress(gpa), bytes as usize)
                    {
                        return Err(MigrationError::Protocol(format!(
                            "{bytes} bytes of pages at {gpa:#x}, outside guest RAM"
                        )));
                    }
                    buf.resize(bytes as usize, 0);
                    std::io::Read::read_exact(&mut self.input, &mut buf)
                        .map_err(MigrationError::stream("receiving guest RAM"))?;
                    mem.write_slice(&buf, GuestAddress(gpa)).map_err(|e| {
                        MigrationError::Protocol(format!("writing guest RAM at {gpa:#x}: {e}"))
                    })?;
                    self.received += bytes;
                }
                Kind::State => {
                    let payload = wire::read_payload(&mut self.input, len, "receiving the state")?;
                    return self.state(&payload, mem);
                }
                Kind::Error => {
                    let payload = wire::read_payload(&mut self.input, len, "receiving")?;
                    return Err(MigrationError::Peer {
                        side: "sending",
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    });
                }
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "a {other:?} frame among the pages"
                    )))
                }
            }
        }
    }

    fn state(&self, payload: &[u8], mem: &GuestMemoryMmap) -> Result<VmState, MigrationError> {
        let state: VmState = serde_json::from_slice(payload)
            .map_err(|e| MigrationError::Protocol(format!("the VM state does not parse: {e}")))?;
        let ram: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
        if state.vcpus.len() != self.config.cpus.count as usize || state.memory.size != ram {
            return Err(MigrationError::Protocol(format!(
                "the state has {} vCPUs and {} bytes of RAM; the VM has {} and {ram}",
                state.vcpus.len(),
                state.memory.size,
                self.config.cpus.count
            )));
        }
        Ok(state)
    }

    /// Tells the sender the VM is ready, and waits for it to stop its copy.
    pub fn ready(&mut self) -> Result<(), MigrationError> {
        wire::write_frame(&mut self.output, Kind::Ready, &[])?;
        wire::expect(&mut self.input, Kind::Go, "sending", "waiting for GO")?;
        Ok(())
    }

    /// Tells the sender why this side gives up (best effort): it runs the VM on.
    /// What it still sends is read and dropped until it closes (a while at most),
    /// so that the reason is not lost to a reset connection.
    pub fn fail(&mut self, why: &str) {
        if wire::write_frame(&mut self.output, Kind::Error, why.as_bytes()).is_err() {
            return;
        }
        let _ = self.output.flush();
        let until = std::time::Instant::now() + DRAIN;
        let mut sink = vec![0u8; 1 << 20];
        while std::time::Instant::now() < until {
            match std::io::Read::read(&mut self.input, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}
