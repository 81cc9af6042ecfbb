//! When is a new secret "rejected"? Pure bookkeeping over one verification
//! window.
//!
//! A secret the provider just created may be refused for a while (its nodes
//! learn it one by one), and a provider that flaps may refuse a working one
//! once. Deleting a working secret because of one late `invalid_client` after
//! a minute of 5xx would throw away the replacement for nothing, so only
//! *consistent* rejection counts: several rejections, spread over at least
//! a quarter of the window, the last attempt among them, and no success (a
//! success ends verification at once). A quarter, not a half: attempts back
//! off (doubling delays), so the last one before the deadline may come
//! just after a third of the window.

use std::time::Duration;

/// Rejections needed before a secret counts as refused.
pub const MIN_REJECTIONS: u32 = 3;

/// What the attempts of one verification window said.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Attempts the provider answered with a rejection (401/`invalid_client`).
    pub rejections: u32,
    /// When (since the window started) the first and last rejection came.
    first_rejection: Option<Duration>,
    last_rejection: Option<Duration>,
    /// Whether the latest attempt was a rejection (not a 5xx or a timeout).
    last_was_rejection: bool,
}

impl Tally {
    /// Records a failed attempt `at` (time since the window started).
    pub fn record(&mut self, rejected: bool, at: Duration) {
        self.last_was_rejection = rejected;
        if rejected {
            self.rejections += 1;
            self.first_rejection.get_or_insert(at);
            self.last_rejection = Some(at);
        }
    }

    /// Whether the failures of a window of length `window` amount to a
    /// definite refusal.
    pub fn consistently_rejected(&self, window: Duration) -> bool {
        let spread = match (self.first_rejection, self.last_rejection) {
            (Some(first), Some(last)) => last.saturating_sub(first),
            _ => return false,
        };
        self.last_was_rejection && self.rejections >= MIN_REJECTIONS && spread >= window / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn rejections_throughout_the_window_are_a_refusal() {
        let mut t = Tally::default();
        for s in [0, 1, 3, 7, 15, 30, 45, 59] {
            t.record(true, secs(s));
        }
        assert!(t.consistently_rejected(WINDOW));
    }

    #[test]
    fn one_late_rejection_after_server_errors_is_not() {
        let mut t = Tally::default();
        for s in [0, 1, 3, 7, 15, 30, 45] {
            t.record(false, secs(s));
        }
        t.record(true, secs(59));
        assert!(!t.consistently_rejected(WINDOW));
    }

    #[test]
    fn rejections_bunched_at_the_end_or_followed_by_errors_are_not() {
        let mut bunched = Tally::default();
        for s in [50, 55, 59] {
            bunched.record(true, secs(s));
        }
        assert!(!bunched.consistently_rejected(WINDOW));

        let mut then_error = Tally::default();
        for s in [0, 20, 40] {
            then_error.record(true, secs(s));
        }
        assert!(then_error.consistently_rejected(WINDOW));
        then_error.record(false, secs(59));
        assert!(!then_error.consistently_rejected(WINDOW));
    }

    #[test]
    fn backed_off_attempts_can_always_reach_a_verdict() {
        // The driver's schedule: 250 ms doubling to 5 s, stopping once the
        // next attempt would pass the deadline. Whatever the window, the
        // attempts it makes can add up to a refusal.
        for tenths in 10..=1200u64 {
            let window = Duration::from_millis(tenths * 100);
            let mut t = Tally::default();
            let (mut at, mut delay) = (Duration::ZERO, Duration::from_millis(250));
            loop {
                t.record(true, at);
                if at + delay >= window {
                    break;
                }
                at += delay;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            assert!(
                t.consistently_rejected(window) || t.rejections < MIN_REJECTIONS,
                "window {window:?}: {t:?}"
            );
        }
    }

    #[test]
    fn too_few_rejections_are_not() {
        let mut t = Tally::default();
        t.record(true, secs(0));
        t.record(true, secs(59));
        assert!(!t.consistently_rejected(WINDOW));
    }
}
