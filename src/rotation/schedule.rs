//! When a rotation is due: a pure function of the trigger, the time of the
//! last rotation and now, on the wall clock (schedules are calendar times
//! and must survive restarts).
//!
//! Cron expressions have six fields with seconds first and are evaluated in
//! UTC, parsed by croner with the settings tokio-cron-scheduler uses.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};

use crate::config::RotationTrigger;

pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 6 {
        return Err(format!(
            "cron expression {expr:?} has {fields} fields; expected 6 (sec min hour day month weekday)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid cron expression {expr:?}: {e}"))
}

/// The first moment after `since` (the last rotation, or the bootstrap) at
/// which a rotation is due. A time in the past means "now": it fell due
/// while rekeyd was not running. `None`: never by schedule.
pub fn next_due(trigger: &RotationTrigger, since: SystemTime) -> Option<SystemTime> {
    match trigger {
        RotationTrigger::Every(interval) => Some(since + *interval),
        RotationTrigger::Schedule(expr) => {
            let cron = parse_cron(expr).ok()?;
            let since: DateTime<Utc> = since.into();
            cron.find_next_occurrence(&since, false)
                .ok()
                .map(SystemTime::from)
        }
        RotationTrigger::Manual => None,
    }
}

/// When a secret created at `created_at` reaches `max_age`
/// (`max_secret_age`): a rotation is due then, whatever the schedule.
/// `None` only when that lies beyond what the clock can represent.
pub fn aged_out(created_at: SystemTime, max_age: Duration) -> Option<SystemTime> {
    created_at.checked_add(max_age)
}

/// The default [`expiry_lead`] is at most this: a month leaves room for a
/// failing rotation to be noticed (the expiry warning, the alert) and fixed
/// by an operator before the secret stops working, even for Entra's default
/// two-year secrets.
pub const MAX_DEFAULT_EXPIRY_LEAD: Duration = Duration::from_secs(30 * 86400);

/// [`default_expiry_lead`] in words, for `rekeyd check`.
pub const DEFAULT_EXPIRY_LEAD_TEXT: &str = "a third of the secret's lifetime, at most 30 days";

/// How long before its provider-side expiry a secret created (or stored by
/// rekeyd) at `created_at` and expiring at `expires_at` is rotated when
/// `before_expiry` is not set: a third of its lifetime, at most
/// [`MAX_DEFAULT_EXPIRY_LEAD`]. A third, so that a secret of any lifetime
/// is used for most of it while a rotation that fails still has a third of
/// it to be retried (backoff reaches 10 minutes; a refusal that needs an
/// operator, 30) and fixed. The grace period plays no part: once the new
/// secret is promoted, the old one is only a fallback, and its expiry
/// during the grace period harms nothing.
pub fn default_expiry_lead(created_at: SystemTime, expires_at: SystemTime) -> Duration {
    (lifetime(created_at, expires_at) / 3).min(MAX_DEFAULT_EXPIRY_LEAD)
}

fn lifetime(created_at: SystemTime, expires_at: SystemTime) -> Duration {
    expires_at
        .duration_since(created_at)
        .unwrap_or(Duration::ZERO)
}

/// How long before `expires_at` the rotation of a secret is due:
/// `before_expiry` (`[credentials.rotation] before_expiry`) or else
/// [`default_expiry_lead`], and never more than half the secret's lifetime
/// as rekeyd knows it (from `created_at`, when rekeyd stored it): a
/// provider whose secrets live shorter than `before_expiry` would
/// otherwise make every new secret due the moment it is created, and
/// rekeyd would rotate without pause.
pub fn expiry_lead(
    created_at: SystemTime,
    expires_at: SystemTime,
    before_expiry: Option<Duration>,
) -> Duration {
    let lead = before_expiry.unwrap_or_else(|| default_expiry_lead(created_at, expires_at));
    lead.min(lifetime(created_at, expires_at) / 2)
}

/// When the rotation of a secret that the provider expires at
/// `expires_at` is due ([`expiry_lead`] before it), whatever the trigger.
pub fn expiry_due(
    created_at: SystemTime,
    expires_at: SystemTime,
    before_expiry: Option<Duration>,
) -> SystemTime {
    let lead = expiry_lead(created_at, expires_at, before_expiry);
    expires_at.checked_sub(lead).unwrap_or(expires_at)
}

/// How the current secret stands against its provider-side expiry, for the
/// warning in logs and `rekeyd status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryState {
    /// No expiry known, or not near.
    Fine,
    /// It expires at this time, and the rotation that should have replaced
    /// it by now has not (it fails, or rotation is not configured).
    Near(SystemTime),
    /// The provider's expiry has passed: logins with it fail
    /// (Entra `AADSTS7000222`).
    Expired(SystemTime),
}

/// Where the secret (created or stored at `created_at`, expiring at
/// `expires_at`) stands at `now`. With rotation configured (`rotates`:
/// `Some(before_expiry)`), the rotation is due [`expiry_lead`] before the
/// expiry, and rekeyd warns once half of that lead has passed without one:
/// a rotation that merely runs is not warned about, one that keeps failing
/// is, with half the lead left to fix it. Without rotation, an operator
/// must replace the secret by hand: rekeyd warns from
/// [`MAX_DEFAULT_EXPIRY_LEAD`] (30 days) before the expiry.
pub fn expiry_state(
    created_at: SystemTime,
    expires_at: Option<SystemTime>,
    rotates: Option<Option<Duration>>,
    now: SystemTime,
) -> ExpiryState {
    let Some(expires_at) = expires_at else {
        return ExpiryState::Fine;
    };
    if now >= expires_at {
        ExpiryState::Expired(expires_at)
    } else if now >= warn_from(created_at, expires_at, rotates) {
        ExpiryState::Near(expires_at)
    } else {
        ExpiryState::Fine
    }
}

/// When [`expiry_state`] changes next after `now` (the warning starts, the
/// secret expires), so that the schedule wakes then; `None`: not before the
/// record changes.
pub fn expiry_state_changes_at(
    created_at: SystemTime,
    expires_at: Option<SystemTime>,
    rotates: Option<Option<Duration>>,
    now: SystemTime,
) -> Option<SystemTime> {
    let expires_at = expires_at?;
    [warn_from(created_at, expires_at, rotates), expires_at]
        .into_iter()
        .find(|at| *at > now)
}

fn warn_from(
    created_at: SystemTime,
    expires_at: SystemTime,
    rotates: Option<Option<Duration>>,
) -> SystemTime {
    let lead = match rotates {
        Some(before_expiry) => expiry_lead(created_at, expires_at, before_expiry) / 2,
        None => MAX_DEFAULT_EXPIRY_LEAD,
    };
    expires_at.checked_sub(lead).unwrap_or(expires_at)
}

/// How long to wait from `now` until `due` (zero if already due).
pub fn wait_for(due: SystemTime, now: SystemTime) -> Duration {
    due.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn interval_counts_from_last_rotation() {
        let t = RotationTrigger::Every(Duration::from_secs(3600));
        assert_eq!(
            next_due(&t, at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T01:00:00Z"))
        );
    }

    #[test]
    fn cron_next_occurrence_in_utc() {
        let t = RotationTrigger::Schedule("0 0 3 * * *".into());
        assert_eq!(
            next_due(&t, at("2026-01-01T02:59:59Z")),
            Some(at("2026-01-01T03:00:00Z"))
        );
        // Exactly at an occurrence: the next one, not the same again.
        assert_eq!(
            next_due(&t, at("2026-01-01T03:00:00Z")),
            Some(at("2026-01-02T03:00:00Z"))
        );
    }

    #[test]
    fn missed_while_down_is_due_now() {
        let t = RotationTrigger::Schedule("0 0 3 * * *".into());
        let last = at("2026-01-01T03:00:00Z");
        let now = at("2026-01-05T12:00:00Z");
        let due = next_due(&t, last).unwrap();
        assert!(due < now);
        assert_eq!(wait_for(due, now), Duration::ZERO);
    }

    #[test]
    fn manual_is_never_due() {
        assert_eq!(next_due(&RotationTrigger::Manual, SystemTime::now()), None);
    }

    #[test]
    fn expiry_lead_defaults_to_a_third_of_the_lifetime_capped_at_30_days() {
        let day = Duration::from_secs(86400);
        let t0 = at("2026-01-01T00:00:00Z");
        // Entra's default two years: 30 days.
        assert_eq!(expiry_lead(t0, t0 + 730 * day, None), 30 * day);
        assert_eq!(expiry_due(t0, t0 + 730 * day, None), t0 + 700 * day);
        // Short-lived secrets: a third.
        assert_eq!(expiry_lead(t0, t0 + 30 * day, None), 10 * day);
        // Configured: as given, but at most half the lifetime, so that a
        // provider's short secrets cannot make rotations run back to back.
        assert_eq!(expiry_lead(t0, t0 + 730 * day, Some(7 * day)), 7 * day);
        assert_eq!(expiry_lead(t0, t0 + 10 * day, Some(30 * day)), 5 * day);
        // Stored after it expired: due at once.
        assert_eq!(expiry_due(t0, t0 - day, Some(day)), t0 - day);
    }

    #[test]
    fn expiry_warns_when_the_rotation_is_late_or_missing() {
        let day = Duration::from_secs(86400);
        let t0 = at("2026-01-01T00:00:00Z");
        let exp = Some(t0 + 90 * day);
        // Rotating with a 30-day lead (due at day 60): quiet until half the
        // lead is gone without a rotation.
        let rotates = Some(None);
        assert_eq!(
            expiry_state(t0, exp, rotates, t0 + 61 * day),
            ExpiryState::Fine
        );
        assert_eq!(
            expiry_state(t0, exp, rotates, t0 + 76 * day),
            ExpiryState::Near(t0 + 90 * day)
        );
        // Not rotating: from 30 days before it on.
        assert_eq!(
            expiry_state(t0, exp, None, t0 + 59 * day),
            ExpiryState::Fine
        );
        assert_eq!(
            expiry_state(t0, exp, None, t0 + 60 * day),
            ExpiryState::Near(t0 + 90 * day)
        );
        assert_eq!(
            expiry_state(t0, exp, None, t0 + 90 * day),
            ExpiryState::Expired(t0 + 90 * day)
        );
        assert_eq!(
            expiry_state(t0, None, None, t0 + 900 * day),
            ExpiryState::Fine
        );
        // The schedule wakes when the state changes.
        assert_eq!(
            expiry_state_changes_at(t0, exp, rotates, t0),
            Some(t0 + 75 * day)
        );
        assert_eq!(
            expiry_state_changes_at(t0, exp, None, t0 + 61 * day),
            Some(t0 + 90 * day)
        );
        assert_eq!(expiry_state_changes_at(t0, exp, None, t0 + 90 * day), None);
    }

    #[test]
    fn rejects_five_field_cron() {
        assert!(parse_cron("0 3 * * *").unwrap_err().contains("6"));
        assert!(parse_cron("0 61 3 * * *").is_err());
    }
}
