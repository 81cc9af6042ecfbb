//! Replicas of `rekeyd run` (real processes) sharing one rotating
//! MapsIndoors credential against the simulated provider, and what the
//! multi-replica tests check at the provider:
//!
//! - I1: the secret the store holds exists at the provider and logs in,
//!   whenever the test looks ([`World::check`]);
//! - I3: once the replicas are stopped and one `rekeyd rotate` has run,
//!   exactly one secret tagged for the credential is left, the stored one
//!   ([`World::assert_settled`]);
//! - I4: the client's hand-made secret and another client's secret are
//!   never touched.
//!
//! Include together with the process helper, whose `RekeydProcess` runs
//! each replica:
//! ```ignore
//! #[path = "support/process.rs"]
//! mod process;
//! #[path = "support/fleet.rs"]
//! mod fleet;
//! ```
#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rekeyd::provider::TokenProvider;
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use rekeyd::store::{CredentialRecord, Rotation};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::process::{BIN, RekeydProcess};

pub const NAME: &str = "maps";
pub const CLIENT: &str = "maps-client";
pub const OTHER_CLIENT: &str = "other-client";
pub const CUSTOMER: &str = "cust";
/// The prefix of the description of every secret rekeyd creates for `maps`.
pub const TAG: &str = "rekeyd:maps:";

/// How often [`World::check`] also logs in with the stored secret (the
/// existence check runs at every call).
const LOGIN_EVERY: Duration = Duration::from_millis(200);

/// The credential's record as the store holds it, read by the test.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub version: u64,
    pub phase: String,
    pub current_id: Option<String>,
    pub current: String,
    /// The rotation id and attempt while `creating`.
    pub rid: Option<String>,
    pub attempt: Option<String>,
    pub last_rotated_at: Option<String>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version)
            .field("phase", &self.phase)
            .field("current_id", &self.current_id)
            .field("current", &"<redacted>")
            .field("rid", &self.rid)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Snapshot {
    /// From the JSON document the file and Kubernetes stores keep.
    pub fn from_document(bytes: &[u8]) -> Option<Snapshot> {
        let doc: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
        let rotation = &doc["rotation"];
        Some(Snapshot {
            version: doc["version"].as_u64()?,
            phase: text(&rotation["phase"])?,
            current_id: text(&doc["current"]["id"]),
            current: text(&doc["current"]["value"])?,
            rid: text(&rotation["rid"]),
            attempt: text(&rotation["attempt"]),
            last_rotated_at: text(&doc["last_rotated_at"]),
        })
    }

    /// From a record a store returned.
    pub fn from_record(version: u64, record: &CredentialRecord) -> Snapshot {
        let (rid, attempt) = match &record.rotation {
            Rotation::Idle => (None, None),
            Rotation::Creating { rid, attempt, .. } => (Some(rid.clone()), Some(attempt.clone())),
            Rotation::Created { rid, .. } | Rotation::Promoted { rid, .. } => {
                (Some(rid.clone()), None)
            }
        };
        Snapshot {
            version,
            phase: record.rotation.phase().to_string(),
            current_id: record.current.id.clone(),
            current: record.current.value.expose_secret().to_string(),
            rid,
            attempt,
            last_rotated_at: record
                .last_rotated_at
                .map(|t| humantime::format_rfc3339_nanos(t).to_string()),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.phase == "idle"
    }
}

/// A pass-through in front of the provider's secret API that carries every
/// request it forwarded to its end, whether or not its caller is still
/// waiting for the answer, as a load balancer in front of a real provider
/// does. The simulated provider alone drops a request whose connection
/// closes; behind this, a `create` whose caller gave up (its claim lapsed,
/// it was killed or paused) still creates the secret, later.
struct Unabandoned {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Unabandoned {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Unabandoned {
    async fn start(upstream: String) -> Unabandoned {
        use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
        use axum::response::IntoResponse;
        let client = reqwest::Client::new();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move {
                    let path = uri.path_and_query().map_or("/", |p| p.as_str());
                    let mut request = client.request(method, format!("{upstream}{path}"));
                    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
                        if let Some(value) = headers.get(&name) {
                            request = request.header(name, value);
                        }
                    }
                    // Spawned: it goes on if this handler is dropped.
                    let forwarded = tokio::spawn(async move {
                        let reply = request.body(body).send().await?;
                        let status = reply.status();
                        let content_type = reply.headers().get(header::CONTENT_TYPE).cloned();
                        Ok::<_, reqwest::Error>((status, content_type, reply.bytes().await?))
                    });
                    match forwarded.await {
                        Ok(Ok((status, content_type, bytes))) => {
                            let mut response = (status, bytes).into_response();
                            if let Some(ct) = content_type {
                                response.headers_mut().insert(header::CONTENT_TYPE, ct);
                            }
                            response
                        }
                        _ => StatusCode::BAD_GATEWAY.into_response(),
                    }
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Unabandoned { url, task }
    }
}

/// The simulated provider with the client's secrets as the tests set them
/// up, and the running checks of I1.
pub struct World {
    pub sim: SimProvider,
    /// In front of the sim's secret API (see [`Unabandoned`]).
    secrets_api: Unabandoned,
    /// The secret the replicas start from; its id is given, so the first
    /// rotation deletes it.
    pub bootstrap: (String, String),
    /// Made by hand for the same client, untagged: never ours (I4).
    pub manual: (String, String),
    /// Another client's, listed by the secret API alongside ours (I4).
    pub other: (String, String),
    /// A login client for the checks, built from a replica's configuration.
    provider: Option<Arc<dyn TokenProvider>>,
    last_login: Option<Instant>,
    /// Existence checks and logins that passed.
    pub checks: u64,
    pub logins: u64,
    /// Every secret value seen at the provider or in the store (I7: none
    /// may be logged).
    pub values: HashSet<String>,
}

impl World {
    /// A provider whose `create` calls take between `create_latency.0` and
    /// `.1`, whose new secrets propagate for 200 ms, and whose tokens live
    /// 8 s: the engines log in with the stored secret every few seconds,
    /// and a bearer token outlives the slowest create of the tests (the
    /// provider checks it once the create is carried out).
    pub async fn start(create_latency: (Duration, Duration)) -> World {
        let sim = SimProvider::start(SimOptions {
            token_lifetime: Duration::from_secs(8),
            propagation_delay: Duration::from_millis(200),
            ..SimOptions::default()
        })
        .await
        .unwrap();
        sim.add_client(CLIENT, CUSTOMER);
        sim.add_client(OTHER_CLIENT, CUSTOMER);
        let bootstrap = sim.add_secret(CLIENT, "portal: initial secret");
        let manual = sim.add_secret(CLIENT, "made by hand for a script");
        let other = sim.add_secret(OTHER_CLIENT, "someone else's");
        let secrets_api = Unabandoned::start(sim.base_url()).await;
        let mut world = World {
            secrets_api,
            values: [&bootstrap.1, &manual.1, &other.1]
                .into_iter()
                .cloned()
                .collect(),
            sim,
            bootstrap,
            manual,
            other,
            provider: None,
            last_login: None,
            checks: 0,
            logins: 0,
        };
        world.slow_creates(create_latency);
        world
    }

    /// Every `create` takes between `latency.0` and `.1` from now on;
    /// nothing else is slowed.
    pub fn slow_creates(&mut self, latency: (Duration, Duration)) {
        self.sim.set_faults(Faults {
            scope: FaultScope::Only(Endpoint::SecretsCreate),
            latency: Some(latency),
            ..Faults::default()
        });
    }

    /// The `[[credentials]]` table of `maps`, bootstrapped from
    /// `secret_file` (written here), rotating `every`, deleting the old
    /// secret `grace` after promoting the new one.
    pub fn credential_toml(&self, secret_file: &Path, every: &str, grace: &str) -> String {
        std::fs::write(secret_file, &self.bootstrap.1).unwrap();
        format!(
            r#"
[[credentials]]
name = "{NAME}"
provider = "mapsindoors"
client_id = "{CLIENT}"
customer_id = "{CUSTOMER}"
initial_secret_file = "{file}"
initial_secret_id = "{boot}"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}/api/clientcredentials"
request_timeout = "10s"
[credentials.rotation]
every = "{every}"
grace = "{grace}"
"#,
            file = secret_file.display(),
            boot = self.bootstrap.0,
            token = self.sim.mapsindoors_token_url(),
            secrets = self.secrets_api.url,
        )
    }

    /// Builds the login client of the checks from a replica's configuration.
    pub fn use_config(&mut self, config: &Path) {
        let config = rekeyd::config::Config::load(config).expect("a valid configuration");
        let cred = config.credential(NAME).expect("credential maps");
        self.provider = Some(rekeyd::provider::build(cred).unwrap());
    }

    pub async fn login(&self, value: &str) -> Result<(), rekeyd::provider::ProviderError> {
        let provider = self.provider.as_ref().expect("use_config first");
        provider
            .login(&SecretString::from(value.to_string()))
            .await
            .map(|_| ())
    }

    /// Remembers the values at the provider now.
    pub fn remember_values(&mut self) {
        for s in self.sim.secrets(CLIENT) {
            self.values.insert(s.value);
        }
    }

    /// I1 and I4, now: the stored secret (`read`) exists at the provider,
    /// and every `LOGIN_EVERY` it also logs in; the hand-made and the other
    /// client's secrets are still there. A login that fails is only excused
    /// when the store has moved on to another secret meanwhile (a rotation
    /// may retire the one read, after its grace period). `None` from `read`:
    /// no record yet.
    pub async fn check(&mut self, read: impl AsyncFn() -> Option<Snapshot>, when: &str) {
        self.remember_values();
        let Some(snap) = read().await else { return };
        self.values.insert(snap.current.clone());
        let ours = self.sim.secrets(CLIENT);
        if !ours.iter().any(|s| s.value == snap.current) {
            // The read and the listing are a moment apart: only a record
            // that still names the missing secret is a lockout.
            let again = read().await.expect("the record does not vanish");
            let listed_again = self.sim.secrets(CLIENT);
            assert!(
                again.current != snap.current
                    || listed_again.iter().any(|s| s.value == snap.current),
                "{when}: LOCKED OUT: the stored secret is gone at the provider \
                 (record {snap:?}; the provider holds {listed_again:?})"
            );
        }
        self.assert_untouched(when);
        self.checks += 1;
        let due = self.last_login.is_none_or(|at| at.elapsed() >= LOGIN_EVERY);
        if due && self.provider.is_some() {
            self.last_login = Some(Instant::now());
            if let Err(e) = self.login(&snap.current).await {
                let again = read().await.expect("the record does not vanish");
                assert!(
                    again.current != snap.current,
                    "{when}: LOCKED OUT: the stored secret does not log in ({e}); \
                     record {again:?}; the provider holds {:?}",
                    self.sim.secrets(CLIENT)
                );
            } else {
                self.logins += 1;
            }
        }
    }

    /// I4: the hand-made secret and the other client's are where they were.
    pub fn assert_untouched(&self, when: &str) {
        let ours = self.sim.secrets(CLIENT);
        assert!(
            ours.iter()
                .any(|s| s.id == self.manual.0 && s.value == self.manual.1),
            "{when}: the hand-made secret of {CLIENT} was deleted: {ours:?}"
        );
        let theirs = self.sim.secrets(OTHER_CLIENT);
        assert!(
            theirs.len() == 1 && theirs[0].id == self.other.0 && theirs[0].value == self.other.1,
            "{when}: another client's secret was touched: {theirs:?}"
        );
    }

    /// The next [`World::check`] logs in whenever the last login was.
    pub fn login_at_next_check(&mut self) {
        self.last_login = None;
    }

    /// The secrets at the provider tagged for `maps`.
    pub fn tagged(&self) -> Vec<rekeyd::sim::SimSecret> {
        self.sim
            .secrets(CLIENT)
            .into_iter()
            .filter(|s| s.description.starts_with(TAG))
            .collect()
    }

    /// After the replicas stopped and one `rekeyd rotate` ran: the journal
    /// is idle, exactly one tagged secret is left and it is the stored one,
    /// which logs in (I1, I3); the bootstrap secret was rotated away; the
    /// hand-made and the other client's secrets are untouched (I4).
    pub async fn assert_settled(&mut self, stored: &Snapshot) {
        self.remember_values();
        assert!(stored.is_idle(), "the journal is idle: {stored:?}");
        let tagged = self.tagged();
        assert_eq!(
            tagged.len(),
            1,
            "exactly one secret tagged {TAG} remains, the stored one \
             (record {stored:?}): {tagged:?}"
        );
        assert_eq!(Some(&tagged[0].id), stored.current_id.as_ref());
        assert_eq!(tagged[0].value, stored.current);
        let ours = self.sim.secrets(CLIENT);
        assert!(
            !ours.iter().any(|s| s.id == self.bootstrap.0),
            "the bootstrap secret was rotated away: {ours:?}"
        );
        assert_eq!(ours.len(), 2, "the stored and the hand-made one: {ours:?}");
        self.assert_untouched("settled");
        self.login(&stored.current)
            .await
            .expect("the stored secret logs in");
    }

    /// I7: no secret value and no token (`sim_...`) in `logs`.
    pub fn assert_no_secrets_in(&self, logs: &str) {
        if let Some(at) = logs.find("sim_") {
            panic!(
                "a token reached the logs: ...{}...",
                &logs[at.saturating_sub(200)..at]
            );
        }
        for value in &self.values {
            assert!(
                !logs.contains(value.as_str()),
                "a secret value reached the logs"
            );
        }
    }
}

/// One replica: its own directory and configuration, and the `rekeyd run`
/// processes started from them (each run logging to a file of its own).
pub struct Replica {
    pub name: String,
    dir: PathBuf,
    process: Option<RekeydProcess>,
    logs: Vec<PathBuf>,
}

impl Replica {
    pub fn new(root: &Path, name: &str) -> Replica {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Replica {
            name: name.to_string(),
            dir,
            process: None,
            logs: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("rekeyd.toml")
    }

    /// Writes the configuration: `store` (a `[store]` table) and the
    /// credential from `world`.
    pub fn configure(&self, world: &World, store: &str, every: &str, grace: &str) {
        let text = format!(
            "state_dir = \"{d}/state\"\n{store}\n{cred}",
            d = self.dir.display(),
            cred = world.credential_toml(&self.dir.join("maps.secret"), every, grace),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn start(&mut self) {
        assert!(self.process.is_none(), "{} already runs", self.name);
        let log = self.dir.join(format!("run-{:03}.log", self.logs.len()));
        self.process = Some(RekeydProcess::spawn(&self.config_path(), &log, &[]));
        self.logs.push(log);
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(|p| p.child.id())
    }

    /// Fails the test if the running process exited by itself.
    pub fn assert_running(&mut self) {
        if let Some(p) = self.process.as_mut()
            && let Some(status) = p.child.try_wait().unwrap()
        {
            panic!("{} exited by itself ({status})\n{}", self.name, p.log());
        }
    }

    pub fn signal(&self, signal: i32) {
        self.process
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .signal(signal);
    }

    /// `kill -9`, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        self.assert_running();
        let mut p = self.process.take().expect("running");
        p.signal(libc::SIGKILL);
        let status = p.wait_exit().await;
        assert!(!status.success(), "killed, not exited: {status}");
    }

    /// Waits until the running process has started up (its signal
    /// handlers are in place from then on).
    pub async fn wait_started(&mut self) {
        let p = self.process.as_mut().expect("running");
        p.wait_until("start-up", |p| p.log().contains("rekeyd started"))
            .await;
    }

    /// SIGTERM once started; the process must exit 0 in time.
    pub async fn stop(&mut self) {
        self.assert_running();
        self.wait_started().await;
        if let Some(p) = self.process.take() {
            p.stop().await;
        }
    }

    /// The output of every run so far, oldest first.
    pub fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// The output of the current (or last) run.
    pub fn last_log(&self) -> String {
        self.logs
            .last()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }
}

/// `rekeyd rotate maps` with `config`, as an operator runs it once the
/// replicas are stopped: it finishes whatever journal they left and rotates
/// once more. Must succeed; returns its output.
pub async fn rotate_once(config: &Path) -> String {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["rotate", NAME, "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("REKEYD") {
            command.env_remove(&name);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("rekeyd rotate finishes in time")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "rekeyd rotate: {}\n{text}",
        out.status
    );
    text
}
