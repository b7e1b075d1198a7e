//! Hugepage reservations for tests: take what a test needs from the kernel, give it
//! back afterwards, and serialize every test that touches the pool (across test
//! binaries too, with a lock file) so their before/after counts mean something.

use std::fs::File;
use std::os::fd::AsRawFd;

const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const RESV: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages";

fn read(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// Free 2M pages nobody has reserved.
pub fn free_2m() -> u64 {
    read(FREE) - read(RESV)
}

/// Exclusive use of the 2M pool, with `extra` pages added to it; the pool size is put
/// back on drop.
pub struct Reservation {
    original: u64,
    _lock: File,
}

impl Reservation {
    /// Locks the pool and grows it by `extra` free pages (panics if the kernel cannot).
    pub fn take(extra: u64) -> Self {
        let lock = File::create("/tmp/hpcvm-tests-hugepages.lock").expect("lock file");
        // SAFETY: flock on a valid open descriptor.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock");
        let original = read(NR);
        let want = original + extra;
        std::fs::write(NR, want.to_string()).unwrap_or_else(|e| {
            panic!("cannot set {NR} (tests reserving hugepages must run as root): {e}")
        });
        let got = read(NR);
        let this = Self {
            original,
            _lock: lock,
        };
        assert_eq!(
            got, want,
            "kernel gave {got} of {want} 2M hugepages (fragmented memory?)"
        );
        this
    }

    /// Shrinks the pool so that exactly `free` pages are free (for pool-too-small tests).
    pub fn set_free(&self, free: u64) {
        let now = read(NR);
        let target = now + free - free_2m();
        std::fs::write(NR, target.to_string()).expect("resize hugepage pool");
        assert_eq!(free_2m(), free);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = std::fs::write(NR, self.original.to_string());
    }
}
