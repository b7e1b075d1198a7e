//! Device models for hpcvm guests.
//!
//! The VMM's vCPU threads hand every port-I/O exit to a [`bus::PioBus`]; the devices on
//! it are the legacy PC pieces a Linux guest needs on a KVM with in-kernel irqchip and PIT:
//! a 16550 UART on COM1, the i8042 controller's reset line and the hardware-reduced
//! ACPI platform's sleep registers and power button.

pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod pci;
pub mod trigger;
pub mod virtio;

pub use bus::{lock, Bus, BusDevice, MmioBus, PioBus};
pub use trigger::EventFdTrigger;
