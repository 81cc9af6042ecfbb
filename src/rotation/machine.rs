//! The rotation state machine: `(record, event, now) -> transition`, pure.
//!
//! A transition says whether the new record must be persisted (always
//! *before* the next side effect: that ordering is what makes a crash at any
//! instruction recoverable, I2/I5) and which single side effect comes next.
//! The driver performs it and feeds the outcome back as the next event.

use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use crate::store::{CredentialRecord, Rotation, SecretEntry};

#[derive(Debug, Clone)]
pub enum Event {
    /// Start a rotation with a fresh id. In any phase but idle this finishes
    /// the interrupted rotation instead (rotating "now" is idempotent).
    Begin { rid: String },
    /// Re-enter after a restart or an error: what is left to do?
    Resume,
    /// Secrets tagged with the rotation id (values lost in a crash) are gone.
    TaggedDeleted,
    /// The provider created the replacement and returned its value.
    Created { id: String, value: SecretString },
    /// A login with the pending secret succeeded.
    Verified,
    /// The provider definitively refuses the pending secret.
    VerifyRejected,
    /// The refused pending secret is deleted at the provider (or was gone).
    PendingDeleted,
    /// The grace period may have passed.
    GraceOver,
    /// The old secret is deleted at the provider (or was already gone).
    OldDeleted,
}

/// The next side effect, performed after persisting when asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing to do: the record is stable.
    Stable,
    /// List the provider's secrets and delete ours tagged with `rid`.
    DeleteTagged { rid: String },
    /// Create a secret tagged with `rid`.
    Create { rid: String },
    /// Log in with the pending secret (bounded retries for propagation).
    Verify,
    /// Delete the refused pending secret.
    DeletePending { id: String },
    /// Wait until the grace period is over.
    WaitUntil(SystemTime),
    /// Delete the old secret.
    DeleteOld { id: String },
}

#[derive(Debug, Clone)]
pub struct Transition {
    pub record: CredentialRecord,
    /// Write `record` (compare-and-swap) before performing `next`.
    pub persist: bool,
    pub next: Next,
    /// Something the operator should hear about (logged as a warning).
    pub warning: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("rotation event {event} does not apply in phase {phase}")]
pub struct InvalidEvent {
    pub phase: &'static str,
    pub event: &'static str,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Begin { .. } => "begin",
            Event::Resume => "resume",
            Event::TaggedDeleted => "tagged-deleted",
            Event::Created { .. } => "created",
            Event::Verified => "verified",
            Event::VerifyRejected => "verify-rejected",
            Event::PendingDeleted => "pending-deleted",
            Event::GraceOver => "grace-over",
            Event::OldDeleted => "old-deleted",
        }
    }
}

fn stay(record: &CredentialRecord, next: Next) -> Transition {
    Transition {
        record: record.clone(),
        persist: false,
        next,
        warning: None,
    }
}

fn persist(record: CredentialRecord, next: Next) -> Transition {
    Transition {
        record,
        persist: true,
        next,
        warning: None,
    }
}

/// The next step for `record` given `event`. `grace` is how long the old
/// secret outlives its replacement's promotion.
pub fn step(
    record: &CredentialRecord,
    event: Event,
    now: SystemTime,
    grace: Duration,
) -> Result<Transition, InvalidEvent> {
    let invalid = |event: &Event| InvalidEvent {
        phase: record.rotation.phase(),
        event: event.name(),
    };
    let t = match (&record.rotation, event) {
        (Rotation::Idle, Event::Begin { rid }) => {
            let mut next = record.clone();
            next.rotation = Rotation::Creating { rid: rid.clone() };
            // A fresh id cannot have tagged secrets yet: create directly.
            persist(next, Next::Create { rid })
        }
        (_, Event::Begin { .. }) | (_, Event::Resume) => resume(record, now),

        (Rotation::Creating { rid }, Event::TaggedDeleted) => {
            stay(record, Next::Create { rid: rid.clone() })
        }
        (Rotation::Creating { rid }, Event::Created { id, value }) => {
            let mut next = record.clone();
            next.rotation = Rotation::Created {
                rid: rid.clone(),
                pending: SecretEntry {
                    id: Some(id),
                    value,
                    created_at: now,
                },
            };
            persist(next, Next::Verify)
        }

        (Rotation::Created { rid, pending }, Event::Verified) => {
            // Config bounds grace; saturate anyway so a bad record cannot
            // make every resume panic.
            let delete_after = now
                .checked_add(grace)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400));
            let next = CredentialRecord {
                current: pending.clone(),
                rotation: Rotation::Promoted {
                    rid: rid.clone(),
                    old: record.current.clone(),
                    delete_after,
                },
                last_rotated_at: record.last_rotated_at,
            };
            persist(next, Next::WaitUntil(delete_after))
        }
        (Rotation::Created { pending, .. }, Event::VerifyRejected) => match &pending.id {
            Some(id) => stay(record, Next::DeletePending { id: id.clone() }),
            None => abort(record),
        },
        (Rotation::Created { .. }, Event::PendingDeleted) => abort(record),

        (Rotation::Promoted { .. }, Event::GraceOver) => resume(record, now),
        (Rotation::Promoted { .. }, Event::OldDeleted) => finish(record, now, None),

        (_, event) => return Err(invalid(&event)),
    };
    Ok(t)
}

/// What is left to do in the record's phase, e.g. after a restart.
fn resume(record: &CredentialRecord, now: SystemTime) -> Transition {
    match &record.rotation {
        Rotation::Idle => stay(record, Next::Stable),
        // The create call may have happened: remove what it may have made
        // (its value is lost) before creating again.
        Rotation::Creating { rid } => stay(record, Next::DeleteTagged { rid: rid.clone() }),
        Rotation::Created { .. } => stay(record, Next::Verify),
        Rotation::Promoted {
            old, delete_after, ..
        } => {
            if now < *delete_after {
                stay(record, Next::WaitUntil(*delete_after))
            } else {
                match &old.id {
                    Some(id) => stay(record, Next::DeleteOld { id: id.clone() }),
                    // I4: a secret whose id we were never told is not ours
                    // to find and delete.
                    None => finish(
                        record,
                        now,
                        Some(
                            "the previous secret's provider id is unknown (set initial_secret_id); it was left in place at the provider"
                                .to_string(),
                        ),
                    ),
                }
            }
        }
    }
}

fn finish(record: &CredentialRecord, now: SystemTime, warning: Option<String>) -> Transition {
    let next = CredentialRecord {
        current: record.current.clone(),
        rotation: Rotation::Idle,
        last_rotated_at: Some(now),
    };
    Transition {
        warning,
        ..persist(next, Next::Stable)
    }
}

/// Gives up the rotation and keeps the current secret.
fn abort(record: &CredentialRecord) -> Transition {
    let mut next = record.clone();
    next.rotation = Rotation::Idle;
    Transition {
        warning: Some(
            "the provider refused the new secret; rotation aborted, the current secret is kept"
                .to_string(),
        ),
        ..persist(next, Next::Stable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const GRACE: Duration = Duration::from_secs(30);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn idle() -> CredentialRecord {
        CredentialRecord::new(SecretEntry {
            id: Some("old".into()),
            value: SecretString::from("old-value"),
            created_at: t0(),
        })
    }

    #[test]
    fn happy_path_persists_before_every_effect() {
        let r = idle();
        let t = step(&r, Event::Begin { rid: "r1".into() }, t0(), GRACE).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.rotation.phase(), "creating");
        assert_eq!(t.next, Next::Create { rid: "r1".into() });

        let created = Event::Created {
            id: "new".into(),
            value: SecretString::from("new-value"),
        };
        let t = step(&t.record, created, t0(), GRACE).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Verify);
        assert_eq!(
            t.record.pending().unwrap().value.expose_secret(),
            "new-value"
        );
        assert_eq!(t.record.current.value.expose_secret(), "old-value");

        let t = step(&t.record, Event::Verified, t0(), GRACE).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.current.value.expose_secret(), "new-value");
        assert_eq!(t.next, Next::WaitUntil(t0() + GRACE));

        // Too early: keep waiting.
        let t = step(&t.record, Event::GraceOver, t0() + GRACE / 2, GRACE).unwrap();
        assert_eq!(t.next, Next::WaitUntil(t0() + GRACE));
        let t = step(&t.record, Event::GraceOver, t0() + GRACE, GRACE).unwrap();
        assert!(!t.persist);
        assert_eq!(t.next, Next::DeleteOld { id: "old".into() });

        let t = step(&t.record, Event::OldDeleted, t0() + GRACE, GRACE).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable);
        assert_eq!(t.record.rotation.phase(), "idle");
        assert_eq!(t.record.last_rotated_at, Some(t0() + GRACE));
    }

    #[test]
    fn resume_in_creating_cleans_up_tagged_secrets_first() {
        let mut r = idle();
        r.rotation = Rotation::Creating { rid: "r1".into() };
        let t = step(&r, Event::Resume, t0(), GRACE).unwrap();
        assert_eq!(t.next, Next::DeleteTagged { rid: "r1".into() });
        let t = step(&t.record, Event::TaggedDeleted, t0(), GRACE).unwrap();
        assert_eq!(t.next, Next::Create { rid: "r1".into() });
        // Begin while interrupted finishes the old rotation, same id.
        let t = step(&r, Event::Begin { rid: "r2".into() }, t0(), GRACE).unwrap();
        assert_eq!(t.next, Next::DeleteTagged { rid: "r1".into() });
    }

    #[test]
    fn rejected_pending_is_deleted_and_rotation_aborted() {
        let mut r = idle();
        r.rotation = Rotation::Created {
            rid: "r1".into(),
            pending: SecretEntry {
                id: Some("new".into()),
                value: SecretString::from("new-value"),
                created_at: t0(),
            },
        };
        let t = step(&r, Event::VerifyRejected, t0(), GRACE).unwrap();
        assert!(
            !t.persist,
            "delete first, then forget: a crash in between retries the delete"
        );
        assert_eq!(t.next, Next::DeletePending { id: "new".into() });
        let t = step(&t.record, Event::PendingDeleted, t0(), GRACE).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.rotation.phase(), "idle");
        assert_eq!(t.record.current.value.expose_secret(), "old-value");
        assert_eq!(t.record.last_rotated_at, None);
        assert!(t.warning.is_some());
    }

    #[test]
    fn unknown_old_id_is_kept_with_a_warning() {
        let mut r = idle();
        r.current.id = None;
        let t = step(&r, Event::Begin { rid: "r1".into() }, t0(), GRACE).unwrap();
        let t = step(
            &t.record,
            Event::Created {
                id: "new".into(),
                value: SecretString::from("v"),
            },
            t0(),
            GRACE,
        )
        .unwrap();
        let t = step(&t.record, Event::Verified, t0(), Duration::ZERO).unwrap();
        let t = step(&t.record, Event::GraceOver, t0(), Duration::ZERO).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable);
        assert!(t.warning.unwrap().contains("initial_secret_id"));
    }

    #[test]
    fn events_out_of_phase_are_refused() {
        let r = idle();
        assert!(step(&r, Event::Verified, t0(), GRACE).is_err());
        assert!(step(&r, Event::OldDeleted, t0(), GRACE).is_err());
        assert!(
            step(
                &r,
                Event::Created {
                    id: "x".into(),
                    value: SecretString::from("x")
                },
                t0(),
                GRACE
            )
            .is_err()
        );
    }
}
