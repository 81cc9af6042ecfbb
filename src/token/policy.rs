//! When to refresh and how long to wait after a failure: pure functions of
//! durations and a random number in `[0, 1)`, so they are tested exactly.

use std::time::Duration;

use crate::provider::ErrorKind;

/// Keeps a provider answering `expires_in: 0` from causing a hot loop. Kept
/// this small on purpose: demos and tests use lifetimes of a few seconds.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// Shortest wait between two failed attempts (full jitter can draw zero).
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
struct Backoff {
    base: Duration,
    max: Duration,
}

/// Network errors, 5xx, garbage: retry soon, up to 5 minutes apart.
const TRANSIENT: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(300),
};
/// Quotas recover on the provider's schedule, not ours: wait longer.
const QUOTA: Backoff = Backoff {
    base: Duration::from_secs(30),
    max: Duration::from_secs(1800),
};
/// A rejected secret or refused request needs a human or a rotation
/// elsewhere; keep trying, slowly.
const REJECTED: Backoff = Backoff {
    base: Duration::from_secs(10),
    max: Duration::from_secs(300),
};

#[derive(Debug, Clone, Copy, Default)]
pub struct RefreshPolicy {
    /// Refresh this long before expiry; `None`: at 70-80% of the lifetime.
    pub before_expiry: Option<Duration>,
}

impl RefreshPolicy {
    /// How long after receiving a token of `lifetime` to refresh it.
    /// `unit` is uniform in `[0, 1)` and spreads refreshes of many
    /// credentials (and replicas) apart.
    pub fn refresh_delay(&self, lifetime: Duration, unit: f64) -> Duration {
        let by_fraction = || lifetime.mul_f64(0.70 + 0.10 * unit);
        let delay = match self.before_expiry {
            // Jitter makes the refresh up to 10% earlier than asked, never later.
            Some(before) => {
                let before = before.mul_f64(1.0 + 0.10 * unit);
                if !before.is_zero() && before < lifetime {
                    lifetime - before
                } else {
                    // The token lives shorter than the configured margin.
                    by_fraction()
                }
            }
            None => by_fraction(),
        };
        delay.max(MIN_REFRESH_DELAY)
    }
}

/// Delay before the next attempt after `failures` consecutive failures
/// (1 for the first), with full jitter. `time_left` is the remaining life of
/// the token being served: the retry never waits past its expiry (I8).
pub fn retry_delay(
    failures: u32,
    kind: ErrorKind,
    retry_after: Option<Duration>,
    time_left: Option<Duration>,
    unit: f64,
) -> Duration {
    let backoff = match kind {
        ErrorKind::Transient => TRANSIENT,
        ErrorKind::Quota => QUOTA,
        ErrorKind::Rejected | ErrorKind::Refused => REJECTED,
    };
    let exp = failures.saturating_sub(1).min(20);
    let cap = backoff.base.saturating_mul(1 << exp).min(backoff.max);
    let mut delay = cap.mul_f64(unit).max(MIN_RETRY_DELAY);
    if let Some(retry_after) = retry_after {
        delay = delay.max(retry_after.min(backoff.max));
    }
    if let Some(left) = time_left.filter(|l| !l.is_zero()) {
        // Leave a moment before expiry for the request itself.
        let latest = left.saturating_sub(left.min(Duration::from_secs(1)) / 2);
        delay = delay.min(latest);
    }
    delay.max(MIN_RETRY_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn default_refresh_is_between_70_and_80_percent() {
        let p = RefreshPolicy::default();
        assert_eq!(p.refresh_delay(S(100), 0.0), S(70));
        assert_eq!(p.refresh_delay(S(100), 0.5), S(75));
        assert!(p.refresh_delay(S(100), 0.999) < S(80));
    }

    #[test]
    fn before_expiry_is_jittered_earlier_only() {
        let p = RefreshPolicy {
            before_expiry: Some(S(300)),
        };
        assert_eq!(p.refresh_delay(S(3600), 0.0), S(3300));
        assert_eq!(p.refresh_delay(S(3600), 0.5), S(3285));
        // Lifetime shorter than the margin falls back to the fraction.
        assert_eq!(p.refresh_delay(S(200), 0.0), S(140));
    }

    #[test]
    fn zero_lifetime_is_floored() {
        let p = RefreshPolicy::default();
        assert_eq!(p.refresh_delay(Duration::ZERO, 0.3), MIN_REFRESH_DELAY);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let t = ErrorKind::Transient;
        assert_eq!(retry_delay(1, t, None, None, 0.999_999).as_secs(), 0);
        assert_eq!(retry_delay(3, t, None, None, 0.999_999).as_secs(), 3);
        assert_eq!(retry_delay(30, t, None, None, 0.999_999).as_secs(), 299);
        assert_eq!(retry_delay(1, t, None, None, 0.0), MIN_RETRY_DELAY);
    }

    #[test]
    fn quota_honours_retry_after_and_waits_longer() {
        let d = retry_delay(1, ErrorKind::Quota, Some(S(600)), None, 0.0);
        assert_eq!(d, S(600));
        let d = retry_delay(2, ErrorKind::Quota, None, None, 0.99);
        assert!(d > S(50), "{d:?}");
    }

    #[test]
    fn never_waits_past_expiry() {
        let d = retry_delay(10, ErrorKind::Transient, None, Some(S(20)), 0.99);
        assert!(d < S(20), "{d:?}");
        let d = retry_delay(1, ErrorKind::Quota, Some(S(900)), Some(S(60)), 0.5);
        assert!(d < S(60), "{d:?}");
    }

    proptest! {
        #[test]
        fn retry_is_bounded(failures in 1u32..100, unit in 0.0f64..1.0, left in proptest::option::of(0u64..100_000)) {
            let left = left.map(Duration::from_millis);
            for kind in [ErrorKind::Transient, ErrorKind::Quota, ErrorKind::Rejected, ErrorKind::Refused] {
                let d = retry_delay(failures, kind, None, left, unit);
                prop_assert!(d >= MIN_RETRY_DELAY);
                prop_assert!(d <= Duration::from_secs(1800));
                if let Some(left) = left.filter(|l| *l > MIN_RETRY_DELAY) {
                    prop_assert!(d < left);
                }
            }
        }

        #[test]
        fn refresh_is_before_expiry(lifetime in 2u64..1_000_000, unit in 0.0f64..1.0, before in proptest::option::of(0u64..1_000_000)) {
            let p = RefreshPolicy { before_expiry: before.map(Duration::from_secs) };
            let d = p.refresh_delay(Duration::from_secs(lifetime), unit);
            prop_assert!(d >= MIN_REFRESH_DELAY);
            prop_assert!(d < Duration::from_secs(lifetime));
        }
    }
}
