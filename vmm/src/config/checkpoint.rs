//! `--checkpoint-on SIGNAL --checkpoint-dir DIR`: which signal makes hpcvm write a
//! checkpoint and stop (the scheduler's warning before a time limit or a preemption).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Checkpoint to `dir` and stop when `signal` arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOn {
    /// The signal's number (one of [`SIGNALS`]).
    pub signal: i32,
    /// Where the checkpoint goes (absolute).
    pub dir: PathBuf,
}

/// The signals `--checkpoint-on` takes, by name: the ones a scheduler sends ahead of
/// a time limit (`sbatch --signal`) or a preemption (SIGTERM, then SIGKILL).
pub const SIGNALS: [(&str, i32); 3] = [
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGTERM", libc::SIGTERM),
];

/// Parses `SIGUSR1`, `USR1`, `usr1` or `10`.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let up = s.trim().to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up.clone()
    } else {
        format!("SIG{up}")
    };
    SIGNALS
        .iter()
        .find(|(n, num)| *n == name || up.parse::<i32>() == Ok(*num))
        .map(|&(_, num)| num)
        .ok_or_else(|| {
            let names: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            format!(
                "Invalid --checkpoint-on '{s}': must be one of {}",
                names.join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_and_numbers() {
        for s in ["SIGUSR1", "USR1", "usr1", "10"] {
            assert_eq!(parse_signal(s), Ok(libc::SIGUSR1), "{s}");
        }
        assert_eq!(parse_signal("term"), Ok(libc::SIGTERM));
        let e = parse_signal("SIGKILL").unwrap_err();
        assert!(
            e.contains("'SIGKILL'") && e.contains("SIGUSR1, SIGUSR2, SIGTERM"),
            "{e}"
        );
        assert!(parse_signal("9").is_err());
    }
}
