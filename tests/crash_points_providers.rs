//! Crash safety of rotation through the Okta and Auth0 secret APIs (I1-I5,
//! I7), end to end with the real binary built with `--features
//! failpoints`: `rekeyd rotate app` aborts (SIGABRT) at a crash point
//! (`FAILPOINTS=<point>=return`), the stored secrets must still log in as
//! the token engine tries them (current, then the pending or caller-chosen
//! one, then the old one), and a clean `rekeyd rotate app` must converge:
//! the journal idle, the client holding exactly one secret, the stored one,
//! the administrative client's secret untouched, no secret or token in
//! anything rekeyd wrote.
//!
//! Each provider's path passes its own points (`path`): Okta creates a
//! second secret with a value rekeyd chose and stored first, proves it,
//! then deactivates and deletes the old one; Auth0 replaces the one secret
//! atomically with the stored value. A crash right after Okta's create
//! leaves a secret whose reply was lost: the resumed run lists, finds it by
//! a login with the stored value, and never creates a second one.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rekeyd::config::Config;
use rekeyd::provider::ErrorKind;
use rekeyd::rotation::driver::{BearerSource, CRASH_POINTS, LoginBearer, PROVIDER_CRASH_POINTS};
use rekeyd::sim::{SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, SecretEntry, Store};
use rekeyd::token::engine::StoreSecrets;
use secrecy::{ExposeSecret, SecretString};
use tokio::process::Command;

const APP: &str = "app-client";
const ADMIN: &str = "admin-client";
const SIGABRT: i32 = 6;
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Profile {
    Okta,
    Auth0,
    Keycloak,
    Entra,
}

/// The crash points a rotation passes with `profile`, each with the
/// journal phase a crash there leaves, in order.
fn path(profile: Profile) -> Vec<(&'static str, &'static str)> {
    match profile {
        Profile::Okta => vec![
            ("rotation-after-persist-creating", "creating"),
            ("rotation-after-create", "creating"),
            ("rotation-after-persist-created", "created"),
            ("rotation-after-verify", "created"),
            ("rotation-after-persist-promoted", "promoted"),
            ("rotation-after-persist-retire", "idle"),
            ("rotation-after-deactivate", "idle"),
            ("rotation-after-delete-old", "idle"),
            ("rotation-after-persist-idle", "idle"),
        ],
        // Entra's path is MapsIndoors': server-made values found by tag.
        Profile::Entra => vec![
            ("rotation-after-persist-creating", "creating"),
            ("rotation-after-create", "creating"),
            ("rotation-after-persist-created", "created"),
            ("rotation-after-verify", "created"),
            ("rotation-after-persist-promoted", "promoted"),
            ("rotation-after-persist-retire", "idle"),
            ("rotation-after-delete-old", "idle"),
            ("rotation-after-persist-idle", "idle"),
        ],
        Profile::Auth0 | Profile::Keycloak => vec![
            ("rotation-after-persist-creating", "creating"),
            ("rotation-after-create", "creating"),
            ("rotation-after-persist-created", "created"),
            ("rotation-after-verify", "created"),
            ("rotation-after-persist-promoted", "promoted"),
            ("rotation-after-persist-retire", "idle"),
        ],
    }
}

struct World {
    profile: Profile,
    sim: SimProvider,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Config,
    bootstrap: (String, String),
    admin: (String, String),
    logs: String,
    values: BTreeSet<String>,
}

impl World {
    async fn new(profile: Profile) -> World {
        let sim = SimProvider::start(SimOptions::default()).await.unwrap();
        sim.add_client(APP, "org");
        sim.add_client(ADMIN, "org");
        let bootstrap = sim.add_secret(APP, "");
        let admin = sim.add_secret(ADMIN, "");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let provider = |client: &str| match profile {
            Profile::Okta => format!(
                "provider = \"okta\"\norg_url = \"{}\"\napp_id = \"{client}\"\n",
                sim.okta_org_url()
            ),
            Profile::Auth0 => "provider = \"auth0\"\ndomain = \"tenant.example\"\n".to_string(),
            Profile::Keycloak => format!(
                "provider = \"keycloak\"\nbase_url = \"{}\"\nrealm = \"demo\"\nclient_uuid = \"{client}\"\n",
                sim.keycloak_base_url()
            ),
            Profile::Entra => format!(
                "provider = \"entra\"\ntenant = \"sim-tenant\"\napplication_object_id = \"{client}\"\n"
            ),
        };
        let endpoints = |client: &str| match profile {
            Profile::Okta | Profile::Keycloak => String::new(),
            Profile::Entra => format!(
                "[credentials.endpoints]\ntoken_url = \"{}\"\nsecrets_url = \"{}\"\n",
                sim.entra_token_url("sim-tenant"),
                sim.entra_application_url(client)
            ),
            Profile::Auth0 => format!(
                "[credentials.endpoints]\ntoken_url = \"{}\"\nsecrets_url = \"{}\"\n",
                sim.auth0_token_url(),
                sim.auth0_client_url(client)
            ),
        };
        let text = format!(
            r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
{p_app}client_id = "{APP}"
initial_secret_file = "{d}/app.secret"
initial_secret_id = "{bootstrap_id}"
secret_api_credential = "admin"
{e_app}[credentials.rotation]
every = "24h"
grace = "0s"

[[credentials]]
name = "admin"
{p_admin}client_id = "{ADMIN}"
initial_secret_file = "{d}/admin.secret"
{e_admin}"#,
            p_app = provider(APP),
            p_admin = provider(ADMIN),
            e_app = endpoints(APP),
            e_admin = endpoints(ADMIN),
            bootstrap_id = bootstrap.0,
        );
        let config_path = dir.path().join("rekeyd.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&text).unwrap();
        // The stores as a first start leaves them.
        let store = FileStore::new(&config.state_dir);
        for (name, (id, value)) in [("app", &bootstrap), ("admin", &admin)] {
            let record = CredentialRecord::new(SecretEntry {
                id: Some(id.clone()),
                value: SecretString::from(value.clone()),
                created_at: SystemTime::now(),
            });
            store.compare_and_swap(name, None, &record).await.unwrap();
        }
        let values = [&bootstrap.1, &admin.1].into_iter().cloned().collect();
        World {
            profile,
            sim,
            dir,
            config_path,
            config,
            bootstrap,
            admin,
            logs: String::new(),
            values,
        }
    }

    fn store(&self) -> Arc<FileStore> {
        Arc::new(FileStore::new(&self.config.state_dir))
    }

    async fn record(&self) -> CredentialRecord {
        self.store().load("app").await.unwrap().unwrap().value
    }

    fn collect_values(&mut self, record: &CredentialRecord) {
        for s in self.sim.secrets(APP) {
            self.values.insert(s.value);
        }
        let entries = [
            Some(&record.current),
            record.pending(),
            record.rotation.old(),
        ];
        for e in entries.into_iter().flatten() {
            self.values.insert(e.value.expose_secret().to_string());
        }
        if let Some(chosen) = record.chosen() {
            self.values.insert(chosen.expose_secret().to_string());
        }
    }

    /// `rekeyd rotate app`, with one crash point armed if given.
    async fn rotate(&mut self, failpoint: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rekeyd"));
        cmd.args(["rotate", "app", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "trace")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(point) = failpoint {
            cmd.env("FAILPOINTS", format!("{point}=return"));
        }
        let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .expect("rekeyd rotate ends in time")
            .unwrap();
        self.logs.push_str(&String::from_utf8_lossy(&out.stderr));
        self.logs.push_str(&String::from_utf8_lossy(&out.stdout));
        let record = self.record().await;
        self.collect_values(&record);
        out
    }

    /// A login as the token engine makes it from the store.
    async fn engine_login(&self) -> Result<(), ErrorKind> {
        let cred = self.config.credential("app").unwrap();
        let bearer = LoginBearer {
            provider: rekeyd::provider::build(cred).unwrap(),
            secrets: Arc::new(StoreSecrets {
                store: self.store(),
                name: "app".into(),
            }),
        };
        bearer.token().await.map(|_| ()).map_err(|e| e.kind)
    }

    async fn crash(&mut self, point: &str, phase: &str) {
        let out = self.rotate(Some(point)).await;
        assert_eq!(
            out.status.signal(),
            Some(SIGABRT),
            "{:?}: FAILPOINTS={point}=return must abort there: {:?}\n{}",
            self.profile,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let record = self.record().await;
        assert_eq!(
            record.rotation.phase(),
            phase,
            "{:?}: journal after {point}",
            self.profile
        );
        assert_eq!(
            self.engine_login().await,
            Ok(()),
            "{:?}: I1: after a crash at {point} no stored secret logs in",
            self.profile
        );
    }

    async fn finish_and_check(&mut self) {
        let out = self.rotate(None).await;
        assert!(
            out.status.success(),
            "{:?}: rekeyd rotate: {:?}\n{}",
            self.profile,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let record = self.record().await;
        assert_eq!(record.phase(), "idle", "{:?}", self.profile);
        assert!(record.last_rotated_at.is_some());
        let current = record.current.value.expose_secret();
        let secrets = self.sim.secrets(APP);
        assert_eq!(
            secrets.len(),
            1,
            "{:?}: no orphan: {secrets:?}",
            self.profile
        );
        assert_eq!(secrets[0].value, current, "{:?}", self.profile);
        assert!(secrets[0].active);
        assert_ne!(current, self.bootstrap.1);
        let admin = self.sim.secrets(ADMIN);
        assert_eq!(admin.len(), 1);
        assert_eq!(admin[0].value, self.admin.1, "nothing foreign touched");
        // I7: no value and no token in anything rekeyd wrote.
        for value in &self.values {
            assert!(
                !self.logs.contains(value.as_str()),
                "a secret reached rekeyd's output"
            );
        }
        assert!(
            !self.logs.contains("sim_"),
            "a token reached rekeyd's output"
        );
        assert!(!self.logs.is_empty());
    }
}

async fn crash_and_recover(profile: Profile, crashes: Vec<(&'static str, &'static str)>) {
    let mut world = World::new(profile).await;
    for (point, phase) in crashes {
        world.crash(point, phase).await;
    }
    world.finish_and_check().await;
    world.sim.shutdown().await;
    drop(world.dir);
}

#[test]
fn every_crash_point_is_on_some_path() {
    let on_paths: BTreeSet<&str> = [
        Profile::Okta,
        Profile::Auth0,
        Profile::Keycloak,
        Profile::Entra,
    ]
    .into_iter()
    .flat_map(path)
    .map(|(point, _)| point)
    .collect();
    for point in PROVIDER_CRASH_POINTS {
        assert!(on_paths.contains(point), "{point} is never reached here");
    }
    for (point, _) in [
        Profile::Okta,
        Profile::Auth0,
        Profile::Keycloak,
        Profile::Entra,
    ]
    .into_iter()
    .flat_map(path)
    {
        assert!(
            CRASH_POINTS.contains(&point) || PROVIDER_CRASH_POINTS.contains(&point),
            "{point} is not a crash point"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_crash_point_on_each_providers_path_converges() {
    let mut tasks = Vec::new();
    for profile in [
        Profile::Okta,
        Profile::Auth0,
        Profile::Keycloak,
        Profile::Entra,
    ] {
        for crash in path(profile) {
            tasks.push((
                profile,
                crash.0,
                tokio::spawn(crash_and_recover(profile, vec![crash])),
            ));
        }
    }
    let mut failures = Vec::new();
    for (profile, point, task) in tasks {
        if let Err(e) = task.await {
            let message = e
                .try_into_panic()
                .ok()
                .and_then(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_default();
            failures.push(format!("{profile:?} {point}: {message}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_rotation_crashed_at_every_point_in_turn() {
    // Each resumed run gets one step further before the next crash. On
    // Okta the second point also reaches the listing that finds the
    // secret whose create reply was lost.
    for profile in [
        Profile::Okta,
        Profile::Auth0,
        Profile::Keycloak,
        Profile::Entra,
    ] {
        crash_and_recover(profile, path(profile)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn okta_a_crash_after_listing_an_interrupted_create_converges() {
    crash_and_recover(
        Profile::Okta,
        vec![
            ("rotation-after-create", "creating"),
            ("rotation-after-list", "creating"),
        ],
    )
    .await;
}
