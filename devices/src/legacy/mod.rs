//! Legacy PC devices: the UARTs (console, agent channel) and the i8042.

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{Uart, UartState};
