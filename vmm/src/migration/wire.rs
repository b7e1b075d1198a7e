//! The migration stream (docs/migration.md): a greeting (magic, version), then
//! frames of a kind byte, a little-endian u64 length and the payload.
//!
//! Sender to receiver: CONFIG (the VM's configuration, JSON), any number of PAGES
//! (a guest-physical address and whole 4 KiB pages), STATE (vCPUs, machine and
//! devices as a checkpoint holds them, JSON), later GO. Receiver to sender: READY
//! once the VM is built and restored, or ERROR with the reason. Either side may send
//! ERROR instead of what comes next.

use std::io::{Read, Write};

use super::MigrationError;

/// The first bytes of a migration stream.
pub const MAGIC: &[u8; 8] = b"HPCVMMIG";
/// The format this hpcvm speaks.
pub const VERSION: u32 = 1;
/// Unit of the page frames.
pub const PAGE: u64 = 4096;
/// Most page bytes in one frame.
pub const MAX_PAGES: u64 = 8 << 20;
/// Largest CONFIG, STATE or ERROR payload accepted.
const MAX_PAYLOAD: u64 = 256 << 20;
/// Frame header: kind and length.
const HEADER: usize = 1 + 8;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The VM's configuration (JSON).
    Config = 1,
    /// Guest-physical address (u64) and page contents.
    Pages = 2,
    /// The VM's state besides RAM (JSON).
    State = 3,
    /// The receiver is ready to run the VM.
    Ready = 4,
    /// The sender has stopped: run it.
    Go = 5,
    /// A side gave up (UTF-8 reason).
    Error = 6,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Config,
            2 => Kind::Pages,
            3 => Kind::State,
            4 => Kind::Ready,
            5 => Kind::Go,
            6 => Kind::Error,
            _ => return None,
        })
    }
}

/// Writes the greeting.
pub fn write_greeting(w: &mut impl Write) -> Result<(), MigrationError> {
    let mut g = MAGIC.to_vec();
    g.extend_from_slice(&VERSION.to_le_bytes());
    w.write_all(&g).map_err(MigrationError::stream("greeting"))
}

/// Reads and checks the greeting.
pub fn read_greeting(r: &mut impl Read) -> Result<(), MigrationError> {
    let mut g = [0u8; 12];
    r.read_exact(&mut g).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => MigrationError::NotMigration,
        _ => MigrationError::stream("reading the greeting")(e),
    })?;
    if &g[..8] != MAGIC {
        return Err(MigrationError::NotMigration);
    }
    let found = u32::from_le_bytes(g[8..].try_into().expect("4 bytes"));
    if found != VERSION {
        return Err(MigrationError::Version {
            found,
            supported: VERSION,
        });
    }
    Ok(())
}

/// Writes a frame header for `len` payload bytes.
pub fn write_header(w: &mut impl Write, kind: Kind, len: u64) -> Result<(), MigrationError> {
    let mut h = [0u8; HEADER];
    h[0] = kind as u8;
    h[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&h).map_err(MigrationError::stream("sending"))
}

/// Writes a whole frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
    write_header(w, kind, payload.len() as u64)?;
    w.write_all(payload)
        .map_err(MigrationError::stream("sending"))
}

/// Reads a frame header: its kind and payload length, checked against the limits.
pub fn read_header(r: &mut impl Read, what: &'static str) -> Result<(Kind, u64), MigrationError> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h).map_err(MigrationError::stream(what))?;
    let kind = Kind::from_byte(h[0])
        .ok_or_else(|| MigrationError::Protocol(format!("unknown frame kind {}", h[0])))?;
    let len = u64::from_le_bytes(h[1..].try_into().expect("8 bytes"));
    let max = match kind {
        Kind::Pages => 8 + MAX_PAGES,
        Kind::Ready | Kind::Go => 0,
        _ => MAX_PAYLOAD,
    };
    if len > max {
        return Err(MigrationError::Protocol(format!(
            "a {kind:?} frame of {len} bytes (at most {max})"
        )));
    }
    Ok((kind, len))
}

/// Reads `len` payload bytes.
pub fn read_payload(
    r: &mut impl Read,
    len: u64,
    what: &'static str,
) -> Result<Vec<u8>, MigrationError> {
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v).map_err(MigrationError::stream(what))?;
    Ok(v)
}

/// Reads the next frame, which must be `want` (or ERROR, returned as the peer's
/// failure): its payload.
pub fn expect(
    r: &mut impl Read,
    want: Kind,
    side: &'static str,
    what: &'static str,
) -> Result<Vec<u8>, MigrationError> {
    let (kind, len) = read_header(r, what)?;
    let payload = read_payload(r, len, what)?;
    match kind {
        k if k == want => Ok(payload),
        Kind::Error => Err(MigrationError::Peer {
            side,
            message: String::from_utf8_lossy(&payload).into_owned(),
        }),
        other => Err(MigrationError::Protocol(format!(
            "a {other:?} frame where {want:?} belongs"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_named() {
        let mut out = Vec::new();
        write_greeting(&mut out).unwrap();
        write_frame(&mut out, Kind::Config, b"{}").unwrap();
        write_frame(&mut out, Kind::Error, b"no hugepages").unwrap();
        let mut r = out.as_slice();
        read_greeting(&mut r).unwrap();
        assert_eq!(expect(&mut r, Kind::Config, "sending", "x").unwrap(), b"{}");
        let e = expect(&mut r, Kind::Ready, "receiving", "x").unwrap_err();
        assert_eq!(e.to_string(), "The receiving hpcvm failed: no hugepages");

        assert!(matches!(
            read_greeting(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(MigrationError::NotMigration)
        ));
        let mut v2 = MAGIC.to_vec();
        v2.extend_from_slice(&2u32.to_le_bytes());
        let e = read_greeting(&mut v2.as_slice()).unwrap_err().to_string();
        assert_eq!(
            e,
            "The sender speaks migration format version 2; this hpcvm speaks 1"
        );
        let mut big = Vec::new();
        write_header(&mut big, Kind::Pages, 1 << 40).unwrap();
        let e = read_header(&mut big.as_slice(), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a Pages frame of 1099511627776 bytes"), "{e}");
        let e = read_header(&mut &[9u8, 0, 0, 0, 0, 0, 0, 0, 0][..], "x")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "The migration stream is damaged: unknown frame kind 9");
        let e = expect(&mut &[1u8, 5, 0][..], Kind::Config, "sending", "reading")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("The migration stream failed while reading"),
            "{e}"
        );
    }
}
