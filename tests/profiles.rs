//! Token profiles (`[[credentials.tokens]]`) against the simulated
//! provider, whose MapsIndoors endpoints both rotate secrets and echo the
//! requested scope: each profile is served and refreshed on its own, its
//! token files are written, `rekeyd token` and `rekeyd status` know it, and
//! a rotation of the credential's one secret reaches every profile's engine
//! (S5, S8). The same against a real OAuth2 server is in
//! `tests/oidc_daemon.rs`; that server has no secret API, so the rotation
//! is shown here.

#[path = "support/daemon.rs"]
mod daemon;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use daemon::{EVENT_TIMEOUT, TestDaemon, wait_status, wait_token, write_secret};
use rekeyd::config::Config;
use rekeyd::sim::{SimOptions, SimProvider};
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const KEY_HEADER: &str = "X-Rekeyd-Key";
const CLIENT: &str = "client-maps";
const CUSTOMER: &str = "cust";

/// One rotating MapsIndoors credential `maps` (scope `client-apis`) with
/// two profiles, `maps-read` (scope `read`) and `maps-write` (scope
/// `write`), each with a token file. `api`: an API on `<dir>/api.sock`.
/// The bootstrap secret's id is given, so its rotation deletes it.
fn config(sim: &SimProvider, api: bool, secret_id: &str) -> String {
    let mut text = String::from("state_dir = \"{dir}/state\"\n");
    if api {
        text.push_str("[api]\nlisten = \"unix:{dir}/api.sock\"\nkey_file = \"{dir}/api.key\"\n");
    }
    text.push_str(&format!(
        r#"
[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "{CLIENT}"
customer_id = "{CUSTOMER}"
scope = "client-apis"
initial_secret_file = "{{dir}}/maps.secret"
initial_secret_id = "{secret_id}"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
[credentials.rotation]
every = "30d"
grace = "0s"
[[credentials.sinks]]
path = "{{dir}}/maps.token"

[[credentials.tokens]]
name = "maps-read"
scope = "read"
[[credentials.tokens.sinks]]
path = "{{dir}}/read.token"

[[credentials.tokens]]
name = "maps-write"
scope = "write"
[[credentials.tokens.sinks]]
path = "{{dir}}/write.json"
format = "json"
"#,
        token = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
    ));
    text
}

/// A temporary directory with the bootstrap secret and the configuration
/// on disk (`<dir>/rekeyd.toml`, for the CLI).
fn dir(sim: &SimProvider, api: bool) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let (id, secret) = sim.add_secret(CLIENT, "bootstrap");
    write_secret(dir.path(), "maps.secret", &secret);
    let text = config(sim, api, &id);
    let on_disk = text.replace("{dir}", &dir.path().display().to_string());
    std::fs::write(dir.path().join("rekeyd.toml"), on_disk).unwrap();
    (dir, text)
}

async fn sim() -> SimProvider {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    sim
}

fn token_of(d: &TestDaemon, name: &str) -> String {
    d.handle(name)
        .valid_token()
        .unwrap_or_else(|| panic!("{name} serves a valid token"))
        .access_token
        .expose_secret()
        .to_string()
}

/// Polls until `path` holds what `accept` wants (the sink writer runs
/// apart from the engine).
async fn wait_file(path: &Path, accept: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && accept(&text)
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never held the expected token",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Api {
    client: reqwest::Client,
    key: String,
}

impl Api {
    fn new(d: &TestDaemon) -> Api {
        Api {
            client: reqwest::Client::builder()
                .unix_socket(d.dir.path().join("api.sock"))
                .timeout(EVENT_TIMEOUT)
                .build()
                .unwrap(),
            key: d.api_key(),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .request(method, format!("http://localhost{path}"))
            .header(KEY_HEADER, &self.key)
            .send()
            .await
            .expect("the API answers");
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// `rekeyd ARGS --config <dir>/rekeyd.toml`: exit code and stdout.
async fn cli(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"));
    command
        .args(args)
        .arg("--config")
        .arg(dir.join("rekeyd.toml"))
        .env_clear()
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(EVENT_TIMEOUT, command.output())
        .await
        .expect("rekeyd ends in time")
        .unwrap();
    (
        out.status.code().expect("exited"),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[tokio::test]
async fn each_profile_is_served_refreshed_and_written_on_its_own() {
    let sim = sim().await;
    let (dir, text) = dir(&sim, true);
    let d = TestDaemon::start_in(dir, &text).await;
    let path = |f: &str| d.dir.path().join(f);

    // Three tokens of one client, each with the scope it asked for.
    for (name, scope) in [
        ("maps", "client-apis"),
        ("maps-read", "read"),
        ("maps-write", "write"),
    ] {
        let token = wait_token(&d.handle(name), |_| true).await;
        assert_eq!(token.scope.as_deref(), Some(scope), "{name}");
        assert_eq!(
            sim.token_client(token.access_token.expose_secret())
                .as_deref(),
            Some(CLIENT),
            "{name}'s token is the client's"
        );
    }
    let read = token_of(&d, "maps-read");
    let write = token_of(&d, "maps-write");
    assert_ne!(read, write);
    assert_ne!(read, token_of(&d, "maps"));

    // Each profile's own token file, in its own format.
    wait_file(&path("read.token"), |t| t.trim() == read).await;
    wait_file(&path("write.json"), |t| t.contains(&write)).await;
    wait_file(&path("maps.token"), |t| !t.trim().is_empty()).await;

    // The API serves each under its name.
    let api = Api::new(&d);
    let (status, body) = api.send(reqwest::Method::GET, "/v1/token/maps-read").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["access_token"], read.as_str());

    // A forced refresh of one profile replaces its token only.
    let (status, body) = api
        .send(reqwest::Method::POST, "/v1/token/maps-write/refresh")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let fresh = body["access_token"].as_str().unwrap().to_string();
    assert_ne!(fresh, write, "a new token for maps-write");
    assert_eq!(token_of(&d, "maps-write"), fresh);
    assert_eq!(token_of(&d, "maps-read"), read, "maps-read untouched");
    wait_file(&path("write.json"), |t| t.contains(&fresh)).await;

    // A profile is not rotated by itself: its credential is.
    let (status, body) = api
        .send(reqwest::Method::POST, "/v1/rotate/maps-read")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "token_profile");
    assert!(
        body["detail"].as_str().unwrap().contains("\"maps\""),
        "{body}"
    );

    // Status lists every token, a profile with its credential.
    let (status, body) = api.send(reqwest::Method::GET, "/v1/status").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rows = body["credentials"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    assert_eq!(row("maps")["profile_of"], Value::Null);
    for name in ["maps-read", "maps-write"] {
        assert_eq!(row(name)["profile_of"], "maps", "{name}");
        assert_eq!(row(name)["ready"], true, "{name}");
        assert_eq!(row(name)["sinks"][0]["freshness"], "current", "{name}");
    }

    // The command line: the token by profile name, and status.
    let (code, out) = cli(d.dir.path(), &["token", "maps-read"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), read);
    let (code, out) = cli(d.dir.path(), &["token", "no-such-profile"]).await;
    assert_eq!(code, 78, "{out}");
    let (code, out) = cli(d.dir.path(), &["status"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("maps-read: token profile of credential maps"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("maps-write ")), "{out}");

    d.stop().await;
}

#[tokio::test]
async fn a_rotation_of_the_one_secret_refreshes_every_profile() {
    let sim = sim().await;
    let (dir, text) = dir(&sim, false);
    let d = TestDaemon::start_in(dir, &text).await;
    let names = ["maps", "maps-read", "maps-write"];
    for name in names {
        wait_token(&d.handle(name), |_| true).await;
    }
    let before: Vec<String> = names.iter().map(|n| token_of(&d, n)).collect();
    let bootstrap = sim.secrets(CLIENT);
    assert_eq!(bootstrap.len(), 1);

    // Tokens live a day: only the promotion makes the engines log in.
    d.handle("maps").rotate_now.notify_one();
    let status = wait_status(&d.handle("maps"), |s| {
        s.last_rotated_at.is_some() && s.rotation_phase == "idle"
    })
    .await;
    assert!(status.last_rotation_error.is_none(), "{status:?}");

    // One secret, replaced under all three tokens: the old one is gone at
    // the provider (grace 0s), the journal holds the new one.
    let secrets = sim.secrets(CLIENT);
    assert_eq!(secrets.len(), 1, "{secrets:?}");
    assert_ne!(secrets[0].id, bootstrap[0].id, "the secret was replaced");
    for (name, old) in names.iter().zip(&before) {
        let token = wait_token(&d.handle(name), |t| {
            t.access_token.expose_secret() != old.as_str()
        })
        .await;
        assert_eq!(
            sim.token_client(token.access_token.expose_secret())
                .as_deref(),
            Some(CLIENT),
            "{name}: a token of the new secret after the promotion"
        );
    }
    // The profiles kept their scopes through the rotation.
    assert_eq!(
        d.handle("maps-read")
            .valid_token()
            .unwrap()
            .scope
            .as_deref(),
        Some("read")
    );

    // And they keep working on the new secret alone: a forced login of a
    // profile now can only use it.
    let old_read = token_of(&d, "maps-read");
    d.handle("maps-read").refresh_now.notify_one();
    let token = wait_token(&d.handle("maps-read"), |t| {
        t.access_token.expose_secret() != old_read.as_str()
    })
    .await;
    assert_eq!(token.scope.as_deref(), Some("read"));
    d.stop().await;
}

#[tokio::test]
async fn run_once_writes_every_profile() {
    let sim = sim().await;
    let (dir, _) = dir(&sim, false);
    let config = Config::load(&dir.path().join("rekeyd.toml")).unwrap();
    let reports = rekeyd::once::run(&config, CancellationToken::new())
        .await
        .unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["maps", "maps-read", "maps-write"]);
    for report in &reports {
        assert!(report.ok, "{}", report.line());
    }
    assert!(
        reports[1]
            .line()
            .starts_with("maps-read: ok: token profile of maps: token written to 1 file"),
        "{}",
        reports[1].line()
    );
    let read = std::fs::read_to_string(dir.path().join("read.token")).unwrap();
    assert_eq!(
        sim.token_client(read.trim()).as_deref(),
        Some(CLIENT),
        "maps-read's file holds a live token"
    );
    let write: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("write.json")).unwrap())
            .unwrap();
    let write = write["access_token"].as_str().unwrap();
    assert_ne!(write, read.trim());
    assert_eq!(sim.token_client(write).as_deref(), Some(CLIENT));
}
