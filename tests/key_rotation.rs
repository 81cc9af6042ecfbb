//! Key rotation of a `private_key_jwt` client through RFC 7592
//! registration management, against a real server (oidc-provider,
//! `tests/oidc`): rekeyd generates a key, stores it, publishes its public
//! key next to the current one (`PUT` with `jwks` = old + new), proves a
//! login signed with it, and after the grace period withdraws the old one
//! (`PUT` with the new key only). Every registration access token the
//! server hands out on the way is stored before the next call. A crash at
//! any step, and `kill -9` at random moments, leave a key the server
//! accepts, and the rotation ends with exactly one key published.
//!
//! `rekeyd rotate app` is the real binary (built with `--features
//! failpoints`, so crash points abort it with `FAILPOINTS=<point>=return`).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/oidc.rs"]
mod oidc;
#[path = "support/rotate_runs.rs"]
mod rotate_runs;

use std::os::unix::process::ExitStatusExt;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oidc::{OidcOptions, OidcServer, Registered};
use rand::Rng;
use rekeyd::config::Config;
use rekeyd::provider::assertion;
use rekeyd::provider::key::{self, Alg, ClientKey};
use rekeyd::rotation::driver::{BearerSource, LoginBearer};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, Store};
use rekeyd::token::engine::StoreSecrets;
use rotate_runs::{RUN_TIMEOUT, RotateRuns, private_d};
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::process::Command;

const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

struct World {
    server: OidcServer,
    client: Registered,
    /// The key the client was registered with (the bootstrap key).
    first: ClientKey,
    _dir: tempfile::TempDir,
    config: Config,
    /// The runs of `rekeyd rotate app`, their output and the keys they held.
    runs: RotateRuns,
}

impl World {
    /// A server with registration management, and a `private_key_jwt`
    /// client registered there with one `alg` key; `keep_token`: the server
    /// keeps the registration access token across updates.
    async fn new(alg: Alg, keep_token: bool) -> Option<World> {
        let server = OidcServer::start_with(OidcOptions {
            registration: true,
            keep_registration_token: keep_token,
            ..OidcOptions::default()
        })
        .await?;
        // The bootstrap key as an operator may make it: a JWK with a kid of
        // its own choosing (rekeyd names every key by its thumbprint).
        let generated = ClientKey::from_file_text(&key::generate_pem(alg).unwrap()).unwrap();
        let mut jwk: serde_json::Value =
            serde_json::from_str(generated.to_secret().expose_secret()).unwrap();
        jwk["kid"] = "operators-key-1".into();
        let bootstrap = jwk.to_string();
        let first = ClientKey::from_file_text(&bootstrap).unwrap();
        assert_ne!(first.kid(), first.thumbprint());
        let client = server
            .register_metadata(
                json!({
                    "grant_types": ["client_credentials"],
                    "response_types": [],
                    "redirect_uris": [],
                    "token_endpoint_auth_method": "private_key_jwt",
                    "token_endpoint_auth_signing_alg": alg.as_str(),
                    "jwks": {"keys": [first.public_jwk()]},
                    "client_name": "rekeyd key client",
                }),
                false,
            )
            .await;
        let dir = tempfile::tempdir().unwrap();
        daemon::write_secret(dir.path(), "app.key", &bootstrap);
        daemon::write_secret(
            dir.path(),
            "registration.token",
            &client.registration_access_token,
        );
        let d = dir.path().display();
        let text = format!(
            r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
provider = "oauth2"
client_id = "{id}"
auth_method = "private_key_jwt"
initial_key_file = "{d}/app.key"
[credentials.endpoints]
token_url = "{token_url}"
[credentials.registration]
client_uri = "{uri}"
access_token_file = "{d}/registration.token"
[credentials.rotation]
every = "24h"
grace = "0s"
"#,
            id = client.client_id,
            token_url = server.token_url(),
            uri = client.registration_client_uri,
        );
        let config_path = dir.path().join("rekeyd.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&text).unwrap();
        let mut runs = RotateRuns::new(config_path);
        runs.privates.push(private_d(&first.to_secret()));
        Some(World {
            server,
            client,
            first,
            _dir: dir,
            config,
            runs,
        })
    }

    fn store(&self) -> Arc<FileStore> {
        Arc::new(FileStore::new(&self.config.state_dir))
    }

    async fn record(&self) -> CredentialRecord {
        self.store().load("app").await.unwrap().unwrap().value
    }

    /// The registration access token rekeyd would use now.
    async fn stored_token(&self) -> String {
        match self.record().await.registration {
            Some(r) => r.value.expose_secret().to_string(),
            None => self.client.registration_access_token.clone(),
        }
    }

    /// `rekeyd rotate app`, with one crash point armed if given.
    async fn rotate(&mut self, failpoint: Option<&str>) -> Output {
        let out = self.runs.rotate(failpoint).await;
        self.remember_keys().await;
        out
    }

    /// `rekeyd set-secret app` with `stdin`, `--force` if asked: its
    /// status and what it printed.
    async fn set_secret(&mut self, stdin: &str, force: bool) -> (bool, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rekeyd"));
        cmd.args(["set-secret", "app", "--config"])
            .arg(&self.runs.config_path)
            .env_remove("FAILPOINTS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if force {
            cmd.arg("--force");
        }
        let mut child = cmd.spawn().unwrap();
        let mut pipe = child.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut pipe, stdin.as_bytes())
            .await
            .unwrap();
        drop(pipe);
        let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
            .await
            .expect("set-secret ends in time")
            .unwrap();
        let error = String::from_utf8_lossy(&out.stderr).to_string();
        self.runs.logs.push_str(&error);
        (out.status.success(), error)
    }

    /// While a new key is being published (phase creating), `rekeyd
    /// set-secret` is refused with the reason and both ways out, the
    /// journal untouched; `--force` with the key in use (verified first)
    /// ends the rotation, and the key being published is retired by its
    /// thumbprint, for the next run to withdraw once a listing shows it.
    async fn set_secret_while_a_key_is_published(&mut self) {
        let before = self.record().await;
        let chosen = key::from_secret(before.chosen().expect("a key in flight")).unwrap();
        let current = before.current.value.expose_secret().to_string();
        let (ok, error) = self.set_secret(&current, false).await;
        assert!(!ok, "{error}");
        for part in ["publishing a new key", "rekeyd rotate app", "--force"] {
            assert!(error.contains(part), "{part}: {error}");
        }
        let after = self.record().await;
        assert_eq!(after.phase(), before.phase(), "the journal is untouched");

        let (ok, error) = self.set_secret(&current, true).await;
        assert!(ok, "{error}");
        let after = self.record().await;
        assert_eq!(
            after.phase(),
            "retiring",
            "the rotation is over, a key to withdraw"
        );
        assert_eq!(after.current.id, before.current.id, "the key in use stays");
        assert!(
            after
                .retire
                .iter()
                .any(|r| r.id == Some(chosen.thumbprint())),
            "the key being published is retired by its thumbprint: {:?}",
            after.retire
        );
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

    /// The HTTP status of a login signed with `key`.
    async fn login_with(&self, key: &ClientKey) -> u16 {
        let jwt = assertion::mint(
            key,
            &self.client.client_id,
            &self.server.token_url(),
            SystemTime::now(),
        )
        .unwrap();
        reqwest::Client::new()
            .post(self.server.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.client.client_id.as_str()),
                ("client_assertion_type", assertion::JWT_BEARER),
                ("client_assertion", jwt.expose_secret()),
            ])
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The key ids the registration holds now (read with `token`).
    async fn published_with(&self, token: &str) -> Vec<String> {
        let (status, body) = self.server.read_registration(&self.client, token).await;
        assert_eq!(status, 200, "registration read: {body}");
        body["jwks"]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    }

    async fn published(&self) -> Vec<String> {
        self.published_with(&self.stored_token().await).await
    }

    /// The journal's current key: published, and accepted by the server.
    async fn assert_current_key_works(&self, when: &str) {
        let record = self.record().await;
        let current = key::from_secret(&record.current.value).unwrap();
        assert_eq!(record.current.id, Some(current.thumbprint()), "{when}");
        assert!(
            self.published().await.contains(&current.kid().to_string()),
            "{when}: the current key is published"
        );
        assert!(self.engine_login().await, "I1 {when}: {}", self.runs.logs);
    }

    /// The end state of every rotation: idle, one key published, the
    /// journal's, accepted by the server.
    async fn assert_one_key(&self) -> ClientKey {
        let record = self.record().await;
        assert_eq!(record.phase(), "idle", "{}", self.runs.logs);
        let current = key::from_secret(&record.current.value).unwrap();
        assert_eq!(self.published().await, [current.kid()], "exactly one key");
        assert_eq!(self.login_with(&current).await, 200);
        assert!(self.engine_login().await);
        current
    }

    /// I7: no private key and no registration access token in anything
    /// rekeyd printed.
    async fn assert_nothing_leaked(&self) {
        let first = self.client.registration_access_token.clone();
        let stored = self.stored_token().await;
        self.runs.assert_nothing_leaked(&[&first, &stored]);
    }
}

/// The whole path with a server that replaces the registration access
/// token on every update: a new key of the same type, published, proven,
/// the old one withdrawn, every token stored and used for the next call;
/// then a second rotation from the stored state.
#[tokio::test]
async fn a_key_rotation_publishes_proves_and_withdraws_through_the_registration() {
    let Some(mut w) = World::new(Alg::Es256, false).await else {
        return;
    };
    let first_token = w.client.registration_access_token.clone();
    assert_eq!(w.login_with(&w.first).await, 200);

    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let second = w.assert_one_key().await;
    assert_ne!(second.kid(), w.first.kid(), "a new key");
    assert_eq!(second.alg(), Alg::Es256, "of the same type");
    assert_eq!(
        w.login_with(&w.first).await,
        401,
        "the old key is withdrawn"
    );
    let record = w.record().await;
    assert!(record.last_rotated_at.is_some());
    assert!(record.retire.is_empty(), "{:?}", record.retire);
    // Two updates (publish, withdraw), each replaced the token; the last
    // one is stored and the first is dead.
    let token = w.stored_token().await;
    assert_ne!(token, first_token);
    assert_eq!(
        w.server.read_registration(&w.client, &first_token).await.0,
        401
    );

    // Again, from what the first rotation stored.
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let third = w.assert_one_key().await;
    assert_ne!(third.kid(), second.kid());
    assert_eq!(w.login_with(&second).await, 401);
    assert!(
        w.runs.logs.contains("rotation complete"),
        "the run says what it did: {}",
        w.runs.logs
    );
    w.assert_nothing_leaked().await;
}

/// RS256 and EdDSA keys rotate the same way, each to its own type.
#[tokio::test]
async fn rsa_and_ed25519_keys_rotate_to_keys_of_their_type() {
    for alg in [Alg::Rs256, Alg::EdDsa] {
        let Some(mut w) = World::new(alg, true).await else {
            return;
        };
        let out = w.rotate(None).await;
        assert!(out.status.success(), "{alg:?}: {}", w.runs.logs);
        let next = w.assert_one_key().await;
        assert_eq!(next.alg(), alg);
        assert_ne!(next.kid(), w.first.kid());
        w.assert_nothing_leaked().await;
    }
}

/// The daemon rotates the key on request: its status follows the key in
/// use (id, age) and the rotation phase, and its token engine logs in with
/// the new key once it is promoted.
#[tokio::test]
async fn the_daemon_status_shows_the_key_in_use_and_the_rotation_phase() {
    let Some(w) = World::new(Alg::Es256, false).await else {
        return;
    };
    let text = std::fs::read_to_string(&w.runs.config_path).unwrap();
    let d = daemon::TestDaemon::start_in(tempfile::tempdir().unwrap(), &text).await;
    let handle = d.handle("app");
    daemon::wait_token(&handle, |_| true).await;
    let before = daemon::wait_status(&handle, |s| s.client_auth.is_some()).await;
    let auth = before.client_auth.clone().unwrap();
    assert_eq!(auth.auth_method, "private_key_jwt");
    assert_eq!(auth.key_id.as_deref(), Some(w.first.kid()));
    assert_eq!(before.rotation_phase, "idle");

    handle.rotate_now.notify_one();
    let after = daemon::wait_status(&handle, |s| {
        s.last_rotated_at.is_some() && s.rotation_phase == "idle"
    })
    .await;
    let auth = after.client_auth.clone().unwrap();
    let record = w.record().await;
    let current = key::from_secret(&record.current.value).unwrap();
    assert_eq!(auth.key_id.as_deref(), Some(current.kid()), "the new key");
    assert_ne!(current.kid(), w.first.kid());
    assert_eq!(auth.key_created_at, Some(record.current.created_at));
    assert_eq!(auth.public_jwk.as_ref(), Some(&current.public_jwk()));
    let json = serde_json::to_string(&after).unwrap();
    assert!(
        !json.contains(&private_d(&record.current.value)),
        "no private key in the status"
    );
    d.stop().await;
    assert_eq!(w.published().await, [current.kid()]);
}

/// The publishing update commits at the server but its reply is lost:
/// the journal holds the new key, so nothing is lost. The next run finds
/// the key in the registration by its `kid`, proves it and goes on; no
/// second key is published.
#[tokio::test]
async fn a_lost_publish_reply_is_found_by_its_key_id_and_finished() {
    let Some(mut w) = World::new(Alg::Es256, true).await else {
        return;
    };
    w.server.drop_next_update_reply().await;
    let out = w.rotate(None).await;
    assert!(!out.status.success(), "the reply was lost: {}", w.runs.logs);
    let record = w.record().await;
    assert_eq!(record.phase(), "creating");
    let chosen = key::from_secret(record.chosen().unwrap()).unwrap();
    assert_eq!(
        w.published().await,
        [w.first.kid(), chosen.kid()],
        "the server committed the publish"
    );
    assert!(w.engine_login().await, "I1");

    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let last = w.assert_one_key().await;
    assert_eq!(last.kid(), chosen.kid(), "the key found, not a second one");
    w.assert_nothing_leaked().await;
}

/// A crash at every step of the path, each followed by a clean run: the
/// journal's current key is published and logs in at every instant, and
/// each rotation ends with exactly one key. (With a server that replaces
/// the registration access token, a crash between an update's reply and
/// its write loses the token, as a lost reply does; the server here keeps
/// it, so every step is covered.)
#[tokio::test]
async fn a_crash_at_every_step_leaves_a_working_key_and_ends_with_one() {
    let Some(mut w) = World::new(Alg::Es256, true).await else {
        return;
    };
    let points = [
        "rotation-after-persist-creating",
        "rotation-after-create",
        "rotation-after-persist-created",
        "rotation-after-verify",
        "rotation-after-persist-promoted",
        "rotation-after-list",
        "rotation-after-persist-retire",
        "rotation-after-delete-old",
    ];
    let mut kids = vec![w.first.kid().to_string()];
    for point in points {
        let out = w.rotate(Some(point)).await;
        assert_eq!(
            out.status.signal(),
            Some(SIGABRT),
            "{point}: {}",
            w.runs.logs
        );
        w.assert_current_key_works(&format!("after {point}")).await;
        let published = w.published().await;
        assert!(
            published.len() <= 2,
            "{point}: at most the old and the new key: {published:?}"
        );
        if point == "rotation-after-create" {
            w.set_secret_while_a_key_is_published().await;
        }
        // The next run finishes the rotation.
        let out = w.rotate(None).await;
        assert!(out.status.success(), "{point}: {}", w.runs.logs);
        let key = w.assert_one_key().await;
        // A crash before the create leaves nothing to finish but a fresh
        // attempt; every other one finishes with a new key.
        if !kids.contains(&key.kid().to_string()) {
            kids.push(key.kid().to_string());
        }
    }
    assert!(kids.len() >= points.len(), "rotations happened: {kids:?}");
    w.assert_nothing_leaked().await;
}

/// `kill -9` of `rekeyd rotate` at random moments, many times: after each
/// kill the journal's current key is published and logs in, never more
/// than the old and the new key are published, and a last undisturbed run
/// leaves exactly one key, the journal's.
#[tokio::test]
async fn kill_9_at_random_moments_ends_with_one_working_key() {
    const KILLS: usize = 40;
    let Some(mut w) = World::new(Alg::Es256, true).await else {
        return;
    };
    // How long an undisturbed rotation takes here: the kills fall
    // anywhere within that (the random moment is the point of the test).
    let started = tokio::time::Instant::now();
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let run = started.elapsed().as_millis() as u64;
    let mut rng = rand::rng();
    let mut phases = std::collections::BTreeMap::<&'static str, u32>::new();
    let mut kills = 0;
    for i in 0..KILLS {
        // A run that ends before its moment is simply not killed.
        let delay = Duration::from_millis(rng.random_range(0..run.max(2)));
        if w.runs.rotate_killed_after(delay).await.signal() == Some(SIGKILL) {
            kills += 1;
        }
        w.remember_keys().await;
        let Ok(Some(_)) = w.store().load("app").await else {
            // Killed before the bootstrap was stored: nothing to check yet.
            continue;
        };
        *phases.entry(w.record().await.phase()).or_default() += 1;
        w.assert_current_key_works(&format!("after kill {i}")).await;
        let published = w.published().await;
        assert!(published.len() <= 2, "kill {i}: {published:?}");
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
    eprintln!("key kill loop: {kills} kills, phases after each run {phases:?}");
    assert!(kills >= KILLS / 2, "enough runs were killed: {kills}");
    w.assert_nothing_leaked().await;
}
