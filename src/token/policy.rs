//! When to refresh and how long to wait after a failure: pure functions of
//! durations and a random number in `[0, 1)`, so they are tested exactly.
//!
//! Retries are spread with full jitter at every point of a token's life
//! (AWS Architecture Blog, "Exponential Backoff And Jitter"): many
//! credentials on one endpoint that fail together must not come back
//! together, neither while their tokens are still valid (I8 keeps each retry
//! before the served token's expiry: drawn within the time left, never
//! clamped to one common instant) nor once the tokens are gone.
//!
//! In the last seconds of a token's life ([`MIN_RETRY_WINDOW`] plus
//! [`EXPIRY_MARGIN`]) the time left no longer bounds the draw: redrawing
//! within an ever shorter window would pack each credential's retries into
//! the moments before expiry (their density grows as one over the time
//! left), and credentials whose tokens expire together would burst there.
//! From then on the retry follows the rules for a credential without a
//! token, which bound it ([`NO_TOKEN_MAX_RETRY`]) without a common point.

use std::time::Duration;

use crate::provider::ErrorKind;

/// Keeps a provider answering `expires_in: 0` from causing a hot loop. Kept
/// this small on purpose: demos and tests use lifetimes of a few seconds.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// Shortest wait between two failed attempts. Retries are drawn uniformly
/// from this floor up, so no share of them piles up on the floor itself.
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Longest wait after a transient failure (network, timeout, 5xx) while no
/// valid token is served: applications have nothing until a login
/// succeeds, so a credential is ready again at most this long after its
/// provider is (plus the request). Full jitter, so on average half of it;
/// with thousands of credentials that is still at most one attempt per
/// credential every 15 s on average against a provider that is down.
pub const NO_TOKEN_MAX_RETRY: Duration = Duration::from_secs(30);
/// Time kept free before the served token expires for the retry's request
/// itself.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(1);
/// The shortest window (time left less [`EXPIRY_MARGIN`]) a retry is drawn
/// within; with less, the token counts as gone for planning (3 s before
/// expiry with the margin). See the module documentation.
pub const MIN_RETRY_WINDOW: Duration = Duration::from_secs(2);
/// A `Retry-After` is honoured, then spread by up to a tenth of itself (at
/// most this much): clients a provider told the same thing at the same
/// moment would otherwise all return at one instant.
pub const RETRY_AFTER_MAX_SPREAD: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// The jitter range after `failures` consecutive failures (1 for the
    /// first): `base * 2^(failures-1)`, at most `max`.
    fn cap(self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.base.saturating_mul(1 << exp).min(self.max)
    }
}

/// Network errors, 5xx, garbage: retry soon, up to 5 minutes apart while a
/// valid token is served ([`NO_TOKEN_MAX_RETRY`] once none is).
const TRANSIENT: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(300),
};
/// Quotas recover on the provider's schedule, not ours: wait longer (Mappls
/// counts requests per hour and per day; hammering only burns the next
/// window's quota).
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
/// (1 for the first of a run), drawn with full jitter from `unit`, uniform
/// in `[0, 1)`.
///
/// - `kind` picks the backoff: transient 1 s doubling to 5 min, quota 30 s
///   doubling to 30 min, rejected or refused 10 s doubling to 5 min.
/// - `time_left` is the remaining life of the token being served (`None` or
///   zero: none is valid). While it exceeds [`MIN_RETRY_WINDOW`] plus
///   [`EXPIRY_MARGIN`] (3 s), every retry falls before its expiry (I8),
///   drawn uniformly within the time left less the margin when the backoff
///   is longer; with less left, or none, a transient failure is retried
///   within [`NO_TOKEN_MAX_RETRY`].
/// - `retry_after` (the reply's `Retry-After`, RFC 9110 §10.2.3) is waited
///   for, up to the kind's longest backoff, plus a spread of up to a tenth
///   of it; only a served token about to expire comes first (I8), and then
///   the retry falls in the last part of its life.
///
/// The result is at least [`MIN_RETRY_DELAY`], and shorter than `time_left`
/// whenever `time_left` is at least 3 s.
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
    let mut cap = backoff.cap(failures);
    // The request needs a moment before expiry to complete.
    let window = time_left
        .and_then(|left| left.checked_sub(EXPIRY_MARGIN))
        .filter(|w| *w >= MIN_RETRY_WINDOW);
    if window.is_none() && kind == ErrorKind::Transient {
        // Nothing is served (or only for a last moment) until a login
        // succeeds: be back soon after the provider is. Quota and rejected secrets keep their slow pace: a
        // quota returns on the provider's schedule, a rejected secret needs
        // an operator (who can ask for a refresh at once).
        cap = cap.min(NO_TOKEN_MAX_RETRY);
    }
    // Full jitter over the backoff, or over the time left if shorter: never
    // one clamp point (the expiry) that every credential would share.
    let span = window.map_or(cap, |w| cap.min(w));
    let jittered = uniform(MIN_RETRY_DELAY, span, unit);
    let Some(retry_after) = retry_after else {
        return jittered;
    };
    let earliest = retry_after.min(backoff.max);
    let spread = (earliest / 10).min(RETRY_AFTER_MAX_SPREAD);
    let honoured = jittered.max(earliest + spread.mul_f64(unit));
    match window {
        Some(w) if honoured >= w => {
            // Waiting as asked would outlast the served token (I8 wins):
            // after `Retry-After` if it falls before the expiry, else in the
            // second half of the time left; spread either way.
            let from = if earliest < w { earliest } else { w / 2 };
            uniform(from.max(MIN_RETRY_DELAY), w, unit)
        }
        _ => honoured.max(MIN_RETRY_DELAY),
    }
}

/// `from + (to - from) * unit`: uniform in `[from, to)` for `unit` in
/// `[0, 1)`; `from` when `to <= from`.
fn uniform(from: Duration, to: Duration, unit: f64) -> Duration {
    from + to.saturating_sub(from).mul_f64(unit)
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

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const HOUR: Option<Duration> = Some(Duration::from_secs(3600));
    const T: ErrorKind = ErrorKind::Transient;
    const KINDS: [ErrorKind; 4] = [
        ErrorKind::Transient,
        ErrorKind::Quota,
        ErrorKind::Rejected,
        ErrorKind::Refused,
    ];

    #[test]
    fn backoff_grows_and_caps_while_a_token_is_served() {
        // Uniform in [250 ms, cap): cap 1 s, 4 s, then 5 min.
        assert_eq!(retry_delay(1, T, None, HOUR, 0.0), MIN_RETRY_DELAY);
        assert_eq!(retry_delay(1, T, None, HOUR, 0.5), MS(625));
        assert_eq!(retry_delay(3, T, None, HOUR, 0.5), MS(2125));
        assert_eq!(retry_delay(30, T, None, HOUR, 0.5), MS(150_125));
        assert!(retry_delay(30, T, None, HOUR, 0.999_999) < S(300));
    }

    #[test]
    fn without_a_valid_token_transient_retries_stay_within_the_bound() {
        for left in [None, Some(Duration::ZERO)] {
            assert_eq!(retry_delay(1, T, None, left, 0.5), MS(625));
            // 5 min would be the cap; 30 s is, with nothing served.
            assert_eq!(retry_delay(30, T, None, left, 0.5), MS(15_125));
            assert!(retry_delay(30, T, None, left, 0.999_999) < NO_TOKEN_MAX_RETRY);
        }
        // Quota and rejected secrets keep their slow pace.
        let quota = retry_delay(3, ErrorKind::Quota, None, None, 0.5);
        assert_eq!(quota, MS(60_125));
        let rejected = retry_delay(10, ErrorKind::Rejected, None, None, 0.5);
        assert_eq!(rejected, MS(150_125));
    }

    #[test]
    fn near_expiry_retries_spread_over_the_time_left() {
        // 20 s left, 1 s kept for the request: uniform in [250 ms, 19 s).
        let left = Some(S(20));
        assert_eq!(retry_delay(10, T, None, left, 0.0), MIN_RETRY_DELAY);
        assert_eq!(retry_delay(10, T, None, left, 0.5), MS(9_625));
        assert!(retry_delay(10, T, None, left, 0.999_999) < S(19));
        // Three seconds left: the window is still 2 s.
        assert_eq!(retry_delay(10, T, None, Some(S(3)), 0.5), MS(1_125));
        // Less: the token counts as gone, and the no-token bound applies
        // (30 s here) instead of ever shorter draws just before expiry.
        for left in [MS(2_999), S(1), MS(300)] {
            assert_eq!(retry_delay(10, T, None, Some(left), 0.5), MS(15_125));
            assert_eq!(retry_delay(1, T, None, Some(left), 0.5), MS(625));
        }
        // A quota error with a Retry-After past the expiry: I8 wins, and
        // the retry falls in the second half of the time left.
        let q = ErrorKind::Quota;
        let left = Some(S(60));
        assert_eq!(retry_delay(1, q, Some(S(900)), left, 0.0), MS(29_500));
        assert_eq!(retry_delay(1, q, Some(S(900)), left, 0.5), MS(44_250));
        assert!(retry_delay(1, q, Some(S(900)), left, 0.999_999) < S(59));
        // A Retry-After just before the expiry is honoured, its spread cut
        // short by the expiry.
        assert_eq!(retry_delay(1, q, Some(S(58)), left, 0.5), MS(58_500));
    }

    #[test]
    fn no_common_clamp_point_at_any_time_left() {
        // Whatever the time left, different draws give different delays:
        // credentials failing together do not come back together.
        for left_ms in [100, 800, 1_500, 3_000, 5_000, 20_000, 120_000, 3_600_000] {
            for failures in [1, 5, 20] {
                for retry_after in [None, Some(S(900))] {
                    let delays: Vec<Duration> = (0..100)
                        .map(|i| {
                            let unit = f64::from(i) / 100.0;
                            retry_delay(failures, T, retry_after, Some(MS(left_ms)), unit)
                        })
                        .collect();
                    assert!(
                        delays.windows(2).all(|w| w[0] < w[1]),
                        "left {left_ms} ms, failures {failures}: {delays:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn quota_honours_retry_after_and_spreads_it() {
        let q = ErrorKind::Quota;
        // 120 s asked; the jittered backoff (below 60 s) is shorter.
        assert_eq!(retry_delay(2, q, Some(S(120)), None, 0.0), S(120));
        assert_eq!(retry_delay(2, q, Some(S(120)), None, 0.5), S(126));
        assert_eq!(retry_delay(1, q, Some(S(600)), None, 0.0), S(600));
        // Spread by at most 30 s.
        assert_eq!(retry_delay(1, q, Some(S(1200)), None, 0.5), S(1215));
        // Without Retry-After: the quota backoff (30 s on the first failure).
        let d = retry_delay(2, q, None, None, 0.99);
        assert!(d > S(50), "{d:?}");
        // A transient failure's Retry-After counts up to 5 min, even with
        // no token served (the provider says when it will be back).
        assert_eq!(retry_delay(1, T, Some(S(3600)), None, 0.0), S(300));
        assert_eq!(retry_delay(1, T, Some(S(60)), None, 0.0), S(60));
    }

    proptest! {
        #[test]
        fn retry_is_bounded(
            failures in 1u32..100,
            unit in 0.0f64..1.0,
            left in proptest::option::of(0u64..100_000_000),
            retry_after in proptest::option::of(0u64..100_000),
        ) {
            let left = left.map(Duration::from_millis);
            let retry_after = retry_after.map(Duration::from_secs);
            let served = left.filter(|l| !l.is_zero());
            for kind in KINDS {
                let d = retry_delay(failures, kind, retry_after, left, unit);
                prop_assert!(d >= MIN_RETRY_DELAY);
                prop_assert!(d <= Duration::from_secs(1800) + RETRY_AFTER_MAX_SPREAD);
                // I8: never past the served token's expiry while it has
                // more than the last few seconds to live.
                let planned = served.filter(|l| *l >= MIN_RETRY_WINDOW + EXPIRY_MARGIN);
                if let Some(left) = planned {
                    prop_assert!(d < left, "{d:?} for {left:?} left");
                }
                // The bound once nothing is served (or about to be).
                if planned.is_none() && kind == ErrorKind::Transient && retry_after.is_none() {
                    prop_assert!(d < NO_TOKEN_MAX_RETRY);
                }
                // Retry-After is honoured unless the served token expires
                // first.
                if let Some(ra) = retry_after {
                    let longest = if kind == ErrorKind::Quota { 1800 } else { 300 };
                    let ra = ra.min(Duration::from_secs(longest));
                    if served.is_none_or(|l| ra + ra / 10 + EXPIRY_MARGIN < l) {
                        prop_assert!(d >= ra, "{d:?} before Retry-After {ra:?}");
                    }
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
