//! The world of the multi-actor simulation (`tests/multi_actor.rs`): one
//! seeded random source, the provider and store models' state, the trace,
//! and the invariant checks that run after every model call.
//!
//! Everything lives behind one `std::sync::Mutex` that is never held across
//! an `.await`: a model call locks it, applies its effect, runs the checks
//! and unlocks, so every check sees the provider and the store at one
//! instant.
//!
//! Include with `#[path = "support/multi_actor/mod.rs"] mod sim;`.

pub mod actors;
pub mod provider;
pub mod store;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use rekeyd::provider::Capabilities;
use rekeyd::store::{CredentialRecord, Rotation};
use secrecy::ExposeSecret;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use provider::ProviderState;
use store::StoreState;

/// The credential under test; its secrets are tagged `rekeyd:maps:`.
pub const CRED: &str = "maps";
/// Our OAuth2 client.
pub const CLIENT: &str = "maps-client";
/// Another client of the same customer: the provider lists its secrets too.
pub const OTHER_CLIENT: &str = "other-client";
/// How long a claim outlives its holder's last renewal.
pub const CLAIM_TTL: Duration = Duration::from_secs(15);
/// Lifetime of every token the provider model mints.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(120);

/// The provider's wall clock at the start of a run.
pub fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// SplitMix64: small, fast, and the same sequence on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// A duration uniform in `[lo, hi]` at microsecond resolution, so that
    /// two actors rarely wake at the very same instant.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(self.below(span + 1))
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        items.get(self.below(items.len() as u64) as usize)
    }
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

tokio::task_local! {
    /// The actor whose task makes a model call (an index into
    /// [`World::actors`]); unset in the harness itself.
    pub static ACTOR: usize;
}

pub fn current_actor() -> Option<usize> {
    ACTOR.try_with(|a| *a).ok()
}

/// The kinds of model calls; the interleaving of a run is the sequence of
/// (actor, call kind) pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Call {
    Login,
    List,
    Create,
    Delete,
    Claim,
    Release,
    Load,
    CheckWritable,
    Cas,
    /// Something the harness or a fault did: a crash, a stop, a lapse.
    Harness,
}

impl Call {
    pub fn name(self) -> &'static str {
        match self {
            Call::Login => "login",
            Call::List => "list",
            Call::Create => "create",
            Call::Delete => "delete",
            Call::Claim => "claim",
            Call::Release => "release",
            Call::Load => "load",
            Call::CheckWritable => "writable",
            Call::Cas => "cas",
            Call::Harness => "harness",
        }
    }

    pub fn is_store(self) -> bool {
        matches!(
            self,
            Call::Claim | Call::Load | Call::CheckWritable | Call::Cas
        )
    }
}

/// Before or after a call's effect: a crash before loses the call, a crash
/// after loses only its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Before,
    After,
}

/// Fault rates of one run. [`Faults::random`] draws them from the seed, so
/// seeds differ in which faults dominate as well as in where they strike.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Off for the final settle runs and in deterministic tests.
    pub enabled: bool,
    /// Upper bound of the usual delay before and after a call's effect.
    pub delay_max: Duration,
    /// A call that takes 0.5-3 s.
    pub p_slow: f64,
    /// Provider 5xx (no effect).
    pub p_5xx: f64,
    /// Windows (since the start) in which 90% of provider calls fail.
    pub outages: Vec<(Duration, Duration)>,
    /// A login of a good secret answered `invalid_client` (a flapping node).
    pub p_flap: f64,
    /// Create happened, its reply is lost.
    pub p_lost_create: f64,
    /// Delete happened, its reply is lost.
    pub p_lost_delete: f64,
    /// A new secret refused for up to `propagation_max`.
    pub p_propagation: f64,
    pub propagation_max: Duration,
    /// A new secret refused for far longer than a verify window.
    pub p_dud: f64,
    /// A new secret missing from lists for up to `list_lag_max`.
    pub p_list_lag: f64,
    pub list_lag_max: Duration,
    /// A deleted secret still logging in on a lagging node, up to
    /// `ghost_max`.
    pub p_ghost: f64,
    pub ghost_max: Duration,
    /// The provider revokes a secret as soon as it is promoted.
    pub p_revoke: f64,
    /// A store call fails (no effect).
    pub p_store_error: f64,
    /// A compare-and-swap lands, its reply is lost.
    pub p_lost_cas: f64,
    /// A store call stalls longer than the claim TTL.
    pub p_stall: f64,
    /// The store grants a held claim to another actor (the holder's lapsed).
    pub p_takeover: f64,
    /// A lapsed holder learns it late (clock skew): up to `skew_max`.
    pub p_skew: f64,
    pub skew_max: Duration,
    /// An actor crashes inside a model call.
    pub p_crash_in_call: f64,
    /// An actor's stop token is cancelled while its journal write is in flight.
    pub p_stop_in_write: f64,
}

impl Faults {
    pub fn none() -> Self {
        Faults {
            enabled: false,
            delay_max: ms(10),
            p_slow: 0.0,
            p_5xx: 0.0,
            outages: Vec::new(),
            p_flap: 0.0,
            p_lost_create: 0.0,
            p_lost_delete: 0.0,
            p_propagation: 0.0,
            propagation_max: Duration::ZERO,
            p_dud: 0.0,
            p_list_lag: 0.0,
            list_lag_max: Duration::ZERO,
            p_ghost: 0.0,
            ghost_max: Duration::ZERO,
            p_revoke: 0.0,
            p_store_error: 0.0,
            p_lost_cas: 0.0,
            p_stall: 0.0,
            p_takeover: 0.0,
            p_skew: 0.0,
            skew_max: Duration::ZERO,
            p_crash_in_call: 0.0,
            p_stop_in_write: 0.0,
        }
    }

    pub fn random(rng: &mut Rng, chaos: Duration) -> Self {
        let mut p = |max: f64| rng.unit() * max;
        let mut f = Faults {
            enabled: true,
            delay_max: Duration::ZERO,
            p_slow: p(0.05),
            p_5xx: p(0.2),
            outages: Vec::new(),
            p_flap: p(0.03),
            p_lost_create: p(0.3),
            p_lost_delete: p(0.3),
            p_propagation: p(0.7),
            propagation_max: Duration::ZERO,
            p_dud: p(0.08),
            p_list_lag: p(0.7),
            list_lag_max: Duration::ZERO,
            p_ghost: p(0.7),
            ghost_max: Duration::ZERO,
            p_revoke: p(0.4),
            p_store_error: p(0.06),
            p_lost_cas: p(0.05),
            p_stall: p(0.04),
            p_takeover: p(0.3),
            p_skew: p(1.0),
            skew_max: Duration::ZERO,
            p_crash_in_call: p(0.02),
            p_stop_in_write: p(0.03),
        };
        f.delay_max = rng.between(ms(1), ms(400));
        f.propagation_max = rng.between(secs(1), secs(15));
        f.list_lag_max = rng.between(secs(1), secs(10));
        f.ghost_max = rng.between(ms(100), secs(3));
        f.skew_max = rng.between(secs(1), secs(20));
        for _ in 0..rng.below(3) {
            let from = rng.between(Duration::ZERO, chaos);
            let to = from + rng.between(secs(2), secs(40));
            f.outages.push((from, to));
        }
        f
    }
}

/// What a login hook may answer instead of the provider's own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginReply {
    Ok,
    Rejected,
    ServerError,
}

/// Overrides for deterministic tests: `(actor, call, stage)` → delay.
pub type DelayHook = Box<dyn FnMut(Option<usize>, Call, Stage) -> Option<Duration> + Send>;
/// `(secret id, actor)` → reply.
pub type LoginHook = Box<dyn FnMut(&str, Option<usize>) -> Option<LoginReply> + Send>;

#[derive(Default)]
pub struct Hooks {
    pub delay: Option<DelayHook>,
    pub login: Option<LoginHook>,
}

/// Scenarios of the failure list (and a few more) that a run
/// reached; the random test asserts each is reached by some seed.
pub mod cover {
    /// (1) An actor resumed `creating` while another's create was in flight.
    pub const TAKEOVER_IN_CREATING: u32 = 1 << 0;
    /// (2) `set-secret` given the old secret of a promoted rotation.
    pub const SET_OLD_IN_GRACE: u32 = 1 << 1;
    /// (4) A stop token cancelled while its actor's journal write was in flight.
    pub const STOP_MID_WRITE: u32 = 1 << 2;
    /// (5) The promoted secret revoked during the grace period.
    pub const REVOKED_IN_GRACE: u32 = 1 << 3;
    /// (7) The pending secret answered many 5xx, then `invalid_client`.
    pub const LATE_REJECTION: u32 = 1 << 4;
    pub const LOST_CREATE: u32 = 1 << 5;
    pub const LOST_DELETE: u32 = 1 << 6;
    pub const STALL: u32 = 1 << 7;
    pub const SKEWED_LAPSE: u32 = 1 << 8;
    pub const GHOST_LOGIN: u32 = 1 << 9;
    pub const LIST_HID_SECRET: u32 = 1 << 10;
    pub const CRASH: u32 = 1 << 11;
    pub const FORCED_INSTALL: u32 = 1 << 12;
    pub const ABORTED: u32 = 1 << 13;
    pub const ROLLED_BACK: u32 = 1 << 14;
    pub const SWEPT_ORPHAN: u32 = 1 << 15;
    pub const CAS_CONFLICT: u32 = 1 << 16;
    pub const ENGINE_USED_OLD: u32 = 1 << 17;

    pub const NAMES: &[(u32, &str)] = &[
        (
            TAKEOVER_IN_CREATING,
            "(1) takeover while a create is in flight",
        ),
        (
            SET_OLD_IN_GRACE,
            "(2) set-secret with the old secret during grace",
        ),
        (STOP_MID_WRITE, "(4) stop token cancelled mid journal write"),
        (REVOKED_IN_GRACE, "(5) promoted secret revoked during grace"),
        (LATE_REJECTION, "(7) many 5xx then a late invalid_client"),
        (LOST_CREATE, "lost create reply"),
        (LOST_DELETE, "lost delete reply"),
        (STALL, "store stall longer than the claim TTL"),
        (SKEWED_LAPSE, "lapsed holder told late (skew)"),
        (GHOST_LOGIN, "deleted secret logged in on a lagging node"),
        (LIST_HID_SECRET, "list lagging behind a create"),
        (CRASH, "actor crashed"),
        (FORCED_INSTALL, "set-secret --force replaced a journal"),
        (ABORTED, "rotation aborted (new secret refused)"),
        (
            ROLLED_BACK,
            "promoted secret refused, old one current again",
        ),
        (SWEPT_ORPHAN, "untracked tagged secret swept"),
        (CAS_CONFLICT, "compare-and-swap conflict"),
        (ENGINE_USED_OLD, "engine fell back to the old secret"),
    ];
}

/// One model call as the interleaving sees it.
#[derive(Debug, Clone, Copy)]
pub struct TraceEvent {
    pub at: Duration,
    pub actor: Option<usize>,
    pub call: Call,
}

/// An actor of the run: its name, and the handles the harness and the
/// faults use to stop or crash it.
pub struct ActorInfo {
    pub name: String,
    pub stop: Option<CancellationToken>,
    pub abort: Option<AbortHandle>,
}

pub struct World {
    me: Weak<Sim>,
    /// What the provider model's secret API can do (MapsIndoors' shape
    /// unless a test runs another provider's profile).
    pub caps: Capabilities,
    pub rng: Rng,
    pub faults: Faults,
    pub hooks: Hooks,
    pub start: Instant,
    pub provider: ProviderState,
    pub store: StoreState,
    pub actors: Vec<ActorInfo>,
    /// Model calls in progress: (actor, call).
    pub in_flight: Vec<(Option<usize>, Call)>,
    pub events: Vec<TraceEvent>,
    /// Hash of the sequence of (actor, call kind): the interleaving.
    pub hash: u64,
    /// Human-readable trace, kept when asked for.
    pub lines: Option<Vec<String>>,
    pub violations: Vec<String>,
    pub coverage: u32,
    /// Millisecond ticks at which a timer of the simulation is due.
    ticks: BTreeSet<u64>,
    /// The run made more calls than any sane run does: frozen.
    runaway: bool,
    /// I1 failed at the last check (a lockout is reported once).
    locked_out: bool,
}

/// More model calls than this in one run is a livelock: the run is frozen
/// and reported.
pub const MAX_CALLS: usize = 200_000;

pub struct Sim {
    world: Mutex<World>,
}

impl Sim {
    pub fn new(seed: u64, faults: Faults, trace: bool) -> Arc<Sim> {
        Arc::new_cyclic(|me| Sim {
            world: Mutex::new(World {
                me: me.clone(),
                caps: Capabilities::SERVER_TAGGED,
                rng: Rng::new(seed),
                faults,
                hooks: Hooks::default(),
                start: Instant::now(),
                provider: ProviderState::default(),
                store: StoreState::default(),
                actors: Vec::new(),
                in_flight: Vec::new(),
                events: Vec::new(),
                hash: 0xcbf2_9ce4_8422_2325,
                lines: trace.then(Vec::new),
                violations: Vec::new(),
                coverage: 0,
                ticks: BTreeSet::new(),
                runaway: false,
                locked_out: false,
            }),
        })
    }

    /// The first step of every model call: wait for a tick of its own,
    /// touching nothing else.
    ///
    /// `tokio::select!` polls its branches in a random order. When the
    /// driver selects between a call and a stop or claim-lost token that
    /// fires in the same instant, the call may or may not be polled once
    /// more before the select returns. A poll that drew from the seed's
    /// random source or changed the world would make the run depend on
    /// that coin. Here such a poll only reserves a timer tick, which the
    /// dropped call gives back at once, so both outcomes leave the world
    /// the same. The call's effects start when its own tick fires, and no
    /// other timer of the simulation fires then.
    pub async fn enter(&self) {
        self.sleep(Duration::ZERO).await;
    }

    /// Sleeps about `d` (see [`World::timer`]).
    pub async fn sleep(&self, d: Duration) {
        let timer = self.lock().timer(d);
        timer.wait().await;
    }

    pub fn lock(&self) -> MutexGuard<'_, World> {
        // A panicking test must not turn every later lock into a panic.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits the delay chosen for this call and stage; may crash the actor
    /// here (a crash before the effect loses the call, after it the reply).
    pub async fn pause(&self, call: Call, stage: Stage) {
        let step = {
            let mut w = self.lock();
            if w.events.len() > MAX_CALLS {
                if !w.runaway {
                    w.runaway = true;
                    w.violation(format!("livelock: more than {MAX_CALLS} model calls"));
                }
                None
            } else {
                let delay = if stage == Stage::Before && call.is_store() {
                    // A store call may stall, lapsing its caller's claim.
                    w.store_delay(call)
                } else {
                    w.delay(call, stage)
                };
                let crash = w.faults.enabled && {
                    let p = w.faults.p_crash_in_call;
                    w.rng.chance(p)
                };
                let crashed = crash && current_actor().is_some_and(|a| w.crash(a, "inside a call"));
                (!crashed).then_some(delay)
            }
        };
        let Some(delay) = step else {
            // Crashed (the task is aborted: it is dropped at this await), or
            // frozen after a livelock (the watchdog ends the run).
            return std::future::pending::<()>().await;
        };
        self.sleep(delay).await;
    }

    /// Marks a call of the current actor as in flight until the guard drops.
    pub fn in_flight(self: &Arc<Self>, call: Call) -> InFlight {
        let actor = current_actor();
        self.lock().in_flight.push((actor, call));
        InFlight {
            sim: self.clone(),
            actor,
            call,
        }
    }
}

pub struct InFlight {
    sim: Arc<Sim>,
    actor: Option<usize>,
    call: Call,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut w = self.sim.lock();
        if let Some(i) = w
            .in_flight
            .iter()
            .position(|&(a, c)| a == self.actor && c == self.call)
        {
            w.in_flight.swap_remove(i);
        }
    }
}

/// A timer of the simulation, due at a millisecond tick no other timer of
/// the simulation uses.
///
/// Why: `tokio::select!` polls its branches in a random order, and the
/// driver selects between a provider call and its stop and claim-lost
/// tokens. If a call's reply and a cancellation became ready in the same
/// timer tick, the winner would be a coin toss outside the seed. Timers on
/// distinct ticks make every wake-up a step of its own, so a seed replays
/// the same interleaving.
pub struct Timer {
    deadline: Instant,
    tick: u64,
    sim: Weak<Sim>,
}

impl Timer {
    pub async fn wait(self) {
        tokio::time::sleep_until(self.deadline).await;
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(sim) = self.sim.upgrade() {
            sim.lock().ticks.remove(&self.tick);
        }
    }
}

impl World {
    /// A timer due `d` from now (at least a tick away), on a free tick.
    pub fn timer(&mut self, d: Duration) -> Timer {
        let ceil_ms = |d: Duration| d.as_nanos().div_ceil(1_000_000) as u64;
        let now = ceil_ms(self.elapsed());
        let mut tick = ceil_ms(self.elapsed() + d).max(now + 1);
        while !self.ticks.insert(tick) {
            tick += 1;
        }
        Timer {
            deadline: self.start + Duration::from_millis(tick),
            tick,
            sim: self.me.clone(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        Instant::now().saturating_duration_since(self.start)
    }

    /// The provider's (true) wall clock.
    pub fn wall(&self) -> SystemTime {
        t0() + self.elapsed()
    }

    pub fn actor_name(&self, actor: Option<usize>) -> &str {
        match actor {
            Some(a) => self.actors.get(a).map_or("?", |i| i.name.as_str()),
            None => "harness",
        }
    }

    pub fn register_actor(&mut self, name: &str) -> usize {
        self.actors.push(ActorInfo {
            name: name.to_string(),
            stop: None,
            abort: None,
        });
        self.actors.len() - 1
    }

    /// Records a model call of the current actor: the interleaving hash,
    /// and with tracing on a line built by `detail`.
    pub fn note(&mut self, call: Call, detail: impl FnOnce(&World) -> String) {
        let actor = current_actor();
        self.note_for(actor, call, detail);
    }

    pub fn note_for(
        &mut self,
        actor: Option<usize>,
        call: Call,
        detail: impl FnOnce(&World) -> String,
    ) {
        let at = self.elapsed();
        self.events.push(TraceEvent { at, actor, call });
        for b in [actor.map_or(0xff, |a| a as u8), call as u8] {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
        if self.lines.is_some() {
            let text = detail(self);
            let line = format!(
                "[{:>9.3}s] {:<7} {:<8} {text}",
                at.as_secs_f64(),
                self.actor_name(actor),
                call.name()
            );
            if let Some(lines) = &mut self.lines {
                lines.push(line);
            }
        }
    }

    /// Records a violation (once: I1 is checked after every call, and a
    /// lockout stays one until something changes).
    pub fn violation(&mut self, what: String) {
        if self.violations.iter().any(|v| v.ends_with(&what)) {
            return;
        }
        let line = format!("[{:>9.3}s] VIOLATION {what}", self.elapsed().as_secs_f64());
        if let Some(lines) = &mut self.lines {
            lines.push(line.clone());
        }
        self.violations.push(line);
    }

    pub fn cover(&mut self, flag: u32) {
        self.coverage |= flag;
    }

    /// The usual delay before or after a call's effect (hooks first).
    pub fn delay(&mut self, call: Call, stage: Stage) -> Duration {
        let actor = current_actor();
        if let Some(hook) = self.hooks.delay.as_mut()
            && let Some(d) = hook(actor, call, stage)
        {
            return d;
        }
        let p_slow = self.faults.p_slow;
        if self.faults.enabled && self.rng.chance(p_slow) {
            return self.rng.between(ms(500), secs(3));
        }
        let max = self.faults.delay_max;
        self.rng.between(Duration::ZERO, max)
    }

    /// Crashes `actor` (kill -9): its task is aborted, its claim is left to
    /// expire after the TTL. False when it has no task to crash.
    pub fn crash(&mut self, actor: usize, how: &str) -> bool {
        let Some(abort) = self.actors.get_mut(actor).and_then(|a| a.abort.take()) else {
            return false;
        };
        if abort.is_finished() {
            return false;
        }
        self.store.crash_holder(actor);
        abort.abort();
        self.cover(cover::CRASH);
        self.note_for(Some(actor), Call::Harness, |_| format!("CRASH ({how})"));
        true
    }

    /// Cancels `actor`'s stop token (shutdown, reload, Ctrl-C).
    pub fn stop(&mut self, actor: usize, how: &str) -> bool {
        let Some(stop) = self.actors.get(actor).and_then(|a| a.stop.clone()) else {
            return false;
        };
        if stop.is_cancelled() {
            return false;
        }
        if self
            .in_flight
            .iter()
            .any(|&(a, c)| a == Some(actor) && c == Call::Cas)
        {
            self.cover(cover::STOP_MID_WRITE);
        }
        stop.cancel();
        self.note_for(Some(actor), Call::Harness, |_| format!("STOP ({how})"));
        true
    }

    /// I1 after every model call: the stored record names a secret the
    /// provider accepts: its current one, or while promoted its old one.
    /// A lockout is reported when it begins.
    pub fn check(&mut self) {
        let Some((version, record)) = &self.store.record else {
            return;
        };
        let current_ok = self.provider.accepts(record.current.value.expose_secret());
        let old_ok = record
            .rotation
            .old()
            .is_some_and(|o| self.provider.accepts(o.value.expose_secret()));
        // An atomic replacement kills the current secret the moment it
        // takes the new value, which the journal holds (pending, or the
        // chosen value of a create whose reply has not come back). That
        // value may still be propagating: the provider's own window (Auth0:
        // up to about 30 s), in which the running token stays served (I8).
        let new_ok = self.caps.replaces()
            && record
                .pending()
                .map(|p| &p.value)
                .or(record.chosen())
                .is_some_and(|v| self.provider.holds(v.expose_secret()));
        let locked_out = !current_ok && !old_ok && !new_ok;
        if locked_out && !self.locked_out {
            let what = format!(
                "I1 lockout: journal v{version} {} names no secret the provider accepts (current {})",
                show_record(record, &self.provider),
                self.provider
                    .describe_value(record.current.value.expose_secret()),
            );
            self.violation(what);
        }
        self.locked_out = locked_out;
    }

    /// The checks after the final settle runs: a stable journal whose
    /// current secret logs in, and I3: no tagged secret of ours that the
    /// journal does not name, and every untagged one the journal ever
    /// committed to deleting is gone. (I4 is checked at every delete.)
    pub fn final_checks(&mut self) {
        let Some((version, record)) = self.store.record.clone() else {
            self.violation("no record at the end".into());
            return;
        };
        let shown = show_record(&record, &self.provider);
        if !matches!(record.rotation, Rotation::Idle) || !record.retire.is_empty() {
            self.violation(format!(
                "journal v{version} not stable after settling: {shown}"
            ));
        }
        if !self.provider.accepts(record.current.value.expose_secret()) {
            self.violation(format!(
                "the final current secret does not log in: v{version} {shown}"
            ));
        }
        let named: BTreeSet<&str> = named_ids(&record).into_iter().collect();
        // Where the API has no ids (an atomic replacement), the journal
        // names its secret by value.
        let values: Vec<&str> = [
            Some(&record.current.value),
            record.pending().map(|p| &p.value),
        ]
        .into_iter()
        .flatten()
        .chain(record.chosen())
        .map(|v| v.expose_secret())
        .collect();
        let mut problems = Vec::new();
        for s in self
            .provider
            .secrets
            .iter()
            .filter(|s| s.deleted_at.is_none())
        {
            let tagged = rekeyd::rotation::parse_tag(CRED, &s.description).is_some();
            // Without tags, what rekeyd created is known by the model.
            let ours = tagged || self.provider.created_by_rekeyd.contains(&s.id);
            if s.client == CLIENT
                && ours
                && !named.contains(s.id.as_str())
                && !values.contains(&s.value.as_str())
            {
                problems.push(format!(
                    "I3: secret {} ({}) of ours exists but the journal does not name it",
                    s.id, s.description
                ));
            }
            if s.client == CLIENT && !tagged && self.store.ever_retired.contains(&s.id) {
                problems.push(format!(
                    "I3: untagged secret {} ({}) was committed to deletion (retire list) but still exists",
                    s.id, s.description
                ));
            }
        }
        for p in problems {
            self.violation(p);
        }
    }
}

/// Provider ids the record names (current, pending, old).
pub fn named_ids(record: &CredentialRecord) -> Vec<&str> {
    [
        Some(&record.current),
        record.pending(),
        record.rotation.old(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|e| e.id.as_deref())
    .collect()
}

/// A record in one line: ids only, never values.
pub fn show_record(record: &CredentialRecord, provider: &ProviderState) -> String {
    let id = |v: &secrecy::SecretString| provider.describe_value(v.expose_secret());
    let rotation = match &record.rotation {
        Rotation::Idle => "idle".to_string(),
        Rotation::Creating { rid, attempt, .. } => format!("creating({rid}.{attempt})"),
        Rotation::Created { rid, pending } => {
            format!("created({rid}, pending {})", id(&pending.value))
        }
        Rotation::Promoted { rid, old, .. } => format!("promoted({rid}, old {})", id(&old.value)),
    };
    let retire: Vec<&str> = record
        .retire
        .iter()
        .filter_map(|r| r.id.as_deref())
        .collect();
    format!(
        "{rotation} current {} retire {retire:?}",
        id(&record.current.value)
    )
}
