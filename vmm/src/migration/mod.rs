//! Live migration of a running VM to another hpcvm process (docs/migration.md):
//! the sender ([`send`], driven by `hpcvm ctl migrate`) copies guest RAM while the
//! guest runs, with KVM's dirty log saying what to copy again, then pauses it for a
//! short stop-and-copy of the last pages and of the state a checkpoint holds; the
//! receiver ([`receive`], `hpcvm receive`) builds the same VM from the stream and
//! runs it on. The stream's framing is in [`wire`], the addresses in [`address`].

pub mod address;
pub mod receive;
pub mod send;
pub mod wire;

use thiserror::Error;

pub use address::Address;

/// Why a migration failed.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// Not `unix:PATH` or `tcp:HOST:PORT`.
    #[error("Invalid migration address '{0}': use unix:PATH or tcp:HOST:PORT")]
    BadAddress(String),
    /// Connecting, listening or accepting failed.
    #[error("Cannot {what} {address}: {source}")]
    Socket {
        /// What was being done ("connect to", "listen on", ...).
        what: &'static str,
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The stream broke or stalled.
    #[error("The migration stream failed while {what}: {source}")]
    Stream {
        /// What was being sent or received.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The peer is not an hpcvm of this migration format.
    #[error("The peer is not an hpcvm migration sender (bad magic)")]
    NotMigration,
    /// Another format version.
    #[error("The sender speaks migration format version {found}; this hpcvm speaks {supported}")]
    Version {
        /// The sender's version.
        found: u32,
        /// This hpcvm's.
        supported: u32,
    },
    /// A frame that breaks the protocol.
    #[error("The migration stream is damaged: {0}")]
    Protocol(String),
    /// The other side gave up, with its reason.
    #[error("The {side} hpcvm failed: {message}")]
    Peer {
        /// "receiving" or "sending".
        side: &'static str,
        /// Its error message.
        message: String,
    },
    /// A signal stopped the receiver before a VM arrived.
    #[error("Stopped by {0} while waiting for a migration")]
    Interrupted(&'static str),
    /// KVM's dirty log could not be used.
    #[error("KVM's dirty-page log failed: {0}")]
    DirtyLog(String),
}

impl MigrationError {
    fn stream(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Stream { what, source }
    }
}
