//! The store model: one credential record under compare-and-swap by
//! version, and a rotation claim shaped like a Kubernetes Lease, both in
//! memory, implementing rekeyd's [`Store`] and [`Claim`].
//!
//! A claim is granted when no lease is held or the held one expired. A
//! holder that is alive renews continuously; its lease lapses when
//!
//! - the store stalls on one of its calls for longer than the TTL (the
//!   renewals fail too): the lease expires within the TTL;
//! - the seed's takeover fault grants the held lease to another actor at
//!   once (a stalled API server, a paused VM);
//! - it crashes: the lease expires a TTL later.
//!
//! A live holder learns of the lapse (`is_fresh()` false, `lost()`
//! cancelled) either in time, or — with the skew fault — only after
//! another actor already holds the claim, as with clocks that disagree.
//! Safety must then come from the compare-and-swap alone (S1).
//!
//! Store faults: a call fails with no effect; a compare-and-swap lands and
//! its reply is lost; a call stalls past the TTL.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rekeyd::store::{Claim, CredentialRecord, Rotation, Store, StoreError, Versioned};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CLAIM_TTL, Call, Sim, Stage, World, cover, current_actor, ms, show_record};

/// The rotation claim as the store holds it.
pub struct Lease {
    pub claim: u64,
    pub actor: Option<usize>,
    /// Renewed continuously while `None`; else grantable to others then.
    pub expires_at: Option<Instant>,
    /// Its holder crashed: dropping the claim does not release it.
    pub crashed: bool,
    fresh: Arc<AtomicBool>,
    lost: CancellationToken,
}

#[derive(Default)]
pub struct StoreState {
    /// The record and its version: all that survives a crash.
    pub record: Option<(u64, CredentialRecord)>,
    pub lease: Option<Lease>,
    next_claim: u64,
    /// Every id that a written record ever put in its retire list.
    pub ever_retired: BTreeSet<String>,
    /// The records loaded by each actor listed here, in order: an engine's
    /// attempt is bracketed by an entry, so its login can be classified
    /// against exactly the journals it read.
    pub reads: BTreeMap<usize, Vec<CredentialRecord>>,
}

impl StoreState {
    /// The holder `actor` crashed: its lease expires after the TTL.
    pub fn crash_holder(&mut self, actor: usize) {
        if let Some(lease) = &mut self.lease
            && lease.actor == Some(actor)
        {
            lease.crashed = true;
            let ttl = Instant::now() + CLAIM_TTL;
            lease.expires_at = Some(lease.expires_at.map_or(ttl, |t| t.min(ttl)));
        }
    }

    pub fn version(&self) -> Option<u64> {
        self.record.as_ref().map(|(v, _)| *v)
    }
}

fn unavailable(what: &str) -> StoreError {
    StoreError::Unavailable {
        target: format!("record {}", super::CRED),
        reason: format!("{what} (simulated)"),
    }
}

impl World {
    fn store_fails(&mut self) -> bool {
        self.faults.enabled && {
            let p = self.faults.p_store_error;
            self.rng.chance(p)
        }
    }

    /// The lease held by someone other than a crashed holder lapses: others
    /// may take it in `grantable_in`; its holder learns in `tell_in`.
    pub fn lapse_lease(&mut self, grantable_in: Duration, tell_in: Duration) {
        let Some(lease) = &mut self.store.lease else {
            return;
        };
        let at = Instant::now() + grantable_in;
        lease.expires_at = Some(lease.expires_at.map_or(at, |t| t.min(at)));
        let (fresh, lost, holder) = (lease.fresh.clone(), lease.lost.clone(), lease.actor);
        if !lease.crashed {
            // Tell the holder that it lapsed, now or later.
            if tell_in.is_zero() {
                fresh.store(false, Ordering::SeqCst);
                lost.cancel();
            } else {
                let timer = self.timer(tell_in);
                tokio::spawn(async move {
                    timer.wait().await;
                    fresh.store(false, Ordering::SeqCst);
                    lost.cancel();
                });
            }
        }
        if tell_in > grantable_in {
            self.cover(cover::SKEWED_LAPSE);
        }
        self.note(Call::Harness, |w| {
            format!(
                "claim of {} LAPSES: others may take it in {grantable_in:?}, holder told in {tell_in:?}",
                w.actor_name(holder)
            )
        });
    }

    /// How long a lapsed holder takes to notice: at once, or (skew) late.
    fn tell_delay(&mut self, grantable_in: Duration) -> Duration {
        let p = self.faults.p_skew;
        if self.rng.chance(p) {
            let max = self.faults.skew_max;
            grantable_in + self.rng.between(ms(1), max)
        } else {
            let half = grantable_in / 2;
            self.rng.between(Duration::ZERO, half)
        }
    }

    /// The delay before a store call's effect; a stall lapses the caller's
    /// lease on the way.
    pub fn store_delay(&mut self, call: Call) -> Duration {
        let stall = self.faults.enabled && {
            let p = self.faults.p_stall;
            self.rng.chance(p)
        };
        if !stall {
            return self.delay(call, Stage::Before);
        }
        self.cover(cover::STALL);
        let actor = current_actor();
        let holds = self
            .store
            .lease
            .as_ref()
            .is_some_and(|l| l.actor == actor && actor.is_some() && l.expires_at.is_none());
        let stall = self.rng.between(CLAIM_TTL + ms(1), CLAIM_TTL * 2);
        self.note(Call::Harness, |_| {
            format!("store STALLS {stall:?} on {}", call.name())
        });
        if holds {
            let grantable = self.rng.between(Duration::ZERO, CLAIM_TTL);
            let tell = self.tell_delay(grantable);
            self.lapse_lease(grantable, tell);
        }
        stall
    }

    fn try_claim(&mut self, wait: bool) -> Result<Option<SimClaim>, StoreError> {
        if self.store_fails() {
            self.note(Call::Claim, |_| "-> unavailable".into());
            return Err(unavailable("claim request failed"));
        }
        let now = Instant::now();
        if let Some(lease) = &self.store.lease
            && lease.expires_at.is_some_and(|t| t <= now)
        {
            let holder = lease.actor;
            self.note(Call::Harness, |w| {
                format!("lease of {} expired", w.actor_name(holder))
            });
            self.store.lease = None;
        }
        if self.store.lease.is_some() {
            let takeover = self.faults.enabled && {
                let p = self.faults.p_takeover;
                self.rng.chance(p)
            };
            if !takeover {
                self.note(Call::Claim, |w| {
                    let holder = w.store.lease.as_ref().and_then(|l| l.actor);
                    format!("wait={wait} -> held by {}", w.actor_name(holder))
                });
                return Ok(None);
            }
            let tell = self.tell_delay(Duration::ZERO);
            self.lapse_lease(Duration::ZERO, tell);
        }
        self.store.next_claim += 1;
        let parts = SimClaimParts {
            id: self.store.next_claim,
            fresh: Arc::new(AtomicBool::new(true)),
            lost: CancellationToken::new(),
        };
        self.store.lease = Some(Lease {
            claim: parts.id,
            actor: current_actor(),
            expires_at: None,
            crashed: false,
            fresh: parts.fresh.clone(),
            lost: parts.lost.clone(),
        });
        self.note(Call::Claim, |_| {
            format!("wait={wait} -> granted #{}", parts.id)
        });
        Ok(Some(SimClaim {
            sim: self
                .me
                .upgrade()
                .expect("the simulation outlives its calls"),
            parts,
            delivered: false,
        }))
    }

    fn load(&mut self) -> Result<Option<Versioned<CredentialRecord>>, StoreError> {
        if self.store_fails() {
            self.note(Call::Load, |_| "-> unavailable".into());
            return Err(unavailable("read failed"));
        }
        self.note(Call::Load, |w| match &w.store.record {
            Some((v, r)) => format!("-> v{v} {}", show_record(r, &w.provider)),
            None => "-> none".into(),
        });
        if let Some(reads) = current_actor().and_then(|a| self.store.reads.get_mut(&a))
            && let Some((_, record)) = &self.store.record
        {
            reads.push(record.clone());
        }
        Ok(self
            .store
            .record
            .as_ref()
            .map(|(version, value)| Versioned {
                version: *version,
                value: value.clone(),
            }))
    }

    fn check_writable(&mut self) -> Result<(), StoreError> {
        if self.store_fails() {
            self.note(Call::CheckWritable, |_| "-> unavailable".into());
            return Err(unavailable("not writable"));
        }
        self.note(Call::CheckWritable, |_| "-> ok".into());
        Ok(())
    }

    fn compare_and_swap(
        &mut self,
        expected: Option<u64>,
        record: &CredentialRecord,
    ) -> Result<u64, StoreError> {
        if self.store_fails() {
            self.note(Call::Cas, |_| "-> unavailable (not written)".into());
            return Err(unavailable("write failed"));
        }
        let stored = self.store.version();
        if stored != expected {
            self.cover(cover::CAS_CONFLICT);
            self.note(Call::Cas, |w| {
                format!(
                    "from v{expected:?} {} -> CONFLICT (stored v{stored:?})",
                    show_record(record, &w.provider)
                )
            });
            return Err(StoreError::Conflict {
                name: super::CRED.into(),
                expected,
            });
        }
        let version = stored.unwrap_or(0) + 1;
        let before = self.store.record.take().map(|(_, r)| r);
        self.observe_write(before.as_ref(), record);
        self.store.record = Some((version, record.clone()));
        let lost = self.faults.enabled && {
            let p = self.faults.p_lost_cas;
            self.rng.chance(p)
        };
        self.note(Call::Cas, |w| {
            format!(
                "v{} -> v{version} {}{}",
                expected.unwrap_or(0),
                show_record(record, &w.provider),
                if lost { ", REPLY LOST" } else { "" }
            )
        });
        self.check();
        if lost {
            return Err(unavailable("write timed out after it was applied"));
        }
        Ok(version)
    }

    /// Bookkeeping and faults tied to what a write changes.
    fn observe_write(&mut self, before: Option<&CredentialRecord>, after: &CredentialRecord) {
        for id in after.retire.iter().filter_map(|r| r.id.clone()) {
            self.store.ever_retired.insert(id);
        }
        let Some(before) = before else { return };
        let actor = current_actor();
        match (&before.rotation, &after.rotation) {
            // (1): an actor resumes `creating` with a fresh attempt while
            // another actor's create is still in flight.
            (
                Rotation::Creating {
                    rid: a, attempt: x, ..
                },
                Rotation::Creating {
                    rid: b, attempt: y, ..
                },
            ) if a == b
                && x != y
                && self
                    .in_flight
                    .iter()
                    .any(|&(who, c)| c == Call::Create && who.is_some() && who != actor) =>
            {
                self.cover(cover::TAKEOVER_IN_CREATING);
            }
            (Rotation::Created { .. }, Rotation::Idle) => self.cover(cover::ABORTED),
            (Rotation::Promoted { old, .. }, Rotation::Idle)
                if after.current.value.expose() == old.value.expose() =>
            {
                self.cover(cover::ROLLED_BACK)
            }
            (Rotation::Created { .. }, Rotation::Promoted { .. }) => {
                // (5): the provider revokes the promoted secret during the
                // grace period (before anyone verifies it again).
                let revoke = self.faults.enabled && {
                    let p = self.faults.p_revoke;
                    self.rng.chance(p)
                };
                if revoke && let Some(id) = after.current.id.clone() {
                    self.cover(cover::REVOKED_IN_GRACE);
                    self.revoke(&id);
                }
            }
            _ => {}
        }
        if !edge(before, after) {
            let (from, to) = (
                show_record(before, &self.provider),
                show_record(after, &self.provider),
            );
            self.violation(format!("journal jumped off its edges: {from} -> {to}"));
        }
    }
}

/// Whether a write from `before` (what its writer read) to `after` follows
/// the journal's edges: a rotation moves creating → created → promoted and
/// ends idle (retired, aborted, rolled back, or replaced by `set-secret
/// --force`); resuming `creating` rewrites its attempt.
fn edge(before: &CredentialRecord, after: &CredentialRecord) -> bool {
    match (&before.rotation, &after.rotation) {
        (_, Rotation::Idle) | (Rotation::Idle, Rotation::Creating { .. }) => true,
        (Rotation::Creating { rid: a, .. }, Rotation::Creating { rid: b, .. })
        | (Rotation::Creating { rid: a, .. }, Rotation::Created { rid: b, .. }) => a == b,
        // An atomic replacement not accepted in time: back to creating
        // with the same value, to be sent again.
        (Rotation::Created { rid: a, pending }, Rotation::Creating { rid: b, chosen, .. }) => {
            a == b
                && chosen
                    .as_ref()
                    .is_some_and(|c| c.expose() == pending.value.expose())
        }
        (Rotation::Created { rid: a, pending }, Rotation::Promoted { rid: b, old, .. }) => {
            a == b
                && after.current.value.expose() == pending.value.expose()
                && old.value.expose() == before.current.value.expose()
        }
        _ => false,
    }
}

/// Compares secret values without exposing them in the checks' code paths.
trait Expose {
    fn expose(&self) -> &str;
}

impl Expose for secrecy::SecretString {
    fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(self)
    }
}

struct SimClaimParts {
    id: u64,
    fresh: Arc<AtomicBool>,
    lost: CancellationToken,
}

/// A claim handed out by the store model; dropping it releases the lease,
/// unless its holder crashed or the grant never reached the caller (its
/// request was abandoned): then the lease expires after the TTL.
pub struct SimClaim {
    sim: Arc<Sim>,
    parts: SimClaimParts,
    delivered: bool,
}

impl Claim for SimClaim {
    fn is_fresh(&self) -> bool {
        self.parts.fresh.load(Ordering::SeqCst)
    }

    fn lost(&self) -> CancellationToken {
        self.parts.lost.clone()
    }
}

impl Drop for SimClaim {
    fn drop(&mut self) {
        let mut w = self.sim.lock();
        let id = self.parts.id;
        let Some(lease) = w
            .store
            .lease
            .as_mut()
            .filter(|l| l.claim == id && !l.crashed)
        else {
            return;
        };
        if self.delivered {
            w.store.lease = None;
            w.note(Call::Release, |_| format!("claim #{id} released"));
        } else {
            let ttl = Instant::now() + CLAIM_TTL;
            lease.expires_at = Some(lease.expires_at.map_or(ttl, |t| t.min(ttl)));
            w.note(Call::Release, |_| {
                format!("claim #{id} abandoned before its grant arrived; expires after the TTL")
            });
        }
    }
}

#[derive(Clone)]
pub struct StoreModel {
    pub sim: Arc<Sim>,
}

impl StoreModel {
    async fn call<T>(&self, call: Call, effect: impl FnOnce(&mut World) -> T) -> T {
        self.call_then(call, false, effect).await
    }

    /// A store call. `may_stop`: a journal write, during which the seed may
    /// cancel the caller's stop token (shutdown or reload while the write is
    /// in flight, (4)).
    async fn call_then<T>(
        &self,
        call: Call,
        may_stop: bool,
        effect: impl FnOnce(&mut World) -> T,
    ) -> T {
        self.sim.enter().await;
        let _flight = self.sim.in_flight(call);
        if may_stop {
            let mut w = self.sim.lock();
            let stop = w.faults.enabled && {
                let p = w.faults.p_stop_in_write;
                w.rng.chance(p)
            };
            if stop && let Some(actor) = current_actor() {
                w.stop(actor, "while its journal write is in flight");
            }
        }
        self.sim.pause(call, Stage::Before).await;
        let out = {
            let mut w = self.sim.lock();
            let out = effect(&mut w);
            w.check();
            out
        };
        self.sim.pause(call, Stage::After).await;
        out
    }
}

impl Store for StoreModel {
    fn claim<'a>(
        &'a self,
        _name: &'a str,
        wait: bool,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Claim>>, StoreError>> {
        Box::pin(async move {
            loop {
                let granted = self.call(Call::Claim, |w| w.try_claim(wait)).await?;
                if let Some(mut claim) = granted {
                    claim.delivered = true;
                    return Ok(Some(Box::new(claim) as Box<dyn Claim>));
                }
                if !wait {
                    return Ok(None);
                }
                let poll = self.sim.lock().rng.between(ms(200), ms(1500));
                self.sim.sleep(poll).await;
            }
        })
    }

    fn check_writable<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.call(Call::CheckWritable, World::check_writable))
    }

    fn load<'a>(
        &'a self,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<CredentialRecord>>, StoreError>> {
        Box::pin(self.call(Call::Load, World::load))
    }

    fn compare_and_swap<'a>(
        &'a self,
        _name: &'a str,
        expected: Option<u64>,
        record: &'a CredentialRecord,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.call_then(Call::Cas, true, move |w| {
            w.compare_and_swap(expected, record)
        }))
    }
}
