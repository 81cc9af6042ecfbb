//! The daemon: validates what it can before touching anything, bootstraps
//! each credential's secret into the store, then runs one token engine (and
//! one sink writer) per credential plus the local API, until shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, CredentialConfig};
use crate::credential::{self, CredentialHandle};
use crate::provider;
use crate::rotation::driver::{DEFAULT_VERIFY_WINDOW, Rotator, run_schedule};
use crate::serve::{api, sink};
use crate::store::file::FileStore;
use crate::store::{CredentialRecord, SecretEntry, Store, StoreError};
use crate::token::engine::{Engine, StoreSecrets};
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
    #[error("local API: {0}")]
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

/// A started daemon.
pub struct Running {
    pub credentials: Arc<BTreeMap<String, CredentialHandle>>,
    /// The API's TCP address, when it listens on TCP (port 0 resolved).
    pub api_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
    shutdown: CancellationToken,
}

impl Running {
    /// Waits for `shutdown`, then for every task to stop (bounded).
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!(
                step = "shutdown",
                "tasks did not stop in time; aborting them"
            );
            self.tasks.abort_all();
        }
        info!(step = "shutdown", "stopped");
    }
}

/// Starts everything; returns once the API listens and the engines run.
pub async fn start(config: &Config, shutdown: CancellationToken) -> Result<Running, DaemonError> {
    let store: Arc<dyn Store> = Arc::new(FileStore::new(&config.state_dir));

    // Everything that can fail because of the configuration happens before
    // anything is written or started.
    let mut prepared = Vec::with_capacity(config.credentials.len());
    for (i, cred) in config.credentials.iter().enumerate() {
        let provider = provider::build(cred).map_err(|e| DaemonError::Setup {
            name: cred.name.clone(),
            reason: e.to_string(),
        })?;
        let secret_api = provider::build_secret_api(cred).map_err(|e| DaemonError::Setup {
            name: cred.name.clone(),
            reason: e.to_string(),
        })?;
        let bootstrap = match store.load(&cred.name).await? {
            Some(_) => None,
            None => Some(read_initial_secret(i, cred)?),
        };
        prepared.push((cred, provider, secret_api, bootstrap));
    }

    let mut tasks = JoinSet::new();
    let mut handles = BTreeMap::new();
    for (cred, provider, secret_api, bootstrap) in prepared {
        if let Some(secret) = bootstrap {
            let record = CredentialRecord::new(SecretEntry {
                id: cred.initial_secret_id.clone(),
                value: secret,
                created_at: SystemTime::now(),
            });
            match store.compare_and_swap(&cred.name, None, &record).await {
                // Another process bootstrapped it meanwhile: theirs stands.
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            info!(credential = %cred.name, step = "bootstrap", "initial secret stored");
        }
        let (channels, mut handle) = credential::channels(&cred.name, cred.provider.as_str());
        handle.rotates = cred.rotation.is_some();
        if let (Some(rotation), Some(secret_api)) = (&cred.rotation, secret_api) {
            let rotator = Arc::new(Rotator {
                name: cred.name.clone(),
                client_id: cred.client_id.clone(),
                provider: provider.clone(),
                secret_api,
                store: store.clone(),
                grace: rotation.grace,
                verify_window: DEFAULT_VERIFY_WINDOW,
                status: Some(channels.status.clone()),
            });
            tasks.spawn(run_schedule(
                rotator,
                rotation.clone(),
                channels.rotate_now.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(record) = store.load(&cred.name).await? {
            channels.status.send_modify(|s| {
                s.rotation_phase = record.value.rotation.phase().to_string();
                s.last_rotated_at = record.value.last_rotated_at;
            });
        }
        let engine = Engine {
            name: cred.name.clone(),
            provider,
            secrets: Arc::new(StoreSecrets {
                store: store.clone(),
                name: cred.name.clone(),
            }),
            policy: RefreshPolicy {
                before_expiry: cred.refresh.before_expiry,
            },
            rotate_on_login: cred.rotation.as_ref().is_some_and(|r| r.on_login),
            channels,
        };
        tasks.spawn(engine.run(shutdown.clone()));
        tasks.spawn(sink::run(
            cred.name.clone(),
            cred.sinks.clone(),
            handle.token.clone(),
            shutdown.clone(),
        ));
        handles.insert(cred.name.clone(), handle);
    }
    let credentials = Arc::new(handles);

    let mut api_addr = None;
    if let Some(api_config) = &config.api {
        let key = api::load_or_create_key(&api_config.key_file)
            .map_err(|e| DaemonError::Api(e.to_string()))?;
        let listener = api::Listener::bind(&api_config.listen).await.map_err(|e| {
            DaemonError::Api(format!("cannot listen on {}: {e}", api_config.listen))
        })?;
        api_addr = listener.local_addr();
        let router = api::router(api::ApiState {
            credentials: credentials.clone(),
            key: Arc::new(key),
        });
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = listener.serve(router, stop).await {
                warn!(step = "api", error = %e, "local API stopped");
            }
        });
        info!(step = "api", listen = %api_addr.map_or(api_config.listen.to_string(), |a| a.to_string()), "local API listening");
    }

    info!(
        step = "start",
        credentials = config.credentials.len(),
        "rekeyd started"
    );
    Ok(Running {
        credentials,
        api_addr,
        tasks,
        shutdown,
    })
}

/// Starts the daemon and runs it until SIGTERM or SIGINT.
pub async fn run(config: &Config) -> Result<(), DaemonError> {
    let shutdown = CancellationToken::new();
    // Listen before starting: a SIGTERM that arrives while start-up runs
    // must stop the daemon cleanly, not kill it with the default action.
    spawn_signal_listener(shutdown.clone());
    let running = start(config, shutdown).await?;
    running.wait().await;
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
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
    let key = format!("credentials[{i}].initial_secret_file");
    let path = cred
        .initial_secret_file
        .as_ref()
        .expect("validated: initial_secret_file is required");
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
    Ok(SecretString::from(secret.to_string()))
}
