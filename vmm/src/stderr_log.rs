//! hpcvm's messages as the `hpcvm` binary prints them: the library reports warnings
//! and notes through the `log` crate, so that an embedding program decides where they
//! go; [`log_to_stderr`] sends them to stderr as `hpcvm: ...` lines.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Prints this crate's records as `hpcvm: error: ...`, `hpcvm: warning: ...` or
/// `hpcvm: ...`. Records of other crates (virtio-queue, event-manager, ...) are left
/// out: some of them log guest-triggered conditions with no rate limit, and a guest
/// must not be able to flood the job's stderr through them.
struct Stderr;

/// Longest line written in one piece; a longer one goes out in several writes.
const LINE_MAX: usize = 1024;

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Info && is_ours(metadata.target())
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prefix = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            _ => "",
        };
        // Formatted on the stack and written with one write(2), so that lines from
        // several threads do not interleave and no allocation happens: this runs on
        // threads whose seccomp filter allows write(2) and little else.
        let mut buf = [0u8; LINE_MAX];
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        let stderr = std::io::stderr();
        if writeln!(cursor, "hpcvm: {prefix}{}", record.args()).is_ok() {
            let len = cursor.position() as usize;
            let _ = stderr.lock().write_all(&buf[..len]);
        } else {
            let _ = writeln!(stderr.lock(), "hpcvm: {prefix}{}", record.args());
        }
    }

    fn flush(&self) {}
}

/// Whether a record's target is this crate or one of its modules.
fn is_ours(target: &str) -> bool {
    target == "vmm" || target.starts_with("vmm::")
}

static STDERR: Stderr = Stderr;

/// Makes hpcvm's warnings and notes (its records at info or above) lines on stderr,
/// as the `hpcvm` binary shows them. Does nothing if the process already has a
/// logger.
pub fn log_to_stderr() {
    if log::set_logger(&STDERR).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_crates_records_are_printed() {
        let ours = Metadata::builder()
            .level(Level::Warn)
            .target("vmm::virtio::fs")
            .build();
        let root = Metadata::builder()
            .level(Level::Error)
            .target("vmm")
            .build();
        let queue = Metadata::builder()
            .level(Level::Error)
            .target("virtio_queue::queue")
            .build();
        let lookalike = Metadata::builder()
            .level(Level::Error)
            .target("vmmx")
            .build();
        let debug = Metadata::builder()
            .level(Level::Debug)
            .target("vmm::runner")
            .build();
        assert!(Stderr.enabled(&ours));
        assert!(Stderr.enabled(&root));
        assert!(!Stderr.enabled(&queue));
        assert!(!Stderr.enabled(&lookalike));
        assert!(!Stderr.enabled(&debug));
    }
}
