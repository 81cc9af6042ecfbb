//! Key rotation of an Okta `private_key_jwt` app through the simulated
//! Okta Management API (`/api/v1/apps/{app}/credentials/jwks`): rekeyd
//! generates a key, stores it, adds its public key next to the current
//! one, proves a login signed with it at `/oauth2/v1/token`, then
//! deactivates and deletes the old key, all with an administrative
//! client's token (`secret_api_credential`). A lost add reply and a crash
//! at every step leave a stored key the sim accepts, and each rotation
//! ends with exactly one key published, active and the journal's.
//!
//! `rekeyd rotate app` is the real binary (built with `--features
//! failpoints`, so crash points abort it with `FAILPOINTS=<point>=return`).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/rotate_runs.rs"]
mod rotate_runs;

use std::os::unix::process::ExitStatusExt;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rekeyd::config::Config;
use rekeyd::provider::assertion;
use rekeyd::provider::key::{self, Alg, ClientKey};
use rekeyd::rotation::driver::{BearerSource, LoginBearer};
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, SecretEntry, Store};
use rekeyd::token::engine::StoreSecrets;
use rotate_runs::{RotateRuns, private_d};
use secrecy::{ExposeSecret, SecretString};

const APP: &str = "app-client";
const ADMIN: &str = "admin-client";
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

struct World {
    sim: SimProvider,
    /// The bootstrap key, published at the sim.
    first: ClientKey,
    dir: tempfile::TempDir,
    config: Config,
    admin_secret: String,
    /// The runs of `rekeyd rotate app`, their output and the keys they held.
    runs: RotateRuns,
}

impl World {
    async fn new(alg: Alg) -> World {
        let sim = SimProvider::start(SimOptions::default()).await.unwrap();
        sim.add_client(APP, "org");
        sim.add_client(ADMIN, "org");
        let pem = key::generate_pem(alg).unwrap();
        let first = ClientKey::from_file_text(&pem).unwrap();
        sim.add_okta_key(APP, &first.public_jwk());
        let (admin_id, admin_secret) = sim.add_secret(ADMIN, "");
        let dir = tempfile::tempdir().unwrap();
        daemon::write_secret(dir.path(), "app.key", &pem);
        daemon::write_secret(dir.path(), "admin.secret", &admin_secret);
        let d = dir.path().display();
        let org = sim.okta_org_url();
        let text = format!(
            r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
provider = "okta"
org_url = "{org}"
app_id = "{APP}"
client_id = "{APP}"
auth_method = "private_key_jwt"
initial_key_file = "{d}/app.key"
secret_api_credential = "admin"
[credentials.rotation]
every = "24h"
grace = "0s"

[[credentials]]
name = "admin"
provider = "okta"
org_url = "{org}"
app_id = "{ADMIN}"
client_id = "{ADMIN}"
initial_secret_file = "{d}/admin.secret"
"#
        );
        let config_path = dir.path().join("rekeyd.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&text).unwrap();
        assert_eq!(
            config
                .credential("app")
                .unwrap()
                .endpoints
                .secrets_url
                .as_ref()
                .unwrap()
                .as_str(),
            sim.okta_jwks_url(APP),
            "derived from org_url and app_id"
        );
        // The administrative client's secret as its first start stores
        // it (`rekeyd rotate app` bootstraps only the app).
        let admin = CredentialRecord::new(SecretEntry {
            id: Some(admin_id),
            value: SecretString::from(admin_secret.clone()),
            created_at: SystemTime::now(),
            expires_at: None,
        });
        FileStore::new(&config.state_dir)
            .compare_and_swap("admin", None, &admin)
            .await
            .unwrap();
        let mut runs = RotateRuns::new(config_path);
        runs.privates.push(private_d(&first.to_secret()));
        World {
            sim,
            first,
            dir,
            config,
            admin_secret,
            runs,
        }
    }

    fn store(&self) -> Arc<FileStore> {
        Arc::new(FileStore::new(&self.config.state_dir))
    }

    async fn record(&self) -> CredentialRecord {
        self.store().load("app").await.unwrap().unwrap().value
    }

    /// `rekeyd rotate app`, with one crash point armed if given.
    async fn rotate(&mut self, failpoint: Option<&str>) -> Output {
        let out = self.runs.rotate(failpoint).await;
        self.remember_keys().await;
        out
    }

    /// Notes every private key the journal holds, for the log check.
    async fn remember_keys(&mut self) {
        if let Ok(Some(record)) = self.store().load("app").await {
            self.runs.remember_keys(&record.value);
        }
    }

    /// A login as the token engine makes it from the store (current, then
    /// pending, then old).
    async fn engine_login(&self) -> bool {
        let cred = self.config.credential("app").unwrap();
        let bearer = LoginBearer {
            provider: rekeyd::provider::build(cred).unwrap(),
            secrets: Arc::new(StoreSecrets {
                store: self.store(),
                name: "app".into(),
            }),
        };
        bearer.token().await.is_ok()
    }

    /// The HTTP status of a login at Okta's token endpoint signed with
    /// `key`.
    async fn login_with(&self, key: &ClientKey) -> u16 {
        let token_url = format!("{}/oauth2/v1/token", self.sim.okta_org_url());
        let jwt = assertion::mint(key, APP, &token_url, SystemTime::now()).unwrap();
        reqwest::Client::new()
            .post(token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", APP),
                ("client_assertion_type", assertion::JWT_BEARER),
                ("client_assertion", jwt.expose_secret()),
            ])
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The kids the sim lists for the app, and the active ones.
    fn published(&self) -> (Vec<String>, Vec<String>) {
        let keys = self.sim.okta_keys(APP);
        (
            keys.iter().map(|k| k.kid.clone()).collect(),
            keys.iter()
                .filter(|k| k.active)
                .map(|k| k.kid.clone())
                .collect(),
        )
    }

    /// After a crash: the journal's current key is published, active, and
    /// the store logs in (I1); at most the old and the new key are there.
    async fn assert_current_key_works(&self, when: &str) {
        let record = self.record().await;
        let current = key::from_secret(&record.current.value).unwrap();
        assert_eq!(record.current.id.as_deref(), Some(current.kid()), "{when}");
        let (all, active) = self.published();
        assert!(all.len() <= 2, "{when}: old and new at most: {all:?}");
        assert!(
            active.contains(&current.kid().to_string()),
            "{when}: the current key is published and active: {all:?}"
        );
        assert!(self.engine_login().await, "I1 {when}: {}", self.runs.logs);
    }

    /// The end of every rotation: idle, exactly one key at the sim, active,
    /// the journal's, accepted there; the bootstrap key refused.
    async fn assert_one_key(&self) -> ClientKey {
        let record = self.record().await;
        assert_eq!(record.phase(), "idle", "{}", self.runs.logs);
        let current = key::from_secret(&record.current.value).unwrap();
        let (all, active) = self.published();
        assert_eq!(all, [current.kid()], "exactly one key");
        assert_eq!(active, [current.kid()], "and it is active");
        assert_eq!(self.login_with(&current).await, 200);
        assert!(self.engine_login().await);
        if current.kid() != self.first.kid() {
            assert_eq!(
                self.login_with(&self.first).await,
                401,
                "the bootstrap key is withdrawn"
            );
        }
        current
    }

    /// I7: no private key, admin secret or token (the sim's start with
    /// `sim_`) in anything rekeyd printed.
    fn assert_nothing_leaked(&self) {
        self.runs
            .assert_nothing_leaked(&[self.admin_secret.as_str(), "sim_"]);
    }

    /// Whether any file under the state directory holds `d`.
    fn stored_anywhere(&self, d: &str) -> bool {
        fn walk(dir: &std::path::Path, d: &str) -> bool {
            std::fs::read_dir(dir).unwrap().any(|entry| {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, d)
                } else {
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap()).contains(d)
                }
            })
        }
        walk(&self.config.state_dir, d)
    }
}

/// The whole path: a new key of the same type added next to the old one,
/// proven by a login signed with it, the old one deactivated then deleted
/// and forgotten by the store; then a second rotation from there.
#[tokio::test]
async fn a_key_rotation_adds_proves_deactivates_and_deletes() {
    for alg in [Alg::Es256, Alg::Rs256] {
        let mut w = World::new(alg).await;
        assert_eq!(w.login_with(&w.first).await, 200, "the bootstrap key works");
        let out = w.rotate(None).await;
        assert!(out.status.success(), "{alg:?}: {}", w.runs.logs);
        let second = w.assert_one_key().await;
        assert_ne!(second.kid(), w.first.kid(), "a new key");
        assert_eq!(second.alg(), alg, "of the bootstrap key's type");
        assert!(
            !w.stored_anywhere(&private_d(&w.first.to_secret())),
            "the old private key is gone from the store"
        );
        let stats = w.sim.stats();
        assert_eq!(stats.requests_to(Endpoint::OktaKeysAdd), 1);
        assert_eq!(stats.requests_to(Endpoint::OktaKeysDeactivate), 1);
        assert_eq!(stats.requests_to(Endpoint::OktaKeysDelete), 1);
        assert!(
            stats.management_callers.contains_key(ADMIN)
                && !stats.management_callers.contains_key(APP),
            "the admin client's token calls the API: {:?}",
            stats.management_callers
        );

        let out = w.rotate(None).await;
        assert!(out.status.success(), "{}", w.runs.logs);
        let third = w.assert_one_key().await;
        assert_ne!(third.kid(), second.kid());
        assert_eq!(w.login_with(&second).await, 401);
        w.assert_nothing_leaked();
        w.sim.shutdown().await;
        drop(w.dir);
    }
}

/// The add commits at Okta but its reply is lost: the journal holds the
/// new key, so nothing is lost. The next run finds it listed under its
/// `kid`, proves it and goes on; no second key is added.
#[tokio::test]
async fn a_lost_add_reply_is_found_by_its_key_id_not_added_twice() {
    let mut w = World::new(Alg::Es256).await;
    w.sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::OktaKeysAdd),
        drop_next: 1,
        ..Faults::default()
    });
    let out = w.rotate(None).await;
    assert!(!out.status.success(), "the reply was lost: {}", w.runs.logs);
    let record = w.record().await;
    assert_eq!(record.phase(), "creating");
    let chosen = key::from_secret(record.chosen().unwrap()).unwrap();
    assert_eq!(
        w.published().0,
        [w.first.kid(), chosen.kid()],
        "Okta committed the add"
    );
    assert!(w.engine_login().await, "I1");

    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let last = w.assert_one_key().await;
    assert_eq!(last.kid(), chosen.kid(), "the key found, not a second one");
    assert_eq!(w.sim.stats().requests_to(Endpoint::OktaKeysAdd), 1);
    w.assert_nothing_leaked();
}

/// A crash at every step of Okta's path, each followed by a clean run:
/// the journal's current key is published, active and logs in at every
/// instant, and each rotation ends with exactly one active key the sim
/// accepts.
#[tokio::test]
async fn a_crash_at_every_step_leaves_a_working_key_and_ends_with_one() {
    let mut w = World::new(Alg::Es256).await;
    let points = [
        ("rotation-after-persist-creating", "creating"),
        ("rotation-after-create", "creating"),
        ("rotation-after-persist-created", "created"),
        ("rotation-after-verify", "created"),
        ("rotation-after-persist-promoted", "promoted"),
        ("rotation-after-list", "promoted"),
        ("rotation-after-persist-retire", "idle"),
        ("rotation-after-deactivate", "idle"),
        ("rotation-after-delete-old", "idle"),
        ("rotation-after-persist-idle", "idle"),
    ];
    let mut kids = vec![w.first.kid().to_string()];
    for (point, phase) in points {
        let out = w.rotate(Some(point)).await;
        assert_eq!(
            out.status.signal(),
            Some(SIGABRT),
            "{point}: {}",
            w.runs.logs
        );
        assert_eq!(w.record().await.rotation.phase(), phase, "{point}");
        w.assert_current_key_works(&format!("after {point}")).await;
        let out = w.rotate(None).await;
        assert!(out.status.success(), "{point}: {}", w.runs.logs);
        let key = w.assert_one_key().await;
        if !kids.contains(&key.kid().to_string()) {
            kids.push(key.kid().to_string());
        }
    }
    assert!(kids.len() > points.len(), "rotations happened: {kids:?}");
    w.assert_nothing_leaked();
}

/// The API itself, called as the rotation calls it: adding a key twice
/// adds it once, and the app's only active key is never deactivated (I1),
/// whatever the caller asks.
#[tokio::test]
async fn adding_twice_adds_once_and_the_last_active_key_stays() {
    let w = World::new(Alg::Es256).await;
    let cred = w.config.credential("app").unwrap();
    let api = rekeyd::provider::build_secret_api(cred).unwrap().unwrap();
    let admin = rekeyd::provider::build(w.config.credential("admin").unwrap()).unwrap();
    let bearer = admin
        .login(&SecretString::from(w.admin_secret.clone()))
        .await
        .unwrap();
    let next = key::generate(Alg::Es256).unwrap();
    for _ in 0..2 {
        let created = api
            .create(
                &bearer,
                rekeyd::provider::CreateRequest {
                    description: "",
                    value: Some(&next.to_secret()),
                },
            )
            .await
            .unwrap();
        assert_eq!(created.id.as_deref(), Some(next.kid()));
    }
    assert_eq!(w.published().0, [w.first.kid(), next.kid()]);
    assert_eq!(w.sim.stats().requests_to(Endpoint::OktaKeysAdd), 1);
    let listed: Vec<String> = api
        .list(&bearer)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, [w.first.kid(), next.kid()], "listed by kid");

    // Retire the bootstrap key; then the new one is the last active key.
    api.deactivate(&bearer, w.first.kid()).await.unwrap();
    api.delete(&bearer, w.first.kid()).await.unwrap();
    let refused = api.deactivate(&bearer, next.kid()).await.unwrap_err();
    assert_eq!(
        refused.kind,
        rekeyd::provider::ErrorKind::Refused,
        "{refused}"
    );
    assert!(refused.to_string().contains("only active key"), "{refused}");
    assert_eq!(w.published().1, [next.kid()], "still active");
    assert_eq!(w.login_with(&next).await, 200);
    assert_eq!(
        api.delete(&bearer, w.first.kid()).await.unwrap(),
        rekeyd::provider::Deleted::NotFound,
        "gone is done"
    );
}

/// `kill -9` of `rekeyd rotate` at random moments, many times: after each
/// kill the journal's current key is active at Okta and its token
/// endpoint accepts it, never more than the old and the new key are
/// listed, and a last undisturbed run leaves exactly one key, the
/// journal's. Everything the killed runs printed is checked for private
/// keys too.
#[tokio::test]
async fn kill_9_at_random_moments_ends_with_one_working_key() {
    const KILLS: usize = 30;
    let mut w = World::new(Alg::Es256).await;
    // How long an undisturbed rotation takes here: the kills fall
    // anywhere within that (the random moment is the point of the test).
    let started = tokio::time::Instant::now();
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let run = started.elapsed().as_millis() as u64;
    w.assert_one_key().await;
    let mut rng = rand::rng();
    let mut phases = std::collections::BTreeMap::<&'static str, u32>::new();
    let mut kills = 0;
    for i in 0..KILLS {
        // A run that ends before its moment is simply not killed.
        let delay = Duration::from_millis(rng.random_range(0..run.max(2)));
        let status = w.runs.rotate_killed_after(delay).await;
        if status.signal() == Some(SIGKILL) {
            kills += 1;
        }
        w.remember_keys().await;
        let record = w.record().await;
        *phases.entry(record.phase()).or_default() += 1;
        w.assert_current_key_works(&format!("after kill {i}")).await;
        let current = key::from_secret(&record.current.value).unwrap();
        assert_eq!(
            w.login_with(&current).await,
            200,
            "after kill {i}: Okta's token endpoint accepts the current key"
        );
    }
    // Finish whatever the last kill interrupted.
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let last = w.assert_one_key().await;
    assert_eq!(
        w.record().await.current.id.as_deref(),
        Some(last.kid()),
        "the journal names the published key"
    );
    eprintln!(
        "okta key kill loop: {kills} kills within {run} ms, phases after each run {phases:?}"
    );
    assert!(kills >= KILLS / 2, "enough runs were killed: {kills}");
    w.assert_nothing_leaked();
}
