//! The state file: a fixed header (magic, format version, CRC-32 and length of the
//! payload) and the payload, the VM's state as JSON. Written to a temporary name and
//! renamed, so a checkpoint directory holds a whole state file or none.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use super::CheckpointError;

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"HPCVMCKP";
/// The format this hpcvm writes and reads (docs/checkpoint.md).
pub const VERSION: u32 = 1;
/// Magic, version, CRC-32, payload length.
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
/// Largest payload accepted (the vCPU and device state of the largest VM is a few MiB).
const MAX_PAYLOAD: u64 = 256 << 20;

/// Writes `payload` to `path` (through `path.tmp`, then renamed) and syncs it.
pub fn write(path: &Path, payload: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    let io = |source| CheckpointError::Io {
        what: "writing",
        path: tmp.clone(),
        source,
    };
    let mut f = File::create(&tmp).map_err(io)?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    f.write_all(&header)
        .and_then(|()| f.write_all(payload))
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|source| CheckpointError::Io {
        what: "renaming into place",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and checks the state file at `path`: its payload.
pub fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    let mut f = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::Missing {
            path: path.to_path_buf(),
        },
        _ => CheckpointError::Io {
            what: "opening",
            path: path.to_path_buf(),
            source,
        },
    })?;
    let mut header = [0u8; HEADER_LEN];
    let got = read_up_to(&mut f, &mut header).map_err(|source| CheckpointError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    if got < MAGIC.len() || &header[..8] != MAGIC {
        return Err(CheckpointError::NotACheckpoint {
            path: path.to_path_buf(),
        });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if got >= 12 && version != VERSION {
        return Err(CheckpointError::Version {
            found: version,
            supported: VERSION,
        });
    }
    if got < HEADER_LEN {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            len: got as u64,
            expected: HEADER_LEN as u64,
        });
    }
    let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            what: format!("its header claims a {len}-byte payload"),
        });
    }
    let mut payload = vec![0u8; len as usize];
    let n = read_up_to(&mut f, &mut payload).map_err(|source| CheckpointError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    if n < payload.len() {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            len: (HEADER_LEN + n) as u64,
            expected: HEADER_LEN as u64 + len,
        });
    }
    if crc32fast::hash(&payload) != crc {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            what: "its checksum does not match".into(),
        });
    }
    Ok(payload)
}

/// Reads until `buf` is full or the file ends; how many bytes were read.
fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("hpcvm-fmt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("vm.state")
    }

    #[test]
    fn a_payload_reads_back_and_damage_is_named() {
        let p = tmp("damage");
        write(&p, b"{\"x\":1}").unwrap();
        assert_eq!(read(&p).unwrap(), b"{\"x\":1}");
        let good = std::fs::read(&p).unwrap();

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&p, &flipped).unwrap();
        assert!(matches!(read(&p), Err(CheckpointError::Corrupt { .. })));

        std::fs::write(&p, &good[..good.len() - 2]).unwrap();
        let e = read(&p).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");

        let mut v2 = good.clone();
        v2[8] = 2;
        std::fs::write(&p, &v2).unwrap();
        let e = read(&p).unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");

        std::fs::write(&p, b"not a checkpoint at all").unwrap();
        assert!(matches!(
            read(&p),
            Err(CheckpointError::NotACheckpoint { .. })
        ));
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
        assert!(matches!(read(&p), Err(CheckpointError::Missing { .. })));
    }
}
