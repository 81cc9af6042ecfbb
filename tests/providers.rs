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
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, Rotation, SecretEntry, Store};
use rekeyd::token::Token;
use secrecy::{ExposeSecret, SecretString};

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
