//! Each provider profile (MapsIndoors, Mappls, generic OAuth2 with
//! `client_secret_basic` and with `client_secret_post`) driven end to end:
//! a real in-process daemon logs in against the simulated provider over
//! loopback HTTP, and the sim's fault plan makes it misbehave.
//!
//! Every scenario is one async function taking the [`Profile`]; the
//! `per_profile!` macro turns it into one test per profile, named
//! `<scenario>::<profile>`.
//!
//! Synchronisation is on the credential's watch channels (`wait_token`,
//! `wait_status`); the only bounded observation window is in the quota test,
//! which has to show that something does *not* happen.

#[path = "support/daemon.rs"]
mod daemon;

use std::time::{Duration, SystemTime};

use daemon::{TestDaemon, wait_status, wait_token};
use rekeyd::credential::{CredentialHandle, CredentialStatus};
use rekeyd::provider::ErrorKind;
use rekeyd::sim::{Endpoint, ExpiresIn, FaultScope, Faults, SimOptions, SimProvider, TokenReply};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, Rotation, SecretEntry, Store};
use rekeyd::token::Token;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

const CLIENT: &str = "svc-client";
const CUSTOMER: &str = "cust-1";
/// The credential's name in the daemon's configuration.
const CRED: &str = "cred";
const WRONG_SECRET: &str = "definitely-not-the-secret";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    MapsIndoors,
    Mappls,
    OAuth2Basic,
    OAuth2Post,
}

impl Profile {
    /// The sim endpoint this profile logs in at.
    fn endpoint(self) -> Endpoint {
        match self {
            Profile::MapsIndoors => Endpoint::MapsIndoorsToken,
            Profile::Mappls => Endpoint::MapplsToken,
            Profile::OAuth2Basic | Profile::OAuth2Post => Endpoint::OAuth2Token,
        }
    }

    /// Status of a quota error: Mappls says 403, everyone else 429.
    fn quota_status(self) -> u16 {
        match self {
            Profile::Mappls => 403,
            _ => 429,
        }
    }

    /// Status of a rejected client secret: IdentityServer answers 400, Mappls
    /// 401; an RFC 6749 server 401 to HTTP Basic and 400 to a secret sent in
    /// the body (§5.2).
    fn rejected_status(self) -> u16 {
        match self {
            Profile::MapsIndoors | Profile::OAuth2Post => 400,
            Profile::Mappls | Profile::OAuth2Basic => 401,
        }
    }

    /// The daemon configuration; `endpoints_extra` is appended to the
    /// `[credentials.endpoints]` table. `{dir}` is the test's directory.
    fn config(self, sim: &SimProvider, endpoints_extra: &str) -> String {
        let (provider, auth, token_url, secrets_url) = match self {
            Profile::MapsIndoors => (
                "mapsindoors",
                "",
                sim.mapsindoors_token_url(),
                format!("secrets_url = \"{}\"\n", sim.mapsindoors_secrets_url()),
            ),
            Profile::Mappls => ("mappls", "", sim.mappls_token_url(), String::new()),
            Profile::OAuth2Basic => (
                "oauth2",
                "auth_method = \"client_secret_basic\"\n",
                sim.oauth2_token_url(),
                String::new(),
            ),
            Profile::OAuth2Post => (
                "oauth2",
                "auth_method = \"client_secret_post\"\n",
                sim.oauth2_token_url(),
                String::new(),
            ),
        };
        format!(
            "state_dir = \"{{dir}}/state\"\n\
             [[credentials]]\n\
             name = \"{CRED}\"\n\
             provider = \"{provider}\"\n\
             client_id = \"{CLIENT}\"\n\
             {auth}\
             initial_secret_file = \"{{dir}}/initial.secret\"\n\
             [credentials.endpoints]\n\
             token_url = \"{token_url}\"\n\
             {secrets_url}\
             {endpoints_extra}\n"
        )
    }
}

/// One test per profile for a scenario `async fn scenario(profile: Profile)`.
macro_rules! per_profile {
    ($scenario:ident) => {
        mod $scenario {
            use super::Profile;

            #[tokio::test]
            async fn mapsindoors() {
                super::$scenario(Profile::MapsIndoors).await
            }

            #[tokio::test]
            async fn mappls() {
                super::$scenario(Profile::Mappls).await
            }

            #[tokio::test]
            async fn oauth2_basic() {
                super::$scenario(Profile::OAuth2Basic).await
            }

            #[tokio::test]
            async fn oauth2_post() {
                super::$scenario(Profile::OAuth2Post).await
            }
        }
    };
}

/// A running sim and daemon for one profile.
struct Env {
    profile: Profile,
    sim: SimProvider,
    daemon: TestDaemon,
    /// The secret the sim accepts for [`CLIENT`].
    secret: String,
}

/// How the credential's secret is set up before the daemon starts.
enum Seed {
    /// `initial_secret_file` holds the working secret.
    Good,
    /// `initial_secret_file` holds a secret the provider rejects.
    Wrong,
    /// The store already holds a record: current rejected, the working
    /// secret pending in an unfinished rotation.
    PendingWorks,
}

struct Setup<'a> {
    options: SimOptions,
    faults: Faults,
    seed: Seed,
    endpoints_extra: &'a str,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            options: SimOptions::default(),
            faults: Faults::default(),
            seed: Seed::Good,
            endpoints_extra: "",
        }
    }
}

async fn start(profile: Profile, setup: Setup<'_>) -> Env {
    let sim = SimProvider::start(setup.options).await.unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let (secret_id, secret) = sim.add_secret(CLIENT, "seeded by the test");
    sim.set_faults(setup.faults);
    let dir = tempfile::tempdir().unwrap();
    let initial = match setup.seed {
        Seed::Good => secret.as_str(),
        Seed::Wrong | Seed::PendingWorks => WRONG_SECRET,
    };
    daemon::write_secret(dir.path(), "initial.secret", initial);
    if let Seed::PendingWorks = setup.seed {
        let mut record = CredentialRecord::new(entry(None, WRONG_SECRET));
        record.rotation = Rotation::Created {
            rid: "r-test".to_string(),
            pending: entry(Some(secret_id), &secret),
        };
        FileStore::new(&dir.path().join("state"))
            .compare_and_swap(CRED, None, &record)
            .await
            .unwrap();
    }
    let daemon = TestDaemon::start_in(dir, &profile.config(&sim, setup.endpoints_extra)).await;
    Env {
        profile,
        sim,
        daemon,
        secret,
    }
}

impl Env {
    fn handle(&self) -> CredentialHandle {
        self.daemon.handle(CRED)
    }

    /// Requests the sim's token endpoint of this profile has received.
    fn token_requests(&self) -> u64 {
        self.sim.stats().requests_to(self.profile.endpoint())
    }

    /// Fault plan scoped to the token endpoints.
    fn set_token_faults(&self, faults: Faults) {
        self.sim.set_faults(Faults {
            scope: FaultScope::Token,
            ..faults
        });
    }

    async fn stop(self) {
        self.daemon.stop().await;
        self.sim.shutdown().await;
    }
}

fn entry(id: Option<String>, value: &str) -> SecretEntry {
    SecretEntry {
        id,
        value: SecretString::from(value.to_string()),
        created_at: SystemTime::now(),
        expires_at: None,
    }
}

fn access(token: &Token) -> String {
    token.access_token.expose_secret().to_string()
}

fn error_of(status: &CredentialStatus) -> &str {
    status.last_error.as_deref().unwrap_or("")
}

/// Waits for a failure whose message contains every one of `needles`.
async fn wait_error(handle: &CredentialHandle, needles: &[&str]) -> CredentialStatus {
    wait_status(handle, |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| needles.iter().all(|n| e.contains(n)))
    })
    .await
}

/// Waits until the status is that of a freshly published token.
async fn wait_healthy(handle: &CredentialHandle) -> CredentialStatus {
    wait_status(handle, |s| {
        s.consecutive_failures == 0 && s.last_error.is_none() && s.token_expires_at.is_some()
    })
    .await
}

/// Moves tokio's clock forward. The clock is paused only for the jump, so
/// that real network I/O never sees auto-advanced time (the test runtime is
/// single-threaded, as `pause` requires).
async fn jump_clock(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

// ---------------------------------------------------------------------------
// First login
// ---------------------------------------------------------------------------

async fn first_login_with(profile: Profile, options: SimOptions) {
    let env = start(
        profile,
        Setup {
            options,
            ..Setup::default()
        },
    )
    .await;
    let handle = env.handle();
    let token = wait_token(&handle, |_| true).await;
    assert_eq!(
        env.sim.token_client(&access(&token)).as_deref(),
        Some(CLIENT),
        "the sim issued the token to our client"
    );
    // Mappls' lowercase `bearer` is normalised.
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(token.lifetime, Duration::from_secs(86_400));
    let status = wait_healthy(&handle).await;
    assert!(!status.locked_out);
    assert!(status.last_refresh_at.is_some());
    assert_eq!(
        handle.valid_token().map(|t| access(&t)),
        Some(access(&token))
    );
    let stats = env.sim.stats();
    assert_eq!(stats.requests_to(profile.endpoint()), 1);
    assert_eq!(stats.logins_ok, 1);
    assert_eq!(stats.logins_rejected, 0);
    match profile {
        Profile::OAuth2Basic => assert_eq!(
            (stats.oauth2_basic_logins, stats.oauth2_post_logins),
            (1, 0)
        ),
        Profile::OAuth2Post => assert_eq!(
            (stats.oauth2_basic_logins, stats.oauth2_post_logins),
            (0, 1)
        ),
        _ => {}
    }
    env.stop().await;
}

async fn first_login(profile: Profile) {
    first_login_with(profile, SimOptions::default()).await
}
per_profile!(first_login);

/// Mappls documents 201 in places and 200 in others: both are success.
#[tokio::test]
async fn mappls_first_login_with_200() {
    first_login_with(
        Profile::Mappls,
        SimOptions {
            mappls_success_status: 200,
            ..SimOptions::default()
        },
    )
    .await
}

// ---------------------------------------------------------------------------
// Error classification, straight from the provider built from the config:
// the kind decides the engine's reaction, which the status does not show.
// ---------------------------------------------------------------------------

async fn errors_are_classified(profile: Profile) {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let (_, secret) = sim.add_secret(CLIENT, "seeded by the test");
    let text = profile
        .config(&sim, "")
        .replace("{dir}", "/nonexistent-rekeyd-test");
    let config = rekeyd::config::Config::from_toml(&text).unwrap();
    let provider = rekeyd::provider::build(&config.credentials[0]).unwrap();
    let good = SecretString::from(secret);
    let wrong = SecretString::from(WRONG_SECRET);
    let faults = |f: Faults| {
        sim.set_faults(Faults {
            scope: FaultScope::Token,
            ..f
        })
    };

    faults(Faults {
        fail_next: 1,
        ..Faults::default()
    });
    let e = provider.login(&good).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ErrorKind::Transient, Some(503)), "{e}");

    faults(Faults {
        quota_next: 1,
        quota_retry_after: Some(60),
        ..Faults::default()
    });
    let e = provider.login(&good).await.unwrap_err();
    assert_eq!(
        (e.kind, e.status, e.retry_after),
        (
            ErrorKind::Quota,
            Some(profile.quota_status()),
            Some(Duration::from_secs(60))
        ),
        "{e}"
    );
    faults(Faults::default());
    let e = provider.login(&wrong).await.unwrap_err();
    assert_eq!(
        (e.kind, e.status, e.code.as_deref()),
        (
            ErrorKind::Rejected,
            Some(profile.rejected_status()),
            Some("invalid_client")
        ),
        "{e}"
    );

    for f in [
        Faults {
            garbage_next: 1,
            ..Faults::default()
        },
        Faults {
            huge_next: 1,
            ..Faults::default()
        },
        Faults {
            drop_next: 1,
            ..Faults::default()
        },
    ] {
        faults(f.clone());
        let e = provider.login(&good).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{f:?}: {e}");
    }

    let token = provider.login(&good).await.unwrap();
    assert_eq!(sim.token_client(&access(&token)).as_deref(), Some(CLIENT));
    sim.shutdown().await;
}
per_profile!(errors_are_classified);

// ---------------------------------------------------------------------------
// Refresh before expiry
// ---------------------------------------------------------------------------

async fn refresh_before_expiry(profile: Profile) {
    let env = start(
        profile,
        Setup {
            options: SimOptions {
                token_lifetime: Duration::from_secs(3),
                ..SimOptions::default()
            },
            ..Setup::default()
        },
    )
    .await;
    let handle = env.handle();
    let first = wait_token(&handle, |_| true).await;
    assert_eq!(first.lifetime, Duration::from_secs(3));
    let first_value = access(&first);
    let second = wait_token(&handle, |t| access(t) != first_value).await;
    assert!(
        second.received_at < first.expires_at(),
        "the replacement arrived {:?} after the first token expired",
        second.received_at - first.expires_at()
    );
    // Refreshed at 70-80% of the lifetime, not earlier.
    assert!(
        second.received_at - first.received_at >= Duration::from_millis(2100),
        "refreshed after only {:?}",
        second.received_at - first.received_at
    );
    assert_eq!(
        env.sim.token_client(&access(&second)).as_deref(),
        Some(CLIENT)
    );
    let stats = env.sim.stats();
    assert!(stats.logins_ok >= 2, "{stats:?}");
    assert_eq!(stats.logins_rejected, 0);
    env.stop().await;
}
per_profile!(refresh_before_expiry);

// ---------------------------------------------------------------------------
// Backoff under a 503 burst
// ---------------------------------------------------------------------------

async fn backoff_under_503_burst(profile: Profile) {
    let env = start(profile, Setup::default()).await;
    let handle = env.handle();
    let first = wait_token(&handle, |_| true).await;
    let first_value = access(&first);

    // Record what is served at every status change until a new token shows up.
    let watcher = {
        let handle = handle.clone();
        let first_value = first_value.clone();
        tokio::spawn(async move {
            let mut rx = handle.status.clone();
            let mut seen = Vec::new();
            loop {
                let status = rx.borrow_and_update().clone();
                let served = handle.valid_token().map(|t| access(&t));
                let done = served.as_deref() != Some(first_value.as_str());
                seen.push((status, served));
                if done || rx.changed().await.is_err() {
                    return seen;
                }
            }
        })
    };

    env.set_token_faults(Faults {
        fail_next: 2,
        ..Faults::default()
    });
    handle.refresh_now.notify_one();

    let failing = wait_status(&handle, |s| s.consecutive_failures == 2).await;
    assert!(error_of(&failing).contains("HTTP 503"), "{failing:?}");
    assert!(!failing.locked_out);
    assert_eq!(
        handle.valid_token().map(|t| access(&t)).as_deref(),
        Some(first_value.as_str()),
        "the old token is still served while refreshes fail"
    );

    let second = wait_token(&handle, |t| access(t) != first_value).await;
    assert!(second.received_at < first.expires_at());
    assert_eq!(
        env.sim.token_client(&access(&second)).as_deref(),
        Some(CLIENT)
    );
    wait_healthy(&handle).await;

    let seen = tokio::time::timeout(daemon::EVENT_TIMEOUT, watcher)
        .await
        .expect("watcher ends once the new token is served")
        .unwrap();
    let (last, rest) = seen.split_last().unwrap();
    assert_eq!(last.1.as_deref(), Some(access(&second).as_str()));
    for (status, served) in rest {
        assert_eq!(
            served.as_deref(),
            Some(first_value.as_str()),
            "token withdrawn during failures (status {status:?})"
        );
    }
    assert!(
        rest.iter().any(|(s, _)| s.consecutive_failures == 2),
        "the failures were visible in the status: {rest:?}"
    );
    // First login, two 503s, the successful retry.
    assert_eq!(env.token_requests(), 4);
    env.stop().await;
}
per_profile!(backoff_under_503_burst);

// ---------------------------------------------------------------------------
// Quota with Retry-After
// ---------------------------------------------------------------------------

async fn quota_honours_retry_after(profile: Profile) {
    let env = start(profile, Setup::default()).await;
    let handle = env.handle();
    let first = wait_token(&handle, |_| true).await;
    let first_value = access(&first);

    env.set_token_faults(Faults {
        quota_next: 1,
        quota_retry_after: Some(60),
        ..Faults::default()
    });
    handle.refresh_now.notify_one();
    let expected = format!("HTTP {}", profile.quota_status());
    let failing = wait_error(&handle, &[&expected]).await;
    assert_eq!(failing.consecutive_failures, 1);
    assert!(!failing.locked_out, "a quota is not a rejected secret");
    assert_eq!(env.token_requests(), 2);

    // 59 s later (the token lives a day) nothing has been asked: the retry
    // waits for Retry-After. The plan has no quota error left, so a retry
    // would succeed and publish a token; give it a bounded moment to show.
    jump_clock(Duration::from_secs(59)).await;
    let mut tokens = handle.token.clone();
    tokens.mark_unchanged();
    let early = tokio::time::timeout(Duration::from_millis(300), tokens.changed()).await;
    assert!(early.is_err(), "a token was fetched before Retry-After");
    assert_eq!(env.token_requests(), 2, "the engine retried early");
    assert_eq!(
        handle.valid_token().map(|t| access(&t)).as_deref(),
        Some(first_value.as_str())
    );

    // Past Retry-After: exactly one more request, which succeeds.
    jump_clock(Duration::from_secs(2)).await;
    let second = wait_token(&handle, |t| access(t) != first_value).await;
    assert_eq!(
        env.sim.token_client(&access(&second)).as_deref(),
        Some(CLIENT)
    );
    wait_healthy(&handle).await;
    assert_eq!(env.token_requests(), 3);
    env.stop().await;
}
per_profile!(quota_honours_retry_after);

// ---------------------------------------------------------------------------
// Rejected secret
// ---------------------------------------------------------------------------

async fn rejected_secret_then_fixed_in_store(profile: Profile) {
    let env = start(
        profile,
        Setup {
            seed: Seed::Wrong,
            ..Setup::default()
        },
    )
    .await;
    let handle = env.handle();
    let expected = format!("HTTP {}", profile.rejected_status());
    let locked = wait_status(&handle, |s| s.locked_out).await;
    let error = error_of(&locked);
    assert!(error.contains(&expected), "{error}");
    assert!(error.contains("invalid_client"), "{error}");
    assert!(!error.contains(WRONG_SECRET), "the secret leaked: {error}");
    assert!(handle.valid_token().is_none());
    assert!(env.sim.stats().logins_rejected >= 1);

    // An operator (or another replica) puts a working secret in the store.
    let store = FileStore::new(&env.daemon.config.state_dir);
    let stored = store.load(CRED).await.unwrap().expect("bootstrapped");
    let mut record = stored.value.clone();
    record.current = entry(None, &env.secret);
    store
        .compare_and_swap(CRED, Some(stored.version), &record)
        .await
        .unwrap();
    handle.refresh_now.notify_one();

    let token = wait_token(&handle, |_| true).await;
    assert_eq!(
        env.sim.token_client(&access(&token)).as_deref(),
        Some(CLIENT)
    );
    let status = wait_healthy(&handle).await;
    assert!(!status.locked_out);
    env.stop().await;
}
per_profile!(rejected_secret_then_fixed_in_store);

async fn rejected_current_but_pending_works(profile: Profile) {
    let env = start(
        profile,
        Setup {
            seed: Seed::PendingWorks,
            ..Setup::default()
        },
    )
    .await;
    let handle = env.handle();
    let token = wait_token(&handle, |_| true).await;
    assert_eq!(
        env.sim.token_client(&access(&token)).as_deref(),
        Some(CLIENT)
    );
    let status = wait_healthy(&handle).await;
    assert!(!status.locked_out);
    assert_eq!(status.rotation_phase, "created");
    let stats = env.sim.stats();
    assert_eq!(
        (stats.logins_rejected, stats.logins_ok),
        (1, 1),
        "current tried (rejected), then pending (accepted)"
    );
    // The engine only uses the pending secret; promoting it is the
    // rotation's job.
    let stored = FileStore::new(&env.daemon.config.state_dir)
        .load(CRED)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.value.current.value.expose_secret(), WRONG_SECRET);
    assert_eq!(stored.value.rotation.phase(), "created");
    env.stop().await;
}
per_profile!(rejected_current_but_pending_works);

// ---------------------------------------------------------------------------
// Misbehaving endpoints: each fault hits the first login, then the engine
// retries and recovers.
// ---------------------------------------------------------------------------

/// Starts with `faults` on the token endpoint, waits for a failure naming
/// `needles`, then for the recovery. Returns the failure status.
async fn fails_then_recovers(
    profile: Profile,
    faults: Faults,
    endpoints_extra: &str,
    needles: &[&str],
) -> (Env, CredentialStatus) {
    let env = start(
        profile,
        Setup {
            faults: Faults {
                scope: FaultScope::Token,
                ..faults
            },
            endpoints_extra,
            ..Setup::default()
        },
    )
    .await;
    let handle = env.handle();
    let failing = wait_error(&handle, needles).await;
    assert!(failing.consecutive_failures >= 1);
    assert!(!failing.locked_out, "{failing:?}");
    let token = wait_token(&handle, |_| true).await;
    assert_eq!(
        env.sim.token_client(&access(&token)).as_deref(),
        Some(CLIENT)
    );
    wait_healthy(&handle).await;
    (env, failing)
}

async fn html_instead_of_json(profile: Profile) {
    let (env, failing) = fails_then_recovers(
        profile,
        Faults {
            garbage_next: 1,
            ..Faults::default()
        },
        "",
        &["HTTP 200", "text/html"],
    )
    .await;
    // The body is described, never quoted.
    assert!(!error_of(&failing).contains("sign in"), "{failing:?}");
    assert_eq!(env.token_requests(), 2);
    env.stop().await;
}
per_profile!(html_instead_of_json);

async fn oversized_body(profile: Profile) {
    let started = std::time::Instant::now();
    let (env, failing) = fails_then_recovers(
        profile,
        Faults {
            huge_next: 1,
            ..Faults::default()
        },
        "",
        &["HTTP 200", "larger than"],
    )
    .await;
    assert!(error_of(&failing).contains("1048576 bytes"), "{failing:?}");
    // Reading (let alone buffering) the 50 MB would take far longer than
    // stopping at the cap.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(env.token_requests(), 2);
    env.stop().await;
}
per_profile!(oversized_body);

async fn hung_request_times_out(profile: Profile) {
    let started = std::time::Instant::now();
    let env = start(
        profile,
        Setup {
            faults: Faults {
                scope: FaultScope::Token,
                hang_next: 1,
                ..Faults::default()
            },
            endpoints_extra: "request_timeout = \"1s\"",
            ..Setup::default()
        },
    )
    .await;
    let handle = env.handle();
    let failing = wait_error(&handle, &["timed out"]).await;
    let timed_out_after = started.elapsed();
    assert!(
        timed_out_after >= Duration::from_millis(900),
        "gave up after {timed_out_after:?}, before request_timeout"
    );
    assert_eq!(failing.consecutive_failures, 1);
    assert!(!failing.locked_out);
    let token = wait_token(&handle, |_| true).await;
    assert_eq!(
        env.sim.token_client(&access(&token)).as_deref(),
        Some(CLIENT)
    );
    wait_healthy(&handle).await;
    assert_eq!(env.token_requests(), 2);
    env.stop().await;
}
per_profile!(hung_request_times_out);

async fn dropped_response(profile: Profile) {
    let (env, failing) = fails_then_recovers(
        profile,
        Faults {
            drop_next: 1,
            ..Faults::default()
        },
        "",
        &[],
    )
    .await;
    assert!(
        !error_of(&failing).contains("sim_"),
        "a token fragment leaked into the error: {failing:?}"
    );
    let stats = env.sim.stats();
    assert_eq!(stats.responses_dropped, 1);
    // The lost login was performed at the sim; the retry logged in again.
    assert_eq!(stats.logins_ok, 2);
    assert_eq!(env.token_requests(), 2);
    env.stop().await;
}
per_profile!(dropped_response);

// ---------------------------------------------------------------------------
// Lifetimes (DESIGN.md "Token refresh", src/token/lifetime.rs)
// ---------------------------------------------------------------------------

/// The profile's provider, built from its configuration with `extra`
/// appended (a `[credentials.refresh]` table, say).
fn provider_for(
    profile: Profile,
    sim: &SimProvider,
    extra: &str,
) -> std::sync::Arc<dyn rekeyd::provider::TokenProvider> {
    let text = profile
        .config(sim, extra)
        .replace("{dir}", "/nonexistent-rekeyd-test");
    let config = rekeyd::config::Config::from_toml(&text).unwrap();
    rekeyd::provider::build(&config.credentials[0]).unwrap()
}

async fn lifetimes_are_read_alike(profile: Profile) {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(600),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let (_, secret) = sim.add_secret(CLIENT, "seeded by the test");
    let provider = provider_for(
        profile,
        &sim,
        "[credentials.refresh]\ndefault_lifetime = \"90s\"",
    );
    let secret = SecretString::from(secret);
    let reply = |expires_in: ExpiresIn, jwt_exp_in: Option<i64>| TokenReply {
        expires_in,
        jwt_exp_in,
    };
    let secs = Duration::from_secs;
    // (reply, shortest and longest lifetime expected)
    for (r, (low, high)) in [
        (reply(ExpiresIn::Seconds, None), (secs(600), secs(600))),
        (
            reply(ExpiresIn::SecondsAsString, None),
            (secs(600), secs(600)),
        ),
        (
            reply(ExpiresIn::Fixed(json!(3.5)), None),
            (Duration::from_millis(3500), Duration::from_millis(3500)),
        ),
        (
            reply(ExpiresIn::Fixed(json!("4.0")), None),
            (secs(4), secs(4)),
        ),
        (
            reply(ExpiresIn::Fixed(json!(" 7 ")), None),
            (secs(7), secs(7)),
        ),
        // No expires_in: the configured default, or the JWT's exp.
        (reply(ExpiresIn::Omitted, None), (secs(90), secs(90))),
        (reply(ExpiresIn::Omitted, Some(300)), (secs(298), secs(300))),
        // Both: the earlier wins.
        (reply(ExpiresIn::Seconds, Some(120)), (secs(118), secs(120))),
        (
            reply(ExpiresIn::Seconds, Some(6000)),
            (secs(600), secs(600)),
        ),
    ] {
        sim.set_token_reply(r.clone());
        let token = provider
            .login(&secret)
            .await
            .unwrap_or_else(|e| panic!("{r:?}: {e}"));
        assert!(
            (low..=high).contains(&token.lifetime),
            "{r:?}: lifetime {:?}",
            token.lifetime
        );
    }
    for (r, needle) in [
        (reply(ExpiresIn::Fixed(json!(0)), None), "expires_in 0:"),
        (
            reply(ExpiresIn::Fixed(json!("0")), None),
            "expires_in \"0\":",
        ),
        (reply(ExpiresIn::Fixed(json!(-5)), None), "expires_in -5:"),
        (reply(ExpiresIn::Fixed(json!(0.4)), None), "expires_in 0.4:"),
        (
            reply(ExpiresIn::Fixed(json!("soon")), None),
            "not a number of seconds",
        ),
        (reply(ExpiresIn::Seconds, Some(-60)), "exp claim is"),
    ] {
        sim.set_token_reply(r.clone());
        let e = provider.login(&secret).await.unwrap_err();
        assert_eq!(
            (e.kind, e.status),
            (ErrorKind::Transient, Some(profile.success_status())),
            "{r:?}: {e}"
        );
        assert!(e.to_string().contains(needle), "{r:?}: {e}");
    }
    sim.shutdown().await;
}
per_profile!(lifetimes_are_read_alike);

impl Profile {
    /// Status of a successful login at the sim.
    fn success_status(self) -> u16 {
        match self {
            Profile::Mappls => 201,
            _ => 200,
        }
    }
}

/// A reply whose token is already expired is a failed refresh: warned
/// about, counted, backed off, never published; the status says what the
/// provider sent; the token being served stays.
async fn zero_lifetime_is_a_failed_refresh(profile: Profile) {
    let env = start(profile, Setup::default()).await;
    let handle = env.handle();
    let first = wait_token(&handle, |_| true).await;
    let first_value = access(&first);
    let mut published = handle.token.clone();
    published.mark_unchanged();

    env.sim.set_token_reply(TokenReply {
        expires_in: ExpiresIn::Fixed(json!(0)),
        ..TokenReply::default()
    });
    handle.refresh_now.notify_one();
    let failing = wait_status(&handle, |s| s.consecutive_failures == 2).await;
    let error = error_of(&failing);
    assert!(
        error.contains(&format!("HTTP {}", profile.success_status()))
            && error.contains("token endpoint returned expires_in 0"),
        "{error}"
    );
    assert!(!failing.locked_out);
    // Each such reply was one failed attempt, not a token refreshed at once
    // again: the first login and two failures.
    assert_eq!(env.token_requests(), 3);
    assert!(
        !published.has_changed().unwrap(),
        "an expired token was published"
    );
    assert_eq!(
        handle.valid_token().map(|t| access(&t)).as_deref(),
        Some(first_value.as_str())
    );
    let stats = env.sim.stats();
    assert_eq!(stats.logins_ok, 3, "the provider did issue the tokens");

    env.sim.set_token_reply(TokenReply::default());
    let second = wait_token(&handle, |t| access(t) != first_value).await;
    assert_eq!(second.lifetime, Duration::from_secs(86_400));
    wait_healthy(&handle).await;
    env.stop().await;
}
per_profile!(zero_lifetime_is_a_failed_refresh);

// ---------------------------------------------------------------------------
// Provider text (I7): echoed secrets are scrubbed where they enter rekeyd
// ---------------------------------------------------------------------------

async fn echoed_secrets_are_scrubbed(profile: Profile) {
    const ASSERTION: &str = "eyJhbGciOiJub25lIn0.an-assertion.value";
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let (_, secret) = sim.add_secret(CLIENT, "seeded by the test");
    let (_, pending) = sim.add_secret(CLIENT, "another of the client's secrets");
    let text = profile
        .config(&sim, "")
        .replace("{dir}", "/nonexistent-rekeyd-test");
    let text = match profile {
        Profile::OAuth2Basic | Profile::OAuth2Post => text.replace(
            "[credentials.endpoints]",
            &format!(
                "extra_params = {{ client_assertion = \"{ASSERTION}\" }}\n[credentials.endpoints]"
            ),
        ),
        _ => text,
    };
    let config = rekeyd::config::Config::from_toml(&text).unwrap();
    let provider = rekeyd::provider::build(&config.credentials[0]).unwrap();
    // As the engine and the rotation do with the journal's secrets.
    provider.remember(&SecretString::from(secret.clone()));
    provider.remember(&SecretString::from(pending.clone()));
    for login_with in [secret.as_str(), WRONG_SECRET] {
        sim.set_faults(Faults {
            scope: FaultScope::Token,
            echo_next: 1,
            ..Faults::default()
        });
        let e = provider
            .login(&SecretString::from(login_with.to_string()))
            .await
            .unwrap_err();
        let shown = e.to_string();
        for value in [
            secret.as_str(),
            pending.as_str(),
            WRONG_SECRET,
            ASSERTION,
            "an-assertion",
        ] {
            assert!(
                !shown.contains(value),
                "{profile:?} leaked {value}: {shown}"
            );
        }
        assert_eq!(e.status, Some(400), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(shown.is_ascii() && shown.len() < 400, "{shown}");
    }
    sim.shutdown().await;
}
per_profile!(echoed_secrets_are_scrubbed);

// ---------------------------------------------------------------------------
// Secret API refusals (MapsIndoors)
// ---------------------------------------------------------------------------

/// A MapsIndoors credential with the secret API and a rotation; `name` keeps
/// its metric series apart from other tests in this process.
fn rotating_config(sim: &SimProvider, name: &str, secret_id: &str) -> String {
    format!(
        "state_dir = \"{{dir}}/state\"\n\
         [[credentials]]\n\
         name = \"{name}\"\n\
         provider = \"mapsindoors\"\n\
         client_id = \"{CLIENT}\"\n\
         customer_id = \"{CUSTOMER}\"\n\
         initial_secret_file = \"{{dir}}/initial.secret\"\n\
         initial_secret_id = \"{secret_id}\"\n\
         [credentials.endpoints]\n\
         token_url = \"{}\"\n\
         secrets_url = \"{}\"\n\
         [credentials.rotation]\n\
         every = \"24h\"\n\
         grace = \"0s\"\n",
        sim.mapsindoors_token_url(),
        sim.mapsindoors_secrets_url(),
    )
}

#[tokio::test]
async fn secret_api_refusals_report_code_message_and_status() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let (id, secret) = sim.add_secret(CLIENT, "seeded by the test");
    let text = rotating_config(&sim, "cred", &id).replace("{dir}", "/nonexistent-rekeyd-test");
    let config = rekeyd::config::Config::from_toml(&text).unwrap();
    let built = rekeyd::provider::build_all(&config.credentials[0], &Default::default()).unwrap();
    let api = built.secrets.expect("a secret API");
    // As the rotation does with the journal's secrets before a run.
    built.token.remember(&SecretString::from(secret.clone()));
    let bearer = built
        .token
        .login(&SecretString::from(secret.clone()))
        .await
        .unwrap();

    sim.set_faults(Faults {
        too_many_secrets: true,
        ..Faults::default()
    });
    let request = rekeyd::provider::CreateRequest {
        description: "rekeyd:cred:r.a",
        value: None,
    };
    let e = api.create(&bearer, request).await.unwrap_err();
    assert_eq!(
        (e.kind, e.status, e.code.as_deref()),
        (ErrorKind::Refused, Some(400), Some("too_many_secrets")),
        "{e}"
    );
    assert_eq!(e.reason(), "too_many_secrets");
    let shown = e.to_string();
    assert!(
        shown.starts_with("mapsindoors create secret failed: HTTP 400 error=too_many_secrets: client svc-client already has the maximum number of secrets (1)"),
        "{shown}"
    );

    // Passing trouble is not a refusal.
    for (faults, kind, status) in [
        (
            Faults {
                fail_next: 1,
                ..Faults::default()
            },
            ErrorKind::Transient,
            503,
        ),
        (
            Faults {
                quota_next: 1,
                ..Faults::default()
            },
            ErrorKind::Quota,
            429,
        ),
    ] {
        sim.set_faults(Faults {
            scope: FaultScope::Secrets,
            ..faults
        });
        let e = api.list(&bearer).await.unwrap_err();
        assert_eq!((e.kind, e.status), (kind, Some(status)), "{e}");
    }

    // A refusal that echoes the bearer token and the client's secrets.
    sim.set_faults(Faults {
        scope: FaultScope::Secrets,
        echo_next: 1,
        ..Faults::default()
    });
    let e = api.delete(&bearer, &id).await.unwrap_err();
    let shown = e.to_string();
    assert_eq!(
        (e.kind, e.status),
        (ErrorKind::Refused, Some(400)),
        "{shown}"
    );
    assert!(
        !shown.contains(&access(&bearer)),
        "the bearer leaked: {shown}"
    );
    assert!(!shown.contains(&secret), "the secret leaked: {shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
    sim.shutdown().await;
}

/// Transient failures of the secret API are retried within seconds; a
/// refusal that will not change (the client has its maximum number of
/// secrets) needs an operator: a distinct status and metric, slow retries,
/// and a retry at once when asked after the fix. The current secret stays
/// in use throughout.
#[tokio::test]
async fn a_permanent_secret_api_refusal_needs_an_operator() {
    const NAME: &str = "needs-operator";
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let (id, secret) = sim.add_secret(CLIENT, "seeded by the test");
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "initial.secret", &secret);
    let daemon = TestDaemon::start_in(dir, &rotating_config(&sim, NAME, &id)).await;
    let handle = daemon.handle(NAME);
    wait_token(&handle, |_| true).await;
    let creates = || sim.stats().requests_to(Endpoint::SecretsCreate);
    let metrics = || rekeyd::metrics::global().encode();

    // A 503 on create: retried by itself, no operator needed.
    sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::SecretsCreate),
        fail_next: 1,
        ..Faults::default()
    });
    handle.rotate_now.notify_one();
    let rotated = wait_status(&handle, |s| s.last_rotated_at.is_some()).await;
    assert_eq!(rotated.rotation_needs_operator, None);
    assert_eq!(creates(), 2);

    // The client has its maximum number of secrets.
    sim.set_faults(Faults {
        too_many_secrets: true,
        ..Faults::default()
    });
    handle.rotate_now.notify_one();
    let refused = wait_status(&handle, |s| s.rotation_needs_operator.is_some()).await;
    assert_eq!(
        refused.rotation_needs_operator.as_deref(),
        Some("too_many_secrets")
    );
    let error = refused.last_rotation_error.clone().unwrap_or_default();
    assert!(
        error.starts_with("needs operator: too_many_secrets: ")
            && error.contains("HTTP 400")
            && error.contains("maximum number of secrets"),
        "{error}"
    );
    let m = metrics();
    assert!(
        m.contains(&format!(
            "rekeyd_rotation_needs_operator{{credential=\"{NAME}\"}} 1"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "rekeyd_rotation_attempts_total{{credential=\"{NAME}\",result=\"refused\",phase=\"creating\"}} 1"
        )),
        "{m}"
    );
    assert_eq!(creates(), 3);
    assert!(
        handle.valid_token().is_some(),
        "the token keeps being served"
    );

    // Five minutes on, a transient failure would have been retried several
    // times; a refusal has not (it waits a quarter to half an hour).
    jump_clock(Duration::from_secs(300)).await;
    let mut status = handle.status.clone();
    status.mark_unchanged();
    // The schedule wakes after the jump and publishes the journal's phase;
    // let it, then check it asked nothing.
    let _ = tokio::time::timeout(Duration::from_millis(500), status.changed()).await;
    assert_eq!(creates(), 3, "a permanent refusal was retried early");

    // The operator frees a slot and asks again: retried at once.
    sim.update_faults(|f| f.too_many_secrets = false);
    handle.rotate_now.notify_one();
    let fixed = wait_status(&handle, |s| {
        s.rotation_needs_operator.is_none()
            && s.last_rotation_error.is_none()
            && s.rotation_phase == "idle"
    })
    .await;
    assert_ne!(
        fixed.last_rotated_at, rotated.last_rotated_at,
        "rotated again"
    );
    assert_eq!(creates(), 4);
    let m = metrics();
    assert!(
        m.contains(&format!(
            "rekeyd_rotation_needs_operator{{credential=\"{NAME}\"}} 0"
        )),
        "{m}"
    );
    daemon.stop().await;
    sim.shutdown().await;
}
