//! A simulated credential provider, served over real HTTP on loopback.
//!
//! [`SimProvider`] plays the three provider kinds rekeyd talks to — the
//! MapsIndoors IdentityServer with its client-secret API, the Mappls
//! (MapmyIndia) token endpoint, and a generic RFC 6749 §4.4 token endpoint —
//! backed by one shared registry of clients, secrets and tokens. It exists so
//! that the daemon's promises (never locked out, no orphans, serve
//! continuously) can be checked end to end without the internet, and so that
//! `rekeyd demo` has something to rotate against.
//!
//! It is stateful and deliberately faithful to each provider's quirks
//! (IdentityServer's 400 for a bad secret, Mappls' 201 and lowercase
//! `bearer`, the secret API listing other clients' secrets, secrets that take
//! a while to propagate). On top of that, a scriptable [`Faults`] plan makes
//! it misbehave the way real infrastructure does: 503 pages, quota errors,
//! replies lost after the work was done, HTML where JSON was expected,
//! endless bodies and hung requests, refusals that echo the request's
//! secrets, a client that has its maximum number of secrets; and
//! [`TokenReply`] varies how a successful token reply states the lifetime
//! (a number, a string, none, anything; JWTs with an `exp`).
//!
//! Layout: `state.rs` holds the registry logic (pure, unit-tested),
//! `faults.rs` the fault plan and its decision function, `routes.rs` the
//! axum handlers.

mod faults;
mod management;
mod okta_keys;
mod routes;
mod state;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use faults::{Endpoint, FaultScope, Faults};
pub use okta_keys::SimKey;
pub use routes::{ExpiresIn, TokenReply};

use state::Registry;

/// How long [`SimProvider::shutdown`] waits for in-flight connections before
/// abandoning them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Start-up settings of a [`SimProvider`].
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Lifetime of issued tokens, reported as `expires_in` (whole seconds).
    pub token_lifetime: Duration,
    /// How long a secret created through the API is refused by the token
    /// endpoints (`invalid_client`), like a real provider's eventual
    /// consistency. Secrets seeded with [`SimProvider::add_secret`] are
    /// usable at once.
    pub propagation_delay: Duration,
    /// Status of a successful Mappls login: its documentation says 201 in
    /// places and 200 in others.
    pub mappls_success_status: u16,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            token_lifetime: Duration::from_secs(86_400),
            propagation_delay: Duration::ZERO,
            mappls_success_status: 201,
        }
    }
}

/// One secret as stored by the sim, value included (for test inspection).
/// `Debug` redacts the value so that a failing assertion does not print it.
#[derive(Clone)]
pub struct SimSecret {
    pub id: String,
    pub client_id: String,
    pub description: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub value: String,
    /// Okta: `false` once deactivated (it no longer logs in).
    pub active: bool,
    /// When logins with it start to fail (Entra `endDateTime`), RFC 3339;
    /// `None`: never.
    pub expires_at: Option<String>,
}

impl fmt::Debug for SimSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSecret")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .field("description", &self.description)
            .field("created_at", &self.created_at)
            .field("value", &"<redacted>")
            .field("active", &self.active)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Counters of what the sim has seen and done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Requests received per endpoint, faulted ones included.
    pub requests: BTreeMap<Endpoint, u64>,
    /// Tokens issued by any token endpoint (including ones whose response
    /// was then dropped).
    pub logins_ok: u64,
    /// Logins refused as `invalid_client`.
    pub logins_rejected: u64,
    /// Of those, logins with a secret past its expiry (Entra answers them
    /// `AADSTS7000222`).
    pub logins_expired: u64,
    /// Successful `/oauth2/token` logins by client authentication method.
    pub oauth2_basic_logins: u64,
    pub oauth2_post_logins: u64,
    /// Secrets created / deleted through the secret API.
    pub secrets_created: u64,
    pub secrets_deleted: u64,
    /// Requests that got any fault (latency alone does not count).
    pub faults_injected: u64,
    /// Of those, requests performed whose response was then lost.
    pub responses_dropped: u64,
    /// Calls of the Okta and Auth0 management APIs, by the client whose
    /// bearer token made them.
    pub management_callers: BTreeMap<String, u64>,
}

impl SimStats {
    /// Requests received by `endpoint`.
    pub fn requests_to(&self, endpoint: Endpoint) -> u64 {
        self.requests.get(&endpoint).copied().unwrap_or(0)
    }
}

/// Everything mutable, behind one lock that is never held across an await.
struct SimState {
    registry: Registry,
    /// Okta apps' published public keys and seen assertion ids.
    okta_keys: okta_keys::KeyRegistry,
    faults: Faults,
    stats: SimStats,
    token_reply: TokenReply,
}

/// State shared by the handle and the server's handlers.
struct Shared {
    state: Mutex<SimState>,
    /// Cancelled on shutdown; also releases hung requests and endless bodies.
    cancel: CancellationToken,
    mappls_success: StatusCode,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panicking handler must not wedge every later request.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running simulated provider. Dropping it starts a graceful shutdown in
/// the background; [`SimProvider::shutdown`] waits for it.
pub struct SimProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl SimProvider {
    /// Binds `127.0.0.1:0` and serves on a spawned task.
    ///
    /// Fails if the listener cannot be bound or `mappls_success_status` is
    /// not a valid HTTP status.
    pub async fn start(options: SimOptions) -> io::Result<SimProvider> {
        let mappls_success = StatusCode::from_u16(options.mappls_success_status)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(SimState {
                registry: Registry::new(options.token_lifetime, options.propagation_delay),
                okta_keys: okta_keys::KeyRegistry::default(),
                faults: Faults::default(),
                stats: SimStats::default(),
                token_reply: TokenReply::default(),
            }),
            cancel: CancellationToken::new(),
            mappls_success,
        });
        let app = routes::router(shared.clone());
        let stop = shared.cancel.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::debug!(%error, "sim: server stopped with an error");
            }
        });
        tracing::debug!(%addr, "sim: provider listening");
        Ok(SimProvider {
            addr,
            shared,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn mapsindoors_token_url(&self) -> String {
        format!("{}/connect/token", self.base_url())
    }

    pub fn mapsindoors_secrets_url(&self) -> String {
        format!("{}/api/clientcredentials", self.base_url())
    }

    pub fn mappls_token_url(&self) -> String {
        format!("{}/api/security/oauth/token", self.base_url())
    }

    pub fn oauth2_token_url(&self) -> String {
        format!("{}/oauth2/token", self.base_url())
    }

    /// Okta's org URL as `org_url` takes it: token and secrets URLs are
    /// derived from it (the app id is the client id in the sim).
    pub fn okta_org_url(&self) -> String {
        self.base_url()
    }

    /// Okta's key URL of app `app` (`…/credentials/jwks`), as
    /// `endpoints.secrets_url` takes it.
    pub fn okta_jwks_url(&self, app: &str) -> String {
        format!("{}/api/v1/apps/{app}/credentials/jwks", self.base_url())
    }

    /// Publishes a public JWK for Okta app `app` (its `kid` required), as
    /// an operator would in the admin console; active at once. Returns
    /// Okta's id of it.
    ///
    /// # Panics
    ///
    /// If the JWK has no `kid` or one the app has already: a test bug.
    pub fn add_okta_key(&self, app: &str, public_jwk: &serde_json::Value) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.shared
            .lock()
            .okta_keys
            .add(app, public_jwk, now, &mut rand::rng())
            .unwrap_or_else(|e| panic!("sim: add_okta_key refused: {e:?}"))
            .id
    }

    /// Okta app `app`'s published keys in the order they were added.
    pub fn okta_keys(&self, app: &str) -> Vec<SimKey> {
        self.shared.lock().okta_keys.keys(app).to_vec()
    }

    /// Keycloak's base URL as `base_url` takes it (realm token and admin
    /// URLs are derived from it; the client's id is its client id).
    pub fn keycloak_base_url(&self) -> String {
        self.base_url()
    }

    /// Entra's token endpoint for `tenant`.
    pub fn entra_token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.base_url())
    }

    /// Microsoft Graph's application resource for `object_id`.
    pub fn entra_application_url(&self, object_id: &str) -> String {
        format!("{}/v1.0/applications/{object_id}", self.base_url())
    }

    /// Auth0's token endpoint.
    pub fn auth0_token_url(&self) -> String {
        format!("{}/oauth/token", self.base_url())
    }

    /// Auth0's client URL (`PATCH` sets its secret).
    pub fn auth0_client_url(&self, client_id: &str) -> String {
        format!("{}/api/v2/clients/{client_id}", self.base_url())
    }

    pub fn oauth2_introspect_url(&self) -> String {
        format!("{}/oauth2/introspect", self.base_url())
    }

    /// Registers a client (idempotent). `customer_id` groups clients, like
    /// MapsIndoors' `customerId`; registering an existing client under
    /// another customer moves it and its secrets there.
    pub fn add_client(&self, client_id: &str, customer_id: &str) {
        self.shared
            .lock()
            .registry
            .add_client(client_id, customer_id);
    }

    /// Creates a secret for the client directly, as an operator would in the
    /// portal; usable at once (no propagation delay). Returns `(id, value)`.
    ///
    /// # Panics
    ///
    /// If the client has not been registered with [`SimProvider::add_client`]:
    /// that is a bug in the test.
    pub fn add_secret(&self, client_id: &str, description: &str) -> (String, String) {
        let secret = self
            .shared
            .lock()
            .registry
            .create_secret(
                client_id,
                description,
                Instant::now(),
                false,
                &mut rand::rng(),
            )
            .unwrap_or_else(|| panic!("sim: add_secret for unregistered client {client_id:?}"));
        (secret.id, secret.value)
    }

    /// Gives secret `id` another id, as a provider whose ids may hold any
    /// text (a line break, an escape sequence) would have named it. `false`
    /// if there was none.
    pub fn rename_secret(&self, id: &str, new_id: &str) -> bool {
        self.shared.lock().registry.rename_secret(id, new_id)
    }

    /// Deletes a secret by id whatever its client, as an operator would (to
    /// simulate a revoked credential). `false` if there was none.
    pub fn remove_secret(&self, id: &str) -> bool {
        self.shared.lock().registry.remove_secret(id)
    }

    /// All secrets of a client in creation order, values included.
    pub fn secrets(&self, client_id: &str) -> Vec<SimSecret> {
        self.shared
            .lock()
            .registry
            .secrets_of_client(client_id)
            .map(|s| SimSecret {
                id: s.id.clone(),
                client_id: s.client_id.clone(),
                description: s.description.clone(),
                created_at: routes::rfc3339(s.created_at),
                value: s.value.clone(),
                active: s.active,
                expires_at: s.expires_at.map(routes::rfc3339),
            })
            .collect()
    }

    /// The client a token was issued to (by any token endpoint); `None` if
    /// the token is unknown or expired.
    pub fn token_client(&self, access_token: &str) -> Option<String> {
        self.shared
            .lock()
            .registry
            .token(access_token, Instant::now())
            .map(|t| t.client_id.clone())
    }

    /// Lifetime of tokens issued from now on; tokens already issued keep
    /// theirs.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().registry.token_lifetime = lifetime;
    }

    /// How the token endpoints write successful replies from now on (the
    /// `expires_in` field, JWT access tokens); tokens still live
    /// `token_lifetime` at the sim.
    pub fn set_token_reply(&self, reply: TokenReply) {
        self.shared.lock().token_reply = reply;
    }

    /// Secrets created from now on (through the API or
    /// [`SimProvider::add_secret`]) expire this long after their creation:
    /// logins with them then fail (Entra: `401 invalid_client`,
    /// `AADSTS7000222`) and Entra's listing shows it as `endDateTime`.
    /// `None` (the default): they never expire, and Entra shows Graph's
    /// default `endDateTime`, two years after creation.
    pub fn set_secret_lifetime(&self, lifetime: Option<Duration>) {
        self.shared.lock().registry.secret_lifetime = lifetime;
    }

    /// Sets when secret `id` expires (`None`: never), as an operator
    /// choosing an expiry in the portal would; `false` if there is none.
    pub fn set_secret_expiry(&self, id: &str, at: Option<std::time::SystemTime>) -> bool {
        self.shared.lock().registry.set_secret_expiry(id, at)
    }

    /// Propagation delay for secrets created through the API from now on.
    pub fn set_propagation_delay(&self, delay: Duration) {
        self.shared.lock().registry.propagation_delay = delay;
    }

    /// Replaces the fault plan.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    /// Edits the fault plan in place (e.g. to add to a counter while
    /// requests are in flight).
    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.shared.lock().faults);
    }

    /// The current fault plan, with counters as consumed so far.
    pub fn faults(&self) -> Faults {
        self.shared.lock().faults.clone()
    }

    pub fn stats(&self) -> SimStats {
        self.shared.lock().stats.clone()
    }

    /// Stops accepting connections, releases hung requests and waits (up to
    /// a few seconds) for in-flight ones to finish.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            tracing::debug!("sim: graceful shutdown timed out; aborting");
            task.abort();
        }
    }
}

impl Drop for SimProvider {
    fn drop(&mut self) {
        // Best effort: the server task winds down on its own.
        self.shared.cancel.cancel();
    }
}

impl fmt::Debug for SimProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimProvider")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
