//! Secret rotation end to end against the simulated MapsIndoors provider:
//! triggers (interval, cron, overdue at start, on login, `rekeyd rotate`),
//! the grace period, a refused replacement, a bootstrap secret whose id is
//! unknown, I4 (only ours is deleted), `rekeyd set-secret` / `status`, and
//! the token engine falling back to a pending secret.
//!
//! The daemon runs in-process; waits are on its watch channels. The CLI
//! runs as the real binary.

#[path = "support/daemon.rs"]
mod daemon;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use daemon::{EVENT_TIMEOUT, TestDaemon, wait_status, wait_token};
use rekeyd::config::Config;
use rekeyd::credential::CredentialStatus;
use rekeyd::provider::{ErrorKind, TokenProvider};
use rekeyd::rotation::driver::{Outcome, Rotator};
use rekeyd::sim::{SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, Rotation, SecretEntry, Store};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const CLIENT: &str = "maps-client";
const OTHER_CLIENT: &str = "other-client";
const CUSTOMER: &str = "cust";
const TAG: &str = "rekeyd:maps:";

/// The provider as a test seeds it: our bootstrap secret, an operator's
/// untagged secret of our client, and another client of the same customer.
struct World {
    sim: Arc<SimProvider>,
    bootstrap: (String, String),
    manual: (String, String),
    other: (String, String),
}

/// A global subscriber that records nothing but keeps every callsite
/// asking the current subscriber (`Interest::sometimes`). Without it, a
/// callsite another test thread registers while no subscriber exists may be
/// cached as never enabled, racing the thread-local subscriber of
/// `bootstrap_without_id_is_left_in_place_with_a_warning` (its warning was
/// lost once on a loaded machine).
struct AskEachTime;

impl tracing::Subscriber for AskEachTime {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

async fn world(lifetime: Duration, propagation: Duration) -> World {
    // Before any test of this file reaches a callsite (each starts here).
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let _ = tracing::subscriber::set_global_default(AskEachTime);
    });
    let sim = SimProvider::start(SimOptions {
        token_lifetime: lifetime,
        propagation_delay: propagation,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    sim.add_client(OTHER_CLIENT, CUSTOMER);
    let bootstrap = sim.add_secret(CLIENT, "portal: initial secret");
    let manual = sim.add_secret(CLIENT, "made by hand for a script");
    let other = sim.add_secret(OTHER_CLIENT, "someone else's");
    World {
        sim: Arc::new(sim),
        bootstrap,
        manual,
        other,
    }
}

impl World {
    /// Daemon configuration (`{dir}` is the test directory). `rotation` is
    /// the body of `[credentials.rotation]`, or `None` for no rotation.
    fn config(&self, rotation: Option<&str>, bootstrap_id: bool, api: bool) -> String {
        let mut text = String::from("state_dir = \"{dir}/state\"\n");
        if api {
            text.push_str(
                "[api]\nlisten = \"unix:{dir}/api.sock\"\nkey_file = \"{dir}/api.key\"\n",
            );
        }
        text.push_str(&format!(
            r#"[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "{CLIENT}"
initial_secret_file = "{{dir}}/maps.secret"
"#
        ));
        if bootstrap_id {
            text.push_str(&format!("initial_secret_id = \"{}\"\n", self.bootstrap.0));
        }
        if rotation.is_some() {
            text.push_str(&format!("customer_id = \"{CUSTOMER}\"\n"));
        }
        text.push_str(&format!(
            "[credentials.endpoints]\ntoken_url = \"{}\"\n",
            self.sim.mapsindoors_token_url()
        ));
        if let Some(rotation) = rotation {
            text.push_str(&format!(
                "secrets_url = \"{}\"\n[credentials.rotation]\n{rotation}\n",
                self.sim.mapsindoors_secrets_url()
            ));
        }
        text
    }

    /// A temporary directory holding the bootstrap secret file.
    fn dir(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        daemon::write_secret(dir.path(), "maps.secret", &self.bootstrap.1);
        dir
    }

    async fn start(&self, rotation: Option<&str>, bootstrap_id: bool) -> TestDaemon {
        TestDaemon::start_in(self.dir(), &self.config(rotation, bootstrap_id, false)).await
    }

    /// Our client's secrets whose description carries the rotation tag.
    fn tagged(&self) -> Vec<rekeyd::sim::SimSecret> {
        self.sim
            .secrets(CLIENT)
            .into_iter()
            .filter(|s| s.description.starts_with(TAG))
            .collect()
    }

    fn has_secret(&self, client: &str, (id, value): &(String, String)) -> bool {
        self.sim
            .secrets(client)
            .iter()
            .any(|s| &s.id == id && &s.value == value)
    }

    /// I4: the operator's and the other client's secrets are untouched.
    fn assert_foreign_untouched(&self) {
        assert!(self.has_secret(CLIENT, &self.manual), "manual secret kept");
        assert!(
            self.has_secret(OTHER_CLIENT, &self.other),
            "other client's secret kept"
        );
        assert_eq!(self.sim.secrets(OTHER_CLIENT).len(), 1);
    }

    /// The token, if it is one the sim issued to our client and still honours.
    fn token_is_ours(&self, token: &rekeyd::token::Token) -> bool {
        self.sim
            .token_client(token.access_token.expose_secret())
            .as_deref()
            == Some(CLIENT)
    }
}

fn provider(config: &Config) -> Arc<dyn TokenProvider> {
    rekeyd::provider::build(config.credential("maps").unwrap()).unwrap()
}

async fn login_kind(provider: &dyn TokenProvider, value: &str) -> Result<(), ErrorKind> {
    provider
        .login(&SecretString::from(value.to_string()))
        .await
        .map(|_| ())
        .map_err(|e| e.kind)
}

async fn stored(config: &Config) -> CredentialRecord {
    FileStore::new(&config.state_dir)
        .load("maps")
        .await
        .unwrap()
        .expect("a stored record")
        .value
}

fn idle_and_rotated_after(s: &CredentialStatus, after: Option<SystemTime>) -> bool {
    s.rotation_phase == "idle" && s.last_rotated_at.is_some() && s.last_rotated_at > after
}

/// Asks for a refresh and waits for a token received after the request.
async fn fresh_token(handle: &rekeyd::credential::CredentialHandle) -> Arc<rekeyd::token::Token> {
    let asked = handle.clock.now();
    handle.refresh_now.notify_one();
    wait_token(handle, |t| t.received_at >= asked).await
}

/// After a rotation: exactly one tagged secret at the provider, the stored
/// one, and it logs in.
async fn assert_single_stored_secret(w: &World, config: &Config) -> CredentialRecord {
    let record = stored(config).await;
    assert_eq!(record.phase(), "idle");
    let tagged = w.tagged();
    assert_eq!(tagged.len(), 1, "exactly one tagged secret: {tagged:?}");
    assert_eq!(Some(&tagged[0].id), record.current.id.as_ref());
    assert_eq!(tagged[0].value, record.current.value.expose_secret());
    assert_eq!(
        login_kind(&*provider(config), record.current.value.expose_secret()).await,
        Ok(()),
        "the stored secret logs in"
    );
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_rotation_keeps_serving_and_moves_to_the_new_secret() {
    let w = world(Duration::from_secs(3), Duration::from_millis(300)).await;
    let d = w.start(Some("every = \"2s\"\ngrace = \"1s\""), true).await;
    let handle = d.handle("maps");
    wait_token(&handle, |_| true).await;

    // From the first token on, a valid token is served at every sample,
    // and the sim honours it.
    let stop = CancellationToken::new();
    let sampler = tokio::spawn({
        let (handle, sim, stop) = (handle.clone(), w.sim.clone(), stop.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            let (mut samples, mut verified) = (0u32, 0u32);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return (samples, verified),
                    _ = tick.tick() => {}
                }
                samples += 1;
                let token = handle
                    .valid_token()
                    .expect("a valid token is always served");
                // Near its end the sim (which started the clock first) may
                // already have dropped it; the daemon refreshes long before.
                if token.remaining(handle.clock.now()) > Duration::from_millis(500) {
                    assert_eq!(
                        sim.token_client(token.access_token.expose_secret())
                            .as_deref(),
                        Some(CLIENT),
                        "the served token is valid at the provider"
                    );
                    verified += 1;
                }
            }
        }
    });

    let first = wait_status(&handle, |s| idle_and_rotated_after(s, None)).await;
    assert!(w.sim.stats().secrets_created >= 1);
    // The bootstrap secret (id given) is gone after the grace period.
    assert!(!w.has_secret(CLIENT, &w.bootstrap));
    assert_eq!(
        login_kind(&*provider(&d.config), &w.bootstrap.1).await,
        Err(ErrorKind::Rejected)
    );
    // Logins from now on use a rotated secret: the bootstrap one is gone.
    let token = fresh_token(&handle).await;
    assert!(w.token_is_ours(&token));

    let second = wait_status(&handle, |s| {
        idle_and_rotated_after(s, first.last_rotated_at)
    })
    .await;
    assert!(w.sim.stats().secrets_created >= 2);
    assert!(second.last_rotation_error.is_none());
    let token = fresh_token(&handle).await;
    assert!(w.token_is_ours(&token));

    stop.cancel();
    let (samples, verified) = sampler.await.expect("served continuously");
    assert!(samples >= 40 && verified >= 20, "{samples} / {verified}");
    w.assert_foreign_untouched();
    // The store's current secret is one the provider accepts (I1).
    let record = stored(&d.config).await;
    assert_eq!(
        login_kind(&*provider(&d.config), record.current.value.expose_secret()).await,
        Ok(())
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_schedule_rotates() {
    let w = world(Duration::from_secs(60), Duration::ZERO).await;
    let d = w
        .start(Some("schedule = \"*/2 * * * * *\"\ngrace = \"0s\""), true)
        .await;
    let handle = d.handle("maps");
    let first = wait_status(&handle, |s| idle_and_rotated_after(s, None)).await;
    assert!(
        !w.has_secret(CLIENT, &w.bootstrap),
        "bootstrap rotated away"
    );
    // And again at a later even second.
    wait_status(&handle, |s| {
        idle_and_rotated_after(s, first.last_rotated_at)
    })
    .await;
    assert!(w.sim.stats().secrets_created >= 2);
    assert!(w.token_is_ours(&*fresh_token(&handle).await));
    w.assert_foreign_untouched();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_that_fell_due_while_down_runs_at_start() {
    let w = world(Duration::from_secs(60), Duration::ZERO).await;
    let dir = w.dir();
    // Last rotated two days ago; `every = "1h"`: overdue.
    let long_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    let record = CredentialRecord {
        last_rotated_at: Some(long_ago),
        ..CredentialRecord::new(SecretEntry {
            id: Some(w.bootstrap.0.clone()),
            value: SecretString::from(w.bootstrap.1.clone()),
            created_at: long_ago,
            expires_at: None,
        })
    };
    FileStore::new(&dir.path().join("state"))
        .compare_and_swap("maps", None, &record)
        .await
        .unwrap();
    let started = SystemTime::now();
    let d = TestDaemon::start_in(
        dir,
        &w.config(Some("every = \"1h\"\ngrace = \"0s\""), true, false),
    )
    .await;
    let handle = d.handle("maps");
    let began = Instant::now();
    wait_status(&handle, |s| idle_and_rotated_after(s, Some(started))).await;
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "rotated right after start, took {:?}",
        began.elapsed()
    );
    assert_eq!(w.sim.stats().secrets_created, 1);
    assert_single_stored_secret(&w, &d.config).await;
    assert!(!w.has_secret(CLIENT, &w.bootstrap));
    w.assert_foreign_untouched();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_login_rotates_after_every_login() {
    // Logins every ~1.5 s (70-80% of 2 s).
    let w = world(Duration::from_secs(2), Duration::ZERO).await;
    let d = w.start(Some("on_login = true\ngrace = \"0s\""), true).await;
    let handle = d.handle("maps");
    let first = wait_status(&handle, |s| idle_and_rotated_after(s, None)).await;
    let second = wait_status(&handle, |s| {
        idle_and_rotated_after(s, first.last_rotated_at)
    })
    .await;
    assert!(second.last_rotation_error.is_none());
    let stats = w.sim.stats();
    assert!(stats.secrets_created >= 2, "{stats:?}");
    assert!(
        stats.secrets_created <= stats.logins_ok,
        "no more rotations than logins: {stats:?}"
    );
    assert!(w.token_is_ours(&*fresh_token(&handle).await));
    w.assert_foreign_untouched();
    d.stop().await;
}

/// Runs the `rekeyd` binary with `--config`, `stdin` piped in, bounded.
async fn cli(args: &[&str], config: &Path, stdin: Option<&str>) -> std::process::Output {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("rekeyd {args:?} finishes in time"))
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes the daemon's configuration where the CLI reads it.
fn write_config(
    d: &TestDaemon,
    w: &World,
    rotation: Option<&str>,
    api: bool,
) -> std::path::PathBuf {
    let path = d.dir.path().join("rekeyd.toml");
    let body = w
        .config(rotation, true, api)
        .replace("{dir}", &d.dir.path().display().to_string());
    std::fs::write(&path, body).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_command_while_the_daemon_rotates_does_not_race() {
    // A slow propagation keeps the daemon's rotation busy verifying while
    // the commands start.
    let w = world(Duration::from_secs(60), Duration::from_millis(1500)).await;
    let rotation = "every = \"1h\"\ngrace = \"0s\"";
    let d = w.start(Some(rotation), true).await;
    let config_path = write_config(&d, &w, Some(rotation), false);
    let handle = d.handle("maps");
    wait_token(&handle, |_| true).await;

    handle.rotate_now.notify_one();
    wait_status(&handle, |s| s.rotation_phase != "idle").await;
    // Two commands at once, while the daemon's rotation runs: each waits
    // for the claim, then rotates.
    let (a, b) = tokio::join!(
        cli(&["rotate", "maps"], &config_path, None),
        cli(&["rotate", "maps"], &config_path, None)
    );
    for out in [&a, &b] {
        assert!(
            out.status.success(),
            "rekeyd rotate: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        assert!(text(&out.stderr).contains("secret rotated"));
    }
    // The daemon's own rotation completed too (before the commands').
    let status = wait_status(&handle, |s| idle_and_rotated_after(s, None)).await;
    assert!(status.last_rotation_error.is_none(), "{status:?}");
    let stats = w.sim.stats();
    assert_eq!(stats.secrets_created, 3, "three rotations: {stats:?}");
    assert_eq!(stats.secrets_deleted, 3, "each deleted its old secret");
    let record = assert_single_stored_secret(&w, &d.config).await;
    assert!(record.last_rotated_at.is_some());
    assert!(!w.has_secret(CLIENT, &w.bootstrap));
    w.assert_foreign_untouched();
    // The daemon keeps serving, from the secret the last command made.
    let token = fresh_token(&handle).await;
    assert!(w.token_is_ours(&token));
    assert!(!handle.status.borrow().locked_out);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_secret_works_during_the_grace_period_and_is_deleted_after() {
    let w = world(Duration::from_secs(60), Duration::ZERO).await;
    let d = w.start(Some("every = \"1h\"\ngrace = \"3s\""), true).await;
    let handle = d.handle("maps");
    let provider = provider(&d.config);
    wait_token(&handle, |_| true).await;

    let asked = SystemTime::now();
    handle.rotate_now.notify_one();
    wait_status(&handle, |s| s.rotation_phase == "promoted").await;
    let promoted = Instant::now();
    let record = stored(&d.config).await;
    assert_ne!(record.current.value.expose_secret(), w.bootstrap.1);
    let delete_after = match &record.rotation {
        Rotation::Promoted {
            old, delete_after, ..
        } => {
            assert_eq!(old.value.expose_secret(), w.bootstrap.1);
            *delete_after
        }
        other => panic!("expected promoted, got {}", other.phase()),
    };
    // S5: the promotion refreshes the token at once (the 60 s token would
    // not be due for 40 s), so consumers hold one of the new secret before
    // the old one can go.
    let refreshed = wait_status(&handle, |s| s.last_refresh_at > Some(asked)).await;
    assert!(
        refreshed.last_refresh_at.unwrap() < delete_after,
        "refreshed during the grace period"
    );
    // Both secrets work while the grace period lasts.
    assert_eq!(login_kind(&*provider, &w.bootstrap.1).await, Ok(()));
    assert!(w.has_secret(CLIENT, &w.bootstrap));
    assert_eq!(
        login_kind(&*provider, record.current.value.expose_secret()).await,
        Ok(())
    );

    wait_status(&handle, |s| idle_and_rotated_after(s, None)).await;
    assert!(
        promoted.elapsed() >= Duration::from_millis(2500),
        "old secret deleted only after the grace period ({:?})",
        promoted.elapsed()
    );
    assert!(!w.has_secret(CLIENT, &w.bootstrap));
    assert_eq!(
        login_kind(&*provider, &w.bootstrap.1).await,
        Err(ErrorKind::Rejected)
    );
    assert_single_stored_secret(&w, &d.config).await;
    w.assert_foreign_untouched();
    d.stop().await;
}

/// The pieces of a [`Rotator`] for credential "maps" of `w`, with the store
/// in `state_dir` holding `record`.
async fn rotator(
    w: &World,
    state_dir: &Path,
    record: &CredentialRecord,
    verify_window: Duration,
) -> (Rotator, Config) {
    let config = Config::from_toml(
        &w.config(Some("every = \"1h\"\ngrace = \"0s\""), true, false)
            .replace("{dir}", &state_dir.display().to_string()),
    )
    .unwrap();
    let cred = config.credential("maps").unwrap();
    let store = Arc::new(FileStore::new(&config.state_dir));
    store.compare_and_swap("maps", None, record).await.unwrap();
    let rotator = Rotator {
        name: "maps".into(),
        client_id: CLIENT.into(),
        provider: rekeyd::provider::build(cred).unwrap(),
        secret_api: rekeyd::provider::build_secret_api(cred)
            .unwrap()
            .expect("secret API configured"),
        secret_api_bearer: None,
        store,
        grace: Duration::ZERO,
        verify_window,
        status: None,
        refresh_now: None,
        clock: rekeyd::rotation::driver::system_clock(),
    };
    (rotator, config)
}

fn bootstrap_record(w: &World) -> CredentialRecord {
    CredentialRecord::new(SecretEntry {
        id: Some(w.bootstrap.0.clone()),
        value: SecretString::from(w.bootstrap.1.clone()),
        created_at: SystemTime::now(),
        expires_at: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_given_id_of_another_client_is_never_deleted() {
    // S7: the operator mistyped initial_secret_id as another client's
    // secret (the MapsIndoors API would let us delete it). The rotation
    // completes, checks the id in a listing before deleting, and keeps it.
    let w = world(Duration::from_secs(60), Duration::ZERO).await;
    let mut record = bootstrap_record(&w);
    record.current.id = Some(w.other.0.clone());
    let dir = tempfile::tempdir().unwrap();
    let (rotator, config) = rotator(&w, dir.path(), &record, Duration::from_secs(10)).await;
    let outcome = tokio::time::timeout(
        EVENT_TIMEOUT,
        rotator.rotate(true, false, &CancellationToken::new()),
    )
    .await
    .expect("rotation ends")
    .expect("rotation runs");
    assert_eq!(outcome, Outcome::Rotated);
    w.assert_foreign_untouched();
    let record = stored(&config).await;
    assert_eq!(record.phase(), "idle", "nothing left to retire");
    // The id is remembered as retired, so set-secret refuses to bring it
    // back, but nothing was deleted under it.
    assert!(
        record
            .retired
            .iter()
            .any(|r| r.id.as_deref() == Some(w.other.0.as_str()))
    );
    assert_eq!(w.sim.stats().secrets_deleted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_replacement_is_deleted_and_the_old_secret_kept() {
    // New secrets take longer to propagate than the verify window.
    let w = world(Duration::from_secs(60), Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let (rotator, config) = rotator(
        &w,
        dir.path(),
        &bootstrap_record(&w),
        Duration::from_secs(1),
    )
    .await;

    let outcome = tokio::time::timeout(
        EVENT_TIMEOUT,
        rotator.rotate(true, false, &CancellationToken::new()),
    )
    .await
    .expect("rotation ends")
    .expect("rotation runs");
    assert_eq!(outcome, Outcome::Aborted);

    let stats = w.sim.stats();
    assert_eq!((stats.secrets_created, stats.secrets_deleted), (1, 1));
    assert!(stats.logins_rejected >= 2, "verify retried: {stats:?}");
    assert!(w.tagged().is_empty(), "the refused secret is deleted");
    let record = stored(&config).await;
    assert_eq!(record.rotation.phase(), "idle");
    assert_eq!(record.current.value.expose_secret(), w.bootstrap.1);
    assert_eq!(record.current.id.as_deref(), Some(w.bootstrap.0.as_str()));
    assert_eq!(record.last_rotated_at, None, "nothing was rotated");
    assert_eq!(
        login_kind(&*provider(&config), &w.bootstrap.1).await,
        Ok(())
    );
    w.assert_foreign_untouched();
}

/// Collects log output of the current thread's subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

// Current-thread runtime: every daemon task runs on this thread, so the
// thread-local subscriber sees their logs (and no other test's).
#[tokio::test]
async fn bootstrap_without_id_is_left_in_place_with_a_warning() {
    let logs = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let w = world(Duration::from_secs(60), Duration::ZERO).await;
    let d = w.start(Some("every = \"1h\"\ngrace = \"0s\""), false).await;
    let handle = d.handle("maps");
    wait_token(&handle, |_| true).await;
    handle.rotate_now.notify_one();
    wait_status(&handle, |s| idle_and_rotated_after(s, None)).await;

    // Its id is unknown: not ours to find and delete (I4).
    assert!(w.has_secret(CLIENT, &w.bootstrap), "bootstrap left alone");
    assert_eq!(w.sim.stats().secrets_deleted, 0);
    assert_eq!(
        login_kind(&*provider(&d.config), &w.bootstrap.1).await,
        Ok(())
    );
    assert_single_stored_secret(&w, &d.config).await;
    w.assert_foreign_untouched();
    d.stop().await;

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let warning = logs
        .lines()
        .find(|l| l.contains("WARN") && l.contains("initial_secret_id"))
        .unwrap_or_else(|| panic!("a warning names initial_secret_id:\n{logs}"));
    assert!(warning.contains("left in place"), "{warning}");
    assert!(!logs.contains(&w.bootstrap.1), "I7");
    assert!(!logs.contains("sim_"), "I7");
}

/// A secret id is the provider's text: one with a line break or an escape
/// sequence is logged escaped, so it forges no log line (and still names
/// the secret exactly where it is used: the delete reaches it).
#[tokio::test]
async fn a_provider_secret_id_with_control_characters_forges_no_log_line() {
    let logs = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut w = world(Duration::from_secs(60), Duration::ZERO).await;
    let odd = "b-1\nforged line\r\u{1b}[2J";
    assert!(w.sim.rename_secret(&w.bootstrap.0, odd));
    w.bootstrap.0 = odd.to_string();
    // TOML spells the control characters as escapes.
    let config = w
        .config(Some("every = \"1h\"\ngrace = \"0s\""), true, false)
        .replace(odd, "b-1\\nforged line\\r\\u001b[2J");
    let d = TestDaemon::start_in(w.dir(), &config).await;
    let handle = d.handle("maps");
    wait_token(&handle, |_| true).await;
    handle.rotate_now.notify_one();
    wait_status(&handle, |s| idle_and_rotated_after(s, None)).await;
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while w.has_secret(CLIENT, &w.bootstrap) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old secret is deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.stop().await;

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let deleted = logs
        .lines()
        .find(|l| l.contains("retired secret deleted"))
        .unwrap_or_else(|| panic!("a line for the delete:\n{logs}"));
    assert!(
        deleted.contains(r"secret_id=b-1\nforged line\r\u{1b}[2J"),
        "{deleted}"
    );
    assert!(
        !logs.contains(['\r', '\u{1b}']) && !logs.contains("\nforged"),
        "raw control characters in the log:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_deletes_only_our_orphan_whatever_the_list_returns() {
    let w = world(Duration::from_secs(60), Duration::ZERO).await;
    let rid = "19a0c0ffee-0badf00d";
    // The create of rotation `rid` happened but its reply was lost: an
    // orphan of ours, and look-alikes that are not ours.
    let orphan = w.sim.add_secret(CLIENT, &format!("rekeyd:maps:{rid}"));
    let other_tagged = w
        .sim
        .add_secret(OTHER_CLIENT, &format!("rekeyd:maps:{rid}"));
    let other_credential = w.sim.add_secret(CLIENT, &format!("rekeyd:maps-2:{rid}"));
    let prefix_only = w.sim.add_secret(CLIENT, &format!("rekeyd:maps:{rid}:x"));
    let mut record = bootstrap_record(&w);
    record.rotation = Rotation::Creating {
        rid: rid.into(),
        attempt: String::new(),
        chosen: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let (rotator, config) = rotator(&w, dir.path(), &record, Duration::from_secs(10)).await;

    let outcome = tokio::time::timeout(
        EVENT_TIMEOUT,
        rotator.rotate(false, false, &CancellationToken::new()),
    )
    .await
    .expect("rotation ends")
    .expect("rotation runs");
    assert_eq!(outcome, Outcome::Rotated);

    assert!(!w.has_secret(CLIENT, &orphan), "our orphan deleted (I3)");
    assert!(!w.has_secret(CLIENT, &w.bootstrap), "old secret deleted");
    for (client, kept) in [
        (OTHER_CLIENT, &other_tagged),
        (CLIENT, &other_credential),
        (CLIENT, &prefix_only),
        (CLIENT, &w.manual),
        (OTHER_CLIENT, &w.other),
    ] {
        assert!(w.has_secret(client, kept), "{client}'s {} kept", kept.0);
    }
    // The replacement carries the interrupted rotation's tag, with the
    // attempt that the resuming run recorded (S2).
    let record = stored(&config).await;
    assert_eq!(record.phase(), "idle");
    let current = w
        .sim
        .secrets(CLIENT)
        .into_iter()
        .find(|s| Some(&s.id) == record.current.id.as_ref())
        .expect("stored secret exists");
    assert_eq!(
        rekeyd::rotation::rotation_id_of("maps", &current.description),
        Some(rid)
    );
    assert_ne!(current.description, format!("rekeyd:maps:{rid}"));
    assert_eq!(w.sim.stats().secrets_deleted, 2);
    assert_eq!(
        login_kind(&*provider(&config), record.current.value.expose_secret()).await,
        Ok(())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_secret_installs_only_working_secrets_and_status_shows_the_phase() {
    let w = world(Duration::from_secs(60), Duration::ZERO).await;
    let rotation = "every = \"1h\"\ngrace = \"0s\"";
    let dir = w.dir();
    let config_path = dir.path().join("rekeyd.toml");
    std::fs::write(
        &config_path,
        w.config(Some(rotation), true, true)
            .replace("{dir}", &dir.path().display().to_string()),
    )
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    let provider = provider(&config);

    // No daemon, no record yet: installed, with its id.
    let replacement = w.sim.add_secret(CLIENT, "issued by the portal");
    let out = cli(
        &["set-secret", "maps", "--id", &replacement.0],
        &config_path,
        Some(&format!("{}\n", replacement.1)),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(&replacement.1), "I7");
    let record = stored(&config).await;
    assert_eq!(record.current.value.expose_secret(), replacement.1);
    assert_eq!(record.current.id.as_deref(), Some(replacement.0.as_str()));
    assert_eq!(
        login_kind(&*provider, record.current.value.expose_secret()).await,
        Ok(())
    );

    // A secret the provider refuses is not installed...
    let out = cli(
        &["set-secret", "maps"],
        &config_path,
        Some("not-a-secret-the-provider-knows"),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("does not accept"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).contains("not-a-secret-the-provider-knows"));
    assert_eq!(
        stored(&config).await.current.value.expose_secret(),
        replacement.1
    );
    // ...unless asked to.
    let out = cli(
        &["set-secret", "maps", "--no-verify"],
        &config_path,
        Some("not-a-secret-the-provider-knows"),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let record = stored(&config).await;
    assert_eq!(
        record.current.value.expose_secret(),
        "not-a-secret-the-provider-knows"
    );
    assert_eq!(record.current.id, None);

    // Not while a rotation is in progress.
    let store = FileStore::new(&config.state_dir);
    let v = store.load("maps").await.unwrap().unwrap().version;
    let mut creating = record.clone();
    creating.rotation = Rotation::Creating {
        rid: "r1".into(),
        attempt: "a1".into(),
        chosen: None,
    };
    let v = store
        .compare_and_swap("maps", Some(v), &creating)
        .await
        .unwrap();
    let out = cli(
        &["set-secret", "maps", "--id", &replacement.0],
        &config_path,
        Some(&replacement.1),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let refusal = text(&out.stderr);
    assert!(refusal.contains("phase creating"), "{refusal}");
    // The refusal says what to do next.
    assert!(refusal.contains("rekeyd rotate maps"), "{refusal}");
    assert!(refusal.contains("--force"), "{refusal}");
    // status without the daemon: the phase comes from the store.
    let out = cli(&["status", "--json"], &config_path, None).await;
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["daemon_reachable"], false);
    assert_eq!(json["credentials"][0]["rotation_phase"], "creating");
    let waiting = json["credentials"][0]["rotation_waiting_for"]
        .as_str()
        .expect("an unfinished journal says what it waits for");
    assert!(waiting.contains("rekeyd rotate maps"), "{waiting}");
    let out = cli(&["status"], &config_path, None).await;
    assert!(
        text(&out.stdout).contains("maps: rotation waiting for the provider to create"),
        "{}",
        text(&out.stdout)
    );
    store
        .compare_and_swap("maps", Some(v), &record)
        .await
        .unwrap();

    let out = cli(
        &["set-secret", "maps", "--id", &replacement.0],
        &config_path,
        Some(&replacement.1),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // With the daemon running: it picks up a newly installed secret.
    let d = TestDaemon::start_in(dir, &w.config(Some(rotation), true, true)).await;
    let handle = d.handle("maps");
    wait_token(&handle, |_| true).await;
    let newer = w.sim.add_secret(CLIENT, "issued by the portal, again");
    let out = cli(
        &["set-secret", "maps", "--id", &newer.0],
        &config_path,
        Some(&newer.1),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Only the newer secret can log in from now on.
    assert!(w.sim.remove_secret(&replacement.0));
    assert!(w.token_is_ours(&*fresh_token(&handle).await));
    assert_eq!(
        stored(&d.config).await.current.value.expose_secret(),
        newer.1
    );

    let out = cli(&["status", "--json"], &config_path, None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["daemon_reachable"], true);
    let row = &json["credentials"][0];
    assert_eq!(row["name"], "maps");
    assert_eq!(row["rotation_phase"], "idle");
    assert!(!text(&out.stdout).contains(&newer.1), "I7");
    assert!(!text(&out.stdout).contains("sim_"), "I7");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_logs_in_with_the_pending_secret_when_current_is_rejected() {
    let w = world(Duration::from_secs(60), Duration::ZERO).await;
    // Crashed after the provider made the new secret and someone revoked
    // the old one: the store's current is dead, the pending one works.
    let pending = w.sim.add_secret(CLIENT, "rekeyd:maps:r1");
    let mut record = CredentialRecord::new(SecretEntry {
        id: Some("revoked".into()),
        value: SecretString::from("revoked-secret-value"),
        created_at: SystemTime::now(),
        expires_at: None,
    });
    record.rotation = Rotation::Created {
        rid: "r1".into(),
        pending: SecretEntry {
            id: Some(pending.0.clone()),
            value: SecretString::from(pending.1.clone()),
            created_at: SystemTime::now(),
            expires_at: None,
        },
    };
    let dir = w.dir();
    FileStore::new(&dir.path().join("state"))
        .compare_and_swap("maps", None, &record)
        .await
        .unwrap();
    // No rotation configured: nothing but the engine touches the record.
    let d = TestDaemon::start_in(dir, &w.config(None, true, false)).await;
    let handle = d.handle("maps");
    let token = wait_token(&handle, |_| true).await;
    assert!(w.token_is_ours(&token));
    let status = handle.status.borrow().clone();
    assert!(!status.locked_out, "{status:?}");
    assert!(
        w.sim.stats().logins_rejected >= 1,
        "current was tried first"
    );
    assert_eq!(stored(&d.config).await.rotation.phase(), "created");
    d.stop().await;
}
