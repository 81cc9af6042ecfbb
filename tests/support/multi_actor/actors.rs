//! The actors of the simulation and the harness that runs them.
//!
//! - **drivers** (replicas): each its own [`Rotator`] over the shared
//!   models, with its own wall-clock offset, calling the real
//!   [`Rotator::rotate`] in a loop (sometimes beginning a rotation);
//! - **engines**: each replica's real [`Engine`] (over the provider model
//!   and the real [`StoreSecrets`] over the store model), whose
//!   [`Engine::attempt`] (login with fallback) runs in a loop; a driver's
//!   promotion wakes its replica's engine through `Rotator.refresh_now`,
//!   which is the engine's `promoted` channel, as in the daemon. Which
//!   secret a login used ([`Used`]) is worked out from the secret the
//!   provider model minted the token with and the journals the attempt
//!   loaded from the store model;
//! - the **operator**: `rekeyd set-secret` through the real
//!   [`operator::set_secret`] (the current secret, an old one a rotation is
//!   about to delete, the pending one, or a fresh one made in the portal,
//!   with or without `--force`), and `rekeyd rotate` as
//!   `Rotator::rotate(true, true, ..)`.
//!
//! The harness crashes actors (their task is aborted: in-flight work is
//! lost, their claim expires after the TTL), stops them through their stop
//! token, restarts them later, and launches operator commands, all at
//! seeded random moments. After the chaos comes the settle: faults off,
//! every actor gone long enough for claims to expire and orphans to age,
//! then each driver finishes the journal, one rotation runs (its listing
//! sweeps orphans, S7), every driver and engine runs once more, and the
//! final checks run.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rekeyd::credential;
use rekeyd::provider::{Capabilities, Overlap, ProviderError};
use rekeyd::rotation::driver::{Outcome, RotationError, Rotator, WallClock};
use rekeyd::rotation::machine::SWEEP_MIN_AGE;
use rekeyd::rotation::operator::{self, Installed, SetSecret, SetSecretError};
use rekeyd::store::{CredentialRecord, Rotation, SecretEntry};
use rekeyd::token::Token;
use rekeyd::token::engine::{Engine, StoreSecrets};
use rekeyd::token::policy::RefreshPolicy;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::provider::ProviderModel;
use super::store::StoreModel;
use super::{
    ACTOR, CLAIM_TTL, CLIENT, CRED, Call, Faults, OTHER_CLIENT, Rng, Sim, cover, ms, secs,
    show_record, t0,
};

/// The shape of one run.
#[derive(Debug, Clone)]
pub struct Params {
    /// Replicas: each one driver and one engine.
    pub replicas: usize,
    pub grace: Duration,
    pub verify_window: Duration,
    /// How long the chaos phase lasts (simulated time).
    pub chaos: Duration,
    /// Wall-clock offset of each replica, then of the operator (ms).
    pub offsets_ms: Vec<i64>,
    /// Whether the operator gave the bootstrap secret's provider id.
    pub bootstrap_known: bool,
    /// Chance that a driver's run begins a new rotation.
    pub p_begin: f64,
}

impl Params {
    pub fn fixed(replicas: usize, grace: Duration, verify_window: Duration) -> Self {
        Params {
            replicas,
            grace,
            verify_window,
            chaos: Duration::ZERO,
            offsets_ms: vec![0; replicas + 1],
            bootstrap_known: true,
            p_begin: 0.0,
        }
    }

    pub fn random(rng: &mut Rng) -> Self {
        let replicas = 2 + rng.below(2) as usize;
        let offsets_ms = (0..=replicas)
            .map(|_| {
                if rng.chance(0.5) {
                    0
                } else {
                    rng.below(10_001) as i64 - 5_000
                }
            })
            .collect();
        Params {
            replicas,
            grace: rng.between(secs(2), secs(30)),
            verify_window: rng.between(secs(10), secs(25)),
            chaos: rng.between(secs(40), secs(180)),
            offsets_ms,
            bootstrap_known: rng.chance(0.85),
            p_begin: 0.2 + rng.unit() * 0.5,
        }
    }
}

/// Secrets the provider starts with that the actors refer to. Besides
/// them: an untagged secret of our client made by hand, one of ours tagged
/// for another credential, and another client's secret tagged exactly like
/// ours; none of them may ever be deleted (I4).
pub struct Seeded {
    /// The bootstrap secret (id, value): the journal's first current one.
    pub boot: (String, String),
    /// Another client's secret (an operator may paste its id by mistake).
    pub other: String,
}

/// The models, the actors and their handles.
pub struct Fixture {
    pub sim: Arc<Sim>,
    pub params: Params,
    pub provider: ProviderModel,
    pub store: StoreModel,
    pub seeded: Seeded,
    /// Actor ids: drivers `D0..`, engines `E0..`, then `op` and `rotate`.
    pub drivers: Vec<usize>,
    pub engines: Vec<usize>,
    pub operator: usize,
    pub rotate_cmd: usize,
    pub rotators: Vec<Arc<Rotator>>,
    /// Each replica's `refresh_now`, shared by its driver and its engine.
    pub refresh: Vec<Arc<Notify>>,
    /// Each replica's token engine.
    pub token_engines: Vec<Engine>,
}

/// A wall clock `offset_ms` off the provider's.
pub fn clock(start: Instant, offset_ms: i64) -> WallClock {
    Arc::new(move || {
        let t = t0() + Instant::now().saturating_duration_since(start);
        let off = Duration::from_millis(offset_ms.unsigned_abs());
        if offset_ms >= 0 { t + off } else { t - off }
    })
}

impl Fixture {
    pub fn new(sim: Arc<Sim>, params: Params) -> Fixture {
        let provider = ProviderModel { sim: sim.clone() };
        let store = StoreModel { sim: sim.clone() };
        let (seeded, drivers, engines, operator, rotate_cmd, start) = {
            let mut w = sim.lock();
            let long_ago = t0() - secs(86_400);
            let mapsindoors = w.caps == Capabilities::SERVER_TAGGED;
            let p = &mut w.provider;
            let boot = p.add(Some("boot"), "portal: initial secret", CLIENT, long_ago);
            // Other secrets of our client: MapsIndoors keeps any number;
            // Okta two (both are rekeyd's to use), Auth0 one.
            if mapsindoors {
                p.add(
                    Some("manual"),
                    "made by hand for a script",
                    CLIENT,
                    long_ago,
                );
                p.add(Some("sibling"), "rekeyd:maps-2:r1.a1", CLIENT, long_ago);
            }
            let other = p
                .add(Some("other"), "someone else's", OTHER_CLIENT, long_ago)
                .0;
            p.add(
                Some("other-tagged"),
                "rekeyd:maps:r1.a1",
                OTHER_CLIENT,
                long_ago,
            );
            if params.bootstrap_known {
                p.operator_ids.insert(boot.0.clone());
            }
            let record = CredentialRecord::new(SecretEntry {
                id: params.bootstrap_known.then(|| boot.0.clone()),
                value: SecretString::from(boot.1.clone()),
                created_at: long_ago,
                expires_at: None,
            });
            w.store.record = Some((1, record));
            let drivers: Vec<usize> = (0..params.replicas)
                .map(|i| w.register_actor(&format!("D{i}")))
                .collect();
            let engines: Vec<usize> = (0..params.replicas)
                .map(|i| w.register_actor(&format!("E{i}")))
                .collect();
            let operator = w.register_actor("op");
            let rotate_cmd = w.register_actor("rotate");
            let seeded = Seeded { boot, other };
            (seeded, drivers, engines, operator, rotate_cmd, w.start)
        };
        let refresh: Vec<Arc<Notify>> = (0..params.replicas)
            .map(|_| Arc::new(Notify::new()))
            .collect();
        let mut fixture = Fixture {
            sim,
            params,
            provider,
            store,
            seeded,
            drivers,
            engines,
            operator,
            rotate_cmd,
            rotators: Vec::new(),
            refresh,
            token_engines: Vec::new(),
        };
        fixture.rotators = (0..fixture.params.replicas)
            .map(|i| {
                let offset = fixture.params.offsets_ms[i];
                Arc::new(fixture.rotator(offset, Some(fixture.refresh[i].clone()), start))
            })
            .collect();
        fixture.token_engines = (0..fixture.params.replicas)
            .map(|i| fixture.engine(fixture.refresh[i].clone()))
            .collect();
        fixture
    }

    /// A token engine over the models, as the daemon builds it: its
    /// `promoted` channel is the replica rotator's `refresh_now`.
    fn engine(&self, promoted: Arc<Notify>) -> Engine {
        let (mut channels, _) = credential::channels(CRED, "simulated");
        channels.promoted = promoted;
        Engine {
            name: CRED.into(),
            provider: Arc::new(self.provider.clone()),
            secrets: Arc::new(StoreSecrets {
                store: Arc::new(self.store.clone()),
                name: CRED.into(),
            }),
            policy: RefreshPolicy::default(),
            channels,
            rotate_on_login: false,
            login_slots: Arc::new(Semaphore::new(1)),
        }
    }

    /// A rotator over the models, as the daemon (with `refresh_now`) or
    /// `rekeyd rotate` (without) builds it.
    pub fn rotator(
        &self,
        offset_ms: i64,
        refresh_now: Option<Arc<Notify>>,
        start: Instant,
    ) -> Rotator {
        Rotator {
            name: CRED.into(),
            client_id: CLIENT.into(),
            provider: Arc::new(self.provider.clone()),
            secret_api: Arc::new(self.provider.clone()),
            secret_api_bearer: None,
            store: Arc::new(self.store.clone()),
            grace: self.params.grace,
            verify_window: self.params.verify_window,
            status: None,
            refresh_now,
            clock: clock(start, offset_ms),
        }
    }

    fn start(&self) -> Instant {
        self.sim.lock().start
    }

    pub fn record(&self) -> (u64, CredentialRecord) {
        self.sim.lock().store.record.clone().expect("a record")
    }

    /// The provider id of the record's current secret.
    pub fn current_id(&self) -> Option<String> {
        let w = self.sim.lock();
        let (_, r) = w.store.record.as_ref().expect("a record");
        w.provider
            .secrets
            .iter()
            .find(|s| s.value == r.current.value.expose_secret())
            .map(|s| s.id.clone())
    }

    /// Driver `i` runs the rotator once, as that actor.
    pub async fn rotate(
        &self,
        i: usize,
        begin: bool,
        wait: bool,
        stop: &CancellationToken,
    ) -> Result<Outcome, RotationError> {
        let rotator = self.rotators[i].clone();
        let result = ACTOR
            .scope(self.drivers[i], rotator.rotate(begin, wait, stop))
            .await;
        self.note_result(
            self.drivers[i],
            &format!("rotate(begin={begin}, wait={wait})"),
            &result,
        );
        result
    }

    /// Engine `i` refreshes once, as that actor.
    pub async fn refresh_token(&self, i: usize) -> Result<(Token, Used), ProviderError> {
        ACTOR.scope(self.engines[i], self.engine_attempt(i)).await
    }

    /// One [`Engine::attempt`] of engine `i` (run as that actor), with the
    /// secret its login used.
    async fn engine_attempt(&self, i: usize) -> Result<(Token, Used), ProviderError> {
        let actor = self.engines[i];
        self.sim.lock().store.reads.insert(actor, Vec::new());
        let result = self.token_engines[i].attempt().await;
        let result = {
            let mut w = self.sim.lock();
            let reads = w.store.reads.remove(&actor).unwrap_or_default();
            result.map(|token| {
                let minted = w
                    .provider
                    .minted_by
                    .remove(token.access_token.expose_secret());
                let used = minted.as_deref().and_then(|m| classify(m, &reads));
                let used = used.unwrap_or_else(|| {
                    let who = w.actor_name(Some(actor)).to_string();
                    w.violation(format!(
                        "{who} got a token minted with a secret its attempt never read"
                    ));
                    // Already reported; any value will do.
                    Used::Newer
                });
                if used == Used::Old {
                    w.cover(cover::ENGINE_USED_OLD);
                }
                (token, used)
            })
        };
        self.note_result(actor, "refresh", &result.as_ref().map(|(_, u)| u));
        result
    }

    /// `rekeyd set-secret` (always verifying), as the operator.
    pub async fn set_secret(
        &self,
        value: &str,
        id: Option<&str>,
        force: bool,
        stop: &CancellationToken,
    ) -> Result<Installed, SetSecretError> {
        if let Some(id) = id {
            self.sim.lock().provider.operator_ids.insert(id.to_string());
        }
        let request = SetSecret {
            name: CRED,
            value: SecretString::from(value.to_string()),
            id: id.map(str::to_string),
            verify: true,
            force,
            retire_replaced: !self.sim.lock().caps.tags,
        };
        let result = ACTOR
            .scope(
                self.operator,
                operator::set_secret(&self.store, &self.provider, request, stop),
            )
            .await;
        let label = format!("set-secret id={id:?} force={force}");
        self.note_result(self.operator, &label, &result);
        if result.as_ref().is_ok_and(|i| i.replaced_phase.is_some()) {
            self.sim.lock().cover(cover::FORCED_INSTALL);
        }
        result
    }

    /// `rekeyd rotate`: waits for the claim, then begins (or finishes) a
    /// rotation.
    pub async fn rotate_command(&self, stop: &CancellationToken) -> Result<Outcome, RotationError> {
        let offset = *self.params.offsets_ms.last().expect("operator offset");
        let rotator = self.rotator(offset, None, self.start());
        let result = ACTOR
            .scope(self.rotate_cmd, rotator.rotate(true, true, stop))
            .await;
        self.note_result(self.rotate_cmd, "rekeyd rotate", &result);
        result
    }

    fn note_result<T: std::fmt::Debug, E: std::fmt::Debug>(
        &self,
        actor: usize,
        what: &str,
        result: &Result<T, E>,
    ) {
        let mut w = self.sim.lock();
        let text = format!("{what} -> {result:?}");
        if text.contains("InvalidEvent") {
            let who = w.actor_name(Some(actor)).to_string();
            w.violation(format!("{who} {text}"));
        }
        w.note_for(Some(actor), Call::Harness, |_| text);
    }

    /// Spawns `run(stop)` as `actor`'s task, with a fresh stop token that
    /// the harness (or a fault) may cancel and an abort handle for crashes.
    pub fn spawn<T, F>(
        &self,
        actor: usize,
        run: impl FnOnce(CancellationToken) -> F,
    ) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(ACTOR.scope(actor, run(stop.clone())));
        let mut w = self.sim.lock();
        w.actors[actor].stop = Some(stop);
        w.actors[actor].abort = Some(handle.abort_handle());
        w.note_for(Some(actor), Call::Harness, |_| "START".into());
        handle
    }

    /// Driver `i` runs the rotator once in a task of its own.
    pub fn spawn_rotate(
        self: &Arc<Self>,
        i: usize,
        begin: bool,
    ) -> JoinHandle<Result<Outcome, RotationError>> {
        let fx = self.clone();
        self.spawn(self.drivers[i], move |stop| async move {
            let result = fx.rotators[i].rotate(begin, false, &stop).await;
            fx.note_result(fx.drivers[i], &format!("rotate(begin={begin})"), &result);
            result
        })
    }

    /// Driver `i`'s daemon loop: run the rotator, pause, again.
    pub fn spawn_driver(self: &Arc<Self>, i: usize) -> JoinHandle<()> {
        let fx = self.clone();
        self.spawn(self.drivers[i], move |stop| async move {
            loop {
                let begin = {
                    let mut w = fx.sim.lock();
                    let p = fx.params.p_begin;
                    w.rng.chance(p)
                };
                let result = fx.rotators[i].rotate(begin, false, &stop).await;
                fx.note_result(fx.drivers[i], &format!("rotate(begin={begin})"), &result);
                if matches!(result, Err(RotationError::Shutdown)) {
                    return;
                }
                let pause = fx.sim.lock().rng.between(ms(100), secs(6));
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = fx.sim.sleep(pause) => {}
                }
            }
        })
    }

    /// Engine `i`'s loop: refresh, wait (or be woken by a promotion), again.
    pub fn spawn_engine(self: &Arc<Self>, i: usize) -> JoinHandle<()> {
        let fx = self.clone();
        self.spawn(self.engines[i], move |stop| async move {
            loop {
                let result = fx.engine_attempt(i).await;
                let wait = {
                    let mut w = fx.sim.lock();
                    if result.is_ok() {
                        w.rng.between(secs(5), secs(40))
                    } else {
                        w.rng.between(secs(1), secs(5))
                    }
                };
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = fx.refresh[i].notified() => {}
                    _ = fx.sim.sleep(wait) => {}
                }
            }
        })
    }

    /// Picks and launches an operator command; returns its actor and task.
    pub fn spawn_operator(self: &Arc<Self>, rng: &mut Rng) -> (usize, JoinHandle<()>) {
        let (_, record) = self.record();
        let command = {
            let mut w = self.sim.lock();
            let roll = rng.below(10);
            let value_of = |w: &super::World, id: &str| w.provider.value_of(id);
            let set = |value: Option<(String, Option<String>)>, force: bool, what: &str| {
                value.map(|(value, id)| Command::SetSecret {
                    value,
                    id,
                    force,
                    what: what.to_string(),
                })
            };
            let entry = |e: &SecretEntry| (e.value.expose_secret().to_string(), e.id.clone());
            let chosen = match roll {
                0..=2 => Some(Command::Rotate),
                3 => set(
                    Some(entry(&record.current)),
                    rng.chance(0.3),
                    "the current secret",
                ),
                4..=5 => {
                    // An old secret that a rotation is about to delete.
                    let old = match &record.rotation {
                        Rotation::Promoted { old, .. } => {
                            w.cover(cover::SET_OLD_IN_GRACE);
                            Some(entry(old))
                        }
                        _ => record
                            .retire
                            .iter()
                            .chain(record.retired.iter().rev())
                            .filter_map(|r| r.id.as_deref())
                            .find_map(|id| value_of(&w, id).map(|v| (v, Some(id.to_string())))),
                    };
                    set(old, rng.chance(0.5), "an old secret")
                }
                6 => set(
                    record.pending().map(entry),
                    rng.chance(0.7),
                    "the pending secret",
                ),
                // A fresh secret made in the provider's portal: not where
                // it would take the client's last free place (Okta) or
                // replace the secret under rekeyd (Auth0).
                _ if match w.caps.overlap {
                    Overlap::Replace => true,
                    Overlap::Many { max: Some(max) } => {
                        w.provider.live_of_client() + 1 >= max as usize
                    }
                    Overlap::Many { max: None } => false,
                } =>
                {
                    Some(Command::Rotate)
                }
                _ => {
                    let wall = w.wall();
                    let (id, value) = w.provider.add(None, "made in the portal", CLIENT, wall);
                    let (accepted, listed) = w.new_secret_lags();
                    let now = Instant::now();
                    let s = w.provider.secrets.last_mut().expect("just added");
                    s.accepted_from = now + accepted;
                    s.listed_from = now + listed;
                    // Now and then the operator pastes the wrong id.
                    let id = if rng.chance(0.05) {
                        self.seeded.other.clone()
                    } else {
                        id
                    };
                    set(Some((value, Some(id))), rng.chance(0.6), "a fresh secret")
                }
            };
            let command = chosen.unwrap_or(Command::Rotate);
            w.note_for(Some(self.operator), Call::Harness, |_| {
                format!("operator: {command}")
            });
            command
        };
        let fx = self.clone();
        let actor = match command {
            Command::Rotate => self.rotate_cmd,
            Command::SetSecret { .. } => self.operator,
        };
        let handle = self.spawn(actor, move |stop| async move {
            match command {
                Command::Rotate => {
                    let _ = fx.rotate_command(&stop).await;
                }
                Command::SetSecret {
                    value, id, force, ..
                } => {
                    let _ = fx.set_secret(&value, id.as_deref(), force, &stop).await;
                }
            }
        });
        (actor, handle)
    }

    /// The chaos phase: every replica's driver and engine run while the
    /// harness crashes, stops and restarts them and launches operator
    /// commands.
    pub async fn chaos(self: &Arc<Self>, rng: &mut Rng) {
        let n = self.sim.lock().actors.len();
        let mut tasks: Vec<Option<JoinHandle<()>>> = (0..n).map(|_| None).collect();
        let mut restart_at: Vec<Option<Instant>> = vec![None; n];
        for i in 0..self.params.replicas {
            tasks[self.drivers[i]] = Some(self.spawn_driver(i));
            tasks[self.engines[i]] = Some(self.spawn_engine(i));
        }
        let running = |t: &Option<JoinHandle<()>>| t.as_ref().is_some_and(|h| !h.is_finished());
        let end = Instant::now() + self.params.chaos;
        while Instant::now() < end {
            self.sim.sleep(rng.between(ms(200), secs(8))).await;
            let now = Instant::now();
            // Restart daemons' tasks that crashed or stopped.
            for i in 0..self.params.replicas {
                for (actor, is_driver) in [(self.drivers[i], true), (self.engines[i], false)] {
                    if running(&tasks[actor]) {
                        continue;
                    }
                    match restart_at[actor] {
                        None => {
                            restart_at[actor] = Some(now + rng.between(Duration::ZERO, secs(20)))
                        }
                        Some(t) if t <= now => {
                            restart_at[actor] = None;
                            tasks[actor] = Some(if is_driver {
                                self.spawn_driver(i)
                            } else {
                                self.spawn_engine(i)
                            });
                        }
                        Some(_) => {}
                    }
                }
            }
            let live: Vec<usize> = (0..n).filter(|&a| running(&tasks[a])).collect();
            match rng.below(100) {
                0..=9 => {
                    if let Some(&a) = rng.pick(&live) {
                        self.sim.lock().crash(a, "by the harness");
                    }
                }
                10..=17 => {
                    if let Some(&a) = rng.pick(&live) {
                        self.sim.lock().stop(a, "shutdown or reload");
                    }
                }
                18..=37 if !running(&tasks[self.operator]) && !running(&tasks[self.rotate_cmd]) => {
                    let (actor, handle) = self.spawn_operator(rng);
                    tasks[actor] = Some(handle);
                }
                _ => {}
            }
        }
        // The end of the chaos: every actor crashes where it stands.
        for (a, task) in tasks.iter().enumerate() {
            if running(task) {
                self.sim.lock().crash(a, "end of the chaos");
            }
        }
    }

    /// Faults off, claims expired, orphans old enough to sweep; then every
    /// driver finishes the journal, one full rotation sweeps, every driver
    /// and engine runs once more, and the final checks run.
    pub async fn settle(&self) {
        {
            let mut w = self.sim.lock();
            w.faults = Faults {
                delay_max: w.faults.delay_max.min(ms(50)),
                ..Faults::none()
            };
            w.hooks = Default::default();
            for a in 0..w.actors.len() {
                w.crash(a, "still running when the settle began");
            }
        }
        self.sim
            .sleep(SWEEP_MIN_AGE + 2 * CLAIM_TTL + secs(120))
            .await;
        self.sim
            .lock()
            .note(Call::Harness, |_| "SETTLE: faults off".into());
        let stop = CancellationToken::new();
        for i in 0..self.params.replicas {
            if let Err(e) = self.rotate(i, false, true, &stop).await {
                self.settle_failed(format!("D{i} could not finish the journal: {e:?}"));
            }
        }
        match self.rotate(0, true, true, &stop).await {
            Ok(Outcome::Rotated) => {}
            other => self.settle_failed(format!("the settle rotation ended {other:?}")),
        }
        for i in 0..self.params.replicas {
            match self.rotate(i, false, true, &stop).await {
                Ok(Outcome::Idle) => {}
                other => self.settle_failed(format!("D{i}'s last run ended {other:?}")),
            }
            if let Err(e) = self.refresh_token(i).await {
                self.settle_failed(format!("E{i} cannot log in after settling: {e}"));
            }
        }
        self.sim.lock().final_checks();
    }

    fn settle_failed(&self, what: String) {
        let mut w = self.sim.lock();
        let shown = w
            .store
            .record
            .as_ref()
            .map(|(v, r)| format!("v{v} {}", show_record(r, &w.provider)))
            .unwrap_or_default();
        w.violation(format!("settle: {what} (journal {shown})"));
    }
}

enum Command {
    Rotate,
    SetSecret {
        value: String,
        id: Option<String>,
        force: bool,
        what: String,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Rotate => write!(f, "rekeyd rotate"),
            Command::SetSecret {
                id, force, what, ..
            } => write!(f, "rekeyd set-secret ({what}) id={id:?} force={force}"),
        }
    }
}

/// Which secret an engine's login used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Used {
    /// The current secret it first read.
    Current,
    /// A newer current, or the pending one, after re-reading the store.
    Newer,
    /// The old secret of a promoted rotation (S5).
    Old,
}

/// Classifies the login of an [`Engine::attempt`] that got a token minted
/// with secret `minted`, given the records the attempt loaded, in order
/// (`None`: not a secret the attempt could have used). The attempt logs in
/// with the first record's current secret; only if that is rejected does it
/// load again and try that record's current, pending and old secrets, in
/// that order, skipping the one already tried. So the classification is
/// exact.
fn classify(minted: &str, reads: &[CredentialRecord]) -> Option<Used> {
    let is = |s: &SecretString| s.expose_secret() == minted;
    if is(&reads.first()?.current.value) {
        return Some(Used::Current);
    }
    let fresh = reads.get(1)?;
    // The engine counts a caller-chosen value of an unfinished create as
    // pending too.
    if is(&fresh.current.value)
        || fresh.pending().is_some_and(|p| is(&p.value))
        || fresh.chosen().is_some_and(is)
    {
        Some(Used::Newer)
    } else if fresh.rotation.old().is_some_and(|o| is(&o.value)) {
        Some(Used::Old)
    } else {
        None
    }
}

/// What one seed did.
pub struct SeedReport {
    pub seed: u64,
    pub calls: usize,
    pub interleaving: u64,
    pub coverage: u32,
    pub violations: Vec<String>,
    pub trace: Option<Vec<String>>,
}

/// Runs seed `seed` on its own current-thread runtime with the paused
/// clock: the chaos, then the settle and the final checks.
pub fn run_seed(seed: u64, trace: bool) -> SeedReport {
    run_seed_with(seed, trace, Capabilities::SERVER_TAGGED)
}

/// [`run_seed`] against a provider model whose secret API can do `caps`.
pub fn run_seed_with(seed: u64, trace: bool, caps: Capabilities) -> SeedReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let mut rng = Rng::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xa5a5);
        let mut params = Params::random(&mut rng);
        // With a limit on secrets (Okta) the configuration requires the
        // bootstrap secret's id: without it the secret could never be
        // retired and the limit would stop every later rotation.
        if let Overlap::Many { max: Some(_) } = caps.overlap {
            params.bootstrap_known = true;
        }
        let faults = Faults::random(&mut rng, params.chaos);
        let sim = Sim::new(seed, faults, trace);
        sim.lock().caps = caps;
        let fixture = Arc::new(Fixture::new(sim.clone(), params.clone()));
        sim.lock().note(Call::Harness, |w| {
            format!("seed {seed}: {params:?} faults {:?}", w.faults)
        });
        let limit = params.chaos + SWEEP_MIN_AGE + secs(3600);
        let run = async {
            fixture.chaos(&mut rng).await;
            fixture.settle().await;
        };
        if tokio::time::timeout(limit, run).await.is_err() {
            let mut w = sim.lock();
            let what = if w.runaway {
                "the run was frozen after a livelock".to_string()
            } else {
                format!("the run did not end within {limit:?} of simulated time")
            };
            w.violation(what);
        }
        let mut w = sim.lock();
        SeedReport {
            seed,
            calls: w.events.len(),
            interleaving: w.hash,
            coverage: w.coverage,
            violations: std::mem::take(&mut w.violations),
            trace: w.lines.take(),
        }
    })
}
