//! Builds the job's initramfs: an uncompressed newc cpio (decompression would be
//! emulated on software KVM) with the guest agent as `/init`, busybox and its applet
//! links, and the files the job asked for (`--file HOST:GUEST`).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// busybox applets linked into `/bin`: a shell and the usual tools a job script uses.
pub const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "cat",
    "chmod",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "dmesg",
    "du",
    "echo",
    "env",
    "false",
    "find",
    "free",
    "grep",
    "head",
    "hostname",
    "id",
    "kill",
    "ln",
    "ls",
    "mkdir",
    "mount",
    "mv",
    "nproc",
    "printf",
    "ps",
    "pwd",
    "readlink",
    "rm",
    "sed",
    "seq",
    "sleep",
    "sort",
    "stat",
    "sync",
    "tail",
    "tee",
    "test",
    "[",
    "timeout",
    "touch",
    "tr",
    "true",
    "umount",
    "uname",
    "uniq",
    "wc",
    "which",
    "xargs",
    "yes",
    "awk",
    "basename",
    "dirname",
    "expr",
    "getconf",
    "top",
    "uptime",
    "whoami",
    "sha256sum",
    "md5sum",
    "cmp",
    "tar",
    "gzip",
    "gunzip",
];

/// One file to put in the initramfs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileSpec {
    /// Path on the host (a file or a directory, copied recursively).
    pub host: PathBuf,
    /// Absolute path in the guest.
    pub guest: PathBuf,
}

impl std::str::FromStr for FileSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, guest) = s
            .split_once(':')
            .ok_or_else(|| format!("--file '{s}' must be HOST:GUEST"))?;
        let guest = PathBuf::from(guest);
        if !guest.is_absolute() || guest.components().any(|c| c == Component::ParentDir) {
            return Err(format!(
                "--file '{s}': the guest path must be absolute, without '..'"
            ));
        }
        Ok(Self {
            host: host.into(),
            guest,
        })
    }
}

/// A newc archive being written.
pub struct Cpio<W: Write> {
    out: W,
    written: u64,
    ino: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl<W: Write> Cpio<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..n])
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn chardev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// Ends the archive.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

/// Everything the job's initramfs holds.
pub struct Contents<'a> {
    /// The guest agent binary (becomes `/init`).
    pub agent: &'a Path,
    /// A static busybox, if available.
    pub busybox: Option<&'a Path>,
    /// Extra files.
    pub files: &'a [FileSpec],
}

/// Writes the job's initramfs to `out`.
pub fn write<W: Write>(contents: &Contents<'_>, out: W) -> io::Result<W> {
    let mut c = Cpio::new(out);
    for d in [
        "bin", "sbin", "dev", "etc", "proc", "sys", "tmp", "run", "root", "usr", "usr/bin",
        "usr/sbin", "mnt",
    ] {
        c.dir(d, 0o755)?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    c.chardev("dev/console", 0o600, 5, 1)?;
    c.chardev("dev/null", 0o666, 1, 3)?;
    c.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    c.file("etc/group", 0o644, b"root:x:0:\n")?;
    c.file("etc/hostname", 0o644, b"hpcvm\n")?;
    c.file("init", 0o755, &read(contents.agent)?)?;
    if let Some(bb) = contents.busybox {
        c.file("bin/busybox", 0o755, &read(bb)?)?;
        for a in APPLETS {
            c.symlink(&format!("bin/{a}"), "busybox")?;
        }
    }
    let mut made_dirs: Vec<PathBuf> = Vec::new();
    for f in contents.files {
        add_tree(&mut c, &f.host, &f.guest, &mut made_dirs)?;
    }
    // Last: the agent starts the job only if this got unpacked.
    let marker = hpcvm_agent::UNPACKED_MARKER.trim_start_matches('/');
    c.file(marker, 0o444, b"")?;
    c.finish()
}

fn read(p: &Path) -> io::Result<Vec<u8>> {
    fs::read(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

fn ensure_parents<W: Write>(
    c: &mut Cpio<W>,
    guest: &Path,
    made: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let mut acc = PathBuf::from("/");
    if let Some(parent) = guest.parent() {
        for comp in parent.components().skip(1) {
            acc.push(comp);
            if !made.contains(&acc) {
                c.dir(&acc.to_string_lossy(), 0o755)?;
                made.push(acc.clone());
            }
        }
    }
    Ok(())
}

fn add_tree<W: Write>(
    c: &mut Cpio<W>,
    host: &Path,
    guest: &Path,
    made: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(host)
        .map_err(|e| io::Error::new(e.kind(), format!("--file {}: {e}", host.display())))?;
    ensure_parents(c, guest, made)?;
    let name = guest.to_string_lossy();
    let perm = meta.permissions().mode() & 0o7777;
    if meta.is_dir() {
        if !made.iter().any(|m| m == guest) {
            c.dir(&name, perm)?;
            made.push(guest.to_path_buf());
        }
        let mut entries: Vec<_> = fs::read_dir(host)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            add_tree(c, &e.path(), &guest.join(e.file_name()), made)?;
        }
    } else if meta.file_type().is_symlink() {
        let target = fs::read_link(host)?;
        c.symlink(&name, &target.to_string_lossy())?;
    } else if meta.is_file() {
        let _ = meta.size();
        c.file(&name, perm, &read(host)?)?;
    } else {
        return Err(io::Error::other(format!(
            "--file {}: only files, directories and symlinks can be copied",
            host.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data) of every entry, parsed back.
    fn parse(a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        let field = |b: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        loop {
            let h = &a[off..off + 110];
            assert_eq!(&h[..6], b"070701");
            let (mode, size, namesize) = (field(h, 1), field(h, 6) as usize, field(h, 11) as usize);
            let name = String::from_utf8(a[off + 110..off + 110 + namesize - 1].to_vec()).unwrap();
            off = (off + 110 + namesize + 3) & !3;
            let data = a[off..off + size].to_vec();
            off = (off + size + 3) & !3;
            if name == "TRAILER!!!" {
                assert_eq!(off, a.len());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn archive_parses_back_with_alignment() {
        let mut c = Cpio::new(Vec::new());
        c.dir("bin", 0o755).unwrap();
        c.file("bin/x", 0o700, b"abcde").unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        c.chardev("dev/console", 0o600, 5, 1).unwrap();
        let a = c.finish().unwrap();
        let e = parse(&a);
        assert_eq!(e[0], ("bin".into(), S_IFDIR | 0o755, vec![]));
        assert_eq!(e[1], ("bin/x".into(), S_IFREG | 0o700, b"abcde".to_vec()));
        assert_eq!(
            e[2],
            ("bin/sh".into(), S_IFLNK | 0o777, b"busybox".to_vec())
        );
        assert_eq!(e[3].1, S_IFCHR | 0o600);
    }

    #[test]
    fn job_initramfs_has_init_console_and_user_files() {
        let dir = std::env::temp_dir().join(format!("hpcvm-initramfs-{}", std::process::id()));
        fs::create_dir_all(dir.join("data/sub")).unwrap();
        fs::write(dir.join("agent"), b"\x7fELFagent").unwrap();
        fs::write(dir.join("data/sub/input.txt"), b"42").unwrap();
        let files = [
            "/dev/null:/x".parse::<FileSpec>().unwrap(),
            FileSpec {
                host: dir.join("data"),
                guest: "/opt/job/data".into(),
            },
        ];
        let a = write(
            &Contents {
                agent: &dir.join("agent"),
                busybox: None,
                files: &files[1..],
            },
            Vec::new(),
        )
        .unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let e = parse(&a);
        let find = |n: &str| {
            e.iter()
                .find(|x| x.0 == n)
                .unwrap_or_else(|| panic!("no {n}"))
        };
        assert_eq!(find("init").2, b"\x7fELFagent");
        assert_eq!(find("init").1, S_IFREG | 0o755);
        assert_eq!(find("dev/console").1, S_IFCHR | 0o600);
        assert_eq!(find("opt").1 & S_IFDIR, S_IFDIR);
        assert_eq!(find("opt/job/data/sub/input.txt").2, b"42");
        assert_eq!(files[0].guest, PathBuf::from("/x"));
    }

    #[test]
    fn file_specs_must_be_host_colon_absolute_guest() {
        assert!("nocolon"
            .parse::<FileSpec>()
            .unwrap_err()
            .contains("HOST:GUEST"));
        assert!("a:relative"
            .parse::<FileSpec>()
            .unwrap_err()
            .contains("absolute"));
        assert!("a:/x/../etc"
            .parse::<FileSpec>()
            .unwrap_err()
            .contains("without '..'"));
    }
}
