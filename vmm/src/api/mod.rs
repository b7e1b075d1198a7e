//! The control socket: a Unix stream socket speaking newline-delimited JSON, one
//! request per line, one response per line (see docs/api.md).

pub mod client;
pub mod protocol;
pub mod server;

pub use protocol::{Command, Request};
pub use server::{ApiServer, ApiSocket};
