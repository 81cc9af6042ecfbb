//! What the rest of the daemon sees of one running credential: its current
//! token and its status, both as watch channels so readers never block the
//! engine and always see the latest value.

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::clock::{self, Clock};
use crate::token::Token;
use crate::token::forced::ForcedRefresh;

/// Human- and machine-readable state of a credential. Holds no secrets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CredentialStatus {
    pub name: String,
    pub provider: String,
    /// Wall-clock expiry of the token being served.
    #[serde(serialize_with = "serialize_time")]
    pub token_expires_at: Option<SystemTime>,
    #[serde(serialize_with = "serialize_time")]
    pub last_refresh_at: Option<SystemTime>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// Every secret we know of was rejected by the provider.
    pub locked_out: bool,
    pub rotation_phase: String,
    /// For an unfinished journal: what rekeyd waits for and the command
    /// that gets out of it ([`crate::rotation::waiting_for`]).
    pub rotation_waiting_for: Option<String>,
    pub last_rotation_error: Option<String>,
    /// Set while the provider refuses the rotation in a way that will not
    /// change on retry (e.g. the client already has its maximum number of
    /// secrets): the provider's error code, else its HTTP status. Retried
    /// slowly, and at once on `rekeyd rotate` or `POST /v1/rotate/{name}`.
    pub rotation_needs_operator: Option<String>,
    #[serde(serialize_with = "serialize_time")]
    pub last_rotated_at: Option<SystemTime>,
    /// When the provider expires the current secret, on its clock (Entra
    /// `endDateTime`), when rekeyd knows it.
    #[serde(serialize_with = "serialize_time")]
    pub secret_expires_at: Option<SystemTime>,
    /// Set while that expiry is near and no rotation has replaced the
    /// secret (rotation failing or not configured), or once it has passed
    /// ([`crate::rotation::schedule::expiry_state`]): what and when, never
    /// the secret.
    pub secret_expiry_warning: Option<String>,
    /// For the assertion-based client authentication methods only: the
    /// method and the key or file in use (fields flattened into the row).
    #[serde(flatten)]
    pub client_auth: Option<ClientAuthStatus>,
}

/// How a `private_key_jwt` or `client_assertion_file` client
/// authenticates, as status shows it. Holds no secret: a `kid` is public
/// (it names the key to the server).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientAuthStatus {
    pub auth_method: &'static str,
    /// `private_key_jwt`: the stored key's `kid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// `private_key_jwt`: when the key was stored (its age counts from here).
    #[serde(
        serialize_with = "serialize_time",
        skip_serializing_if = "Option::is_none"
    )]
    pub key_created_at: Option<SystemTime>,
    /// `private_key_jwt`: the stored key's public JWK (with `kid`, `alg`,
    /// `use`), the one to register at the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_jwk: Option<serde_json::Value>,
    /// `client_assertion_file`: the file read for every login.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assertion_file: Option<String>,
}

impl ClientAuthStatus {
    /// The status of `cred`'s client authentication with `current`, the
    /// store's current entry; `None` for the secret-based methods.
    pub fn of(
        cred: &crate::config::CredentialConfig,
        current: Option<&crate::store::SecretEntry>,
    ) -> Option<ClientAuthStatus> {
        use crate::config::AuthMethod;
        match cred.auth_method {
            AuthMethod::PrivateKeyJwt => {
                let key = current.and_then(|c| crate::provider::key::from_secret(&c.value).ok());
                Some(ClientAuthStatus {
                    auth_method: cred.auth_method.as_str(),
                    key_id: key.as_ref().map(|k| k.kid().to_string()),
                    key_created_at: current.map(|c| c.created_at),
                    public_jwk: key.as_ref().map(|k| k.public_jwk()),
                    assertion_file: None,
                })
            }
            AuthMethod::ClientAssertionFile => Some(ClientAuthStatus {
                auth_method: cred.auth_method.as_str(),
                assertion_file: (cred.assertion.as_ref())
                    .and_then(|a| a.file.as_ref())
                    .map(|f| f.display().to_string()),
                ..ClientAuthStatus::default()
            }),
            AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost => None,
        }
    }
}

impl ClientAuthStatus {
    /// Follows a new current entry of the journal (a key rotation promoted
    /// a new key): the key fields of a `private_key_jwt` status name it.
    pub fn follow(&mut self, current: &crate::store::SecretEntry) {
        if self.auth_method != crate::config::AuthMethod::PrivateKeyJwt.as_str()
            || (self.key_id.is_some() && self.key_created_at == Some(current.created_at))
        {
            // Not a key, or this key already (parsing an RSA key is not free).
            return;
        }
        let key = crate::provider::key::from_secret(&current.value).ok();
        self.key_id = key.as_ref().map(|k| k.kid().to_string());
        self.key_created_at = Some(current.created_at);
        self.public_jwk = key.as_ref().map(|k| k.public_jwk());
    }
}

fn serialize_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&humantime::format_rfc3339_seconds(*t).to_string()),
        None => s.serialize_none(),
    }
}

/// What one sink (a token file, a Kubernetes Secret key) holds, as its
/// writer last left it ([`crate::serve::sink`]).
#[derive(Debug, Clone)]
pub struct SinkState {
    /// The sink's [`crate::config::SinkConfig::label`]: a file's path, or
    /// `kubernetes-secret:<namespace>/<secret>[<key>]`.
    pub target: String,
    /// The token the file holds: the last one written to it.
    pub token: Option<Arc<Token>>,
    pub last_written_at: Option<SystemTime>,
    /// Failed writes since the last one that landed.
    pub consecutive_failures: u32,
    /// Why the last write failed; cleared by the next that lands.
    pub last_error: Option<String>,
}

impl SinkState {
    pub fn new(target: String) -> SinkState {
        SinkState {
            target,
            token: None,
            last_written_at: None,
            consecutive_failures: 0,
            last_error: None,
        }
    }
}

/// The state of a credential's token files, shared by their writer and
/// every reader of the credential. A lock and a [`Notify`], not a watch
/// channel: a watch channel's wake-up machinery costs some 400 bytes per
/// credential, mostly for credentials without token files (10,000 of them
/// in the scale benchmark), and only tests and `rekeyd run --once` wait
/// for these to change.
#[derive(Clone, Default)]
pub struct SinkStates(Arc<SinkStatesInner>);

#[derive(Default)]
struct SinkStatesInner {
    states: std::sync::Mutex<Vec<SinkState>>,
    changed: Notify,
}

impl SinkStates {
    /// The states now (a lock: drop it before any `.await`).
    pub fn borrow(&self) -> std::sync::MutexGuard<'_, Vec<SinkState>> {
        self.0
            .states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces every state (after a start or a reload).
    pub fn send_replace(&self, states: Vec<SinkState>) {
        self.send_modify(|s| *s = states);
    }

    /// Changes the states in place and wakes [`SinkStates::wait_for`].
    pub fn send_modify(&self, modify: impl FnOnce(&mut Vec<SinkState>)) {
        modify(&mut self.borrow());
        self.0.changed.notify_waiters();
    }

    /// Returns once the states satisfy `accept` (at once if they do now).
    pub async fn wait_for(&self, accept: impl Fn(&[SinkState]) -> bool) {
        loop {
            // Registered before the check, so a change between the check
            // and the wait is not missed.
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if accept(&self.borrow()) {
                return;
            }
            changed.await;
        }
    }
}

/// How up to date a token file is, compared with the token being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFreshness {
    /// It holds the token being served.
    Current,
    /// It holds an earlier token that is still valid.
    Old,
    /// It holds a token that has expired.
    Expired,
    /// Nothing was written to it yet.
    Missing,
}

impl SinkFreshness {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkFreshness::Current => "current",
            SinkFreshness::Old => "old",
            SinkFreshness::Expired => "expired",
            SinkFreshness::Missing => "missing",
        }
    }

    /// The file holds a token its readers can use.
    pub fn is_valid(self) -> bool {
        matches!(self, SinkFreshness::Current | SinkFreshness::Old)
    }
}

/// One sink as `rekeyd status` and `/v1/status` show it. Holds no token,
/// only its expiry.
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    /// A file's path, or `kubernetes-secret:<namespace>/<secret>[<key>]`
    /// (the metrics' `path` label too).
    pub path: String,
    pub freshness: SinkFreshness,
    /// Wall-clock expiry of the token the file holds.
    #[serde(serialize_with = "serialize_time")]
    pub token_expires_at: Option<SystemTime>,
    #[serde(serialize_with = "serialize_time")]
    pub last_written_at: Option<SystemTime>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

/// The reading side of a running credential.
#[derive(Clone)]
pub struct CredentialHandle {
    pub name: String,
    pub token: watch::Receiver<Option<Arc<Token>>>,
    pub status: watch::Receiver<CredentialStatus>,
    /// Wakes the token engine for an immediate refresh.
    pub refresh_now: Arc<Notify>,
    /// Asks for a rotation now (credentials with rotation configured).
    pub rotate_now: Arc<Notify>,
    /// Forced logins asked for by applications (`POST
    /// /v1/token/{name}/refresh`); the engine is woken through `refresh_now`.
    pub forced: Arc<ForcedRefresh>,
    /// Whether this credential's secret is rotated by rekeyd.
    pub rotates: bool,
    /// The clock its token's lifetime is measured on (the engine's).
    pub clock: Arc<dyn Clock>,
    /// The credential's token files.
    pub sinks: SinkStates,
}

impl CredentialHandle {
    /// The current token, if it has not expired: decided on the boot-time
    /// clock, so a token that ran out while the machine was suspended is
    /// not served once it resumes, whatever tokio's timers say.
    pub fn valid_token(&self) -> Option<Arc<Token>> {
        let now = self.clock.now();
        self.token
            .borrow()
            .as_ref()
            .filter(|t| t.is_valid(now))
            .cloned()
    }

    /// Each token file's state now: expiry passes with time alone, so it
    /// is judged at each call, on the credential's boot-time clock.
    pub fn sink_reports(&self) -> Vec<SinkReport> {
        let now = self.clock.now();
        let serving = self.token.borrow().clone();
        self.sinks
            .borrow()
            .iter()
            .map(|sink| {
                let freshness = match &sink.token {
                    None => SinkFreshness::Missing,
                    Some(t) if !t.is_valid(now) => SinkFreshness::Expired,
                    Some(t) if serving.as_ref().is_some_and(|s| Arc::ptr_eq(s, t)) => {
                        SinkFreshness::Current
                    }
                    Some(_) => SinkFreshness::Old,
                };
                SinkReport {
                    path: sink.target.clone(),
                    freshness,
                    token_expires_at: sink.token.as_ref().map(|t| t.expires_at_wall()),
                    last_written_at: sink.last_written_at,
                    consecutive_failures: sink.consecutive_failures,
                    last_error: sink.last_error.clone(),
                }
            })
            .collect()
    }

    /// Ready: a valid token is served, and every token file holds a valid
    /// token (an application reading an expired one fails just the same).
    pub fn ready(&self) -> bool {
        self.valid_token().is_some() && self.sink_reports().iter().all(|s| s.freshness.is_valid())
    }
}

/// The writing side, shared by the credential's tasks.
#[derive(Clone)]
pub struct CredentialChannels {
    pub token: watch::Sender<Option<Arc<Token>>>,
    pub status: watch::Sender<CredentialStatus>,
    pub refresh_now: Arc<Notify>,
    pub rotate_now: Arc<Notify>,
    /// Forced logins: the engine claims and finishes them.
    pub forced: Arc<ForcedRefresh>,
    /// Wakes the token engine after a rotation promoted a new secret (S5).
    /// Apart from `refresh_now` because that login must not ask for yet
    /// another rotation (`on_login`), or rotations would chain forever.
    pub promoted: Arc<Notify>,
    /// What the token's lifetime is measured on; its suspension reports
    /// wake the engine.
    pub clock: Arc<dyn Clock>,
    pub sinks: SinkStates,
}

impl CredentialChannels {
    /// A new reading side for these channels.
    pub fn handle(&self, name: &str) -> CredentialHandle {
        CredentialHandle {
            name: name.to_string(),
            token: self.token.subscribe(),
            status: self.status.subscribe(),
            refresh_now: self.refresh_now.clone(),
            rotate_now: self.rotate_now.clone(),
            forced: self.forced.clone(),
            rotates: false,
            clock: self.clock.clone(),
            sinks: self.sinks.clone(),
        }
    }
}

/// Creates the channels of a credential and the handle that reads them, on
/// the system clock.
pub fn channels(name: &str, provider: &str) -> (CredentialChannels, CredentialHandle) {
    channels_with_clock(name, provider, clock::system())
}

/// [`channels`] on another clock (tests suspend a [`clock::ManualClock`]).
pub fn channels_with_clock(
    name: &str,
    provider: &str,
    clock: Arc<dyn Clock>,
) -> (CredentialChannels, CredentialHandle) {
    let (token_tx, token_rx) = watch::channel(None);
    let (status_tx, status_rx) = watch::channel(CredentialStatus {
        name: name.to_string(),
        provider: provider.to_string(),
        rotation_phase: "idle".to_string(),
        ..Default::default()
    });
    let refresh_now = Arc::new(Notify::new());
    let rotate_now = Arc::new(Notify::new());
    let forced = Arc::new(ForcedRefresh::new(
        crate::config::DEFAULT_MIN_FORCED_INTERVAL,
    ));
    let sinks = SinkStates::default();
    (
        CredentialChannels {
            token: token_tx,
            status: status_tx,
            refresh_now: refresh_now.clone(),
            rotate_now: rotate_now.clone(),
            forced: forced.clone(),
            promoted: Arc::new(Notify::new()),
            clock: clock.clone(),
            sinks: sinks.clone(),
        },
        CredentialHandle {
            name: name.to_string(),
            token: token_rx,
            status: status_rx,
            refresh_now,
            rotate_now,
            forced,
            rotates: false,
            clock,
            sinks,
        },
    )
}
