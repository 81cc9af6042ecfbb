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

use secrecy::{ExposeSecret, SecretString};

use super::{Tag, parse_tag};
use crate::history::{Event as Audit, Step};
use crate::provider::{Capabilities, Overlap, RemoteSecret, Retire, ValueOrigin};
use crate::store::{CredentialRecord, RegistrationToken, RetiredSecret, Rotation, SecretEntry};

/// A tagged secret that the journal does not name is swept (S7) only once
/// it is this old, so that a create whose reply is still on its way is not
/// raced for nothing (its actor's swap would fail anyway, S1).
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Clone)]
pub enum Event {
    /// Start a rotation with a fresh id and, for an API that takes
    /// caller-chosen values, a fresh value (the driver draws it from a
    /// CSPRNG). With unfinished work in the journal this finishes that
    /// instead (rotating "now" is idempotent).
    Begin {
        rid: String,
        chosen: Option<SecretString>,
    },
    /// Re-enter after a restart, an error or a lost compare-and-swap: what
    /// is left to do?
    Resume,
    /// Secrets of earlier attempts of the rotation (values lost) are gone.
    TaggedDeleted,
    /// The provider created the replacement and returned its value (its id
    /// is `None` where the API replaces the one secret and has no ids), and
    /// when the provider says it expires ([`crate::provider::NewSecret`]).
    Created {
        id: Option<String>,
        value: SecretString,
        expires_at: Option<SystemTime>,
        /// A new RFC 7592 registration access token the reply carried: it
        /// is stored in the same write as the secret.
        registration: Option<RegistrationToken>,
    },
    /// The login with the value of an interrupted caller-chosen create
    /// ([`Next::Probe`]): accepted or consistently refused.
    Probed { id: String, accepted: bool },
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
    /// The licensed deletes of these ids are done (404 counts as done).
    RetireDeleted { ids: Vec<String> },
}

/// The next side effect, performed after persisting when asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing to do: the record is stable.
    Stable,
    /// List the provider's secrets and delete ours tagged with `rid` and an
    /// attempt earlier than `keep` (S2; see [`attempt_number`]).
    DeleteTagged { rid: String, keep: String },
    /// Create a secret tagged with `rid` and `attempt`; with the record's
    /// caller-chosen value when it has one ([`CredentialRecord::chosen`]).
    Create { rid: String, attempt: String },
    /// Log in with the record's caller-chosen value to learn whether the
    /// listed secret `id`, the only one the journal does not know, is the
    /// one an interrupted create made.
    Probe { id: String },
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
    /// The steps this transition commits, for the rotation history: the
    /// driver records them once `record` is persisted (never before, so
    /// the history never shows a step the journal does not hold).
    pub audit: Vec<Audit>,
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
    /// What the secret API can do: the steps depend on it.
    pub caps: Capabilities,
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
            Event::Probed { .. } => "probed",
            Event::Verified => "verified",
            Event::VerifyRejected => "verify-rejected",
            Event::CurrentVerified => "current-verified",
            Event::CurrentRejected => "current-rejected",
            Event::GraceOver => "grace-over",
            Event::Listed { .. } => "listed",
            Event::RetireDeleted { .. } => "retire-deleted",
        }
    }
}

fn stay(record: &CredentialRecord, next: Next) -> Transition {
    Transition {
        record: record.clone(),
        persist: false,
        next,
        warnings: Vec::new(),
        audit: Vec::new(),
    }
}

fn persist(record: CredentialRecord, next: Next) -> Transition {
    Transition {
        record,
        persist: true,
        next,
        warnings: Vec::new(),
        audit: Vec::new(),
    }
}

fn audited(t: Transition, events: impl IntoIterator<Item = Audit>) -> Transition {
    let mut t = t;
    t.audit.extend(events);
    t
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
        (Rotation::Idle, Event::Begin { rid, chosen }) if !record.is_unfinished() => {
            let mut next = record.clone();
            let attempt = next_attempt("");
            if ctx.caps.value == ValueOrigin::Key && next.current.id.is_none() {
                // A key stored without its id (installed before keys were
                // rotated) is named by its thumbprint now, the id every
                // publisher lists it by, so that its withdrawal at the end
                // can find it.
                next.current.id = crate::provider::key::from_secret(&next.current.value)
                    .ok()
                    .map(|key| key.thumbprint());
            }
            // A caller-chosen value is in this write, before the call (I2).
            next.rotation = Rotation::Creating {
                rid: rid.clone(),
                attempt: attempt.clone(),
                chosen,
            };
            // A fresh id cannot have tagged secrets yet: create directly.
            let started = Audit::new(Step::Started).rid(&rid);
            audited(persist(next, Next::Create { rid, attempt }), [started])
        }
        (_, Event::Begin { .. }) | (_, Event::Resume) => resume(record, ctx),

        (Rotation::Creating { rid, attempt, .. }, Event::TaggedDeleted) => stay(
            record,
            Next::Create {
                rid: rid.clone(),
                attempt: attempt.clone(),
            },
        ),
        (
            Rotation::Creating { rid, .. },
            Event::Created {
                id,
                value,
                expires_at,
                registration,
            },
        ) => {
            let mut next = record.clone();
            if registration.is_some() {
                // The token the update was sent with is dead: the new one
                // is in this write, before anything uses it.
                next.registration = registration;
            }
            if ctx.caps.replaces() && value.expose_secret() == record.current.value.expose_secret()
            {
                // The server answered with the secret it had (an RFC 7592
                // update that rotated only the registration access token,
                // or nothing): nothing new to prove, nothing retired. It
                // counts as the rotation, or a schedule would ask again at
                // once.
                next.rotation = Rotation::Idle;
                next.last_rotated_at = Some(ctx.now);
                // The reply's expiry is the kept secret's (a server may
                // have extended it); none said leaves the known one.
                if expires_at.is_some() {
                    next.current.expires_at = expires_at;
                }
                let kept = Audit::new(Step::Completed)
                    .rid(rid)
                    .detail("the provider kept the client secret");
                return Ok(audited(
                    warned(
                        persist(next, Next::Stable),
                        "the provider kept the client secret: this rotation changed nothing else than what the provider chose to renew (the registration access token, if any)",
                    ),
                    [kept],
                ));
            }
            let created = Audit::new(Step::Created).rid(rid).secret(id.as_deref());
            // The provider's expiry goes with the value: promotion makes
            // this entry current, and the schedule rotates before it.
            next.rotation = Rotation::Created {
                rid: rid.clone(),
                pending: SecretEntry {
                    id,
                    value,
                    created_at: ctx.now,
                    expires_at,
                },
            };
            audited(persist(next, Next::Verify), [created])
        }
        // A caller-chosen create that may have landed before its reply was
        // lost: which listed secret is it?
        (
            Rotation::Creating {
                chosen: Some(_), ..
            },
            Event::Listed { secrets },
        ) => find_chosen(record, &secrets, ctx),
        (
            Rotation::Creating {
                rid,
                chosen: Some(value),
                ..
            },
            Event::Probed { id, accepted },
        ) => match accepted {
            true => {
                // The value logs in and the journal knows every other
                // secret of the client: this one is ours (I4), made by the
                // interrupted create. It is verified as any new secret.
                let mut next = record.clone();
                let adopted = Audit::new(Step::Created)
                    .rid(rid)
                    .secret(Some(&id))
                    .detail("found after a lost create reply");
                next.rotation = Rotation::Created {
                    rid: rid.clone(),
                    pending: SecretEntry {
                        id: Some(id),
                        value: value.clone(),
                        created_at: ctx.now,
                        expires_at: None,
                    },
                };
                audited(persist(next, Next::Verify), [adopted])
            }
            // Not ours (or not the value we sent): create as planned.
            false => stay(
                record,
                Next::Create {
                    rid: rid.clone(),
                    attempt: attempt_of(record),
                },
            ),
        },

        (Rotation::Created { rid, pending }, Event::VerifyRejected) if ctx.caps.replaces() => {
            // The old secret may be gone already: never drop the new value.
            // Back to creating with the same value, which the next run
            // sends again (idempotent), while logins keep trying both.
            // Attempts count afresh: an API that replaces its secret keeps
            // no tags, so no earlier attempt has anything to delete (S2).
            let mut next = record.clone();
            next.rotation = Rotation::Creating {
                rid: rid.clone(),
                attempt: next_attempt(&attempt_of(record)),
                chosen: Some(pending.value.clone()),
            };
            warned(
                persist(next, Next::Stable),
                "the provider does not accept the new secret yet; it is kept and set again on the next run, and logins try both the old and the new one",
            )
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
            let id = pending.id.as_deref();
            let until = humantime::format_rfc3339_seconds(delete_after);
            // Where the provider replaced the old secret, it stays in the
            // journal all the same: logins try it while the new one
            // propagates (Auth0: up to about 30 s), and a replacement
            // request delayed from an earlier rotation, which would set
            // an older value again, is met by the check at the end (S5).
            let detail = if ctx.caps.replaces() {
                format!(
                    "the provider replaced the previous secret; logins still try it until {until}"
                )
            } else {
                format!(
                    "previous secret {} kept until {until}",
                    record.current.id.as_deref().unwrap_or("(id unknown)")
                )
            };
            let audit = [
                Audit::new(Step::Verified).rid(rid).secret(id),
                Audit::new(Step::Promoted)
                    .rid(rid)
                    .secret(id)
                    .detail(detail),
            ];
            audited(persist(next, Next::WaitUntil(delete_after)), audit)
        }
        (Rotation::Created { rid, pending }, Event::VerifyRejected) => {
            // Forget the refused secret and commit to deleting it in one
            // write: the write licenses the delete (S1).
            let mut next = record.clone();
            next.rotation = Rotation::Idle;
            next.listing_owed = true;
            retire_created(&mut next, pending);
            let aborted = Audit::new(Step::Aborted)
                .rid(rid)
                .secret(pending.id.as_deref())
                .detail("the provider refused the new secret; the current secret is kept");
            audited(
                warned(
                    persist(next, Next::List),
                    "the provider refused the new secret; rotation aborted, the current secret is kept",
                ),
                [aborted],
            )
        }

        // Promoted: the grace period; idle: retire entries a listing did
        // not show yet.
        (Rotation::Promoted { .. } | Rotation::Idle, Event::GraceOver) => resume(record, ctx),
        // List first (S7: is the old secret this client's? orphans to
        // sweep?), then end the rotation in one write that also licenses
        // the deletes (S1).
        (Rotation::Promoted { .. }, Event::CurrentVerified) => stay(record, Next::List),
        (Rotation::Promoted { rid, old, .. }, Event::Listed { secrets }) => {
            let mut next = record.clone();
            next.rotation = Rotation::Idle;
            next.last_rotated_at = Some(ctx.now);
            let mut warnings = if ctx.caps.retire == Retire::Replaced {
                // Gone at the provider with the replacement: nothing to
                // delete; remembered (by digest) so set-secret refuses it.
                next.remember_retired([RetiredSecret::of(old)]);
                Vec::new()
            } else {
                retire_entry(&mut next, old)
            };
            let t = plan_retire(record, next, &secrets, ctx, true);
            warnings.extend(t.warnings);
            let completed = Audit::new(Step::Completed)
                .rid(rid)
                .secret(record.current.id.as_deref());
            let mut audit = vec![completed];
            audit.extend(t.audit);
            Transition {
                warnings,
                audit,
                ..t
            }
        }
        (Rotation::Promoted { rid, old, .. }, Event::CurrentRejected) if ctx.caps.replaces() => {
            // The provider held one secret: something set another value
            // since the new one was proven (a replacement request delayed
            // from an earlier rotation, which may have set the old value
            // again). The old value becomes current, and the proven one is
            // set again (or, server-generated, the update asked for
            // again): logins try both meanwhile, and neither is dropped.
            let mut next = record.clone();
            next.current = old.clone();
            next.rotation = Rotation::Creating {
                rid: rid.clone(),
                attempt: "1".into(),
                chosen: match ctx.caps.value {
                    ValueOrigin::Caller { .. } | ValueOrigin::Key => {
                        Some(record.current.value.clone())
                    }
                    ValueOrigin::Server => None,
                },
            };
            let aborted = Audit::new(Step::Aborted).rid(rid).detail(
                "the provider refuses the new secret after its promotion; the previous one is current again and the new one is set again",
            );
            audited(
                warned(
                    persist(next, Next::Stable),
                    "the provider refuses the new secret after its promotion (was another value set since?); the previous secret is current again and the new one is set again on the next run",
                ),
                [aborted],
            )
        }
        (Rotation::Promoted { rid, old, .. }, Event::CurrentRejected) => {
            // S5: the old secret is still valid at the provider; it becomes
            // current again and the refused one is retired.
            let mut next = record.clone();
            next.current = old.clone();
            next.rotation = Rotation::Idle;
            next.listing_owed = true;
            retire_created(&mut next, &record.current);
            let aborted = Audit::new(Step::Aborted)
                .rid(rid)
                .secret(record.current.id.as_deref())
                .detail(format!(
                    "the provider refuses the new secret after its promotion; the previous secret {} is current again",
                    old.id.as_deref().unwrap_or("(id unknown)")
                ));
            audited(
                warned(
                    persist(next, Next::List),
                    "the provider refuses the new secret after its promotion; the previous secret is current again and the rotation is aborted",
                ),
                [aborted],
            )
        }

        (Rotation::Idle, Event::Listed { secrets }) => {
            plan_retire(record, record.clone(), &secrets, ctx, false)
        }
        (Rotation::Idle, Event::RetireDeleted { ids }) => {
            let mut next = record.clone();
            let (done, left): (Vec<_>, Vec<_>) = std::mem::take(&mut next.retire)
                .into_iter()
                .partition(|r| r.id.as_ref().is_some_and(|id| ids.contains(id)));
            next.retire = left;
            // What each delete was: a swept orphan (S7; the sweep retires
            // it by id alone, its value never known) or a secret the
            // journal retired.
            let audit: Vec<Audit> = done
                .iter()
                .map(|r| {
                    let step = if r.sha256.is_none() {
                        Step::OrphanRemoved
                    } else {
                        Step::Deleted
                    };
                    Audit::new(step).secret(r.id.as_deref())
                })
                .collect();
            next.remember_retired(done);
            // Entries left that were not waiting for a listing (not among
            // the deletes reported), or a listing still owed: list again.
            let then = if next.listing_owed || next.retire.iter().any(|r| r.missing_since.is_none())
            {
                Next::List
            } else {
                wait_for_missing(&next).unwrap_or(Next::Stable)
            };
            audited(persist(next, then), audit)
        }

        (_, event) => return Err(invalid(&event)),
    };
    Ok(t)
}

/// What is left to do in the record's phase, e.g. after a restart.
fn resume(record: &CredentialRecord, ctx: &Context<'_>) -> Transition {
    match &record.rotation {
        Rotation::Idle if !record.is_unfinished() => stay(record, Next::Stable),
        // Check the listing before deleting what a previous run committed
        // to, and sweep (S7).
        Rotation::Idle => stay(record, Next::List),
        // The create call may have happened, in this attempt or an earlier
        // one. S2: record the next attempt first; only if that write wins do
        // we delete the earlier attempts' secrets (their values were never
        // persisted, or the write would have failed) and create again.
        // Attempts are numbered along the journal's versions, so a resumer
        // whose claim has lapsed deletes only attempts older than its own,
        // never those of an actor that moved the journal on after it.
        Rotation::Creating {
            rid,
            attempt,
            chosen,
        } => {
            let mut next = record.clone();
            let attempt = next_attempt(attempt);
            next.rotation = Rotation::Creating {
                rid: rid.clone(),
                attempt: attempt.clone(),
                chosen: chosen.clone(),
            };
            let then = match (chosen, ctx.caps.overlap) {
                // The same value again: setting it twice is setting it once.
                (Some(_), Overlap::Replace) => Next::Create {
                    rid: rid.clone(),
                    attempt,
                },
                // The value may be at the provider already, under an id
                // the lost reply carried: look before creating a second.
                (Some(_), Overlap::Many { .. }) if ctx.caps.lists => Next::List,
                (Some(_), Overlap::Many { .. }) => Next::Create {
                    rid: rid.clone(),
                    attempt,
                },
                // A server-generated value was lost with its reply: the
                // secret is found by its tag and deleted (I3).
                (None, _) if ctx.caps.tags && ctx.caps.lists => Next::DeleteTagged {
                    rid: rid.clone(),
                    keep: attempt,
                },
                (None, _) => Next::Create {
                    rid: rid.clone(),
                    attempt,
                },
            };
            persist(next, then)
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

/// The attempt of a record in phase creating ("" otherwise).
fn attempt_of(record: &CredentialRecord) -> String {
    match &record.rotation {
        Rotation::Creating { attempt, .. } => attempt.clone(),
        _ => String::new(),
    }
}

/// Resuming a caller-chosen create under an API that keeps several
/// secrets: the listing shows whether the interrupted call made one. A key
/// ([`ValueOrigin::Key`]) is found by its kid. For a secret, the
/// journal knows the client's current secret and every secret it retires
/// or retired; exactly one secret besides those may be ours, and a login
/// with the value decides ([`Next::Probe`]). None: create. More than one:
/// no login can tell which is ours, so none is adopted (I4) and the create
/// goes ahead; the sweep cannot find an untagged duplicate, so the
/// operator is told.
fn find_chosen(
    record: &CredentialRecord,
    listed: &[RemoteSecret],
    ctx: &Context<'_>,
) -> Transition {
    let known: Vec<&str> = [Some(&record.current)]
        .into_iter()
        .flatten()
        .filter_map(|e| e.id.as_deref())
        .chain(
            record
                .retire
                .iter()
                .chain(&record.retired)
                .filter_map(|r| r.id.as_deref()),
        )
        .collect();
    let unknown: Vec<&RemoteSecret> = listed
        .iter()
        .filter(|s| s.client_id.as_deref().is_none_or(|c| c == ctx.client_id))
        .filter(|s| !known.contains(&s.id.as_str()))
        .collect();
    let create = Next::Create {
        rid: match &record.rotation {
            Rotation::Creating { rid, .. } => rid.clone(),
            _ => String::new(),
        },
        attempt: attempt_of(record),
    };
    if ctx.caps.value == ValueOrigin::Key {
        // A key is listed by its thumbprint, which follows from the key
        // the journal holds: the listing shows it or not, and nothing else
        // listed can be taken for it (a listing that lags behind the
        // publish shows someone else's key as the only unknown one). A
        // second publish of the same key writes nothing.
        let id = record
            .chosen()
            .and_then(|chosen| crate::provider::key::from_secret(chosen).ok())
            .map(|key| key.thumbprint());
        return match id {
            Some(id) if listed.iter().any(|s| s.id == id) => stay(record, Next::Probe { id }),
            _ => stay(record, create),
        };
    }
    match unknown.as_slice() {
        [] => stay(record, create),
        [one] => stay(record, Next::Probe { id: one.id.clone() }),
        many => warned(
            stay(record, create),
            format!(
                "{} secrets of client {} are unknown to the journal; if an interrupted create made one of them, it cannot be told apart and is left in place",
                many.len(),
                ctx.client_id
            ),
        ),
    }
}

/// The number of an attempt id ([`Rotation::Creating`]): attempts count up
/// from 1 along the journal's versions. Records and tags written before
/// attempts were numbered (empty, or absent from the tag) count as 0.
pub fn attempt_number(attempt: &str) -> u64 {
    attempt.parse().unwrap_or(0)
}

/// The attempt after `attempt`.
fn next_attempt(attempt: &str) -> String {
    (attempt_number(attempt) + 1).to_string()
}

/// Whether a secret tagged `tag` belongs to an attempt of rotation `rid`
/// that attempt `keep` superseded (S2): the same rotation, an earlier
/// attempt. A later attempt is another actor's, made after ours.
pub fn superseded(tag: &Tag<'_>, rid: &str, keep: &str) -> bool {
    tag.rid == rid && attempt_number(tag.attempt.unwrap_or_default()) < attempt_number(keep)
}

/// Retires a secret this journal created (the pending one, or the promoted
/// one): ours by construction, so no listing needs to prove it (S7) and a
/// listing that does not show it (gone, or lagging) does not hold up its
/// delete: a 404 is done.
fn retire_created(record: &mut CredentialRecord, entry: &SecretEntry) {
    if entry.id.is_some() {
        record.retire.push(RetiredSecret {
            confirmed: true,
            ..RetiredSecret::of(entry)
        });
    }
}

/// Decides from the provider's listing which retire entries of `next` (the
/// record to write, derived from `record`) may be deleted and which orphans
/// to sweep (S7), and licenses those deletes with one write (S1).
/// `must_persist`: `next` differs from `record` beyond the retire list (a
/// rotation ends in this write).
fn plan_retire(
    record: &CredentialRecord,
    mut next: CredentialRecord,
    listed: &[RemoteSecret],
    ctx: &Context<'_>,
    must_persist: bool,
) -> Transition {
    let mut warnings = Vec::new();
    let mut keep = Vec::new();
    let mut gone = Vec::new();
    for mut entry in std::mem::take(&mut next.retire) {
        let id = entry.id.as_deref().unwrap_or_default();
        match listed.iter().find(|s| s.id == id) {
            // Absent after a listing showed it as ours: probably deleted by
            // a run that stopped before writing so, but a list may also
            // lag. It is proven ours (S7), so delete it again: a 404 is
            // done (I5).
            None if entry.confirmed => keep.push(entry),
            // Absent and never seen: gone, or a list lagging behind its
            // creation (an id the operator gave carries no tag, so no sweep
            // would find it later). Gone only once absent for SWEEP_MIN_AGE.
            None => match entry.missing_since {
                Some(since) if elapsed(since, ctx.now) >= SWEEP_MIN_AGE => gone.push(entry),
                Some(_) => keep.push(entry),
                None => {
                    entry.missing_since = Some(ctx.now);
                    keep.push(entry);
                }
            },
            Some(s) if is_this_clients(s, ctx) => {
                entry.missing_since = None;
                entry.confirmed = true;
                keep.push(entry);
            }
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
            .is_none_or(|at| elapsed(at, ctx.now) >= SWEEP_MIN_AGE);
        let this_client = s.client_id.as_deref().is_none_or(|c| c == ctx.client_id);
        if tagged && this_client && old_enough && !named.contains(&s.id) {
            warnings.push(format!(
                "secret {} is tagged for this credential but untracked (a lost reply or a lagging list); deleting it",
                s.id
            ));
            // Listed as this client's and tagged as ours: proven (S7).
            keep.push(RetiredSecret {
                confirmed: true,
                ..RetiredSecret::id_only(&s.id)
            });
        }
    }
    next.remember_retired(gone);
    next.retire = keep;
    next.listing_owed = false;
    let ids: Vec<String> = next
        .retire
        .iter()
        .filter(|r| r.missing_since.is_none())
        .filter_map(|r| r.id.clone())
        .collect();
    let t = if !ids.is_empty() {
        // Always written, even when unchanged: this write is the licence
        // for the deletes that follow (S1).
        persist(next, Next::Delete { ids })
    } else {
        let then = wait_for_missing(&next).unwrap_or(Next::Stable);
        let unchanged = !must_persist
            && next.retire == record.retire
            && next.retired == record.retired
            && !record.listing_owed;
        if unchanged {
            stay(record, then)
        } else {
            persist(next, then)
        }
    };
    Transition { warnings, ..t }
}

/// While retire entries wait to be shown by a listing: wait until the
/// first of them may be taken as gone, then list again.
fn wait_for_missing(record: &CredentialRecord) -> Option<Next> {
    record
        .retire
        .iter()
        .filter_map(|r| r.missing_since)
        .min()
        .map(|since| Next::WaitUntil(since + SWEEP_MIN_AGE))
}

fn elapsed(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or_default()
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
            caps: Capabilities::SERVER_TAGGED,
        }
    }

    fn idle() -> CredentialRecord {
        CredentialRecord::new(SecretEntry {
            id: Some("old".into()),
            value: SecretString::from("old-value"),
            created_at: t0(),
            expires_at: None,
        })
    }

    fn listed(id: &str, description: &str, client: Option<&str>) -> RemoteSecret {
        RemoteSecret {
            id: id.into(),
            description: description.into(),
            client_id: client.map(Into::into),
            created_at: Some(t0()),
            expires_at: None,
        }
    }

    fn begin() -> Event {
        Event::Begin {
            rid: "r1".into(),
            chosen: None,
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
                attempt: "1".into()
            }
        );

        let created = Event::Created {
            id: Some("new".into()),
            value: SecretString::from("new-value"),
            expires_at: None,
            registration: None,
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

        // Verified: list before anything is written (S7).
        let t = step(&t.record, Event::CurrentVerified, &ctx(t0() + GRACE)).unwrap();
        assert!(!t.persist);
        assert_eq!(t.next, Next::List);

        let secrets = vec![
            listed("old", "by hand", Some("client")),
            listed("new", "rekeyd:maps:r1.a1", Some("client")),
        ];
        let t = step(&t.record, Event::Listed { secrets }, &ctx(t0() + GRACE)).unwrap();
        assert!(
            t.persist,
            "the write that ends the rotation licenses the delete"
        );
        assert_eq!(
            t.next,
            Next::Delete {
                ids: vec!["old".into()]
            }
        );
        assert_eq!(t.record.rotation.phase(), "idle");
        assert_eq!(t.record.retire[0].id.as_deref(), Some("old"));
        assert!(t.record.retire[0].confirmed);
        assert_eq!(t.record.last_rotated_at, Some(t0() + GRACE));
        let deleted = Event::RetireDeleted {
            ids: vec!["old".into()],
        };
        let t = step(&t.record, deleted, &ctx(t0() + GRACE)).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable);
        assert!(!t.record.is_unfinished());
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
    fn the_provider_expiry_of_a_new_secret_goes_from_created_to_current() {
        let expiry = t0() + Duration::from_secs(90 * 86400);
        let created = || Event::Created {
            id: Some("new".into()),
            value: SecretString::from("new-value"),
            expires_at: Some(expiry),
            registration: None,
        };
        // Several secrets at once: promoted after verification.
        let t = step(&idle(), begin(), &ctx(t0())).unwrap();
        let t = step(&t.record, created(), &ctx(t0())).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.pending().unwrap().expires_at, Some(expiry));
        assert_eq!(t.record.current.expires_at, None, "the old one's is kept");
        let t = step(&t.record, Event::Verified, &ctx(t0())).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.current.expires_at, Some(expiry));
        assert_eq!(t.record.rotation.old().unwrap().expires_at, None);
        // An API that replaces its secret: current once proven too.
        let mut replace = ctx(t0());
        replace.caps = crate::provider::replace::CAPABILITIES;
        let chosen = Event::Begin {
            rid: "r1".into(),
            chosen: Some(SecretString::from("new-value")),
        };
        let t = step(&idle(), chosen, &replace).unwrap();
        let t = step(&t.record, created(), &replace).unwrap();
        let t = step(&t.record, Event::Verified, &replace).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.current.expires_at, Some(expiry));
    }

    #[test]
    fn a_kept_secret_takes_the_expiry_the_reply_states() {
        let expiry = t0() + Duration::from_secs(90 * 86400);
        let mut replace = ctx(t0());
        replace.caps = crate::provider::replace::CAPABILITIES;
        let mut r = idle();
        r.rotation = Rotation::Creating {
            rid: "r1".into(),
            attempt: "1".into(),
            chosen: None,
        };
        // The server answered with the secret it had, and when it expires.
        let kept = Event::Created {
            id: None,
            value: SecretString::from("old-value"),
            expires_at: Some(expiry),
            registration: None,
        };
        let t = step(&r, kept, &replace).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.rotation.phase(), "idle");
        assert_eq!(t.record.current.expires_at, Some(expiry));
    }

    #[test]
    fn resuming_creating_records_a_fresh_attempt_before_deleting() {
        let mut r = idle();
        r.rotation = Rotation::Creating {
            rid: "r1".into(),
            attempt: "1".into(),
            chosen: None,
        };
        let t = step(&r, Event::Resume, &ctx(t0())).unwrap();
        assert!(
            t.persist,
            "S2: the fresh attempt is written before any delete"
        );
        assert!(matches!(&t.record.rotation, Rotation::Creating { attempt, .. } if attempt == "2"));
        assert_eq!(
            t.next,
            Next::DeleteTagged {
                rid: "r1".into(),
                keep: "2".into()
            }
        );
        let t = step(&t.record, Event::TaggedDeleted, &ctx(t0())).unwrap();
        assert_eq!(
            t.next,
            Next::Create {
                rid: "r1".into(),
                attempt: "2".into()
            }
        );
        // Begin while interrupted finishes the old rotation, same rid.
        let t = step(&r, begin(), &ctx(t0())).unwrap();
        assert!(matches!(t.next, Next::DeleteTagged { rid, .. } if rid == "r1"));
    }

    #[test]
    fn a_resumer_deletes_only_attempts_older_than_its_own() {
        let tag = |attempt| Tag { rid: "r1", attempt };
        assert!(superseded(&tag(Some("1")), "r1", "3"));
        assert!(superseded(&tag(Some("2")), "r1", "3"));
        // Tags written before attempts were numbered.
        assert!(superseded(&tag(None), "r1", "1"));
        // Its own attempt, and a later one: another actor moved the journal
        // on after this resumer's write (its claim lapsed meanwhile).
        assert!(!superseded(&tag(Some("3")), "r1", "3"));
        assert!(!superseded(&tag(Some("4")), "r1", "3"));
        assert!(!superseded(&tag(Some("1")), "r2", "3"));
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
                expires_at: None,
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
            expires_at: None,
        };
        r.rotation = Rotation::Promoted {
            rid: "r1".into(),
            old: SecretEntry {
                id: Some("old".into()),
                value: SecretString::from("old-value"),
                created_at: t0(),
                expires_at: None,
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
            id: Some("new".into()),
            value: SecretString::from("v"),
            expires_at: None,
            registration: None,
        };
        let t = step(&t.record, created, &c).unwrap();
        let t = step(&t.record, Event::Verified, &c).unwrap();
        let late = ctx(t0() + GRACE);
        let t = step(&t.record, Event::GraceOver, &late).unwrap();
        let t = step(&t.record, Event::CurrentVerified, &late).unwrap();
        let t = step(&t.record, Event::Listed { secrets: vec![] }, &late).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable);
        assert!(t.record.retire.is_empty());
        assert!(t.warnings[0].contains("initial_secret_id"));
    }

    #[test]
    fn retire_deletes_only_this_clients_secrets_and_sweeps_orphans() {
        let mut r = idle();
        r.retire = vec![
            RetiredSecret::id_only("foreign"),
            RetiredSecret::id_only("gone"),
            RetiredSecret::id_only("mine"),
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
        let now = t0() + Duration::from_secs(3600);
        let t = step(&r, Event::Listed { secrets }, &ctx(now)).unwrap();
        assert!(t.persist);
        assert_eq!(
            t.next,
            Next::Delete {
                ids: vec!["mine".into(), "orphan".into()]
            }
        );
        assert!(t.warnings.iter().any(|w| w.contains("foreign")));
        // Another client's id is dropped, and remembered so set-secret
        // refuses it.
        assert!(
            t.record
                .retired
                .iter()
                .any(|r| r.id.as_deref() == Some("foreign"))
        );
        let deleted = Event::RetireDeleted {
            ids: vec!["mine".into(), "orphan".into()],
        };
        let t = step(&t.record, deleted, &ctx(now)).unwrap();
        // An id the listing did not show may be a lagging list: it is kept
        // and looked for again once it may count as gone.
        assert_eq!(t.next, Next::WaitUntil(now + SWEEP_MIN_AGE));
        assert_eq!(t.record.retire.len(), 1);
        assert!(t.record.is_unfinished());
        let later = ctx(now + SWEEP_MIN_AGE);
        let t = step(&t.record, Event::GraceOver, &later).unwrap();
        assert_eq!(t.next, Next::List);
        let t = step(&t.record, Event::Listed { secrets: vec![] }, &later).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable);
        assert!(
            t.record
                .retired
                .iter()
                .any(|r| r.id.as_deref() == Some("gone"))
        );
        assert!(!t.record.is_unfinished());
    }

    #[test]
    fn the_sweep_after_an_aborted_rotation_is_owed_until_its_listing_is_written() {
        // S7: the listing after an abort is part of the journal, so a crash
        // before it does not skip the sweep.
        let mut r = idle();
        r.rotation = Rotation::Created {
            rid: "r1".into(),
            pending: SecretEntry {
                id: Some("new".into()),
                value: SecretString::from("new-value"),
                created_at: t0(),
                expires_at: None,
            },
        };
        let t = step(&r, Event::VerifyRejected, &ctx(t0())).unwrap();
        assert!(t.record.listing_owed);
        let resumed = Event::Resume;
        let t = step(&t.record, resumed, &ctx(t0())).unwrap();
        assert_eq!(t.next, Next::List);
        let secrets = vec![listed("new", "rekeyd:maps:r1.a1", Some("client"))];
        let t = step(&t.record, Event::Listed { secrets }, &ctx(t0())).unwrap();
        assert!(t.persist);
        assert!(!t.record.listing_owed);
        let deleted = Event::RetireDeleted {
            ids: vec!["new".into()],
        };
        let t = step(&t.record, deleted, &ctx(t0())).unwrap();
        assert!(!t.record.is_unfinished());
    }

    #[test]
    fn a_verified_rotation_writes_nothing_before_its_listing() {
        // Killed between verifying and listing, a promoted journal resumes
        // with verification and the listing, so its sweep is never skipped.
        let mut old = idle().current;
        old.id = None;
        let mut r = idle();
        r.rotation = Rotation::Promoted {
            rid: "r1".into(),
            old,
            delete_after: t0(),
        };
        let t = step(&r, Event::CurrentVerified, &ctx(t0())).unwrap();
        assert!(!t.persist);
        let resumed = Event::Resume;
        assert_eq!(
            step(&r, resumed, &ctx(t0())).unwrap().next,
            Next::VerifyCurrent
        );
    }

    const REPLACE: Capabilities = crate::provider::replace::CAPABILITIES;
    const CHOSEN_TWO: Capabilities = crate::provider::okta::CAPABILITIES;

    fn with_caps(now: SystemTime, caps: Capabilities) -> Context<'static> {
        Context { caps, ..ctx(now) }
    }

    fn begin_chosen(value: &str) -> Event {
        Event::Begin {
            rid: "r1".into(),
            chosen: Some(SecretString::from(value)),
        }
    }

    fn chosen_of(record: &CredentialRecord) -> String {
        record.chosen().unwrap().expose_secret().to_string()
    }

    const REGISTRATION: Capabilities = crate::provider::registration::CAPABILITIES;

    fn registration_token(value: &str) -> Option<RegistrationToken> {
        Some(RegistrationToken {
            value: SecretString::from(value),
            file_sha256: "f".repeat(64),
        })
    }

    #[test]
    fn a_registration_update_stores_its_new_access_token_with_its_secret() {
        let c = with_caps(t0(), REGISTRATION);
        let t = step(&idle(), begin(), &c).unwrap();
        assert!(matches!(t.next, Next::Create { .. }));
        // The server replaced the secret and the access token: both in the
        // one write before the login that proves the secret.
        let created = Event::Created {
            id: None,
            value: SecretString::from("server-value"),
            expires_at: None,
            registration: registration_token("rat-2"),
        };
        let t = step(&t.record, created, &c).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Verify);
        assert_eq!(
            t.record.pending().unwrap().value.expose_secret(),
            "server-value"
        );
        let stored = t.record.registration.as_ref().unwrap();
        assert_eq!(stored.value.expose_secret(), "rat-2");
        let t = step(&t.record, Event::Verified, &c).unwrap();
        assert_eq!(t.record.current.value.expose_secret(), "server-value");
        let t = step(
            &t.record,
            Event::Resume,
            &with_caps(t0() + GRACE, REGISTRATION),
        )
        .unwrap();
        let t = step(&t.record, Event::CurrentVerified, &c).unwrap();
        let t = step(&t.record, Event::Listed { secrets: vec![] }, &c).unwrap();
        assert!(!t.record.is_unfinished());
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        assert_eq!(
            t.record.registration.unwrap().value.expose_secret(),
            "rat-2",
            "the token outlives the rotation"
        );
    }

    #[test]
    fn a_registration_update_that_kept_the_secret_completes_at_once() {
        let c = with_caps(t0(), REGISTRATION);
        let t = step(&idle(), begin(), &c).unwrap();
        let kept = Event::Created {
            id: None,
            value: SecretString::from("old-value"),
            expires_at: None,
            registration: registration_token("rat-2"),
        };
        let t = step(&t.record, kept, &c).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable, "nothing new to prove");
        assert!(!t.record.is_unfinished());
        assert_eq!(t.record.last_rotated_at, Some(t0()));
        assert_eq!(t.record.current.value.expose_secret(), "old-value");
        assert!(
            !t.record
                .knows_retired(&SecretString::from("old-value"), None),
            "the current secret is not retired"
        );
        assert!(t.record.registration.is_some());
        assert!(t.warnings[0].contains("kept the client secret"));
        // Without a new token the stored one stays.
        let mut with_token = idle();
        with_token.registration = registration_token("rat-1");
        let t = step(&with_token, begin(), &c).unwrap();
        let kept = Event::Created {
            id: None,
            value: SecretString::from("old-value"),
            expires_at: None,
            registration: None,
        };
        let t = step(&t.record, kept, &c).unwrap();
        assert_eq!(
            t.record.registration.unwrap().value.expose_secret(),
            "rat-1"
        );
    }

    #[test]
    fn a_chosen_value_is_written_before_the_call_and_sent_again_after_a_loss() {
        let c = with_caps(t0(), REPLACE);
        let t = step(&idle(), begin_chosen("chosen-value"), &c).unwrap();
        assert!(t.persist, "I2: the value is stored before the call");
        assert_eq!(chosen_of(&t.record), "chosen-value");
        assert!(matches!(t.next, Next::Create { .. }));
        // Reply lost (or a crash): the same value goes out again, with no
        // search for tagged secrets (there are none to find).
        let t = step(&t.record, Event::Resume, &c).unwrap();
        assert!(t.persist);
        assert_eq!(chosen_of(&t.record), "chosen-value");
        assert_eq!(
            t.next,
            Next::Create {
                rid: "r1".into(),
                attempt: "2".into()
            }
        );
    }

    #[test]
    fn a_replacing_api_keeps_the_old_value_through_the_grace_and_never_drops_the_new_one() {
        let c = with_caps(t0(), REPLACE);
        let t = step(&idle(), begin_chosen("chosen-value"), &c).unwrap();
        let created = Event::Created {
            id: None,
            value: SecretString::from("chosen-value"),
            expires_at: None,
            registration: None,
        };
        let created = step(&t.record, created, &c).unwrap();
        assert_eq!(created.next, Next::Verify);

        // Refused for the whole window: the old secret may be gone, so the
        // new value stays in the journal, to be set again.
        let t = step(&created.record, Event::VerifyRejected, &c).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable);
        assert_eq!(chosen_of(&t.record), "chosen-value");
        assert_eq!(t.record.current.value.expose_secret(), "old-value");
        assert!(t.record.retire.is_empty(), "nothing of ours is deleted");

        // Accepted: current at once; the replaced value stays in the
        // journal through the grace period (logins still try it while the
        // new one propagates).
        let promoted = step(&created.record, Event::Verified, &c).unwrap();
        assert!(promoted.persist);
        assert_eq!(promoted.next, Next::WaitUntil(t0() + GRACE));
        assert_eq!(
            promoted.record.current.value.expose_secret(),
            "chosen-value"
        );
        assert_eq!(
            promoted
                .record
                .rotation
                .old()
                .unwrap()
                .value
                .expose_secret(),
            "old-value"
        );
        let later = with_caps(t0() + GRACE, REPLACE);
        let t = step(&promoted.record, Event::GraceOver, &later).unwrap();
        assert_eq!(t.next, Next::VerifyCurrent);
        let t = step(&t.record, Event::CurrentVerified, &later).unwrap();
        assert_eq!(t.next, Next::List);
        // The API lists nothing; nothing is deleted, nothing warned about.
        let t = step(&t.record, Event::Listed { secrets: vec![] }, &later).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Stable);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        assert!(!t.record.is_unfinished());
        assert_eq!(t.record.last_rotated_at, Some(t0() + GRACE));
        assert!(
            t.record
                .knows_retired(&SecretString::from("old-value"), None),
            "S6: set-secret refuses the replaced value"
        );

        // Refused after the grace period (a delayed replacement from an
        // earlier rotation set another value): the old value is current
        // again, the proven one is set again; neither is dropped.
        let t = step(&promoted.record, Event::CurrentRejected, &later).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.current.value.expose_secret(), "old-value");
        assert_eq!(chosen_of(&t.record), "chosen-value");
        assert!(t.record.retire.is_empty());
        let t = step(&t.record, Event::Resume, &later).unwrap();
        assert!(matches!(t.next, Next::Create { .. }));
    }

    #[test]
    fn an_interrupted_chosen_create_is_found_by_a_login_not_created_twice() {
        let c = with_caps(t0(), CHOSEN_TWO);
        let t = step(&idle(), begin_chosen("chosen-value"), &c).unwrap();
        let t = step(&t.record, Event::Resume, &c).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::List, "look before creating a second one");
        let interrupted = t.record;

        // Nothing unknown: the call never landed.
        let only_old = vec![listed("old", "", Some("client"))];
        let t = step(
            &interrupted,
            Event::Listed {
                secrets: only_old.clone(),
            },
            &c,
        )
        .unwrap();
        assert!(matches!(t.next, Next::Create { .. }));

        // One unknown secret: a login with the value decides.
        let mut with_new = only_old;
        with_new.push(listed("s2", "", Some("client")));
        with_new.push(listed("foreign", "", Some("other-client")));
        let t = step(&interrupted, Event::Listed { secrets: with_new }, &c).unwrap();
        assert_eq!(t.next, Next::Probe { id: "s2".into() });
        let accepted = Event::Probed {
            id: "s2".into(),
            accepted: true,
        };
        let t = step(&interrupted, accepted, &c).unwrap();
        assert!(t.persist);
        assert_eq!(t.next, Next::Verify);
        let pending = t.record.pending().unwrap();
        assert_eq!(pending.id.as_deref(), Some("s2"));
        assert_eq!(pending.value.expose_secret(), "chosen-value");

        // Refused: someone else's secret, left alone; create as planned.
        let refused = Event::Probed {
            id: "s2".into(),
            accepted: false,
        };
        let t = step(&interrupted, refused, &c).unwrap();
        assert!(!t.persist);
        assert!(matches!(t.next, Next::Create { .. }));
    }

    #[test]
    fn a_key_stored_without_an_id_is_named_by_its_thumbprint_when_a_rotation_begins() {
        let c = with_caps(t0(), crate::provider::registration::KEY_CAPABILITIES);
        // An operator's key with a kid of its own: the thumbprint names it.
        let key = crate::provider::key::generate_with_kid(crate::provider::key::Alg::Es256, "op-1");
        let stored = CredentialRecord::new(SecretEntry {
            id: None,
            value: key.to_secret(),
            created_at: t0(),
            expires_at: None,
        });
        let begin = Event::Begin {
            rid: "r".into(),
            chosen: Some(key.to_secret()),
        };
        let t = step(&stored, begin, &c).unwrap();
        assert!(t.persist);
        assert_eq!(t.record.current.id, Some(key.thumbprint()));
    }

    #[test]
    fn an_interrupted_key_publish_is_found_by_its_thumbprint_never_by_elimination() {
        let c = with_caps(t0(), crate::provider::registration::KEY_CAPABILITIES);
        let key = crate::provider::key::generate(crate::provider::key::Alg::Es256).unwrap();
        let begin = Event::Begin {
            rid: "r".into(),
            chosen: Some(key.to_secret()),
        };
        let t = step(&idle(), begin, &c).unwrap();
        let t = step(&t.record, Event::Resume, &c).unwrap();
        assert_eq!(t.next, Next::List);
        let interrupted = t.record;

        // A listing that lags behind the publish shows someone else's key
        // as the only unknown one: not taken for ours, the key is
        // published (again: idempotent).
        let lagging = vec![
            listed("old", "", Some("client")),
            listed("operators-key", "", Some("client")),
        ];
        let t = step(
            &interrupted,
            Event::Listed {
                secrets: lagging.clone(),
            },
            &c,
        )
        .unwrap();
        assert!(matches!(t.next, Next::Create { .. }), "{:?}", t.next);

        // The listing shows the key: a login with it proves it.
        let mut shown = lagging;
        shown.push(listed(&key.thumbprint(), "", Some("client")));
        let t = step(&interrupted, Event::Listed { secrets: shown }, &c).unwrap();
        assert_eq!(
            t.next,
            Next::Probe {
                id: key.thumbprint()
            }
        );
    }

    #[test]
    fn a_chosen_value_is_never_probed_against_secrets_the_journal_knows() {
        let c = with_caps(t0(), CHOSEN_TWO);
        let mut r = idle();
        r.retired.push(RetiredSecret::id_only("gone-before"));
        let t = step(&r, begin_chosen("v"), &c).unwrap();
        let t = step(&t.record, Event::Resume, &c).unwrap();
        let secrets = vec![
            listed("old", "", Some("client")),
            listed("gone-before", "", Some("client")),
        ];
        let t = step(&t.record, Event::Listed { secrets }, &c).unwrap();
        assert!(matches!(t.next, Next::Create { .. }));
    }

    #[test]
    fn events_out_of_phase_are_refused() {
        let r = idle();
        let c = ctx(t0());
        assert!(step(&r, Event::Verified, &c).is_err());
        assert!(step(&r, Event::CurrentVerified, &c).is_err());
        let created = Event::Created {
            id: Some("x".into()),
            value: SecretString::from("x"),
            expires_at: None,
            registration: None,
        };
        assert!(step(&r, created, &c).is_err());
    }
}
