//! The rotation state machine: `(record, event, context) -> transition`,
//! pure.
//!
//! A transition says whether the new record must be persisted (always
//! *before* the next side effect: that ordering is what makes a crash at any
//! instruction recoverable, I2/I5) and which single side effect comes next.
//! The driver performs it and feeds the outcome back as the next event.
//!
//! With more than one actor (replicas, `rekeyd rotate`, `set-secret`), the
//! persist before a destructive step is also its licence (DESIGN.md S1): a
//! delete only follows a compare-and-swap this actor just made, recording
//! exactly what the delete carries out. An actor whose swap fails re-reads
//! and asks the machine again; it never acts on a record it did not write.

use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use super::parse_tag;
use crate::provider::RemoteSecret;
use crate::store::{CredentialRecord, RetiredSecret, Rotation, SecretEntry};

/// A tagged secret that the journal does not name is swept (S7) only once
/// it is this old, so that a create whose reply is still on its way is not
/// raced for nothing (its actor's swap would fail anyway, S1).
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Clone)]
pub enum Event {
    /// Start a rotation with fresh ids. With unfinished work in the journal
    /// this finishes that instead (rotating "now" is idempotent).
    Begin { rid: String, attempt: String },
    /// Re-enter after a restart, an error or a lost compare-and-swap: what
    /// is left to do? `attempt` is a fresh attempt id, used when the journal
    /// is in `creating` (S2).
    Resume { attempt: String },
    /// Secrets of earlier attempts of the rotation (values lost) are gone.
    TaggedDeleted,
    /// The provider created the replacement and returned its value.
    Created { id: String, value: SecretString },
    /// A login with the pending secret succeeded.
    Verified,
    /// The provider consistently refuses the pending secret.
    VerifyRejected,
    /// After the grace period, the promoted secret still logs in.
    CurrentVerified,
    /// After the grace period, the provider consistently refuses the promoted
    /// secret (revoked, or a provider that flapped): the old one comes back.
    CurrentRejected,
    /// The grace period may have passed.
    GraceOver,
    /// The provider's list of secrets, to check what is ours before deleting.
    Listed { secrets: Vec<RemoteSecret> },
    /// The licensed deletes are done (404 counts as done).
    RetireDeleted,
}

/// The next side effect, performed after persisting when asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing to do: the record is stable.
    Stable,
    /// List the provider's secrets and delete ours tagged with `rid` but not
    /// with attempt `keep` (S2).
    DeleteTagged { rid: String, keep: String },
    /// Create a secret tagged with `rid` and `attempt`.
    Create { rid: String, attempt: String },
    /// Log in with the pending secret (bounded retries for propagation).
    Verify,
    /// Wait until the grace period is over.
    WaitUntil(SystemTime),
    /// Log in with the promoted secret once more before the old one goes.
    VerifyCurrent,
    /// List the provider's secrets (S7: check what is ours, find orphans).
    List,
    /// Delete these ids at the provider; the persisted record licenses it.
    Delete { ids: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Transition {
    pub record: CredentialRecord,
    /// Write `record` (compare-and-swap) before performing `next`.
    pub persist: bool,
    pub next: Next,
    /// Something the operator should hear about (logged as a warning).
    pub warnings: Vec<String>,
}

/// What the machine needs besides the record and the event.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub now: SystemTime,
    /// How long the old secret outlives its replacement's promotion.
    pub grace: Duration,
    /// The credential's name (the tags name it).
    pub credential: &'a str,
    /// The OAuth2 client whose secrets these are (S7).
    pub client_id: &'a str,
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
            Event::Resume { .. } => "resume",
            Event::TaggedDeleted => "tagged-deleted",
            Event::Created { .. } => "created",
            Event::Verified => "verified",
            Event::VerifyRejected => "verify-rejected",
            Event::CurrentVerified => "current-verified",
            Event::CurrentRejected => "current-rejected",
            Event::GraceOver => "grace-over",
            Event::Listed { .. } => "listed",
            Event::RetireDeleted => "retire-deleted",
        }
    }
}

fn stay(record: &CredentialRecord, next: Next) -> Transition {
    Transition {
        record: record.clone(),
        persist: false,
        next,
        warnings: Vec::new(),
    }
}

fn persist(record: CredentialRecord, next: Next) -> Transition {
    Transition {
        record,
        persist: true,
        next,
        warnings: Vec::new(),
    }
}

fn warned(t: Transition, warning: impl Into<String>) -> Transition {
    let mut t = t;
    t.warnings.push(warning.into());
    t
}

/// The next step for `record` given `event`.
pub fn step(
    record: &CredentialRecord,
    event: Event,
    ctx: &Context<'_>,
) -> Result<Transition, InvalidEvent> {
    let invalid = |event: &Event| InvalidEvent {
        phase: record.rotation.phase(),
        event: event.name(),
    };
    let t = match (&record.rotation, event) {
        (Rotation::Idle, Event::Begin { rid, attempt }) if record.retire.is_empty() => {
            let mut next = record.clone();
            next.rotation = Rotation::Creating {
                rid: rid.clone(),
                attempt: attempt.clone(),
            };
            // A fresh id cannot have tagged secrets yet: create directly.
            persist(next, Next::Create { rid, attempt })
        }
        (_, Event::Begin { attempt, .. }) | (_, Event::Resume { attempt }) => {
            resume(record, &attempt, ctx)
        }

        (Rotation::Creating { rid, attempt }, Event::TaggedDeleted) => stay(
            record,
            Next::Create {
                rid: rid.clone(),
                attempt: attempt.clone(),
            },
        ),
        (Rotation::Creating { rid, .. }, Event::Created { id, value }) => {
            let mut next = record.clone();
            next.rotation = Rotation::Created {
                rid: rid.clone(),
                pending: SecretEntry {
                    id: Some(id),
                    value,
                    created_at: ctx.now,
                },
            };
            persist(next, Next::Verify)
        }

        (Rotation::Created { rid, pending }, Event::Verified) => {
            // Config bounds grace; saturate anyway so a bad record cannot
            // make every resume panic.
            let delete_after = ctx
                .now
                .checked_add(ctx.grace)
                .unwrap_or_else(|| ctx.now + Duration::from_secs(100 * 365 * 86400));
            let next = CredentialRecord {
                current: pending.clone(),
                rotation: Rotation::Promoted {
                    rid: rid.clone(),
                    old: record.current.clone(),
                    delete_after,
                },
                ..record.clone()
            };
            persist(next, Next::WaitUntil(delete_after))
        }
        (Rotation::Created { pending, .. }, Event::VerifyRejected) => {
            // Forget the refused secret and commit to deleting it in one
            // write: the write licenses the delete (S1).
            let mut next = record.clone();
            next.rotation = Rotation::Idle;
            retire_entry(&mut next, pending);
            warned(
                persist(next, Next::List),
                "the provider refused the new secret; rotation aborted, the current secret is kept",
            )
        }

        (Rotation::Promoted { .. }, Event::GraceOver) => resume(record, "", ctx),
        (Rotation::Promoted { old, .. }, Event::CurrentVerified) => {
            let mut next = record.clone();
            next.rotation = Rotation::Idle;
            next.last_rotated_at = Some(ctx.now);
            let warnings = retire_entry(&mut next, old);
            Transition {
                warnings,
                ..persist(next, Next::List)
            }
        }
        (Rotation::Promoted { old, .. }, Event::CurrentRejected) => {
            // S5: the old secret is still valid at the provider; it becomes
            // current again and the refused one is retired.
            let mut next = record.clone();
            next.current = old.clone();
            next.rotation = Rotation::Idle;
            retire_entry(&mut next, &record.current);
            warned(
                persist(next, Next::List),
                "the provider refuses the new secret after its promotion; the previous secret is current again and the rotation is aborted",
            )
        }

        (Rotation::Idle, Event::Listed { secrets }) => plan_retire(record, &secrets, ctx),
        (Rotation::Idle, Event::RetireDeleted) => {
            let mut next = record.clone();
            let done = std::mem::take(&mut next.retire);
            next.remember_retired(done);
            persist(next, Next::Stable)
        }

        (_, event) => return Err(invalid(&event)),
    };
    Ok(t)
}

/// What is left to do in the record's phase, e.g. after a restart.
fn resume(record: &CredentialRecord, attempt: &str, ctx: &Context<'_>) -> Transition {
    match &record.rotation {
        Rotation::Idle if record.retire.is_empty() => stay(record, Next::Stable),
        // Check the listing before deleting what a previous run committed to.
        Rotation::Idle => stay(record, Next::List),
        // The create call may have happened, in this attempt or an earlier
        // one. S2: record a fresh attempt first; only if that write wins do
        // we delete the earlier attempts' secrets (their values were never
        // persisted, or the write would have failed) and create again.
        Rotation::Creating { rid, .. } => {
            let mut next = record.clone();
            next.rotation = Rotation::Creating {
                rid: rid.clone(),
                attempt: attempt.to_string(),
            };
            persist(
                next,
                Next::DeleteTagged {
                    rid: rid.clone(),
                    keep: attempt.to_string(),
                },
            )
        }
        Rotation::Created { .. } => stay(record, Next::Verify),
        Rotation::Promoted { delete_after, .. } if ctx.now < *delete_after => {
            stay(record, Next::WaitUntil(*delete_after))
        }
        Rotation::Promoted { .. } => stay(record, Next::VerifyCurrent),
    }
}

/// Moves `entry` into the retire list, or, without a provider id, straight
/// into the history with a warning: I4, a secret whose id we were never
/// told is not ours to find and delete.
fn retire_entry(record: &mut CredentialRecord, entry: &SecretEntry) -> Vec<String> {
    let retired = RetiredSecret::of(entry);
    if retired.id.is_some() {
        record.retire.push(retired);
        Vec::new()
    } else {
        record.remember_retired([retired]);
        vec!["the previous secret's provider id is unknown (set initial_secret_id); it was left in place at the provider".to_string()]
    }
}

/// Decides from the provider's listing which retire entries may be deleted
/// and which orphans to sweep (S7), and licenses those deletes with one
/// write (S1).
fn plan_retire(
    record: &CredentialRecord,
    listed: &[RemoteSecret],
    ctx: &Context<'_>,
) -> Transition {
    let mut next = record.clone();
    let mut warnings = Vec::new();
    let mut keep = Vec::new();
    let mut gone = Vec::new();
    for entry in std::mem::take(&mut next.retire) {
        let id = entry.id.as_deref().unwrap_or_default();
        match listed.iter().find(|s| s.id == id) {
            // A lagging list may not show it yet; if it is ours and exists
            // after all, the next sweep finds it by its tag.
            None => gone.push(entry),
            Some(s) if is_this_clients(s, ctx) => keep.push(entry),
            Some(s) => {
                warnings.push(format!(
                    "secret {id} is not known to belong to client {} (the provider lists it {}); it is kept and forgotten",
                    ctx.client_id,
                    match &s.client_id {
                        Some(other) => format!("for client {other}"),
                        None => "without a client and without our tag".to_string(),
                    }
                ));
                gone.push(entry);
            }
        }
    }
    // S7: this client's secrets tagged for this credential that the journal
    // does not name come from lost create replies or lists that lagged.
    let named: Vec<String> = [Some(&record.current)]
        .into_iter()
        .flatten()
        .chain(record.pending())
        .chain(record.rotation.old())
        .filter_map(|e| e.id.clone())
        .chain(keep.iter().filter_map(|r| r.id.clone()))
        .collect();
    for s in listed {
        let tagged = parse_tag(ctx.credential, &s.description).is_some();
        let old_enough = s
            .created_at
            .is_none_or(|at| ctx.now.duration_since(at).unwrap_or_default() >= SWEEP_MIN_AGE);
        let this_client = s.client_id.as_deref().is_none_or(|c| c == ctx.client_id);
        if tagged && this_client && old_enough && !named.contains(&s.id) {
            warnings.push(format!(
                "secret {} is tagged for this credential but untracked (a lost reply or a lagging list); deleting it",
                s.id
            ));
            keep.push(RetiredSecret {
                id: Some(s.id.clone()),
                sha256: None,
            });
        }
    }
    next.remember_retired(gone);
    next.retire = keep;
    let ids: Vec<String> = next.retire.iter().filter_map(|r| r.id.clone()).collect();
    let t = if ids.is_empty() {
        // Nothing to delete: persist only if entries were dropped.
        if next.retire.len() == record.retire.len() && next.retired.len() == record.retired.len() {
            stay(record, Next::Stable)
        } else {
            persist(next, Next::Stable)
        }
    } else {
        // Always written, even when unchanged: this write is the licence
        // for the deletes that follow (S1).
        persist(next, Next::Delete { ids })
    };
    Transition { warnings, ..t }
}

/// S7: a listed secret is this client's when the provider says so, or, when
/// it does not say, when the secret carries our tag.
fn is_this_clients(s: &RemoteSecret, ctx: &Context<'_>) -> bool {
    match &s.client_id {
        Some(c) => c == ctx.client_id,
        None => parse_tag(ctx.credential, &s.description).is_some(),
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

    fn ctx(now: SystemTime) -> Context<'static> {
        Context {
            now,
            grace: GRACE,
            credential: "maps",
            client_id: "client",
        }
    }

    fn idle() -> CredentialRecord {
        CredentialRecord::new(SecretEntry {
            id: Some("old".into()),
            value: SecretString::from("old-value"),
            created_at: t0(),
        })
    }

    fn listed(id: &str, description: &str, client: Option<&str>) -> RemoteSecret {
        RemoteSecret {
            id: id.into(),
            description: description.into(),
            client_id: client.map(Into::into),
            created_at: Some(t0()),
        }
    }

    fn begin() -> Event {
        Event::Begin {
            rid: "r1".into(),
            attempt: "a1".into(),
        }
    }

    #[test]
    fn happy_path_persists_before_every_effect() {
        let r = idle();
        let t = step(&r, begin(), &ctx(t0())).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.rotation.phase(), "creating");
        assert_eq!(
            t.next,
            Next::Create {
                rid: "r1".into(),
                attempt: "a1".into()
            }
        );

        let created = Event::Created {
            id: "new".into(),
            value: SecretString::from("new-value"),
        };
        let t = step(&t.record, created, &ctx(t0())).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Verify);
        assert_eq!(
            t.record.pending().unwrap().value.expose_secret(),
            "new-value"
        );
        assert_eq!(t.record.current.value.expose_secret(), "old-value");

        let t = step(&t.record, Event::Verified, &ctx(t0())).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.current.value.expose_secret(), "new-value");
        assert_eq!(t.next, Next::WaitUntil(t0() + GRACE));

        // Too early: keep waiting.
        let t = step(&t.record, Event::GraceOver, &ctx(t0() + GRACE / 2)).unwrap();
        assert_eq!(t.next, Next::WaitUntil(t0() + GRACE));
        // After the grace: prove the new secret once more first.
        let t = step(&t.record, Event::GraceOver, &ctx(t0() + GRACE)).unwrap();
        assert!(!t.persist);
        assert_eq!(t.next, Next::VerifyCurrent);

        let t = step(&t.record, Event::CurrentVerified, &ctx(t0() + GRACE)).unwrap();
        assert!(t.persist, "the write that licenses the delete");
        assert_eq!(t.next, Next::List);
        assert_eq!(t.record.rotation.phase(), "idle");
        assert_eq!(t.record.retire[0].id.as_deref(), Some("old"));
        assert_eq!(t.record.last_rotated_at, Some(t0() + GRACE));

        let secrets = vec![
            listed("old", "by hand", Some("client")),
            listed("new", "rekeyd:maps:r1.a1", Some("client")),
        ];
        let t = step(&t.record, Event::Listed { secrets }, &ctx(t0() + GRACE)).unwrap();
        assert!(t.persist);
        assert_eq!(
            t.next,
            Next::Delete {
                ids: vec!["old".into()]
            }
        );
        let t = step(&t.record, Event::RetireDeleted, &ctx(t0() + GRACE)).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable);
        assert!(t.record.retire.is_empty());
        assert!(
            t.record
                .knows_retired(&SecretString::from("old-value"), None)
        );
        assert!(
            !t.record
                .knows_retired(&SecretString::from("new-value"), None)
        );
    }

    #[test]
    fn resuming_creating_records_a_fresh_attempt_before_deleting() {
        let mut r = idle();
        r.rotation = Rotation::Creating {
            rid: "r1".into(),
            attempt: "a1".into(),
        };
        let resume = Event::Resume {
            attempt: "a2".into(),
        };
        let t = step(&r, resume, &ctx(t0())).unwrap();
        assert!(
            t.persist,
            "S2: the fresh attempt is written before any delete"
        );
        assert!(
            matches!(&t.record.rotation, Rotation::Creating { attempt, .. } if attempt == "a2")
        );
        assert_eq!(
            t.next,
            Next::DeleteTagged {
                rid: "r1".into(),
                keep: "a2".into()
            }
        );
        let t = step(&t.record, Event::TaggedDeleted, &ctx(t0())).unwrap();
        assert_eq!(
            t.next,
            Next::Create {
                rid: "r1".into(),
                attempt: "a2".into()
            }
        );
        // Begin while interrupted finishes the old rotation, same rid.
        let t = step(&r, begin(), &ctx(t0())).unwrap();
        assert!(matches!(t.next, Next::DeleteTagged { rid, .. } if rid == "r1"));
    }

    #[test]
    fn rejected_pending_is_retired_in_the_same_write_that_aborts() {
        let mut r = idle();
        r.rotation = Rotation::Created {
            rid: "r1".into(),
            pending: SecretEntry {
                id: Some("new".into()),
                value: SecretString::from("new-value"),
                created_at: t0(),
            },
        };
        let t = step(&r, Event::VerifyRejected, &ctx(t0())).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::List);
        assert_eq!(t.record.rotation.phase(), "idle");
        assert_eq!(t.record.current.value.expose_secret(), "old-value");
        assert_eq!(t.record.retire[0].id.as_deref(), Some("new"));
        assert_eq!(t.record.last_rotated_at, None);
        assert!(!t.warnings.is_empty());
        // Unfinished until the delete is done.
        assert!(t.record.is_unfinished());
        let t = step(&t.record, begin(), &ctx(t0())).unwrap();
        assert_eq!(t.next, Next::List, "finishes the retire before beginning");
    }

    #[test]
    fn refused_current_after_promotion_brings_the_old_secret_back() {
        let mut r = idle();
        r.current = SecretEntry {
            id: Some("new".into()),
            value: SecretString::from("new-value"),
            created_at: t0(),
        };
        r.rotation = Rotation::Promoted {
            rid: "r1".into(),
            old: SecretEntry {
                id: Some("old".into()),
                value: SecretString::from("old-value"),
                created_at: t0(),
            },
            delete_after: t0(),
        };
        let t = step(&r, Event::CurrentRejected, &ctx(t0())).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.current.value.expose_secret(), "old-value");
        assert_eq!(t.record.retire[0].id.as_deref(), Some("new"));
        assert_eq!(t.record.rotation.phase(), "idle");
    }

    #[test]
    fn unknown_old_id_is_kept_with_a_warning() {
        let mut r = idle();
        r.current.id = None;
        let c = ctx(t0());
        let t = step(&r, begin(), &c).unwrap();
        let created = Event::Created {
            id: "new".into(),
            value: SecretString::from("v"),
        };
        let t = step(&t.record, created, &c).unwrap();
        let t = step(&t.record, Event::Verified, &c).unwrap();
        let late = ctx(t0() + GRACE);
        let t = step(&t.record, Event::GraceOver, &late).unwrap();
        let t = step(&t.record, Event::CurrentVerified, &late).unwrap();
        assert!(t.persist);
        assert!(t.record.retire.is_empty());
        assert!(t.warnings[0].contains("initial_secret_id"));
    }

    #[test]
    fn retire_deletes_only_this_clients_secrets_and_sweeps_orphans() {
        let mut r = idle();
        r.retire = vec![
            RetiredSecret {
                id: Some("foreign".into()),
                sha256: None,
            },
            RetiredSecret {
                id: Some("gone".into()),
                sha256: None,
            },
            RetiredSecret {
                id: Some("mine".into()),
                sha256: None,
            },
        ];
        let mut young = listed("young", "rekeyd:maps:r9.a1", Some("client"));
        young.created_at = Some(t0() + Duration::from_secs(3600) - SWEEP_MIN_AGE / 2);
        let secrets = vec![
            listed("foreign", "someone's", Some("other-client")),
            listed("mine", "by hand", Some("client")),
            listed("old", "by hand", Some("client")),
            listed("orphan", "rekeyd:maps:r8.a2", Some("client")),
            listed("other-cred", "rekeyd:maps-2:r8.a2", Some("client")),
            listed(
                "other-clients-tag",
                "rekeyd:maps:r8.a2",
                Some("other-client"),
            ),
            listed("untagged-unknown", "by hand", None),
            young,
        ];
        let t = step(
            &r,
            Event::Listed { secrets },
            &ctx(t0() + Duration::from_secs(3600)),
        )
        .unwrap();
        assert!(t.persist);
        assert_eq!(
            t.next,
            Next::Delete {
                ids: vec!["mine".into(), "orphan".into()]
            }
        );
        assert!(t.warnings.iter().any(|w| w.contains("foreign")));
        // Dropped entries are remembered, so set-secret refuses them.
        assert!(
            t.record
                .retired
                .iter()
                .any(|r| r.id.as_deref() == Some("gone"))
        );
    }

    #[test]
    fn events_out_of_phase_are_refused() {
        let r = idle();
        let c = ctx(t0());
        assert!(step(&r, Event::Verified, &c).is_err());
        assert!(step(&r, Event::CurrentVerified, &c).is_err());
        let created = Event::Created {
            id: "x".into(),
            value: SecretString::from("x"),
        };
        assert!(step(&r, created, &c).is_err());
    }
}
