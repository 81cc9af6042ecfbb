//! The kill loop's assertions (I1, I3, I4, I5, I7 under `kill -9`) for
//! rotation through the Okta and Auth0 secret APIs: the daemon binary
//! rotates every second against a flaky simulated provider (latency,
//! random 5xx, lost replies, lost create/update replies) and is killed at
//! random moments. After every kill, the store holds a value the provider
//! still has (for Auth0, mid-replacement, the new value the journal
//! holds); after a last undisturbed run, the client holds exactly one
//! secret, the stored one, which logs in; the administrative client is
//! untouched; nothing secret reached the logs.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, Store};
use secrecy::ExposeSecret;
use tokio::process::{Child, Command};
use tokio::time::Instant;

const APP: &str = "app-client";
const ADMIN: &str = "admin-client";
/// Iterations of start / run a random while / `kill -9`, per provider.
const KILLS: usize = 30;
/// Each provider's loop stops early rather than exceed this.
const LOOP_BUDGET: Duration = Duration::from_secs(45);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    Okta,
    Auth0,
    Keycloak,
    Entra,
}

struct Setup {
    profile: Profile,
    dir: tempfile::TempDir,
    sim: SimProvider,
    bootstrap_id: String,
    admin: (String, String),
    values: HashSet<String>,
    logs: Vec<PathBuf>,
}

impl Setup {
    async fn new(profile: Profile) -> Setup {
        let sim = SimProvider::start(SimOptions {
            token_lifetime: Duration::from_secs(3),
            propagation_delay: Duration::from_millis(200),
            ..SimOptions::default()
        })
        .await
        .unwrap();
        sim.add_client(APP, "org");
        sim.add_client(ADMIN, "org");
        let (bootstrap_id, bootstrap) = sim.add_secret(APP, "");
        let admin = sim.add_secret(ADMIN, "");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.secret"), &bootstrap).unwrap();
        std::fs::write(dir.path().join("admin.secret"), &admin.1).unwrap();
        Setup {
            profile,
            dir,
            sim,
            bootstrap_id,
            values: [bootstrap, admin.1.clone()].into_iter().collect(),
            admin,
            logs: Vec::new(),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("rekeyd.toml")
    }

    fn write_config(&self, every: &str) {
        let d = self.dir.path().display();
        let provider = |client: &str| match self.profile {
            Profile::Okta => format!(
                "provider = \"okta\"\norg_url = \"{}\"\napp_id = \"{client}\"\n[credentials.endpoints]\nrequest_timeout = \"5s\"\n",
                self.sim.okta_org_url()
            ),
            Profile::Auth0 => format!(
                "provider = \"auth0\"\ndomain = \"tenant.example\"\n[credentials.endpoints]\ntoken_url = \"{}\"\nsecrets_url = \"{}\"\nrequest_timeout = \"5s\"\n",
                self.sim.auth0_token_url(),
                self.sim.auth0_client_url(client)
            ),
            Profile::Keycloak => format!(
                "provider = \"keycloak\"\nbase_url = \"{}\"\nrealm = \"demo\"\nclient_uuid = \"{client}\"\n[credentials.endpoints]\nrequest_timeout = \"5s\"\n",
                self.sim.keycloak_base_url()
            ),
            Profile::Entra => format!(
                "provider = \"entra\"\ntenant = \"sim-tenant\"\napplication_object_id = \"{client}\"\n[credentials.endpoints]\ntoken_url = \"{}\"\nsecrets_url = \"{}\"\nrequest_timeout = \"5s\"\n",
                self.sim.entra_token_url("sim-tenant"),
                self.sim.entra_application_url(client)
            ),
        };
        let text = format!(
            r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
client_id = "{APP}"
initial_secret_file = "{d}/app.secret"
initial_secret_id = "{boot}"
secret_api_credential = "admin"
{p_app}[credentials.rotation]
every = "{every}"
grace = "0s"

[[credentials]]
name = "admin"
client_id = "{ADMIN}"
initial_secret_file = "{d}/admin.secret"
{p_admin}"#,
            boot = self.bootstrap_id,
            p_app = provider(APP),
            p_admin = provider(ADMIN),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    fn spawn(&mut self) -> Child {
        let log = self
            .dir
            .path()
            .join(format!("run-{:03}.log", self.logs.len()));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        self.logs.push(log);
        Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("start rekeyd")
    }

    async fn record(&self) -> Option<CredentialRecord> {
        let store = FileStore::new(&self.dir.path().join("state"));
        store.load("app").await.ok().flatten().map(|v| v.value)
    }

    async fn remember_values(&mut self) {
        for s in self.sim.secrets(APP) {
            self.values.insert(s.value);
        }
        if let Some(r) = self.record().await {
            let entries = [Some(&r.current), r.pending(), r.rotation.old()];
            for e in entries.into_iter().flatten() {
                self.values.insert(e.value.expose_secret().to_string());
            }
            if let Some(v) = r.chosen() {
                self.values.insert(v.expose_secret().to_string());
            }
        }
    }

    /// I1 after a kill: the provider still holds a value the journal
    /// holds (current, else, mid-replacement, the new one).
    async fn assert_not_locked_out(&self, when: &str) {
        let Some(r) = self.record().await else { return };
        let held: Vec<String> = self
            .sim
            .secrets(APP)
            .into_iter()
            .filter(|s| s.active)
            .map(|s| s.value)
            .collect();
        let journal: Vec<&secrecy::SecretString> = [
            Some(&r.current.value),
            r.pending().map(|p| &p.value),
            r.rotation.old().map(|o| &o.value),
            r.chosen(),
        ]
        .into_iter()
        .flatten()
        .collect();
        assert!(
            journal
                .iter()
                .any(|v| held.iter().any(|h| h == v.expose_secret())),
            "{:?} {when}: no value of the journal (phase {}) is held by the provider",
            self.profile,
            r.phase()
        );
    }

    fn plan(&self, iteration: usize) -> Faults {
        let latency = Some((Duration::ZERO, Duration::from_millis(50)));
        let create = match self.profile {
            Profile::Okta => Endpoint::OktaSecretsCreate,
            Profile::Auth0 => Endpoint::Auth0ClientUpdate,
            Profile::Keycloak => Endpoint::KeycloakClientUpdate,
            Profile::Entra => Endpoint::EntraAddPassword,
        };
        if iteration.is_multiple_of(2) {
            Faults {
                scope: FaultScope::All,
                latency,
                random_5xx: 0.1,
                random_drop: 0.1,
                ..Faults::default()
            }
        } else {
            Faults {
                scope: FaultScope::Only(create),
                latency,
                random_5xx: 0.1,
                random_drop: 0.4,
                ..Faults::default()
            }
        }
    }
}

fn settled(r: &CredentialRecord) -> bool {
    !r.is_unfinished()
}

async fn run_until(setup: &mut Setup, what: &str, done: impl Fn(&CredentialRecord) -> bool) {
    let mut child = setup.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        setup.remember_values().await;
        if let Some(r) = setup.record().await
            && settled(&r)
            && done(&r)
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{:?}: rekeyd exited early ({status}) while waiting for {what}",
                setup.profile
            );
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(setup.logs.last().unwrap()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "{:?}: timed out waiting for {what}\n{}",
                setup.profile,
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().expect("running") as i32;
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("rekeyd exits in time")
        .unwrap();
    assert!(status.success(), "rekeyd exits 0 on SIGTERM: {status}");
    setup.remember_values().await;
}

async fn kill_loop(profile: Profile) {
    let mut setup = Setup::new(profile).await;
    let started = Instant::now();
    let mut kills = 0;
    for i in 0..KILLS {
        if started.elapsed() > LOOP_BUDGET {
            break;
        }
        setup.write_config("1s");
        setup.sim.set_faults(setup.plan(i));
        let mut child = setup.spawn();
        let run_for = Duration::from_millis(rand::rng().random_range(100..=1500));
        let until = Instant::now() + run_for;
        while Instant::now() < until {
            setup.remember_values().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{profile:?}: rekeyd exited by itself ({status}) in run {i}");
        }
        let pid = child.id().expect("running") as i32;
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        kills += 1;
        setup.remember_values().await;
        setup
            .assert_not_locked_out(&format!("after kill {kills}"))
            .await;
    }

    setup.sim.set_faults(Faults::default());
    let restart = SystemTime::now();
    run_until(&mut setup, "a full rotation after the restart", |r| {
        r.last_rotated_at.is_some_and(|t| t > restart)
    })
    .await;
    let mut settles = 0;
    while !setup.record().await.is_some_and(|r| settled(&r)) {
        settles += 1;
        assert!(settles <= 3, "{profile:?}: the journal does not settle");
        setup.write_config("1h");
        run_until(&mut setup, "the interrupted rotation to finish", |_| true).await;
    }

    let record = setup.record().await.expect("a record");
    let ours = setup.sim.secrets(APP);
    assert_eq!(
        ours.len(),
        1,
        "{profile:?}: exactly one secret, no orphan: {ours:?}"
    );
    assert_eq!(
        ours[0].value,
        record.current.value.expose_secret(),
        "{profile:?}"
    );
    assert!(
        ours.iter().all(|s| s.id != setup.bootstrap_id),
        "{profile:?}: bootstrap retired"
    );
    let admin = setup.sim.secrets(ADMIN);
    assert_eq!(admin.len(), 1);
    assert_eq!(
        (&admin[0].id, &admin[0].value),
        (&setup.admin.0, &setup.admin.1)
    );

    let mut logs = String::new();
    for path in &setup.logs {
        logs.push_str(&std::fs::read_to_string(path).unwrap());
    }
    assert!(logs.contains("token refreshed"), "the runs were logged");
    assert!(
        !logs.contains("sim_"),
        "{profile:?}: a token reached the logs"
    );
    for value in &setup.values {
        assert!(
            !logs.contains(value.as_str()),
            "{profile:?}: a secret value reached the logs"
        );
    }
    let stats = setup.sim.stats();
    eprintln!(
        "{profile:?} kill loop: {kills} kills, {settles} settle runs; sim: {} created, {} deleted, {} faults, {} responses dropped",
        stats.secrets_created,
        stats.secrets_deleted,
        stats.faults_injected,
        stats.responses_dropped
    );
    assert!(kills >= 10, "enough kills happened: {kills}");
    if matches!(profile, Profile::Okta | Profile::Entra) {
        // Every secret the API made is gone but the stored one; the
        // bootstrap one was deleted too.
        assert_eq!(stats.secrets_created, stats.secrets_deleted, "{stats:?}");
    }
    setup.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_converges_with_every_secret_api() {
    let (okta, auth0, keycloak, entra) = tokio::join!(
        tokio::spawn(kill_loop(Profile::Okta)),
        tokio::spawn(kill_loop(Profile::Auth0)),
        tokio::spawn(kill_loop(Profile::Keycloak)),
        tokio::spawn(kill_loop(Profile::Entra))
    );
    let failures: Vec<String> = [
        ("Okta", okta),
        ("Auth0", auth0),
        ("Keycloak", keycloak),
        ("Entra", entra),
    ]
    .into_iter()
    .filter_map(|(name, r)| {
        r.err().map(|e| {
            let message = e
                .try_into_panic()
                .ok()
                .and_then(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_default();
            format!("{name}: {message}")
        })
    })
    .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
