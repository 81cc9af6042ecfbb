//! The daemon: validates what it can before touching anything, bootstraps
//! each credential's secret into the store, then runs per credential a token
//! engine, a token-file writer, hooks and (where configured) the rotation
//! schedule, plus the local API and the systemd supervisor, until shutdown.
//! SIGHUP reloads the configuration; SIGUSR1 asks for rotations now.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use secrecy::SecretString;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, CredentialConfig, ListenAddr};
use crate::credential::{self, CredentialChannels, CredentialHandle, CredentialStatus};
use crate::metrics;
use crate::notify::{self, Notifier};
use crate::provider::{self, HttpClients, SecretApi, TokenProvider};
use crate::rotation::driver::{BearerSource, LoginBearer, RegistrationBearer};
use crate::rotation::driver::{Rotator, run_schedule, system_clock};
use crate::serve::{activation, api, hooks, http, sink};
use crate::store::{self, CredentialRecord, SecretEntry, Store, StoreError};
use crate::token::Token;
use crate::token::engine::{Engine, NoStoredSecret, SecretSource, StoreSecrets};
use crate::token::policy::RefreshPolicy;

/// How long shutdown waits for tasks to finish their current step.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration (or a file it names) is unusable: exit 78.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener (`[api]`, `[diag]`) could not be set up.
    #[error("listener {0}")]
    Api(String),
    #[error("credential {name}: {reason}")]
    Setup { name: String, reason: String },
}

impl DaemonError {
    /// Process exit status: 78 (EX_CONFIG) for configuration problems.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_) => 78,
            _ => 1,
        }
    }
}

/// The credentials being served. Replaced as a whole on reload, so readers
/// (the API, the supervisor) take a cheap snapshot and never block writers.
pub struct Registry {
    map: RwLock<Arc<BTreeMap<String, CredentialHandle>>>,
    /// Token profile name -> the credential it belongs to. Apart from the
    /// handles so that a credential without profiles costs nothing more.
    profile_of: RwLock<Arc<BTreeMap<String, String>>>,
    /// `[credentials.jwks]` `serve_path` -> the JWKS file the diagnostics
    /// listener serves there; replaced with the credentials.
    jwks_files: RwLock<Arc<BTreeMap<String, PathBuf>>>,
    /// Pinged on every token or status change of any credential.
    pub changed: Notify,
    /// Set when a credential's token engine ended without being asked to:
    /// the supervisor then stops feeding systemd's watchdog.
    engine_died: AtomicBool,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// An empty registry; the daemon fills it as credentials start.
    pub fn new() -> Registry {
        Registry {
            map: RwLock::new(Arc::new(BTreeMap::new())),
            profile_of: RwLock::new(Arc::new(BTreeMap::new())),
            jwks_files: RwLock::new(Arc::new(BTreeMap::new())),
            changed: Notify::new(),
            engine_died: AtomicBool::new(false),
        }
    }

    pub fn snapshot(&self) -> Arc<BTreeMap<String, CredentialHandle>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps in the running credentials (after a start or a reload) and
    /// wakes whoever watches for changes.
    pub fn replace(&self, map: BTreeMap<String, CredentialHandle>) {
        self.replace_with_profiles(map, BTreeMap::new());
    }

    /// [`Registry::replace`], with the token profiles among `map`'s names
    /// (profile name -> credential name).
    pub fn replace_with_profiles(
        &self,
        map: BTreeMap<String, CredentialHandle>,
        profile_of: BTreeMap<String, String>,
    ) {
        *self.profile_of.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(profile_of);
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        self.changed.notify_one();
    }

    /// Sets the JWKS files the diagnostics listener serves, by path.
    pub fn set_jwks_files(&self, files: BTreeMap<String, PathBuf>) {
        *self.jwks_files.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(files);
    }

    /// The JWKS file served at `path`, if any (`[credentials.jwks]`
    /// `serve_path`).
    pub fn jwks_file(&self, path: &str) -> Option<PathBuf> {
        (self.jwks_files.read().unwrap_or_else(|e| e.into_inner()))
            .get(path)
            .cloned()
    }

    /// Which credential the token profile `name` belongs to; `None` for a
    /// credential's own token (or an unknown name).
    pub fn profile_of(&self, name: &str) -> Option<String> {
        self.profile_of
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// One credential's running tasks. The channels outlive the tasks, so a
/// credential restarted by a reload keeps serving its current token.
struct CredentialRuntime {
    config: CredentialConfig,
    channels: CredentialChannels,
    handle: CredentialHandle,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl CredentialRuntime {
    async fn stop(mut self) {
        self.cancel.cancel();
        join_bounded(&mut self.tasks).await;
    }
}

/// A token profile's running channels (its tasks run in its credential's
/// runtime, and stop with it). Like a credential's, they outlive a reload.
struct ProfileRuntime {
    /// The credential whose secret it is minted from.
    credential: String,
    channels: CredentialChannels,
    handle: CredentialHandle,
}

/// What a credential needs before its tasks start; everything that can fail
/// because of the configuration is done while building it.
pub(crate) struct Prepared {
    pub(crate) config: CredentialConfig,
    pub(crate) provider: Arc<dyn TokenProvider>,
    pub(crate) secret_api: Option<Arc<dyn SecretApi>>,
    /// `secret_api_credential`'s token source; `None`: the credential's own.
    pub(crate) secret_api_bearer: Option<Arc<dyn BearerSource>>,
    pub(crate) bootstrap: Option<SecretString>,
    /// The credential's token profiles, in configuration order.
    pub(crate) profiles: Vec<PreparedProfile>,
}

/// A token profile ready to start: the credential as the profile asks for
/// tokens ([`CredentialConfig::profile_view`]) and its own provider, which
/// carries the profile's `scope`, `audience` and `extra_params`.
pub(crate) struct PreparedProfile {
    pub(crate) config: CredentialConfig,
    pub(crate) provider: Arc<dyn TokenProvider>,
}

/// systemd hears a new STATUS line at most this often.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Before READY, the supervisor summarizes at most 1/SUMMARY_PACING of the
/// time (see `supervise`).
const SUMMARY_PACING: u32 = 20;

/// Logins in flight at once across all credentials.
pub(crate) const MAX_CONCURRENT_LOGINS: usize = 64;

/// A started daemon.
pub struct Running {
    /// The API's TCP address, when it listens on TCP (port 0 resolved).
    pub api_addr: Option<SocketAddr>,
    /// The diagnostics listener's TCP address, likewise.
    pub diag_addr: Option<SocketAddr>,
    /// The settings only a restart changes (`state_dir`, `[api]`, `[diag]`); its
    /// `credentials` stay empty: each runtime keeps its own configuration,
    /// and ten thousand credentials are not worth a second copy.
    config: Config,
    shared: Shared,
    /// Boxed: a map node holds eleven values inline, about two thirds of
    /// them in use, and a runtime is a kilobyte; boxed, the unused slots
    /// cost a pointer each (10,000 credentials: about 4 MiB less).
    credentials: BTreeMap<String, Box<CredentialRuntime>>,
    /// Token profiles by name (empty when no credential has any).
    profiles: BTreeMap<String, ProfileRuntime>,
    /// The API and the supervisor.
    tasks: JoinSet<()>,
}

/// What every credential's tasks share (also a one-shot run's,
/// [`crate::once`]).
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) clients: HttpClients,
    pub(crate) login_slots: Arc<Semaphore>,
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
    /// Opens the configured store; nothing else is touched.
    pub(crate) async fn open(
        config: &Config,
        shutdown: CancellationToken,
    ) -> Result<Shared, DaemonError> {
        Ok(Shared {
            store: store::open(config).await?,
            registry: Arc::new(Registry::new()),
            clients: HttpClients::default(),
            login_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_LOGINS)),
            shutdown,
        })
    }
}

impl Running {
    pub fn credentials(&self) -> Arc<BTreeMap<String, CredentialHandle>> {
        self.shared.registry.snapshot()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.shared.registry
    }

    /// Waits for `shutdown`, then for every task to stop (bounded).
    pub async fn wait(mut self) {
        self.shared.shutdown.cancelled().await;
        for (_, runtime) in std::mem::take(&mut self.credentials) {
            runtime.stop().await;
        }
        self.profiles.clear();
        join_bounded(&mut self.tasks).await;
        info!(step = "shutdown", "stopped");
    }

    /// Applies a new configuration: added credentials start, removed ones
    /// stop (their journals stay in the store), changed ones restart with
    /// their current token still served. If anything in the new
    /// configuration cannot be prepared, nothing changes.
    pub async fn reload(&mut self, new: &Config) -> Result<(), DaemonError> {
        if new.state_dir != self.config.state_dir
            || new.api != self.config.api
            || new.diag != self.config.diag
            || new.store != self.config.store
        {
            warn!(
                step = "reload",
                "state_dir, [api], [diag] and [store] changes take effect only after a restart"
            );
        }
        let mut prepared = Vec::new();
        for (i, cred) in new.credentials.iter().enumerate() {
            let unchanged = self
                .credentials
                .get(&cred.name)
                .is_some_and(|r| r.config == *cred);
            if !unchanged {
                prepared.push(prepare(i, cred, &self.shared).await?);
            }
        }
        // I8: publishing a changed `[credentials.jwks]` can fail (a file
        // that holds no JWK Set, a Secret this account may not write).
        // Failing in `launch` would come after the running credential was
        // stopped, leaving it without a token engine while the log says
        // the previous configuration stays in force; so publish first,
        // before anything is stopped. Publishing the key in use where no
        // set exists yet changes nothing for the running credential, and
        // `launch` repeats it as a no-op.
        for p in &prepared {
            if let Some(jwks) = &p.config.jwks {
                publish_initial_key(self.shared.store.as_ref(), &p.config, jwks).await?;
            }
        }
        let keep: Vec<&str> = new.credentials.iter().map(|c| c.name.as_str()).collect();
        let removed: Vec<String> = self
            .credentials
            .keys()
            .filter(|name| !keep.contains(&name.as_str()))
            .cloned()
            .collect();
        // Token names served before, to forget the metrics of those gone.
        let mut gone: Vec<String> = removed.clone();
        for name in &removed {
            if let Some(runtime) = self.credentials.remove(name) {
                runtime.stop().await;
                info!(credential = %name, step = "reload", "credential removed; its journal is kept");
            }
        }
        // Profiles of removed or restarting credentials: taken out here,
        // their channels handed back to the profiles that keep their name.
        let restarting: Vec<&str> = removed
            .iter()
            .map(String::as_str)
            .chain(prepared.iter().map(|p| p.config.name.as_str()))
            .collect();
        let mut old_profiles = BTreeMap::new();
        self.profiles.retain(|name, runtime| {
            if restarting.contains(&runtime.credential.as_str()) {
                old_profiles.insert(name.clone(), runtime.channels.clone());
                false
            } else {
                true
            }
        });
        for p in prepared {
            let name = p.config.name.clone();
            let channels = match self.credentials.remove(&name) {
                Some(old) => {
                    let channels = old.channels.clone();
                    old.stop().await;
                    info!(credential = %name, step = "reload", "credential configuration changed; restarting it");
                    Some(channels)
                }
                None => {
                    info!(credential = %name, step = "reload", "credential added");
                    None
                }
            };
            let (runtime, profiles) = launch(p, channels, &mut old_profiles, &self.shared).await?;
            self.credentials.insert(name, Box::new(runtime));
            self.profiles.extend(profiles);
        }
        gone.extend(old_profiles.into_keys());
        self.publish();
        // After publish: the API no longer lists them, so no scrape
        // re-creates their series.
        for name in &gone {
            crate::metrics::global().forget_credential(name);
        }
        Ok(())
    }

    /// Asks every rotating credential for a rotation now (SIGUSR1).
    pub fn request_rotations(&self) {
        for runtime in self.credentials.values() {
            if runtime.handle.rotates {
                runtime.handle.rotate_now.notify_one();
            }
        }
    }

    fn publish(&self) {
        self.shared.registry.set_jwks_files(
            (self.credentials.values())
                .filter_map(|r| r.config.jwks.as_deref())
                .filter_map(|j| Some((j.serve_path.clone()?, j.file.clone()?)))
                .collect(),
        );
        let credentials =
            (self.credentials.iter()).map(|(name, r)| (name.clone(), r.handle.clone()));
        let profiles = (self.profiles.iter()).map(|(name, p)| (name.clone(), p.handle.clone()));
        self.shared.registry.replace_with_profiles(
            credentials.chain(profiles).collect(),
            (self.profiles.iter())
                .map(|(name, p)| (name.clone(), p.credential.clone()))
                .collect(),
        );
    }
}

async fn join_bounded(tasks: &mut JoinSet<()>) {
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(
            step = "shutdown",
            "tasks did not stop in time; aborting them"
        );
        tasks.abort_all();
    }
}

/// Builds the provider clients and reads the bootstrap secret if the store
/// has none. Touches nothing.
pub(crate) async fn prepare(
    i: usize,
    cred: &CredentialConfig,
    shared: &Shared,
) -> Result<Prepared, DaemonError> {
    let setup = |e: provider::ProviderError| DaemonError::Setup {
        name: cred.name.clone(),
        reason: e.to_string(),
    };
    let provider::Built {
        token: provider,
        secrets: secret_api,
    } = provider::build_all(cred, &shared.clients).map_err(setup)?;
    let profiles = (cred.tokens.iter())
        .map(|profile| {
            let config = cred.profile_view(profile);
            let provider = provider::build_with(&config, &shared.clients).map_err(setup)?;
            Ok(PreparedProfile { config, provider })
        })
        .collect::<Result<Vec<_>, DaemonError>>()?;
    let secret_api_bearer =
        secret_api_bearer(cred, &shared.clients, &shared.store).map_err(setup)?;
    let bootstrap = match shared.store.load(&cred.name).await? {
        Some(_) => None,
        // client_assertion_file: the platform's file is the credential.
        None if cred.stores_nothing() => None,
        None => Some(read_initial_secret(i, cred)?),
    };
    Ok(Prepared {
        config: cred.clone(),
        provider,
        secret_api,
        secret_api_bearer,
        bootstrap,
        profiles,
    })
}

/// Stores the bootstrap secret and starts the credential's tasks, and its
/// token profiles' (each reusing its channels from `old_profiles`, by
/// name, when it ran before a reload).
async fn launch(
    p: Prepared,
    channels: Option<CredentialChannels>,
    old_profiles: &mut BTreeMap<String, CredentialChannels>,
    shared: &Shared,
) -> Result<(CredentialRuntime, Vec<(String, ProfileRuntime)>), DaemonError> {
    let Shared {
        store,
        registry,
        login_slots,
        shutdown,
        ..
    } = shared;
    let cred = p.config;
    if let Some(secret) = p.bootstrap {
        store_bootstrap(store.as_ref(), &cred, secret).await?;
    }
    if let Some(jwks) = &cred.jwks {
        publish_initial_key(store.as_ref(), &cred, jwks).await?;
    }
    let (channels, mut handle) = match channels {
        Some(channels) => {
            let handle = channels.handle(&cred.name);
            (channels, handle)
        }
        None => credential::channels(&cred.name, cred.provider.as_str()),
    };
    handle.rotates = cred.rotation.is_some();
    // Channels outlive a reload; the interval is the configuration's now.
    channels
        .forced
        .set_min_interval(cred.refresh.min_forced_interval);
    let mut unfinished = false;
    // A secret the provider expires is watched even without rotation: the
    // rotation task warns as the expiry nears ([`run_schedule`]).
    let mut expiry_watch = false;
    let label = metrics::credential(&cred.name);
    // The policy the secret age alert compares against; none, no series.
    match cred.rotation.as_ref().and_then(|r| r.max_secret_age) {
        Some(age) => {
            metrics::global()
                .secret_max_age
                .get_or_create(&label)
                .set(age.as_secs_f64());
        }
        None => {
            metrics::global().secret_max_age.remove(&label);
        }
    }
    if let Some(record) = store.load_settled(&cred.name).await? {
        unfinished = record.value.is_unfinished();
        expiry_watch = record.value.current.expires_at.is_some()
            || crate::rotation::expiry::worth_listing(&record.value, true);
        // For every credential, rotating or not: the rotation task keeps
        // it current after each step.
        metrics::global()
            .secret_created
            .get_or_create(&label)
            .set(metrics::unix_seconds(record.value.current.created_at));
        channels.status.send_modify(|s| {
            s.client_auth = credential::ClientAuthStatus::of(&cred, Some(&record.value.current));
            s.rotation_phase = record.value.phase().to_string();
            s.rotation_waiting_for = crate::rotation::waiting_for(&record.value, &cred.name);
            s.last_rotated_at = record.value.last_rotated_at;
        });
    }

    if cred.stores_nothing() {
        channels
            .status
            .send_modify(|s| s.client_auth = credential::ClientAuthStatus::of(&cred, None));
    }

    let cancel = shutdown.child_token();
    let mut tasks = JoinSet::new();
    // An unfinished journal is always finished, whatever the configuration
    // says about future rotations (a reload may have removed
    // `[credentials.rotation]` mid-rotation): the rotation task then runs
    // without a schedule and ends once the journal is finished.
    let secret_api = p.secret_api.filter(|api| {
        cred.rotation.is_some() || unfinished || (expiry_watch && api.lists_expiry())
    });
    // The profiles' channels, before the rotation task that must reach
    // their engines after a promotion.
    let profile_channels: Vec<(PreparedProfile, CredentialChannels, CredentialHandle)> =
        (p.profiles.into_iter())
            .map(|profile| {
                let name = &profile.config.name;
                let (channels, handle) = match old_profiles.remove(name) {
                    Some(channels) => {
                        let handle = channels.handle(name);
                        (channels, handle)
                    }
                    None => credential::channels(name, cred.provider.as_str()),
                };
                channels
                    .forced
                    .set_min_interval(cred.refresh.min_forced_interval);
                (profile, channels, handle)
            })
            .collect();
    if let Some(secret_api) = secret_api {
        let mut rotator = rotator(
            &cred,
            &p.provider,
            secret_api,
            p.secret_api_bearer.clone(),
            store,
            Some(&channels),
        );
        if !profile_channels.is_empty() {
            // S5 for every token of the secret: a promotion wakes the
            // credential's engine and each profile's.
            let promoted = Arc::new(Notify::new());
            rotator.refresh_now = Some(promoted.clone());
            let engines: Vec<Arc<Notify>> = std::iter::once(channels.promoted.clone())
                .chain(profile_channels.iter().map(|(_, c, _)| c.promoted.clone()))
                .collect();
            tasks.spawn(fan_out(promoted, engines, cancel.clone()));
        }
        let rotator = Arc::new(rotator);
        tasks.spawn(run_schedule(
            rotator,
            cred.rotation.clone(),
            channels.rotate_now.clone(),
            cancel.clone(),
        ));
    }
    let mut profiles = Vec::with_capacity(profile_channels.len());
    for (profile, channels, handle) in profile_channels {
        let config = profile.config;
        let engine = engine(
            &config,
            &cred.name,
            profile.provider,
            store,
            login_slots,
            channels.clone(),
        );
        spawn_token_tasks(
            &config, engine, &channels, &handle, registry, &cancel, &mut tasks,
        );
        profiles.push((
            config.name,
            ProfileRuntime {
                credential: cred.name.clone(),
                channels,
                handle,
            },
        ));
    }
    let engine = engine(
        &cred,
        &cred.name,
        p.provider,
        store,
        login_slots,
        channels.clone(),
    );
    spawn_token_tasks(
        &cred, engine, &channels, &handle, registry, &cancel, &mut tasks,
    );
    for hook in &cred.hooks {
        tasks.spawn(hooks::run(
            cred.name.clone(),
            hook.clone(),
            handle.token.clone(),
            handle.status.clone(),
            cancel.clone(),
        ));
    }
    Ok((
        CredentialRuntime {
            config: cred,
            channels,
            handle,
            cancel,
            tasks,
        },
        profiles,
    ))
}

/// Starts what every served token has, a credential's or a token
/// profile's: its engine, its token-file writer and the forwarder of its
/// changes to the supervisor.
fn spawn_token_tasks(
    config: &CredentialConfig,
    engine: Engine,
    channels: &CredentialChannels,
    handle: &CredentialHandle,
    registry: &Arc<Registry>,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    let watch = EngineWatch {
        registry: registry.clone(),
        cancel: cancel.clone(),
    };
    // The guard goes with the future (dropped when the engine ends, also
    // by a panic), not in an async block around it: a block that awaits
    // what it captured keeps room for it twice, per credential.
    let engine = engine.run(watch.cancel.clone());
    tasks.spawn(engine.map(move |()| drop(watch)));
    if config.sinks.is_empty() {
        // No task for nothing to write: a finished task stays in the
        // JoinSet until the credential stops, and 10,000 of them add up.
        // A reload that removed every sink clears them from status here.
        channels.sinks.send_replace(Vec::new());
    } else {
        tasks.spawn(sink::run(
            config.name.clone(),
            config.sinks.clone(),
            handle.token.clone(),
            channels.sinks.clone(),
            handle.clock.clone(),
            cancel.clone(),
        ));
    }
    tasks.spawn(forward_changes(
        handle.token.clone(),
        handle.status.clone(),
        registry.clone(),
        cancel.clone(),
    ));
}

/// Passes each wake-up of `from` on to every one of `to`: a rotation's
/// promotion, to every token engine of its secret (S5). `notify_one`
/// keeps a wake-up for an engine that is busy logging in, so none is lost.
async fn fan_out(from: Arc<Notify>, to: Vec<Arc<Notify>>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = from.notified() => {}
        }
        for notify in &to {
            notify.notify_one();
        }
    }
}

/// Where `cred`'s secret API gets its bearer token: `None` for its own
/// login; an RFC 7592 registration's access token; none at all for a JWK
/// Set rekeyd publishes itself; else `secret_api_credential`'s token,
/// logged in with the secret the store holds for that credential.
pub(crate) fn secret_api_bearer(
    cred: &CredentialConfig,
    clients: &provider::HttpClients,
    store: &Arc<dyn Store>,
) -> Result<Option<Arc<dyn BearerSource>>, provider::ProviderError> {
    if cred.jwks.is_some() {
        return Ok(Some(Arc::new(crate::rotation::driver::NoBearer)));
    }
    if let Some(registration) = &cred.registration {
        return Ok(Some(Arc::new(RegistrationBearer {
            access_token_file: registration.access_token_file.clone(),
            store: store.clone(),
            name: cred.name.clone(),
        })));
    }
    let Some(admin) = &cred.secret_api_credential else {
        return Ok(None);
    };
    let login = admin
        .login
        .as_ref()
        .expect("a loaded configuration resolves secret_api_credential");
    Ok(Some(Arc::new(LoginBearer {
        provider: provider::build_with(login, clients)?,
        secrets: secret_source(login, store, &admin.secret_of),
    })))
}

/// The rotation driver of `cred`, as the daemon and a one-shot run use
/// it; `channels` (the daemon's) show its progress and hear about
/// promotions (S5).
pub(crate) fn rotator(
    cred: &CredentialConfig,
    provider: &Arc<dyn TokenProvider>,
    secret_api: Arc<dyn SecretApi>,
    secret_api_bearer: Option<Arc<dyn BearerSource>>,
    store: &Arc<dyn Store>,
    channels: Option<&CredentialChannels>,
) -> Rotator {
    Rotator {
        name: cred.name.clone(),
        client_id: cred.client_id.clone(),
        provider: provider.clone(),
        secret_api,
        secret_api_bearer,
        store: store.clone(),
        grace: cred
            .rotation
            .as_ref()
            .map_or(crate::config::DEFAULT_ROTATION_GRACE, |r| r.grace),
        verify_window: cred.verify_window(),
        status: channels.map(|c| c.status.clone()),
        refresh_now: channels.map(|c| c.promoted.clone()),
        clock: system_clock(),
    }
}

/// The token engine of `cred` (a credential, or a token profile's view of
/// its credential), as the daemon and a one-shot run use it. Secrets are
/// read from the store under `secret_of`, the credential's name: a
/// profile has no secret of its own.
pub(crate) fn engine(
    cred: &CredentialConfig,
    secret_of: &str,
    provider: Arc<dyn TokenProvider>,
    store: &Arc<dyn Store>,
    login_slots: &Arc<Semaphore>,
    channels: CredentialChannels,
) -> Engine {
    Engine {
        name: cred.name.clone(),
        provider,
        secrets: secret_source(cred, store, secret_of),
        policy: RefreshPolicy {
            before_expiry: cred.refresh.before_expiry,
        },
        rotate_on_login: cred.rotation.as_ref().is_some_and(|r| r.on_login),
        login_slots: login_slots.clone(),
        channels,
    }
}

/// Where the logins of `cred` get their secret: the store, under
/// `secret_of`; nowhere for `client_assertion_file`, whose provider reads
/// the platform's file for every login instead.
fn secret_source(
    cred: &CredentialConfig,
    store: &Arc<dyn Store>,
    secret_of: &str,
) -> Arc<dyn SecretSource> {
    if cred.stores_nothing() {
        Arc::new(NoStoredSecret)
    } else {
        Arc::new(StoreSecrets {
            store: store.clone(),
            name: secret_of.to_string(),
        })
    }
}

/// The provider's id of a bootstrap secret: `initial_secret_id`; for a
/// `private_key_jwt` key its RFC 7638 thumbprint, the id every key
/// publisher lists it by (a key rotation withdraws it by that id).
pub(crate) fn bootstrap_id(cred: &CredentialConfig, secret: &SecretString) -> Option<String> {
    if cred.auth_method == crate::config::AuthMethod::PrivateKeyJwt
        && let Ok(key) = provider::key::from_secret(secret)
    {
        return Some(key.thumbprint());
    }
    cred.initial_secret_id.clone()
}

pub(crate) async fn store_bootstrap(
    store: &dyn Store,
    cred: &CredentialConfig,
    secret: SecretString,
) -> Result<(), DaemonError> {
    let record = CredentialRecord::new(SecretEntry {
        id: bootstrap_id(cred, &secret),
        value: secret,
        created_at: SystemTime::now(),
        expires_at: None,
    });
    match store.compare_and_swap(&cred.name, None, &record).await {
        // Another process bootstrapped it meanwhile: theirs stands.
        Ok(_) | Err(StoreError::Conflict { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    info!(credential = %cred.name, step = "bootstrap", "initial secret stored");
    Ok(())
}

/// Publishes the keys the store holds as published for `cred` where its
/// `[credentials.jwks]` has no set yet: a fresh install serves its
/// bootstrap key at once (the server can verify the first login), and a
/// set that exists is left to the rotation. During a rotation that is
/// the current key with the new key awaiting its proof (phase created)
/// or the old key in its grace period (promoted): a place added then
/// holds what the others hold ([`JwksKeys::publish_initial`]).
///
/// [`JwksKeys::publish_initial`]: provider::jwks_publish::JwksKeys::publish_initial
pub(crate) async fn publish_initial_key(
    store: &dyn Store,
    cred: &CredentialConfig,
    jwks: &crate::config::JwksConfig,
) -> Result<(), DaemonError> {
    let Some(record) = store.load(&cred.name).await? else {
        return Ok(());
    };
    let publisher = provider::jwks_publish::JwksKeys::new(cred.client_id.clone(), jwks);
    let journal = &record.value;
    let current = &journal.current.value;
    // In the order a rotation's writes leave them: old, current, new.
    let keys: Vec<&SecretString> = [
        journal.rotation.old().map(|old| &old.value),
        Some(current),
        journal.pending().map(|pending| &pending.value),
    ]
    .into_iter()
    .flatten()
    .collect();
    match publisher.publish_initial(&keys).await {
        Ok(true) => {
            info!(credential = %cred.name, step = "bootstrap", "current public key published as the JWK Set");
        }
        Ok(false) => {}
        Err(e) => {
            return Err(DaemonError::Setup {
                name: cred.name.clone(),
                reason: format!("cannot publish the current public key: {e}"),
            });
        }
    }
    // A set that existed is left to the rotation, but one without the key
    // the client signs with makes every login fail: say why up front.
    if let Ok(key) = provider::key::from_secret(current)
        && let Ok(ids) = publisher.published_ids().await
        && !ids.contains(&key.thumbprint())
    {
        warn!(credential = %cred.name, step = "bootstrap", key_id = %key.kid(), "the published JWK Set does not hold the current public key (a set written by someone else?); the server refuses logins until it does: add the key (`rekeyd status --json` shows public_jwk) or remove the set to have rekeyd write it");
    }
    Ok(())
}

/// Makes sure the store holds a secret for credential `i` of `config`,
/// reading `initial_secret_file` when it does not, and that a
/// `[credentials.jwks]` publishes it (for `rekeyd rotate`).
pub async fn ensure_bootstrapped(
    config: &Config,
    i: usize,
    store: &dyn Store,
) -> Result<(), DaemonError> {
    let cred = &config.credentials[i];
    if store.load(&cred.name).await?.is_none() {
        let secret = read_initial_secret(i, cred)?;
        store_bootstrap(store, cred, secret).await?;
    }
    if let Some(jwks) = &cred.jwks {
        publish_initial_key(store, cred, jwks).await?;
    }
    Ok(())
}

/// Marks the daemon unhealthy if a token engine ends without having been
/// cancelled (a panic, or a bug that returns early).
struct EngineWatch {
    registry: Arc<Registry>,
    cancel: CancellationToken,
}

impl Drop for EngineWatch {
    fn drop(&mut self) {
        if !self.cancel.is_cancelled() {
            self.registry.engine_died.store(true, Ordering::SeqCst);
            self.registry.changed.notify_one();
        }
    }
}

/// Wakes the supervisor whenever this credential's token or status changes.
/// Holds only the two receivers it watches, not the whole handle, and is a
/// block rather than an `async fn` (which would keep its arguments twice):
/// one such task sleeps per credential.
#[allow(clippy::manual_async_fn)] // on purpose, see above
fn forward_changes(
    mut token: watch::Receiver<Option<Arc<Token>>>,
    mut status: watch::Receiver<CredentialStatus>,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) -> impl Future<Output = ()> + Send {
    async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = token.changed() => if r.is_err() { return },
                r = status.changed() => if r.is_err() { return },
            }
            token.borrow_and_update();
            status.borrow_and_update();
            registry.changed.notify_one();
        }
    }
}

/// The TCP addresses the listeners bound (port 0 resolved).
struct BoundListeners {
    api: Option<SocketAddr>,
    diag: Option<SocketAddr>,
}

/// Binds the token API and the diagnostics listener and starts serving
/// them. Their connection caps are lowered, if need be, so that
/// connections never take the file descriptors the engines, the store and
/// the token files need (see `serve::http::connection_caps`).
async fn start_listeners(
    config: &Config,
    shared: &Shared,
    tasks: &mut JoinSet<()>,
) -> Result<BoundListeners, DaemonError> {
    let mut planned = Vec::new();
    if let Some(api) = &config.api {
        let key = api::load_or_create_key(&api.key_file)
            .map_err(|e| DaemonError::Api(format!("api: {e}")))?;
        let state = api::ApiState {
            registry: shared.registry.clone(),
            key: Arc::new(key),
            forced_wait: api::forced_wait(api.limits.request_timeout),
            store: shared.store.clone(),
        };
        let router = api::router(state, config.diag.is_some());
        planned.push(("api", &api.listen, api.limits, router));
    }
    if let Some(diag) = &config.diag {
        let router = api::diag_router(shared.registry.clone());
        planned.push(("diag", &diag.listen, diag.limits, router));
    }
    let nofile = http::nofile_limit().map_err(|e| {
        DaemonError::Api(format!(
            "set-up: cannot read the file-descriptor limit: {e}"
        ))
    })?;
    let wanted: Vec<usize> = planned.iter().map(|p| p.2.max_connections).collect();
    let caps = http::connection_caps(nofile, &wanted);
    let mut bound = BoundListeners {
        api: None,
        diag: None,
    };
    // Sockets systemd passed (rekeyd.socket) serve the listener of their
    // address; one that matches none is refused before anything listens.
    let mut passed = Vec::with_capacity(planned.len());
    for (name, listen, _, _) in &planned {
        let claimed = activation::with_inherited(|i| i.claim(listen)).map_err(|e| {
            DaemonError::Api(format!(
                "{name}: cannot use the socket systemd passed for {listen}: {e}"
            ))
        })?;
        passed.push(claimed);
    }
    for (((name, listen, mut limits, router), cap), passed) in
        planned.into_iter().zip(caps).zip(passed)
    {
        if cap < limits.max_connections {
            warn!(
                step = "listen",
                listener = name,
                configured = limits.max_connections,
                max_connections = cap,
                nofile,
                "connection cap lowered to keep half of the file-descriptor limit (RLIMIT_NOFILE) for the token engines; raise the limit (systemd LimitNOFILE=, ulimit -n) for more"
            );
            limits.max_connections = cap;
        }
        let activated = passed.is_some();
        let listener = match passed {
            Some(socket) => http::Listener::from_passed(socket),
            None => http::Listener::bind(listen).await,
        }
        .map_err(|e| DaemonError::Api(format!("{name}: cannot listen on {listen}: {e}")))?;
        let addr = listener.local_addr();
        match name {
            "api" => bound.api = addr,
            _ => bound.diag = addr,
        }
        tasks.spawn(listener.serve(name, router, limits, shared.shutdown.clone()));
        info!(
            step = "listen",
            listener = name,
            listen = %addr.map_or(listen.to_string(), |a| a.to_string()),
            max_connections = limits.max_connections,
            socket_activated = activated,
            "listening"
        );
    }
    Ok(bound)
}

/// Refuses sockets systemd passed that no configured listener uses, and
/// `LISTEN_*` variables that could not be read: the socket unit and the
/// configuration disagree, and its clients would wait on a socket nobody
/// serves. A configuration error, found before anything starts.
fn check_passed_sockets(config: &Config) -> Result<(), DaemonError> {
    let listens: Vec<&ListenAddr> = (config.api.iter().map(|a| &a.listen))
        .chain(config.diag.iter().map(|d| &d.listen))
        .collect();
    let (error, unmatched) =
        activation::with_inherited(|i| (i.take_error(), i.unmatched(&listens)));
    if let Some(e) = error {
        return Err(DaemonError::Api(format!("set-up: {e}")));
    }
    if unmatched.is_empty() {
        return Ok(());
    }
    let key = if config.api.is_none() && config.diag.is_some() {
        "diag.listen"
    } else {
        "api.listen"
    };
    let listening = match listens.as_slice() {
        [] => "no listener is configured".to_string(),
        _ => format!(
            "the listeners are {}",
            listens
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    };
    Err(ConfigError::Invalid {
        key: key.to_string(),
        reason: format!(
            "systemd passed {} (socket activation), which no listener uses ({listening}); \
             make the socket unit's ListenStream= and the listen address the same",
            unmatched.join(", "),
        ),
    }
    .into())
}

/// Starts everything; returns once the API listens and the engines run.
pub async fn start(config: &Config, shutdown: CancellationToken) -> Result<Running, DaemonError> {
    config.require_credentials()?;
    check_passed_sockets(config)?;
    let shared = Shared::open(config, shutdown).await?;

    // Everything that can fail because of the configuration happens before
    // anything is written or started.
    let mut prepared = Vec::with_capacity(config.credentials.len());
    for (i, cred) in config.credentials.iter().enumerate() {
        prepared.push(prepare(i, cred, &shared).await?);
    }

    let mut credentials = BTreeMap::new();
    let mut profiles = BTreeMap::new();
    for p in prepared {
        let name = p.config.name.clone();
        let (runtime, started) = launch(p, None, &mut BTreeMap::new(), &shared).await?;
        credentials.insert(name, Box::new(runtime));
        profiles.extend(started);
    }

    let mut tasks = JoinSet::new();
    // Wakes the token engines after the machine was suspended (their
    // timers run on a clock that stopped meanwhile).
    tasks.spawn(crate::clock::watchdog(shared.shutdown.clone()));
    let listeners = start_listeners(config, &shared, &mut tasks).await?;
    let running = Running {
        api_addr: listeners.api,
        diag_addr: listeners.diag,
        config: Config {
            state_dir: config.state_dir.clone(),
            api: config.api.clone(),
            diag: config.diag.clone(),
            log: config.log.clone(),
            store: config.store.clone(),
            history_limit: config.history_limit,
            credentials: Vec::new(),
        },
        shared,
        credentials,
        profiles,
        tasks,
    };
    running.publish();
    info!(
        step = "start",
        credentials = config.credentials.len(),
        "rekeyd started"
    );
    Ok(running)
}

/// Runs the daemon until SIGTERM or SIGINT: SIGHUP reloads `config_path`,
/// SIGUSR1 requests rotations, systemd hears about readiness and health.
pub async fn run(config_path: &Path, config: Config) -> Result<(), DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed before start-up: a SIGTERM during start-up must stop the
    // daemon cleanly, not kill it with the default action.
    let install = |kind| signal(kind).expect("install signal handler");
    let mut term = install(SignalKind::terminate());
    let mut int = install(SignalKind::interrupt());
    let mut hup = install(SignalKind::hangup());
    let mut usr1 = install(SignalKind::user_defined1());

    let shutdown = CancellationToken::new();
    let notifier = Arc::new(Notifier::from_env());
    let mut running = start(&config, shutdown.clone()).await?;
    // Each credential's runtime holds its own part from now on.
    drop(config);
    let ready = Arc::new(Notify::new());
    let mut supervisor = tokio::spawn(supervise(
        running.registry().clone(),
        notifier.clone(),
        ready.clone(),
        shutdown.clone(),
    ));
    loop {
        tokio::select! {
            _ = term.recv() => { info!(step = "shutdown", signal = "SIGTERM", "shutting down"); break }
            _ = int.recv() => { info!(step = "shutdown", signal = "SIGINT", "shutting down"); break }
            _ = hup.recv() => {
                notifier.reloading();
                info!(step = "reload", path = %config_path.display(), "reloading configuration");
                match Config::load(config_path) {
                    Ok(new) => {
                        for w in new.warnings() {
                            warn!(step = "config", "{w}");
                        }
                        match running.reload(&new).await {
                            Ok(()) => info!(step = "reload", "configuration reloaded"),
                            Err(e) => error!(step = "reload", error = %e, "reload failed; the previous configuration stays in force"),
                        }
                    }
                    Err(e) => error!(step = "reload", error = %e, "new configuration rejected; the previous one stays in force"),
                }
                // systemd waits for READY after RELOADING.
                ready.notify_one();
            }
            _ = usr1.recv() => {
                info!(step = "rotate", signal = "SIGUSR1", "rotation requested");
                running.request_rotations();
            }
            _ = &mut supervisor => {
                error!(step = "supervise", "the supervisor stopped; shutting down");
                break
            }
        }
    }
    notifier.stopping();
    shutdown.cancel();
    running.wait().await;
    Ok(())
}

/// Tells systemd when the daemon is ready, what state it is in, and that it
/// is alive. The watchdog is fed only from here, and only while every
/// credential's tasks are running, so a wedged runtime or a dead engine
/// lets systemd restart us.
async fn supervise(
    registry: Arc<Registry>,
    notifier: Arc<Notifier>,
    reloaded: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut ready_sent = false;
    let mut last_line = String::new();
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    // After READY, a change is summarized at most once per STATUS_INTERVAL;
    // before it, after a pause of SUMMARY_PACING times what the last summary
    // took (nothing for a few credentials; with thousands starting at once,
    // summarizing after every token would keep a core busy). `pending`
    // marks a change waiting for `next_summary`. The wait is one more branch
    // of the select below, so pings and reloads never wait.
    let mut summarize = true;
    let mut pending = false;
    let mut next_summary = tokio::time::Instant::now();
    loop {
        // Once READY is out, summaries only matter to systemd: with
        // thousands of credentials they are not free.
        if ready_sent && !notifier.enabled() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = registry.changed.notified() => continue,
            }
        }
        if summarize {
            summarize = false;
            let started = tokio::time::Instant::now();
            send_summary(&registry, &notifier, &mut ready_sent, &mut last_line);
            next_summary = if ready_sent {
                started + STATUS_INTERVAL
            } else {
                started + started.elapsed() * SUMMARY_PACING
            };
        }
        let tick = async {
            match watchdog.as_mut() {
                Some(w) => {
                    w.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let throttle = async {
            if pending {
                tokio::time::sleep_until(next_summary).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = registry.changed.notified() => pending = true,
            _ = throttle => {
                pending = false;
                summarize = true;
            }
            _ = reloaded.notified() => {
                if ready_sent {
                    notifier.ready(&last_line);
                }
            }
            _ = tick => {
                if registry.engine_died.load(Ordering::SeqCst) {
                    warn!(step = "supervise", "a token engine stopped unexpectedly; not feeding the watchdog");
                } else {
                    notifier.watchdog();
                }
            }
        }
    }
}

/// Computes the one-line summary; sends READY the first time every
/// credential has been tried, STATUS when the line changed after that.
fn send_summary(
    registry: &Registry,
    notifier: &Notifier,
    ready_sent: &mut bool,
    last_line: &mut String,
) {
    let snapshot = registry.snapshot();
    let statuses: Vec<_> = snapshot
        .values()
        .map(|h| (h.status.borrow().clone(), h.valid_token().is_some()))
        .collect();
    let entries: Vec<notify::Entry> = statuses
        .iter()
        .map(|(status, valid)| notify::Entry {
            status,
            valid: *valid,
        })
        .collect();
    let (attempted, line) = notify::summarize(&entries);
    if !*ready_sent && attempted {
        notifier.ready(&line);
        info!(step = "ready", "{line}");
        *ready_sent = true;
    } else if *ready_sent && line != *last_line {
        notifier.status(&line);
    }
    *last_line = line;
}

/// Cancels `shutdown` on SIGTERM or SIGINT (for commands other than `run`).
pub fn spawn_signal_listener(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = shutdown.cancelled() => return,
        };
        info!(step = "shutdown", signal = name, "shutting down");
        shutdown.cancel();
    });
}

/// Reads the bootstrap secret. Its absence is a configuration problem: the
/// operator named a file that is not there.
fn read_initial_secret(i: usize, cred: &CredentialConfig) -> Result<SecretString, DaemonError> {
    let key = format!("credentials[{i}].{}", cred.initial_secret_key());
    let path = cred.initial_secret_path(i)?;
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key: key.clone(),
        reason: format!(
            "cannot read {} ({e}); the store holds no secret for credential {:?} yet",
            path.display(),
            cred.name
        ),
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("{} is empty", path.display()),
        }
        .into());
    }
    if cred.auth_method == crate::config::AuthMethod::PrivateKeyJwt {
        // The store keeps the key as a private JWK (provider::key); the
        // reason names the format problem, never the file's content.
        let key_pair =
            provider::key::ClientKey::from_file_text(secret).map_err(|e| ConfigError::Invalid {
                key,
                reason: format!("{} {e}", path.display()),
            })?;
        return Ok(key_pair.to_secret());
    }
    Ok(SecretString::from(secret.to_string()))
}
