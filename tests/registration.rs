//! RFC 7592 client registration management against a real server
//! (oidc-provider, `tests/oidc`) with registration management on and the
//! registration access token replaced by every update: rekeyd reads the
//! client, writes its metadata back, stores every value the reply carries
//! (a new registration access token; a new secret where the server
//! replaces it) before using it, and a reply lost after the server
//! committed costs the management channel, never client authentication.
//!
//! `rekeyd rotate app` is the real binary (built with `--features
//! failpoints`, so crash points abort it with `FAILPOINTS=<point>=return`).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/oidc.rs"]
mod oidc;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oidc::{OidcOptions, OidcServer, Registered};
use rekeyd::config::Config;
use rekeyd::provider::ErrorKind;
use rekeyd::rotation::driver::{BearerSource, LoginBearer};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, SecretEntry, Store};
use rekeyd::token::engine::StoreSecrets;
use secrecy::{ExposeSecret, SecretString};
use tokio::process::Command;

const SIGABRT: i32 = 6;
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

struct World {
    server: OidcServer,
    client: Registered,
    _dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Config,
    /// Everything rekeyd printed.
    logs: String,
}

fn config_text(dir: &std::path::Path, server: &OidcServer, client: &Registered) -> String {
    let d = dir.display();
    format!(
        r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
provider = "oauth2"
client_id = "{id}"
initial_secret_file = "{d}/app.secret"
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
    )
}

impl World {
    /// A server with registration management and a client registered
    /// there; `rotating`: the server replaces the secret on every update.
    async fn new(rotating: bool) -> Option<World> {
        let server = OidcServer::start_with(OidcOptions {
            registration: true,
            ..OidcOptions::default()
        })
        .await?;
        let client = server.register(rotating).await;
        let dir = tempfile::tempdir().unwrap();
        daemon::write_secret(dir.path(), "app.secret", &client.client_secret);
        daemon::write_secret(
            dir.path(),
            "registration.token",
            &client.registration_access_token,
        );
        let text = config_text(dir.path(), &server, &client);
        let config_path = dir.path().join("rekeyd.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&text).unwrap();
        let store = FileStore::new(&config.state_dir);
        let record = CredentialRecord::new(SecretEntry {
            id: None,
            value: SecretString::from(client.client_secret.clone()),
            created_at: SystemTime::now(),
        });
        store.compare_and_swap("app", None, &record).await.unwrap();
        Some(World {
            server,
            client,
            _dir: dir,
            config_path,
            config,
            logs: String::new(),
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
        out
    }

    /// A login as the token engine makes it from the store (current, then
    /// pending, then old).
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

    /// Whether the server takes `secret` for the client now.
    async fn server_accepts(&self, secret: &str) -> bool {
        let resp = reqwest::Client::new()
            .post(self.server.token_url())
            .basic_auth(&self.client.client_id, Some(secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        resp.status() == 200
    }

    async fn read_status(&self, token: &str) -> u16 {
        self.server.read_registration(&self.client, token).await.0
    }

    /// I7: neither a secret nor a registration access token in anything
    /// rekeyd printed.
    async fn assert_nothing_leaked(&self, extra: &[&str]) {
        let record = self.record().await;
        let mut values = vec![
            self.client.client_secret.clone(),
            self.client.registration_access_token.clone(),
            record.current.value.expose_secret().to_string(),
        ];
        values.extend(
            record
                .registration
                .iter()
                .map(|r| r.value.expose_secret().to_string()),
        );
        values.extend(extra.iter().map(|s| s.to_string()));
        assert!(!self.logs.is_empty());
        for value in values {
            assert!(
                !self.logs.contains(&value),
                "a secret or token reached rekeyd's output"
            );
        }
    }
}

/// oidc-provider keeps the secret on an update and replaces the
/// registration access token: rekeyd stores the new token in the same
/// write as the rotation's outcome, uses it for the next update, and the
/// file's token (now dead) is never used again.
#[tokio::test]
async fn each_new_registration_access_token_is_stored_and_used_for_the_next_update() {
    let Some(mut w) = World::new(false).await else {
        return;
    };
    let first = w.client.registration_access_token.clone();
    assert_eq!(w.read_status(&first).await, 200);

    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.logs);
    let record = w.record().await;
    assert_eq!(record.phase(), "idle");
    assert!(record.last_rotated_at.is_some());
    let second = w.stored_token().await;
    assert_ne!(second, first, "the new token is in the store");
    assert_eq!(w.read_status(&first).await, 401, "the server replaced it");
    assert_eq!(w.read_status(&second).await, 200);
    // The server kept the secret, and rekeyd says so.
    assert_eq!(
        record.current.value.expose_secret(),
        w.client.client_secret,
        "the secret is unchanged"
    );
    assert!(w.logs.contains("kept the client secret"), "{}", w.logs);
    assert!(w.server_accepts(&w.client.client_secret).await);

    // The next update goes out with the stored token (the file still holds
    // the first, dead one).
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.logs);
    let third = w.stored_token().await;
    assert_ne!(third, second);
    assert_eq!(w.read_status(&second).await, 401);
    assert_eq!(w.read_status(&third).await, 200);
    assert_eq!(w.engine_login().await, Ok(()));
    w.assert_nothing_leaked(&[&second, &third]).await;
}

/// A server that replaces the secret on every update (a registration
/// policy): the new secret and the new token are stored together, the
/// new secret is proven by a login and becomes current; the old one is
/// dead at the server at once.
#[tokio::test]
async fn a_secret_the_server_replaces_is_stored_proven_and_made_current() {
    let Some(mut w) = World::new(true).await else {
        return;
    };
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.logs);
    let record = w.record().await;
    assert_eq!(record.phase(), "idle");
    let current = record.current.value.expose_secret().to_string();
    assert_ne!(current, w.client.client_secret, "a new secret is current");
    assert!(w.server_accepts(&current).await);
    assert!(
        !w.server_accepts(&w.client.client_secret).await,
        "the server replaced the old one"
    );
    let token = w.stored_token().await;
    assert_ne!(token, w.client.registration_access_token);
    assert_eq!(w.read_status(&token).await, 200);
    assert_eq!(w.engine_login().await, Ok(()));
    w.assert_nothing_leaked(&[&current, &token]).await;
}

/// The update commits at the server (a new registration access token) but
/// its reply never arrives: rekeyd has lost the management channel, which
/// it reports as needing an operator, and client authentication goes on
/// with the secret the journal holds, in the daemon as in every login.
#[tokio::test]
async fn a_lost_update_reply_loses_the_management_channel_never_client_authentication() {
    let Some(mut w) = World::new(false).await else {
        return;
    };
    w.server.drop_next_update_reply().await;
    let out = w.rotate(None).await;
    assert!(!out.status.success(), "the update's reply was lost");
    assert_eq!(
        w.read_status(&w.client.registration_access_token).await,
        401,
        "the server committed the update (and replaced the token)"
    );
    assert_eq!(w.record().await.phase(), "creating");
    assert_eq!(
        w.engine_login().await,
        Ok(()),
        "client authentication works"
    );

    // The next attempt meets the dead token: needs an operator, and says
    // what was lost and what was not.
    let out = w.rotate(None).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "HTTP 401",
        "invalid_token",
        "management channel is lost",
        "client authentication is not affected",
        "registration.token",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }
    assert_eq!(w.engine_login().await, Ok(()));

    // The daemon serves tokens and shows the refusal in its status.
    let text = std::fs::read_to_string(&w.config_path).unwrap();
    // The configuration names its paths in full: this directory is unused.
    let dir = tempfile::tempdir().unwrap();
    let d = daemon::TestDaemon::start_in(dir, &text).await;
    let handle = d.handle("app");
    let token = daemon::wait_token(&handle, |_| true).await;
    assert!(!token.access_token.expose_secret().is_empty());
    handle.rotate_now.notify_one();
    let status = daemon::wait_status(&handle, |s| s.rotation_needs_operator.is_some()).await;
    assert_eq!(
        status.rotation_needs_operator.as_deref(),
        Some("invalid_token")
    );
    let error = status.last_rotation_error.clone().unwrap_or_default();
    assert!(
        error.contains("client authentication is not affected"),
        "{error}"
    );
    d.stop().await;
    w.assert_nothing_leaked(&[]).await;
}

/// A crash at every point of the path, each followed by a clean run: the
/// stored secrets log in at every instant, and the rotation converges.
/// With a server that keeps the secret, the crash right after the update
/// (its reply received, not yet stored: a lost reply) costs the
/// management channel; it is checked separately above.
#[tokio::test]
async fn a_crash_at_every_point_before_and_after_the_update_converges() {
    let Some(mut w) = World::new(true).await else {
        return;
    };
    // Before the update: nothing happened at the server yet.
    for (point, phase) in [("rotation-after-persist-creating", "creating")] {
        let out = w.rotate(Some(point)).await;
        assert_eq!(out.status.signal(), Some(SIGABRT), "{point}: {}", w.logs);
        assert_eq!(w.record().await.rotation.phase(), phase, "{point}");
        assert_eq!(w.engine_login().await, Ok(()), "I1 after {point}");
    }
    // After the reply is stored: the journal holds the new secret and the
    // new token; the next run proves and promotes.
    for (point, phase) in [
        ("rotation-after-persist-created", "created"),
        ("rotation-after-verify", "created"),
        ("rotation-after-persist-promoted", "promoted"),
        ("rotation-after-persist-retire", "idle"),
    ] {
        let out = w.rotate(Some(point)).await;
        assert_eq!(out.status.signal(), Some(SIGABRT), "{point}: {}", w.logs);
        let record = w.record().await;
        assert_eq!(record.rotation.phase(), phase, "{point}");
        assert_eq!(w.engine_login().await, Ok(()), "I1 after {point}");
        let token = w.stored_token().await;
        assert_eq!(w.read_status(&token).await, 200, "token stored by {point}");
    }
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.logs);
    let record = w.record().await;
    assert_eq!(record.phase(), "idle");
    let current = record.current.value.expose_secret().to_string();
    assert!(w.server_accepts(&current).await);
    assert_eq!(w.read_status(&w.stored_token().await).await, 200);
    w.assert_nothing_leaked(&[&current]).await;
}

/// `rekeyd check` shows the registration and explains the path, with its
/// limit, without any token.
#[tokio::test]
async fn rekeyd_check_shows_the_registration_and_its_path() {
    let text = r#"state_dir = "/var/lib/rekeyd"
[[credentials]]
name = "app"
provider = "oauth2"
client_id = "registered"
initial_secret_file = "/etc/rekeyd/app.secret"
[credentials.endpoints]
token_url = "https://idp.example/token"
[credentials.registration]
client_uri = "https://idp.example/reg/registered"
access_token_file = "/etc/rekeyd/app.registration-token"
[credentials.rotation]
every = "30d"
"#;
    let config = Config::from_toml(text).unwrap();
    let shown = rekeyd::commands::effective_config(&config).await;
    let doc: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let credential = &doc["credentials"][0];
    assert_eq!(
        credential["registration"]["client_uri"],
        "https://idp.example/reg/registered"
    );
    assert_eq!(
        credential["registration"]["access_token_file"],
        "/etc/rekeyd/app.registration-token"
    );
    let path = credential["rotation"]["path"].as_str().unwrap();
    for fragment in [
        "RFC 7592",
        "new registration access token",
        "stores both before using either",
        "cannot be recovered",
    ] {
        assert!(path.contains(fragment), "{fragment:?} in {path}");
    }
}
