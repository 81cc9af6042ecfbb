//! Model-based property tests of the pure rotation state machine
//! ([`rekeyd::rotation::machine::step`]).
//!
//! The machine is driven by a *model* of everything around it:
//!
//! - a **provider** holding secrets `{id, description, client_id, value}`:
//!   ours (a bootstrap secret, an untagged manual one, one tagged for another
//!   credential of the same client) and another client's (some carrying
//!   exactly the tags our rotations use). A login with value `v` succeeds iff
//!   our client has a secret with value `v`; a new secret may be refused for
//!   its first few logins (propagation) or forever (a dud);
//! - **durable storage**: the last persisted record, all that survives a
//!   crash;
//! - a **process** holding the in-memory record and the transition being
//!   carried out, interpreting `Next` like `src/rotation/driver.rs` does:
//!   persist first when asked, then perform the side effect and feed its
//!   outcome back as the next event.
//!
//! Proptest picks, for every step, what happens: success, a transient
//! failure with no effect, a call performed whose reply is lost, a crash
//! before or after the persist / the provider call, a rotation request
//! (`Begin`) at any moment, time passing. After the random run the process
//! (optionally killed first) runs to stability without faults.
//!
//! Checked after every step: I1 (the durable current secret logs in; nothing
//! is deleted before the replacement is durable, verified and the grace
//! period over), I2 (a persisted pending value stays in the record until
//! promotion or abort), I4 (only secrets we created, or the bootstrap whose
//! id the operator gave, are ever deleted), persist-before-effect (every
//! provider call matches the *durable* journal), and that the durable record
//! only moves along the journal's edges. At the end: stable, and I3 (exactly
//! the secrets that should exist, no orphans, everything foreign untouched).
//!
//! Also: deterministic regressions of tricky sequences, and a property over
//! every (phase, event) pair (`step` is total, refuses out-of-phase events,
//! and its `Next` always fits the record it returns).
//!
//! `PROPTEST_CASES=200000 cargo test --test rotation_model` for a deep run;
//! a failure replays its minimal case with a step-by-step trace.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rekeyd::rotation::machine::{self, Event, Next, Transition};
use rekeyd::rotation::{rotation_id_of, secret_description};
use rekeyd::store::{CredentialRecord, Rotation, SecretEntry};
use secrecy::{ExposeSecret, SecretString};

/// The credential's name (its secrets are tagged `rekeyd:maps:<rid>`).
const CRED: &str = "maps";
const CLIENT: &str = "our-client";
const OTHER_CLIENT: &str = "other-client";
const BOOT_ID: &str = "boot";
const BOOT_VALUE: &str = "boot-value";
/// Logins the model driver tries within its verify window before it calls
/// the pending secret rejected (the real driver: 60 s of retries).
const VERIFY_WINDOW: u32 = 3;
/// A propagation delay that never ends: a secret the provider never accepts.
const NEVER: u32 = u32::MAX;

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

// --- model provider ---------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelSecret {
    id: String,
    description: String,
    client_id: String,
    value: String,
    /// Logins refused before the secret is accepted (propagation); `NEVER`.
    refusals_left: u32,
}

#[derive(Debug, Default)]
struct Provider {
    secrets: Vec<ModelSecret>,
    next_id: u32,
    /// Ids of the secrets our create calls made (for our client).
    created: BTreeSet<String>,
}

impl Provider {
    fn ours_with_value(&self, value: &str) -> Option<&ModelSecret> {
        self.secrets
            .iter()
            .find(|s| s.client_id == CLIENT && s.value == value)
    }

    /// Whether a login with `value` succeeds now (no side effect).
    fn accepts(&self, value: &str) -> bool {
        self.ours_with_value(value)
            .is_some_and(|s| s.refusals_left == 0)
    }

    /// A login attempt: counts down propagation.
    fn login(&mut self, value: &str) -> bool {
        match self
            .secrets
            .iter_mut()
            .find(|s| s.client_id == CLIENT && s.value == value)
        {
            Some(s) if s.refusals_left == 0 => true,
            Some(s) => {
                if s.refusals_left != NEVER {
                    s.refusals_left -= 1;
                }
                false
            }
            None => false,
        }
    }

    fn create(&mut self, description: String, refusals_left: u32) -> (String, String) {
        self.next_id += 1;
        let id = format!("s{}", self.next_id);
        let value = format!("value-{}", self.next_id);
        self.secrets.push(ModelSecret {
            id: id.clone(),
            description,
            client_id: CLIENT.to_string(),
            value: value.clone(),
            refusals_left,
        });
        self.created.insert(id.clone());
        (id, value)
    }

    /// Deletes secret `id`; `false`: 404.
    fn delete(&mut self, id: &str) -> bool {
        let before = self.secrets.len();
        self.secrets.retain(|s| s.id != id);
        self.secrets.len() != before
    }

    fn get(&self, id: &str) -> Option<&ModelSecret> {
        self.secrets.iter().find(|s| s.id == id)
    }
}

/// Secrets that are not rekeyd's to touch: ours made by hand or for another
/// credential, and another client's, some tagged exactly like the secrets
/// of our rotations `r1`..`r3` ("whatever GET returns").
fn foreign_secrets() -> Vec<ModelSecret> {
    let secret = |id: &str, description: String, client_id: &str| ModelSecret {
        id: id.to_string(),
        description,
        client_id: client_id.to_string(),
        value: format!("value-{id}"),
        refusals_left: 0,
    };
    vec![
        secret("manual", "created by hand".into(), CLIENT),
        secret("sibling", secret_description("maps-2", "r1"), CLIENT),
        secret(
            "colon",
            format!("{}:x", secret_description(CRED, "r1")),
            CLIENT,
        ),
        secret("other-1", secret_description(CRED, "r1"), OTHER_CLIENT),
        secret("other-2", secret_description(CRED, "r2"), OTHER_CLIENT),
        secret("other-3", secret_description(CRED, "r3"), OTHER_CLIENT),
        secret("other-hand", "created by hand".into(), OTHER_CLIENT),
    ]
}

// --- faults -----------------------------------------------------------------

/// What happens at the next step of the simulation.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// The next persist or provider call succeeds. A secret created by it is
    /// refused for its first `propagation` logins (`NEVER`: always).
    Ok { propagation: u32 },
    /// The store or provider call fails with no effect; the run ends with an
    /// error and the next one resumes from the store.
    Fail,
    /// The call takes effect but its reply is lost (a created secret's value
    /// is unknown to us); the run ends with an error. For a wait: an early
    /// wake-up (the wall clock may not have reached the deadline).
    Lost,
    /// `kill -9` before the persist / the provider call.
    CrashBefore,
    /// `kill -9` right after the persist / the provider call, before its
    /// outcome is applied.
    CrashAfter,
    /// A rotation is requested: `Begin` with a fresh id, fed to the record
    /// the process holds, whatever it was doing.
    Begin,
    /// Wall-clock time passes (seconds).
    Advance(u64),
}

/// Ops drawn as small numbers (cheap to generate and shrink; 0 is `OK`, so
/// shrinking removes faults), weighted by how many numbers map to each.
fn op() -> impl Strategy<Value = Op> {
    (0u8..28).prop_map(|n| match n {
        0..=9 => OK,
        10 => Op::Ok { propagation: 1 },
        11 => Op::Ok {
            propagation: VERIFY_WINDOW - 1,
        },
        12 => Op::Ok {
            propagation: VERIFY_WINDOW + 1,
        },
        13 => Op::Ok { propagation: NEVER },
        14 | 15 => Op::Fail,
        16 | 17 => Op::Lost,
        18 | 19 => Op::CrashBefore,
        20 | 21 => Op::CrashAfter,
        22 | 23 => Op::Begin,
        24 => Op::Advance(1),
        25 => Op::Advance(10),
        26 => Op::Advance(60),
        _ => Op::Advance(400),
    })
}

const OK: Op = Op::Ok { propagation: 0 };

// --- the simulation ---------------------------------------------------------

/// A running rekeyd process (the driver's `Run`).
struct Proc {
    /// The record as last loaded or persisted (the driver's `self.record`).
    mem: CredentialRecord,
    /// The transition being carried out.
    t: Transition,
    /// Whether `t.record` is written (always true when `!t.persist`).
    persisted: bool,
}

/// How often interesting situations came up (the model must not be vacuous).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    promotions: u64,
    completions: u64,
    aborts: u64,
    orphans_deleted: u64,
    deletes_not_found: u64,
    bootstrap_deleted: u64,
    unknown_id_kept: u64,
    begins_while_busy: u64,
    early_wakeups: u64,
    crashes: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.promotions += o.promotions;
        self.completions += o.completions;
        self.aborts += o.aborts;
        self.orphans_deleted += o.orphans_deleted;
        self.deletes_not_found += o.deletes_not_found;
        self.bootstrap_deleted += o.bootstrap_deleted;
        self.unknown_id_kept += o.unknown_id_kept;
        self.begins_while_busy += o.begins_while_busy;
        self.early_wakeups += o.early_wakeups;
        self.crashes += o.crashes;
    }
}

struct Sim {
    now: SystemTime,
    grace: Duration,
    /// Whether the operator gave the bootstrap's id (`initial_secret_id`).
    bootstrap_known: bool,
    provider: Provider,
    /// The record in the store: what survives a crash.
    durable: CredentialRecord,
    proc: Option<Proc>,
    rids: u32,
    /// Values a verify login succeeded with, and when.
    verified: BTreeMap<String, SystemTime>,
    /// Every id a delete call was made for.
    deleted: Vec<String>,
    stats: Stats,
    /// What happened, step by step (only when asked for: it is costly).
    trace: Option<Vec<String>>,
}

impl Sim {
    fn with_trace(bootstrap_known: bool, grace: Duration, trace: bool) -> Sim {
        let mut provider = Provider::default();
        provider.secrets.push(ModelSecret {
            id: BOOT_ID.into(),
            description: "bootstrap".into(),
            client_id: CLIENT.into(),
            value: BOOT_VALUE.into(),
            refusals_left: 0,
        });
        provider.secrets.extend(foreign_secrets());
        let durable = CredentialRecord::new(SecretEntry {
            id: bootstrap_known.then(|| BOOT_ID.to_string()),
            value: SecretString::from(BOOT_VALUE),
            created_at: t0(),
        });
        Sim {
            now: t0(),
            grace,
            bootstrap_known,
            provider,
            durable,
            proc: None,
            rids: 0,
            verified: BTreeMap::new(),
            deleted: Vec::new(),
            stats: Stats::default(),
            trace: trace.then(|| {
                vec![format!(
                    "bootstrap id known: {bootstrap_known}, grace {}s",
                    grace.as_secs()
                )]
            }),
        }
    }

    #[track_caller]
    fn fail(&self, msg: &str) -> ! {
        match &self.trace {
            Some(trace) => panic!("{msg}\n--- trace ---\n{}", trace.join("\n")),
            None => panic!("{msg}"),
        }
    }

    #[track_caller]
    fn expect(&self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fail(&msg())
        }
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push(line());
        }
    }

    fn secs(&self, t: SystemTime) -> i64 {
        match t.duration_since(t0()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }

    fn fresh_rid(&mut self) -> String {
        self.rids += 1;
        format!("r{}", self.rids)
    }

    // --- one step ---

    fn apply(&mut self, op: Op) {
        if self.trace.is_some() {
            let line = format!(
                "t={:>5} store={:<40} {op:?}",
                self.secs(self.now),
                show(&self.durable)
            );
            self.log(|| line);
        }
        match op {
            Op::Advance(s) => self.now += Duration::from_secs(s),
            Op::Begin => {
                let rid = self.fresh_rid();
                let mem = match self.proc.take() {
                    Some(p) => p.mem,
                    None => self.durable.clone(),
                };
                if !matches!(mem.rotation, Rotation::Idle) {
                    self.stats.begins_while_busy += 1;
                }
                self.run(mem, Event::Begin { rid });
            }
            _ => match self.proc.take() {
                // The next run (schedule, restart) resumes from the store.
                None => {
                    if matches!(op, Op::Ok { .. } | Op::Lost | Op::CrashAfter) {
                        self.run(self.durable.clone(), Event::Resume);
                    }
                }
                Some(p) => self.advance(p, op),
            },
        }
        self.check_always();
    }

    /// Applies `event` to `mem` and carries on with the transition.
    fn run(&mut self, mem: CredentialRecord, event: Event) {
        let shown = {
            let e = self.trace.is_some().then(|| event.clone());
            move || e.as_ref().map(show_event).unwrap_or_default()
        };
        let t = match machine::step(&mem, event, self.now, self.grace) {
            Ok(t) => t,
            Err(e) => self.fail(&format!("the machine refused its own step: {e}")),
        };
        // The driver steps from the record it persisted: a change that is
        // not persisted would be silently dropped.
        self.expect(t.persist || same(&t.record, &mem), || {
            format!(
                "{}: record changed without persist: {}",
                shown(),
                show(&t.record)
            )
        });
        if t.warning
            .as_ref()
            .is_some_and(|w| w.contains("initial_secret_id"))
        {
            self.stats.unknown_id_kept += 1;
        }
        if self.trace.is_some() {
            let line = format!(
                "        {} -> persist={} {} next={:?}{}",
                shown(),
                t.persist,
                show(&t.record),
                t.next,
                if t.warning.is_some() {
                    " (warning)"
                } else {
                    ""
                }
            );
            self.log(|| line);
        }
        if t.next == Next::Stable && !t.persist {
            self.proc = None;
        } else {
            let persisted = !t.persist;
            self.proc = Some(Proc { mem, t, persisted });
        }
    }

    fn crash(&mut self) {
        self.stats.crashes += 1;
        self.log(|| "        (process gone)".into());
    }

    fn advance(&mut self, mut p: Proc, op: Op) {
        if !p.persisted {
            match op {
                Op::Fail | Op::CrashBefore => self.crash(),
                Op::Ok { .. } => {
                    self.persist(&p.t.record);
                    p.mem = p.t.record.clone();
                    p.persisted = true;
                    if p.t.next != Next::Stable {
                        self.proc = Some(p);
                    }
                }
                Op::Lost | Op::CrashAfter => {
                    self.persist(&p.t.record);
                    self.crash();
                }
                Op::Begin | Op::Advance(_) => unreachable!(),
            }
            return;
        }
        let next = p.t.next.clone();
        match self.perform(&next, op) {
            Some(event) => self.run(p.mem, event),
            None => self.crash(),
        }
    }

    /// Performs `next` like the driver, with the outcome `op`; `None`: the
    /// run ends (error or crash) and the next one resumes from the store.
    fn perform(&mut self, next: &Next, op: Op) -> Option<Event> {
        let effect = !matches!(op, Op::Fail | Op::CrashBefore);
        let replied = matches!(op, Op::Ok { .. });
        let durable = self.durable.clone();
        match next {
            Next::Stable => unreachable!("stable processes end"),
            Next::DeleteTagged { rid } => {
                self.expect(
                    matches!(&durable.rotation, Rotation::Creating { rid: r } if r == rid),
                    || {
                        format!(
                            "DeleteTagged({rid}) while the store says {}",
                            show(&durable)
                        )
                    },
                );
                if !effect {
                    return None;
                }
                // Like the driver: tagged with `rid` for this credential,
                // and (when the provider says) of our client.
                let tagged: Vec<String> = self
                    .provider
                    .secrets
                    .iter()
                    .filter(|s| {
                        rotation_id_of(CRED, &s.description) == Some(rid.as_str())
                            && s.client_id == CLIENT
                    })
                    .map(|s| s.id.clone())
                    .collect();
                for id in tagged {
                    self.delete(&id);
                    self.stats.orphans_deleted += 1;
                    if !replied {
                        // Lost / crash: after the first delete.
                        return None;
                    }
                }
                replied.then_some(Event::TaggedDeleted)
            }
            Next::Create { rid } => {
                self.expect(
                    matches!(&durable.rotation, Rotation::Creating { rid: r } if r == rid),
                    || format!("Create({rid}) while the store says {}", show(&durable)),
                );
                if !effect {
                    return None;
                }
                let propagation = match op {
                    Op::Ok { propagation } => propagation,
                    _ => 0,
                };
                let (id, value) = self
                    .provider
                    .create(secret_description(CRED, rid), propagation);
                self.log(|| format!("        created {id}"));
                replied.then(|| Event::Created {
                    id,
                    value: SecretString::from(value),
                })
            }
            Next::Verify => {
                let Rotation::Created { pending, .. } = &durable.rotation else {
                    self.fail(&format!("Verify while the store says {}", show(&durable)))
                };
                if !effect {
                    return None;
                }
                let value = pending.value.expose_secret().to_string();
                let attempts = if replied { VERIFY_WINDOW } else { 1 };
                for _ in 0..attempts {
                    if self.provider.login(&value) {
                        self.verified.insert(value, self.now);
                        return replied.then_some(Event::Verified);
                    }
                }
                replied.then_some(Event::VerifyRejected)
            }
            Next::DeletePending { id } => {
                self.expect(
                    matches!(&durable.rotation, Rotation::Created { pending, .. } if pending.id.as_deref() == Some(id)),
                    || format!("DeletePending({id}) while the store says {}", show(&durable)),
                );
                if !effect {
                    return None;
                }
                self.delete(id);
                replied.then_some(Event::PendingDeleted)
            }
            Next::WaitUntil(at) => {
                self.expect(
                    matches!(&durable.rotation, Rotation::Promoted { delete_after, .. } if delete_after == at),
                    || format!("WaitUntil while the store says {}", show(&durable)),
                );
                match op {
                    Op::Ok { .. } => {
                        self.now = self.now.max(*at);
                        Some(Event::GraceOver)
                    }
                    Op::Lost => {
                        if self.now < *at {
                            self.stats.early_wakeups += 1;
                        }
                        Some(Event::GraceOver)
                    }
                    _ => None,
                }
            }
            Next::DeleteOld { id } => {
                let Rotation::Promoted {
                    old, delete_after, ..
                } = &durable.rotation
                else {
                    self.fail(&format!(
                        "DeleteOld({id}) while the store says {}",
                        show(&durable)
                    ))
                };
                self.expect(old.id.as_deref() == Some(id), || {
                    format!("DeleteOld({id}) but the store's old is {:?}", old.id)
                });
                // I1: replacement durable (current) and verified, grace over.
                let current = durable.current.value.expose_secret();
                let verified_at = self.verified.get(current).copied();
                self.expect(
                    verified_at.is_some_and(|v| self.now >= v + self.grace)
                        && self.now >= *delete_after,
                    || {
                        format!(
                            "I1: DeleteOld({id}) at t={} but the replacement was verified at {:?} (grace {}s, delete_after t={})",
                            self.secs(self.now),
                            verified_at.map(|v| self.secs(v)),
                            self.grace.as_secs(),
                            self.secs(*delete_after)
                        )
                    },
                );
                if !effect {
                    return None;
                }
                self.delete(id);
                replied.then_some(Event::OldDeleted)
            }
        }
    }

    /// A delete call at the model provider, checked for I1 and I4.
    fn delete(&mut self, id: &str) {
        self.expect(
            self.provider.created.contains(id) || (self.bootstrap_known && id == BOOT_ID),
            || format!("I4: deleting {id}, which rekeyd neither created nor was given"),
        );
        if let Some(s) = self.provider.get(id) {
            self.expect(s.client_id == CLIENT, || {
                format!("I4: deleting {id} of client {}", s.client_id)
            });
            self.expect(
                s.value != self.durable.current.value.expose_secret(),
                || format!("I1: deleting {id}, the stored current secret"),
            );
        }
        self.expect(self.durable.current.id.as_deref() != Some(id), || {
            format!("I1: deleting {id}, the stored current secret's id")
        });
        let found = self.provider.delete(id);
        if !found {
            self.stats.deletes_not_found += 1;
        }
        if found && id == BOOT_ID {
            self.stats.bootstrap_deleted += 1;
        }
        self.deleted.push(id.to_string());
        self.log(|| format!("        delete {id}: {}", if found { "ok" } else { "404" }));
    }

    /// Writes `new` to the store, checking that the journal only moves along
    /// its edges (which is also I2: a persisted pending value stays until
    /// promoted or, once deleted at the provider, abandoned).
    fn persist(&mut self, new: &CredentialRecord) {
        let old = &self.durable;
        let same_current = same_entry(&old.current, &new.current);
        let same_last = old.last_rotated_at == new.last_rotated_at;
        let edge = format!("{} => {}", show(old), show(new));
        match (&old.rotation, &new.rotation) {
            (Rotation::Idle, Rotation::Creating { .. }) => {
                self.expect(same_current && same_last, || format!("bad begin: {edge}"));
            }
            (Rotation::Creating { rid }, Rotation::Created { rid: r2, pending }) => {
                self.expect(same_current && same_last && rid == r2, || {
                    format!("bad created: {edge}")
                });
                // I3: the persisted pending secret is the one made for `rid`.
                let at = pending.id.as_deref().and_then(|id| self.provider.get(id));
                self.expect(
                    at.is_some_and(|s| {
                        s.value == pending.value.expose_secret()
                            && s.client_id == CLIENT
                            && s.description == secret_description(CRED, rid)
                    }),
                    || format!("pending is not the secret created for {rid}: {edge}"),
                );
            }
            (Rotation::Created { pending, .. }, Rotation::Promoted { old: o, .. }) => {
                // I2 + I1: the pending value becomes current, and only once
                // a login with it has succeeded.
                self.expect(
                    same_entry(&new.current, pending) && same_entry(o, &old.current) && same_last,
                    || format!("I2: bad promotion: {edge}"),
                );
                self.expect(
                    self.verified.contains_key(pending.value.expose_secret()),
                    || format!("I1: promoted a secret no login succeeded with: {edge}"),
                );
                self.stats.promotions += 1;
            }
            (Rotation::Created { pending, .. }, Rotation::Idle) => {
                // I2: abandoning the pending value is fine only once it is
                // gone at the provider (else it would be an orphan).
                self.expect(same_current && same_last, || format!("bad abort: {edge}"));
                self.expect(
                    self.provider
                        .ours_with_value(pending.value.expose_secret())
                        .is_none(),
                    || format!("I2/I3: pending forgotten while it exists: {edge}"),
                );
                self.stats.aborts += 1;
            }
            (Rotation::Promoted { old: o, .. }, Rotation::Idle) => {
                // `last_rotated_at`: when the finish was decided (the write
                // may come later).
                self.expect(
                    same_current && new.last_rotated_at.is_some_and(|t| t <= self.now),
                    || format!("bad finish: {edge}"),
                );
                let gone = match &o.id {
                    Some(id) => self.provider.get(id).is_none(),
                    // Only the bootstrap can have an unknown id.
                    None => !self.bootstrap_known && o.value.expose_secret() == BOOT_VALUE,
                };
                self.expect(gone, || {
                    format!("finished with the old secret alive: {edge}")
                });
                self.stats.completions += 1;
            }
            _ => self.fail(&format!("I2: not a journal transition: {edge}")),
        }
        self.log(|| format!("        persisted {}", show(new)));
        self.durable = new.clone();
    }

    /// Checked after every step.
    fn check_always(&self) {
        // I1: the store always holds a secret the provider accepts.
        let current = self.durable.current.value.expose_secret();
        self.expect(self.provider.accepts(current), || {
            format!(
                "I1: the stored current secret {:?} does not log in",
                self.durable.current.id
            )
        });
        if let Some(p) = &self.proc {
            self.expect(same(&p.mem, &self.durable), || {
                "model: the process's record is not the stored one".into()
            });
        }
    }

    /// Runs without faults until stable; `restart`: kill the running
    /// process first, the next one resumes from the store.
    fn stabilize(&mut self, restart: bool) {
        self.log(|| format!("--- no more faults (restart: {restart}) ---"));
        if restart && self.proc.take().is_some() {
            self.crash();
        }
        for _ in 0..64 {
            self.apply(OK);
            if self.proc.is_none() && matches!(self.durable.rotation, Rotation::Idle) {
                return;
            }
        }
        self.fail("did not converge to a stable state")
    }

    /// After [`Self::stabilize`]: I3 and the foreign secrets.
    fn check_final(&self) {
        self.expect(
            matches!(self.durable.rotation, Rotation::Idle) && self.proc.is_none(),
            || "not stable".into(),
        );
        let current = &self.durable.current;
        self.expect(self.provider.accepts(current.value.expose_secret()), || {
            "I1: current does not log in".into()
        });
        let rotated = current.value.expose_secret() != BOOT_VALUE;
        self.expect(rotated == (self.stats.promotions > 0), || {
            "model: current changed iff a promotion was persisted".into()
        });

        // I3: our client has exactly the secrets it should.
        let foreign = foreign_secrets();
        let mut expected: BTreeSet<String> = foreign
            .iter()
            .filter(|s| s.client_id == CLIENT)
            .map(|s| s.id.clone())
            .collect();
        if !rotated || !self.bootstrap_known {
            expected.insert(BOOT_ID.into());
        }
        if rotated {
            match &current.id {
                Some(id) => expected.insert(id.clone()),
                None => self.fail("a rotated secret without id"),
            };
        }
        let ours: BTreeSet<String> = self
            .provider
            .secrets
            .iter()
            .filter(|s| s.client_id == CLIENT)
            .map(|s| s.id.clone())
            .collect();
        self.expect(ours == expected, || {
            format!("I3: our client has {ours:?}, expected {expected:?}")
        });
        let tagged: Vec<&str> = self
            .provider
            .secrets
            .iter()
            .filter(|s| s.client_id == CLIENT && rotation_id_of(CRED, &s.description).is_some())
            .map(|s| s.id.as_str())
            .collect();
        let want: Vec<&str> = if rotated {
            current.id.as_deref().into_iter().collect()
        } else {
            Vec::new()
        };
        self.expect(tagged == want, || {
            format!("I3: rekeyd-tagged secrets {tagged:?}, expected {want:?}")
        });

        // I4: foreign secrets untouched, byte for byte.
        for f in &foreign {
            self.expect(self.provider.get(&f.id) == Some(f), || {
                format!("I4: foreign secret {} was touched", f.id)
            });
        }
        if rotated && !self.bootstrap_known {
            self.expect(self.stats.unknown_id_kept > 0, || {
                "the kept bootstrap was not warned about".into()
            });
        }
    }
}

fn same_entry(a: &SecretEntry, b: &SecretEntry) -> bool {
    a.id == b.id
        && a.value.expose_secret() == b.value.expose_secret()
        && a.created_at == b.created_at
}

fn same(a: &CredentialRecord, b: &CredentialRecord) -> bool {
    let rotation = match (&a.rotation, &b.rotation) {
        (Rotation::Idle, Rotation::Idle) => true,
        (Rotation::Creating { rid: x }, Rotation::Creating { rid: y }) => x == y,
        (Rotation::Created { rid: x, pending: p }, Rotation::Created { rid: y, pending: q }) => {
            x == y && same_entry(p, q)
        }
        (
            Rotation::Promoted {
                rid: x,
                old: p,
                delete_after: s,
            },
            Rotation::Promoted {
                rid: y,
                old: q,
                delete_after: t,
            },
        ) => x == y && same_entry(p, q) && s == t,
        _ => false,
    };
    rotation && same_entry(&a.current, &b.current) && a.last_rotated_at == b.last_rotated_at
}

/// Short form for traces.
fn show(r: &CredentialRecord) -> String {
    let id = |e: &SecretEntry| e.id.clone().unwrap_or_else(|| "?".into());
    let rotation = match &r.rotation {
        Rotation::Idle => "idle".to_string(),
        Rotation::Creating { rid } => format!("creating({rid})"),
        Rotation::Created { rid, pending } => format!("created({rid},{})", id(pending)),
        Rotation::Promoted { rid, old, .. } => format!("promoted({rid},old={})", id(old)),
    };
    format!("cur={} {rotation}", id(&r.current))
}

fn show_event(e: &Event) -> String {
    match e {
        Event::Created { id, .. } => format!("Created({id})"),
        other => format!("{other:?}"),
    }
}

// --- the property -----------------------------------------------------------

#[derive(Debug, Clone)]
struct Scenario {
    bootstrap_known: bool,
    /// Whether the process is killed before the final fault-free run.
    restart: bool,
    grace_secs: u64,
    ops: Vec<Op>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0u64), Just(30), Just(300)],
        prop::collection::vec(op(), 0..120),
    )
        .prop_map(|(bootstrap_known, restart, grace_secs, ops)| Scenario {
            bootstrap_known,
            restart,
            grace_secs,
            ops,
        })
}

fn run_scenario(s: &Scenario, trace: bool) -> Stats {
    let mut sim = Sim::with_trace(s.bootstrap_known, Duration::from_secs(s.grace_secs), trace);
    for op in &s.ops {
        sim.apply(*op);
    }
    sim.stabilize(s.restart);
    sim.check_final();
    sim.stats
}

/// The main property: random faults, invariants at every step, convergence.
#[test]
fn random_faults_keep_invariants_and_converge() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let total = RefCell::new(Stats::default());
    let result = runner.run(&scenario(), |s| {
        let stats = run_scenario(&s, false);
        total.borrow_mut().add(&stats);
        Ok(())
    });
    if let Err(e) = result {
        // Replay the minimal failing case with its step-by-step trace.
        if let proptest::test_runner::TestError::Fail(_, s) = &e {
            eprintln!("minimal failing case: {s:#?}");
            run_scenario(s, true);
        }
        panic!("{e}");
    }
    let total = total.into_inner();
    println!("{cases} cases: {total:#?}");
    // The faults must actually reach the interesting paths.
    for (what, n) in [
        ("promotions", total.promotions),
        ("completions", total.completions),
        ("aborts", total.aborts),
        ("orphans deleted", total.orphans_deleted),
        ("deletes answered 404", total.deletes_not_found),
        ("bootstrap deleted", total.bootstrap_deleted),
        ("unknown bootstrap id kept", total.unknown_id_kept),
        ("begins while busy", total.begins_while_busy),
        ("early wake-ups", total.early_wakeups),
        ("crashes", total.crashes),
    ] {
        assert!(
            n >= u64::from(cases / 100).max(1),
            "only {n} {what} in {cases} cases"
        );
    }
}

// --- regressions: tricky sequences, step by step -----------------------------

/// Runs `ops` from a fresh start and returns the simulation.
fn sim_with(bootstrap_known: bool, grace_secs: u64, ops: &[Op]) -> Sim {
    let mut sim = Sim::with_trace(bootstrap_known, Duration::from_secs(grace_secs), true);
    for op in ops {
        sim.apply(*op);
    }
    sim
}

fn phase(sim: &Sim) -> &'static str {
    sim.durable.rotation.phase()
}

#[test]
fn crash_after_create_before_persist_leaves_an_orphan_that_resume_deletes() {
    // Begin; persist creating; create performed, then kill -9.
    let mut sim = sim_with(true, 30, &[Op::Begin, OK, Op::CrashAfter]);
    assert_eq!(phase(&sim), "creating");
    assert!(sim.proc.is_none());
    let orphan = sim
        .provider
        .get("s1")
        .expect("the create reached the provider");
    assert_eq!(orphan.description, secret_description(CRED, "r1"));

    // A rotation request on restart finishes the interrupted one (same rid)
    // and lists + deletes the orphan before creating again.
    sim.apply(Op::Begin);
    assert_eq!(
        sim.proc.as_ref().map(|p| p.t.next.clone()),
        Some(Next::DeleteTagged { rid: "r1".into() })
    );
    sim.apply(OK);
    assert!(sim.provider.get("s1").is_none(), "orphan deleted");
    assert_eq!(
        sim.deleted,
        ["s1"],
        "and nothing else (other-1 carries r1 too)"
    );
    assert_eq!(
        sim.proc.as_ref().map(|p| p.t.next.clone()),
        Some(Next::Create { rid: "r1".into() })
    );
    sim.stabilize(true);
    sim.check_final();
    assert_eq!(sim.durable.current.id.as_deref(), Some("s2"));
    assert_eq!(sim.stats.orphans_deleted, 1);
}

#[test]
fn lost_create_reply_is_an_orphan_too() {
    let mut sim = sim_with(false, 0, &[Op::Begin, OK, Op::Lost]);
    assert_eq!(phase(&sim), "creating");
    assert!(sim.provider.get("s1").is_some());
    sim.stabilize(true);
    sim.check_final();
    assert!(sim.provider.get("s1").is_none());
    assert_eq!(sim.durable.current.id.as_deref(), Some("s2"));
}

#[test]
fn crash_after_persist_created_verifies_the_stored_secret_without_creating_again() {
    let mut sim = sim_with(true, 30, &[Op::Begin, OK, OK, Op::CrashAfter]);
    assert_eq!(phase(&sim), "created");
    sim.apply(OK); // restart: Resume
    assert_eq!(
        sim.proc.as_ref().map(|p| p.t.next.clone()),
        Some(Next::Verify)
    );
    sim.stabilize(true);
    sim.check_final();
    assert_eq!(sim.provider.created.len(), 1);
    assert_eq!(sim.durable.current.id.as_deref(), Some("s1"));
}

#[test]
fn crash_after_delete_old_before_persist_idle_treats_404_as_done() {
    let ops = [
        Op::Begin,
        OK,             // persist creating
        OK,             // create
        OK,             // persist created
        OK,             // verify
        OK,             // persist promoted
        OK,             // wait out the grace period
        Op::CrashAfter, // delete old performed, kill -9 before persist idle
    ];
    let mut sim = sim_with(true, 30, &ops);
    assert_eq!(phase(&sim), "promoted");
    assert!(
        sim.provider.get(BOOT_ID).is_none(),
        "the old secret is gone"
    );
    assert_eq!(sim.durable.current.id.as_deref(), Some("s1"));

    sim.apply(OK); // restart: Resume → DeleteOld again
    assert_eq!(
        sim.proc.as_ref().map(|p| p.t.next.clone()),
        Some(Next::DeleteOld { id: BOOT_ID.into() })
    );
    sim.apply(OK); // 404 → OldDeleted → finish
    assert_eq!(sim.stats.deletes_not_found, 1);
    sim.apply(OK); // persist idle
    assert_eq!(phase(&sim), "idle");
    assert!(sim.proc.is_none());
    assert_eq!(sim.durable.last_rotated_at, Some(sim.now));
    sim.check_final();
}

#[test]
fn rejected_pending_is_deleted_and_the_old_secret_kept() {
    let ops = [
        Op::Begin,
        OK,
        Op::Ok { propagation: NEVER }, // the provider hands out a dud
        OK,                            // persist created
        OK,                            // verify: refused for the whole window
    ];
    let mut sim = sim_with(true, 30, &ops);
    assert_eq!(
        sim.proc.as_ref().map(|p| (p.t.next.clone(), p.t.persist)),
        Some((Next::DeletePending { id: "s1".into() }, false))
    );
    sim.apply(OK); // delete pending → abort
    assert!(sim.provider.get("s1").is_none());
    sim.apply(OK); // persist idle
    assert_eq!(phase(&sim), "idle");
    assert_eq!(sim.durable.current.value.expose_secret(), BOOT_VALUE);
    assert_eq!(sim.durable.last_rotated_at, None);
    assert_eq!(sim.stats.aborts, 1);
    sim.check_final();
}

#[test]
fn crash_between_deleting_the_pending_and_aborting_reverifies_then_aborts() {
    let ops = [
        Op::Begin,
        OK,
        Op::Ok { propagation: NEVER },
        OK,
        OK,             // verify rejected → DeletePending
        Op::CrashAfter, // pending deleted, kill -9 before the abort is written
    ];
    let mut sim = sim_with(false, 30, &ops);
    assert_eq!(phase(&sim), "created");
    assert!(sim.provider.get("s1").is_none());
    sim.stabilize(true);
    sim.check_final();
    assert_eq!(sim.stats.aborts, 1);
    assert_eq!(sim.stats.deletes_not_found, 1);
    assert_eq!(sim.deleted, ["s1", "s1"]);
}

#[test]
fn slow_propagation_within_the_window_is_verified_beyond_it_is_aborted() {
    let sim = sim_with(
        true,
        0,
        &[
            Op::Begin,
            OK,
            Op::Ok {
                propagation: VERIFY_WINDOW - 1,
            },
            OK,
            OK,
            OK,
        ],
    );
    assert_eq!(phase(&sim), "promoted");

    let mut sim = sim_with(
        true,
        0,
        &[
            Op::Begin,
            OK,
            Op::Ok {
                propagation: VERIFY_WINDOW,
            },
            OK,
            OK,
        ],
    );
    assert_eq!(
        sim.proc.as_ref().map(|p| p.t.next.clone()),
        Some(Next::DeletePending { id: "s1".into() })
    );
    let slow = SecretString::from(sim.provider.get("s1").unwrap().value.clone());
    sim.stabilize(false);
    sim.check_final();
    assert_eq!(sim.durable.current.value.expose_secret(), BOOT_VALUE);
    assert!(sim.provider.ours_with_value(slow.expose_secret()).is_none());

    // Killed before that delete: the restart verifies again, and by now the
    // secret has propagated, so it is promoted after all.
    let mut sim = sim_with(
        true,
        0,
        &[
            Op::Begin,
            OK,
            Op::Ok {
                propagation: VERIFY_WINDOW,
            },
            OK,
            OK,
            Op::CrashBefore,
        ],
    );
    assert_eq!(phase(&sim), "created");
    sim.stabilize(true);
    sim.check_final();
    assert_eq!(sim.durable.current.id.as_deref(), Some("s1"));
}

#[test]
fn begin_while_promoted_waits_out_the_grace_period_instead_of_rotating_again() {
    let mut sim = sim_with(true, 300, &[Op::Begin, OK, OK, OK, OK, OK]);
    assert_eq!(phase(&sim), "promoted");
    sim.apply(Op::Advance(10));
    sim.apply(Op::Begin);
    let at = t0() + Duration::from_secs(300);
    assert_eq!(
        sim.proc.as_ref().map(|p| p.t.next.clone()),
        Some(Next::WaitUntil(at))
    );
    // An early wake-up (clock behind the deadline) keeps waiting.
    sim.apply(Op::Lost);
    assert_eq!(
        sim.proc.as_ref().map(|p| p.t.next.clone()),
        Some(Next::WaitUntil(at))
    );
    assert!(sim.provider.get(BOOT_ID).is_some());
    sim.stabilize(true);
    sim.check_final();
    assert_eq!(
        sim.provider.created.len(),
        1,
        "no second rotation was started"
    );
    assert!(sim.now >= at);
}

#[test]
fn unknown_bootstrap_id_is_kept_and_later_rotations_clean_up_after_themselves() {
    // Two full rotations with grace 0.
    let rotation = [Op::Begin, OK, OK, OK, OK, OK, OK, OK];
    let mut sim = sim_with(false, 0, &rotation);
    for op in rotation {
        sim.apply(op);
    }
    sim.apply(OK); // the second one also deletes its old secret
    assert_eq!(phase(&sim), "idle");
    assert_eq!(sim.stats.completions, 2);
    assert_eq!(sim.stats.unknown_id_kept, 1);
    assert_eq!(
        sim.deleted,
        ["s1"],
        "the first rotation's secret, nothing else"
    );
    assert!(sim.provider.get(BOOT_ID).is_some());
    sim.stabilize(true);
    sim.check_final();
}

#[test]
fn idle_resume_does_nothing() {
    let mut sim = Sim::with_trace(true, Duration::from_secs(30), true);
    sim.stabilize(true);
    sim.check_final();
    assert!(sim.deleted.is_empty());
    assert!(sim.provider.created.is_empty());
}

// --- every (record, event) pair ---------------------------------------------

/// A record in any phase, at a time around `t0()`.
fn any_record() -> impl Strategy<Value = CredentialRecord> {
    (0u8..4, any::<bool>(), 0u64..100).prop_map(|(phase, old_id_known, delete_after)| {
        let entry = |id: Option<&str>, value: &str| SecretEntry {
            id: id.map(str::to_string),
            value: SecretString::from(value),
            created_at: t0(),
        };
        let old = entry(old_id_known.then_some("old"), "old-value");
        let new = entry(Some("new"), "new-value");
        let rid = "r1".to_string();
        let (current, rotation) = match phase {
            0 => (old, Rotation::Idle),
            1 => (old, Rotation::Creating { rid }),
            2 => (old, Rotation::Created { rid, pending: new }),
            _ => (
                new,
                Rotation::Promoted {
                    rid,
                    old,
                    delete_after: t0() + Duration::from_secs(delete_after),
                },
            ),
        };
        CredentialRecord {
            current,
            rotation,
            last_rotated_at: None,
        }
    })
}

fn any_event() -> impl Strategy<Value = Event> {
    (0u8..9).prop_map(|n| match n {
        0 => Event::Begin { rid: "r9".into() },
        1 => Event::Resume,
        2 => Event::TaggedDeleted,
        3 => Event::Created {
            id: "s9".into(),
            value: SecretString::from("value-9"),
        },
        4 => Event::Verified,
        5 => Event::VerifyRejected,
        6 => Event::PendingDeleted,
        7 => Event::GraceOver,
        _ => Event::OldDeleted,
    })
}

proptest! {
    #![proptest_config(Config {
        cases: 1000,
        failure_persistence: None,
        ..Config::default()
    })]

    /// `step` never panics; it takes exactly the events that belong to the
    /// record's phase (a late or duplicated outcome is refused, not applied
    /// to the wrong phase); a change is always persisted; and the next
    /// effect always matches the record it is to be performed against.
    #[test]
    fn step_is_total_and_next_matches_the_record(
        record in any_record(),
        event in any_event(),
        now in 0u64..200,
        grace in prop_oneof![Just(0u64), 0u64..100],
    ) {
        let now = t0() + Duration::from_secs(now);
        let phase = record.rotation.phase();
        let applies = match &event {
            Event::Begin { .. } | Event::Resume => true,
            Event::TaggedDeleted | Event::Created { .. } => phase == "creating",
            Event::Verified | Event::VerifyRejected | Event::PendingDeleted => phase == "created",
            Event::GraceOver | Event::OldDeleted => phase == "promoted",
        };
        let verified = matches!(event, Event::Verified);
        let result = machine::step(&record, event, now, Duration::from_secs(grace));
        prop_assert_eq!(result.is_ok(), applies);
        let Ok(t) = result else { return Ok(()) };
        let new = &t.record;
        prop_assert!(t.persist || same(new, &record), "changed without persist");
        if verified {
            prop_assert_eq!(new.current.id.as_deref(), Some("new"));
        } else {
            prop_assert!(same_entry(&new.current, &record.current), "current replaced");
        }
        let current_id = new.current.id.as_deref();
        match (&t.next, &new.rotation) {
            (Next::Stable, Rotation::Idle) => {}
            (Next::DeleteTagged { rid }, Rotation::Creating { rid: r })
            | (Next::Create { rid }, Rotation::Creating { rid: r }) => prop_assert_eq!(rid, r),
            (Next::Verify, Rotation::Created { .. }) => {}
            (Next::DeletePending { id }, Rotation::Created { pending, .. }) => {
                prop_assert_eq!(pending.id.as_deref(), Some(id.as_str()));
                prop_assert_ne!(current_id, Some(id.as_str()));
            }
            (Next::WaitUntil(at), Rotation::Promoted { delete_after, .. }) => {
                prop_assert_eq!(at, delete_after);
                prop_assert!(now < *at || verified, "waits for a deadline already passed");
            }
            (Next::DeleteOld { id }, Rotation::Promoted { old, delete_after, .. }) => {
                prop_assert_eq!(old.id.as_deref(), Some(id.as_str()));
                prop_assert_ne!(current_id, Some(id.as_str()));
                prop_assert!(now >= *delete_after, "deletes before the grace period is over");
            }
            (next, rotation) => prop_assert!(
                false,
                "next {:?} does not fit phase {}",
                next,
                rotation.phase()
            ),
        }
    }
}

/// Regression: `Verified` computes `delete_after = now + grace`; a grace
/// that overflows `SystemTime` (e.g. "500000000000years") must not panic,
/// or every resume in phase `created` would panic again.
#[test]
fn huge_grace_does_not_panic_the_machine() {
    let mut record = CredentialRecord::new(SecretEntry {
        id: Some("old".into()),
        value: SecretString::from("old-value"),
        created_at: t0(),
    });
    record.rotation = Rotation::Created {
        rid: "r1".into(),
        pending: SecretEntry {
            id: Some("new".into()),
            value: SecretString::from("new-value"),
            created_at: t0(),
        },
    };
    // What humantime makes of "500000000000years".
    let grace = Duration::from_secs(15_778_800_000_000_000_000);
    let _ = machine::step(&record, Event::Verified, t0(), grace);
}
