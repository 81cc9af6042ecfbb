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
    fn rejects_five_field_cron() {
        assert!(parse_cron("0 3 * * *").unwrap_err().contains("6"));
        assert!(parse_cron("0 61 3 * * *").is_err());
    }
}
