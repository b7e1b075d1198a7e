use super::*;

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hpcvm-disk-{}-{name}", std::process::id()))
}

fn cfg(path: &std::path::Path, read_only: bool, root_image: bool) -> DiskConfig {
    DiskConfig {
        path: path.to_path_buf(),
        read_only,
        serial: None,
        direct: false,
        root_image,
    }
}

/// A file that looks like an ext4 superblock of `blocks` 1 KiB blocks, `len` long.
fn fake_ext4(name: &str, blocks: u32, len: u64) -> PathBuf {
    let p = temp(name);
    let mut img = vec![0u8; len as usize];
    img[1024 + 4..1024 + 8].copy_from_slice(&blocks.to_le_bytes());
    img[1024 + SB_MAGIC..1024 + SB_MAGIC + 2].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
    std::fs::write(&p, img).unwrap();
    p
}

#[test]
fn readers_share_a_disk_and_a_writer_is_kept_out() {
    let p = temp("shared");
    std::fs::write(&p, vec![0u8; 4096]).unwrap();
    let a = open(&cfg(&p, true, false)).unwrap();
    let b = open(&cfg(&p, true, false)).unwrap();
    assert_eq!(a.sectors(), 8);
    let err = open(&cfg(&p, false, false)).unwrap_err().to_string();
    assert!(
        err.contains("is in use: another process has it open"),
        "{err}"
    );
    drop((a, b));
    let w = open(&cfg(&p, false, false)).unwrap();
    let err = open(&cfg(&p, true, false)).unwrap_err().to_string();
    assert!(
        err.contains("another process has it open for writing"),
        "{err}"
    );
    drop(w);
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn an_image_must_be_a_whole_ext4_filesystem() {
    let ok = fake_ext4("ok", 64, 64 << 10);
    open(&cfg(&ok, true, true)).unwrap();
    let short = fake_ext4("short", 64, 32 << 10);
    let err = open(&cfg(&short, true, true)).unwrap_err().to_string();
    assert!(
        err.contains("needs 65536 bytes, the file has 32768"),
        "{err}"
    );
    let zeros = temp("zeros");
    std::fs::write(&zeros, vec![0u8; 8192]).unwrap();
    let err = open(&cfg(&zeros, true, true)).unwrap_err().to_string();
    assert!(err.contains("is not an ext4 filesystem"), "{err}");
    // The same bytes are fine as a plain disk.
    open(&cfg(&zeros, true, false)).unwrap();
    let tiny = temp("tiny");
    std::fs::write(&tiny, [0u8; 100]).unwrap();
    let err = open(&cfg(&tiny, true, false)).unwrap_err().to_string();
    assert!(
        err.contains("is 100 bytes: smaller than one 512-byte sector"),
        "{err}"
    );
    for p in [ok, short, zeros, tiny] {
        std::fs::remove_file(p).unwrap();
    }
}
