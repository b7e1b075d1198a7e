//! `migrate`: the control loop's side of a live migration (the stream itself is
//! [`crate::migration::send`]). The virtio devices stay locked from the first page
//! sent to the end, so that only vCPUs write guest RAM and KVM's dirty log sees it
//! all; the vCPUs are paused only for the last copy.

use std::time::Instant;

use super::lifecycle::{Controller, Outcome, CHECKPOINT_VCPU_TIMEOUT};
use super::report::{Answer, MigrationReport};
use crate::checkpoint::Snapshotter;
use crate::migration::send::Sender;
use crate::migration::Address;

impl Controller {
    /// Migrates the VM to the `hpcvm receive` at `to`; on success the VM ends here
    /// as [`Outcome::Migrated`]. A failure at any step before the receiver is told
    /// to go leaves the VM running here as it was.
    pub fn migrate(&mut self, to: &str) -> Result<Answer, String> {
        if self.is_done() {
            return Err("the VM is already stopping".into());
        }
        if self.shutting_down() {
            return Err("cannot migrate during a shutdown".into());
        }
        let address = Address::parse(to).map_err(|e| e.to_string())?;
        let Some(snap) = self.snapshot.take() else {
            return Err("this VM cannot be migrated".into());
        };
        let result = match &snap.refusal {
            Some(why) => Err(format!("Cannot migrate this VM: {why}")),
            None => self.migrate_with(&snap, &address),
        };
        self.snapshot = Some(snap);
        result.map_err(|e| format!("migration to {address} failed, the VM runs on here: {e}"))
    }

    fn migrate_with(&mut self, snap: &Snapshotter, to: &Address) -> Result<Answer, String> {
        let started = Instant::now();
        let mut sender = Sender::connect(to, snap).map_err(|e| e.to_string())?;
        let was_paused = self.paused();
        let mut devices = match snap.hold_devices() {
            Ok(held) => held,
            Err(e) => {
                let e = e.to_string();
                sender.abort(&e);
                return Err(e);
            }
        };
        let copied = (|| {
            let pending = sender
                .precopy()
                .map_err(|e| sender.explain(e).to_string())?;
            if !was_paused {
                self.pause()?;
            }
            let paused_at = Instant::now();
            let n = self.vcpus.len();
            let shared = self.shared.clone();
            let state = snap
                .capture(&mut devices.0, false, || {
                    shared.save_parked(n, CHECKPOINT_VCPU_TIMEOUT)
                })
                .map_err(|e| e.to_string())?;
            sender
                .complete(&pending, &state)
                .map_err(|e| sender.explain(e).to_string())?;
            Ok::<_, String>(paused_at)
        })();
        let gone = match copied {
            Ok(paused_at) => sender
                .go()
                .map(|stats| (paused_at, stats))
                .map_err(|e| e.to_string()),
            Err(e) => {
                sender.abort(&e);
                drop(sender);
                Err(e)
            }
        };
        if gone.is_ok() {
            // The receiver serves the queues from here on.
            for d in devices.0.iter_mut() {
                d.hand_over();
            }
        }
        // Unlocked before any vCPU runs again: a vCPU touching a device would wait.
        drop(devices);
        match gone {
            Ok((paused_at, stats)) => {
                self.outcome = Some(Outcome::Migrated { to: to.to_string() });
                Ok(Answer::Migrated(MigrationReport {
                    to: to.to_string(),
                    ram: stats.ram,
                    sent: stats.sent,
                    passes: stats.passes,
                    sent_paused: stats.sent_paused,
                    total_s: started.elapsed().as_secs_f64(),
                    downtime_s: paused_at.elapsed().as_secs_f64(),
                }))
            }
            Err(e) => {
                if !was_paused && self.paused() {
                    self.resume()?;
                }
                Err(e)
            }
        }
    }
}
