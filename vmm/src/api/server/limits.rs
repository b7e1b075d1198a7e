//! Who may keep a place on the control socket: the clock every client carries, and
//! the choice of whom to evict, kept apart from the I/O so they can be tested alone.
//!
//! Two rules keep idle and slow clients from locking out the controller:
//! * at the cap, the client idle longest (no complete request for the longest time)
//!   is closed so that a new connection is always accepted;
//! * a client that holds an unfinished request line, or leaves its replies unread,
//!   for longer than the request timeout is closed (a slowloris).

use std::time::{Duration, Instant};

/// How long a client may take to finish a request line, or to read a reply the
/// kernel could not take, before it is closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client owes the server, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owes {
    /// Nothing: no partial line, no unwritten replies.
    Nothing,
    /// The rest of a request line begun at that time.
    RestOfLine(Instant),
    /// Reading its replies: none of them could be written since that time.
    ReadingReplies(Instant),
}

/// One client's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// When it connected or last completed a request.
    last_active: Instant,
    owes: Owes,
}

/// What one wake-up did with a client, for [`Clock::update`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Complete lines taken from its input, blank ones included.
    pub lines: usize,
    /// Of those, lines that were requests (not blank).
    pub requests: usize,
    /// An unfinished line is left in its input.
    pub partial: bool,
    /// Replies wait to be written.
    pub backlog: bool,
    /// Some reply bytes were written.
    pub wrote: bool,
}

impl Clock {
    /// A client that connected at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            last_active: now,
            owes: Owes::Nothing,
        }
    }

    /// When it connected or last completed a request.
    pub fn last_active(&self) -> Instant {
        self.last_active
    }

    /// Records what a wake-up at `now` did.
    pub fn update(&mut self, now: Instant, p: Progress) {
        if p.requests > 0 {
            self.last_active = now;
        }
        self.owes = if p.backlog {
            match self.owes {
                Owes::ReadingReplies(t) if !p.wrote => Owes::ReadingReplies(t),
                _ => Owes::ReadingReplies(now),
            }
        } else if p.partial {
            match self.owes {
                // Still the same line: its clock keeps running.
                Owes::RestOfLine(t) if p.lines == 0 => Owes::RestOfLine(t),
                // A new line (or one we could not read while replies were stuck).
                _ => Owes::RestOfLine(now),
            }
        } else {
            Owes::Nothing
        };
    }

    /// When it must be closed unless it makes progress first; `None` while it owes
    /// nothing (an idle client may stay until the cap needs its place).
    pub fn deadline(&self, timeout: Duration) -> Option<Instant> {
        match self.owes {
            Owes::Nothing => None,
            Owes::RestOfLine(t) | Owes::ReadingReplies(t) => Some(t + timeout),
        }
    }

    /// Whether the line it owes is unfinished (rather than replies unread).
    pub fn owes_rest_of_line(&self) -> bool {
        matches!(self.owes, Owes::RestOfLine(_))
    }
}

/// The client idle longest, to make room for a new one.
pub fn longest_idle<K: Copy>(clients: impl IntoIterator<Item = (K, Instant)>) -> Option<K> {
    clients
        .into_iter()
        .min_by_key(|&(_, last_active)| last_active)
        .map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn an_idle_client_has_no_deadline() {
        let t0 = Instant::now();
        let mut c = Clock::new(t0);
        assert_eq!(c.deadline(T), None);
        c.update(at(t0, 10), Progress::default());
        assert_eq!(c.deadline(T), None);
        assert_eq!(c.last_active(), t0, "an empty wake-up is no activity");
    }

    #[test]
    fn a_trickled_line_keeps_its_first_byte_deadline() {
        let t0 = Instant::now();
        let mut c = Clock::new(t0);
        let partial = Progress {
            partial: true,
            ..Progress::default()
        };
        c.update(at(t0, 100), partial);
        for s in 1..20 {
            c.update(at(t0, 100 + s * 1000), partial);
        }
        assert_eq!(
            c.deadline(T),
            Some(at(t0, 5100)),
            "1 byte/s never resets it"
        );
        assert!(c.owes_rest_of_line());
        assert_eq!(c.last_active(), t0, "no request completed");
    }

    #[test]
    fn finishing_a_line_clears_or_restarts_the_deadline() {
        let t0 = Instant::now();
        let mut c = Clock::new(t0);
        let partial = Progress {
            partial: true,
            ..Progress::default()
        };
        c.update(at(t0, 100), partial);
        // The line completes and the next one begins in the same read.
        c.update(
            at(t0, 900),
            Progress {
                lines: 1,
                requests: 1,
                partial: true,
                ..Progress::default()
            },
        );
        assert_eq!(c.deadline(T), Some(at(t0, 5900)));
        assert_eq!(c.last_active(), at(t0, 900));
        c.update(
            at(t0, 1000),
            Progress {
                lines: 1,
                requests: 1,
                ..Progress::default()
            },
        );
        assert_eq!(c.deadline(T), None);
        // Blank lines end a partial line but are not activity.
        c.update(at(t0, 1100), partial);
        c.update(
            at(t0, 1200),
            Progress {
                lines: 1,
                ..Progress::default()
            },
        );
        assert_eq!(c.deadline(T), None);
        assert_eq!(c.last_active(), at(t0, 1000));
    }

    #[test]
    fn unread_replies_time_out_unless_some_are_taken() {
        let t0 = Instant::now();
        let mut c = Clock::new(t0);
        let stuck = Progress {
            lines: 1,
            requests: 1,
            backlog: true,
            ..Progress::default()
        };
        c.update(at(t0, 10), stuck);
        assert_eq!(c.deadline(T), Some(at(t0, 5010)));
        assert!(!c.owes_rest_of_line());
        let still = Progress {
            backlog: true,
            ..Progress::default()
        };
        c.update(at(t0, 3000), still);
        assert_eq!(c.deadline(T), Some(at(t0, 5010)), "no bytes taken");
        c.update(
            at(t0, 4000),
            Progress {
                wrote: true,
                ..still
            },
        );
        assert_eq!(c.deadline(T), Some(at(t0, 9000)), "progress restarts it");
        // Once the replies are gone, a partial line left behind starts afresh.
        c.update(
            at(t0, 4500),
            Progress {
                wrote: true,
                partial: true,
                ..Progress::default()
            },
        );
        assert_eq!(c.deadline(T), Some(at(t0, 9500)));
    }

    #[test]
    fn the_longest_idle_client_is_the_one_evicted() {
        let t0 = Instant::now();
        assert_eq!(longest_idle::<i32>([]), None);
        let clients = [(7, at(t0, 30)), (3, at(t0, 10)), (9, at(t0, 20))];
        assert_eq!(longest_idle(clients), Some(3));
    }
}
