//! The local HTTP API and the token files, end to end: an in-process daemon
//! (tests/support/daemon.rs) against the simulated provider, spoken to over
//! real HTTP (TCP on port 0, or a unix socket).

#[path = "support/daemon.rs"]
mod daemon;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use daemon::{EVENT_TIMEOUT, TestDaemon, wait_status, wait_token, write_secret};
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::time::Instant;

const KEY_HEADER: &str = "X-Rekeyd-Key";

// ---------------------------------------------------------------------------
// Set-up helpers
// ---------------------------------------------------------------------------

/// Registers `client_id` at the sim with one usable secret, writes that
/// secret to `<dir>/<name>.secret` (the credential's initial_secret_file)
/// and returns its value.
fn register(sim: &SimProvider, dir: &Path, name: &str, client_id: &str) -> String {
    sim.add_client(client_id, "cust");
    let (_, secret) = sim.add_secret(client_id, "bootstrap");
    write_secret(dir, &format!("{name}.secret"), &secret);
    secret
}

/// A `[[credentials]]` block for a MapsIndoors credential at the sim;
/// `extra` is appended (sinks, refresh settings).
fn mapsindoors(name: &str, client_id: &str, sim: &SimProvider, extra: &str) -> String {
    format!(
        r#"
[[credentials]]
name = "{name}"
provider = "mapsindoors"
client_id = "{client_id}"
initial_secret_file = "{{dir}}/{name}.secret"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
{extra}
"#,
        token = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
    )
}

/// A `[[credentials]]` block for a Mappls credential at the sim.
fn mappls(name: &str, client_id: &str, sim: &SimProvider) -> String {
    format!(
        r#"
[[credentials]]
name = "{name}"
provider = "mappls"
client_id = "{client_id}"
initial_secret_file = "{{dir}}/{name}.secret"
[credentials.endpoints]
token_url = "{token}"
"#,
        token = sim.mappls_token_url(),
    )
}

/// The head of a config whose API listens on TCP port 0.
const TCP_API: &str = r#"state_dir = "{dir}/state"
[api]
listen = "127.0.0.1:0"
key_file = "{dir}/api.key"
"#;

/// A client for the daemon's API, over TCP or a unix socket.
struct Api {
    client: reqwest::Client,
    base: String,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply (HTTP {}) is not JSON: {e}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Api {
    fn tcp(d: &TestDaemon) -> Api {
        let addr = d.api_addr.expect("the API listens on TCP");
        Api {
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: format!("http://{addr}"),
        }
    }

    fn unix(socket: &Path) -> Api {
        Api {
            client: reqwest::Client::builder()
                .unix_socket(socket.to_path_buf())
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: "http://localhost".to_string(),
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.client.get(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap().to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get_with_key(&self, path: &str, key: &str) -> Reply {
        self.get(path, &[(KEY_HEADER, key)]).await
    }
}

/// Polls `path` until its content satisfies `accept`. Only used after the
/// token event that makes the sink writer act: the write itself has no
/// signal of its own.
async fn wait_file(path: &Path, what: &str, accept: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && meta.is_file()
            && let Ok(bytes) = std::fs::read(path)
            && accept(&bytes)
        {
            return bytes;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not get {what} within {EVENT_TIMEOUT:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn token_value(token: &rekeyd::token::Token) -> String {
    token.access_token.expose_secret().to_string()
}

// ---------------------------------------------------------------------------
// GET /v1/token/{name}
// ---------------------------------------------------------------------------

#[tokio::test]
async fn token_endpoint_serves_the_token_the_provider_issued() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let config = format!("{TCP_API}{}", mapsindoors("maps", "client-maps", &sim, ""));
    let d = TestDaemon::start_in(dir, &config).await;
    let published = wait_token(&d.handle("maps"), |_| true).await;
    let api = Api::tcp(&d);

    let before = SystemTime::now();
    let reply = api.get_with_key("/v1/token/maps", &d.api_key()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply
            .headers
            .get("cache-control")
            .map(|v| v.to_str().unwrap()),
        Some("no-store"),
        "a token reply must not be cached"
    );
    assert!(
        reply
            .headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("application/json")),
        "content-type: {:?}",
        reply.headers.get("content-type")
    );
    let body = reply.json();

    let access_token = body["access_token"]
        .as_str()
        .expect("access_token is a string");
    assert_eq!(access_token, token_value(&published));
    assert_eq!(
        sim.token_client(access_token).as_deref(),
        Some("client-maps"),
        "the served token is one the provider issued to this client and still valid"
    );
    assert_eq!(body["token_type"], "Bearer");

    let expires_in = body["expires_in"]
        .as_u64()
        .unwrap_or_else(|| panic!("expires_in is a number: {body}"));
    assert!(
        (86_300..=86_400).contains(&expires_in),
        "expires_in {expires_in} should be about the sim's 24h lifetime"
    );
    let expires_at_text = body["expires_at"].as_str().expect("expires_at is a string");
    let expires_at = humantime::parse_rfc3339(expires_at_text)
        .unwrap_or_else(|e| panic!("expires_at {expires_at_text:?} is not RFC 3339: {e}"));
    let lifetime = expires_at
        .duration_since(before)
        .expect("expires_at is in the future");
    assert!(
        lifetime > Duration::from_secs(86_300) && lifetime <= Duration::from_secs(86_401),
        "expires_at is {lifetime:?} from now"
    );
    let fields: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        fields,
        ["access_token", "expires_at", "expires_in", "token_type"],
        "unexpected fields in {body}"
    );

    d.stop().await;
}

#[tokio::test]
async fn token_endpoint_refuses_missing_wrong_key_unknown_name_and_proxies() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let config = format!("{TCP_API}{}", mapsindoors("maps", "client-maps", &sim, ""));
    let d = TestDaemon::start_in(dir, &config).await;
    let token = token_value(wait_token(&d.handle("maps"), |_| true).await.as_ref());
    let api = Api::tcp(&d);
    let key = d.api_key();
    assert!(!key.is_empty());

    // The right key works (so the refusals below are about what they test).
    assert_eq!(
        api.get_with_key("/v1/token/maps", &key).await.status,
        StatusCode::OK
    );

    let wrong = format!("{key}x");
    let prefix = &key[..key.len() - 1];
    let cases: [(&str, Vec<(&str, &str)>); 5] = [
        ("no key", vec![]),
        ("empty key", vec![(KEY_HEADER, "")]),
        ("wrong key", vec![(KEY_HEADER, "not-the-key")]),
        ("key plus a character", vec![(KEY_HEADER, wrong.as_str())]),
        ("prefix of the key", vec![(KEY_HEADER, prefix)]),
    ];
    for (what, headers) in &cases {
        let reply = api.get("/v1/token/maps", headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(reply.json()["error"], "missing_or_wrong_key", "{what}");
        assert!(!reply.text().contains(&token), "{what}: token leaked");
    }

    // Unknown credential, with the right key: 404 (without the key: 401, so
    // the API does not tell strangers which names exist).
    let reply = api.get_with_key("/v1/token/nope", &key).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    assert_eq!(reply.json()["error"], "unknown_credential");
    assert_eq!(
        api.get("/v1/token/nope", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Relayed by a proxy: refused even with the right key, on every route.
    for path in ["/v1/token/maps", "/v1/status", "/livez", "/readyz"] {
        let reply = api
            .get(
                path,
                &[(KEY_HEADER, key.as_str()), ("X-Forwarded-For", "10.1.2.3")],
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(reply.json()["error"], "forwarded_request", "{path}");
        assert!(!reply.text().contains(&token), "{path}: token leaked");
    }

    d.stop().await;
}

// ---------------------------------------------------------------------------
// Health, readiness, status
// ---------------------------------------------------------------------------

#[tokio::test]
async fn readiness_waits_for_every_credential_and_status_holds_no_secrets() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let maps_secret = register(&sim, dir.path(), "maps", "client-maps");
    let places_secret = register(&sim, dir.path(), "places", "client-places");
    // The Mappls endpoint is down from the start: "places" gets no token.
    sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::MapplsToken),
        fail_next: 1000,
        ..Faults::default()
    });
    let config = format!(
        "{TCP_API}{}{}",
        mapsindoors("maps", "client-maps", &sim, ""),
        mappls("places", "client-places", &sim)
    );
    let d = TestDaemon::start_in(dir, &config).await;
    let api = Api::tcp(&d);
    let key = d.api_key();

    // Liveness needs no key and no token.
    let reply = api.get("/livez", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let maps_token = token_value(wait_token(&d.handle("maps"), |_| true).await.as_ref());
    wait_status(&d.handle("places"), |s| s.consecutive_failures >= 1).await;

    // One credential without a token: not ready.
    let reply = api.get("/readyz", &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    let body = reply.json();
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["credentials"]["maps"], true, "{body}");
    assert_eq!(body["credentials"]["places"], false, "{body}");

    // Its token endpoint says so, and why, without a token.
    let reply = api.get_with_key("/v1/token/places", &key).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"], "no_valid_token");

    // Status needs the key.
    let reply = api.get("/v1/status", &[]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = api.get_with_key("/v1/status", "wrong").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    let reply = api.get_with_key("/v1/status", &key).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = reply.text();
    for (what, value) in [
        ("maps token", maps_token.as_str()),
        ("maps secret", maps_secret.as_str()),
        ("places secret", places_secret.as_str()),
        ("API key", key.as_str()),
    ] {
        assert!(!text.contains(value), "/v1/status leaks the {what}");
    }
    let body = reply.json();
    let rows = body["credentials"].as_array().expect("credentials array");
    assert_eq!(rows.len(), 2, "{body}");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no status row for {name}: {body}"))
    };
    let maps = row("maps");
    assert_eq!(maps["provider"], "mapsindoors");
    assert_eq!(maps["ready"], true);
    assert_eq!(maps["consecutive_failures"], 0);
    assert!(maps["last_error"].is_null(), "{maps}");
    assert_eq!(maps["locked_out"], false);
    assert_eq!(maps["rotation_phase"], "idle");
    let expires = maps["token_expires_at"]
        .as_str()
        .expect("token_expires_at is set");
    humantime::parse_rfc3339(expires).expect("token_expires_at is RFC 3339");
    assert!(maps["last_refresh_at"].is_string(), "{maps}");
    let places = row("places");
    assert_eq!(places["provider"], "mappls");
    assert_eq!(places["ready"], false);
    assert!(
        places["consecutive_failures"].as_u64().unwrap() >= 1,
        "{places}"
    );
    assert!(places["last_error"].is_string(), "{places}");
    assert!(places["token_expires_at"].is_null(), "{places}");

    // The provider recovers; once "places" has a token, the daemon is ready.
    sim.set_faults(Faults::default());
    d.handle("places").refresh_now.notify_one();
    wait_token(&d.handle("places"), |_| true).await;
    let reply = api.get("/readyz", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["credentials"]["places"], true, "{body}");

    d.stop().await;
}

// ---------------------------------------------------------------------------
// API key file
// ---------------------------------------------------------------------------

#[tokio::test]
async fn missing_api_key_file_is_created_with_mode_0640() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let key_file = dir.path().join("keys/api.key");
    assert!(!key_file.exists());
    let config = format!(
        r#"state_dir = "{{dir}}/state"
[api]
listen = "127.0.0.1:0"
key_file = "{{dir}}/keys/api.key"
{}"#,
        mapsindoors("maps", "client-maps", &sim, "")
    );
    let d = TestDaemon::start_in(dir, &config).await;

    let meta = std::fs::symlink_metadata(&key_file).expect("the key file was created");
    assert!(meta.is_file());
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o640,
        "API key file mode"
    );
    let key = std::fs::read_to_string(&key_file).unwrap();
    let key = key.trim();
    assert!(
        key.len() >= 32,
        "the generated key is too short: {} chars",
        key.len()
    );

    wait_token(&d.handle("maps"), |_| true).await;
    let api = Api::tcp(&d);
    assert_eq!(
        api.get_with_key("/v1/token/maps", key).await.status,
        StatusCode::OK
    );

    d.stop().await;
}

#[tokio::test]
async fn existing_api_key_file_is_used_as_is() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let key_file = dir.path().join("api.key");
    let content = "operator-chosen-key-0123456789\n";
    rekeyd::fsutil::write_atomic(&key_file, content.as_bytes(), 0o600).unwrap();
    let config = format!("{TCP_API}{}", mapsindoors("maps", "client-maps", &sim, ""));
    let d = TestDaemon::start_in(dir, &config).await;
    wait_token(&d.handle("maps"), |_| true).await;

    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), content);
    assert_eq!(mode_of(&key_file), 0o600, "the key file's mode was changed");
    let api = Api::tcp(&d);
    assert_eq!(
        api.get_with_key("/v1/token/maps", "operator-chosen-key-0123456789")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.get_with_key("/v1/token/maps", "another-key")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    d.stop().await;
}

// ---------------------------------------------------------------------------
// Unix socket
// ---------------------------------------------------------------------------

#[tokio::test]
async fn api_on_a_unix_socket_with_mode_0660() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let socket = dir.path().join("api.sock");
    let config = format!(
        r#"state_dir = "{{dir}}/state"
[api]
listen = "unix:{{dir}}/api.sock"
key_file = "{{dir}}/api.key"
{}"#,
        mapsindoors("maps", "client-maps", &sim, "")
    );
    let d = TestDaemon::start_in(dir, &config).await;
    assert_eq!(d.api_addr, None, "no TCP address for a unix socket API");

    let meta = std::fs::symlink_metadata(&socket).expect("the socket exists");
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        socket.display()
    );
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "socket mode");

    let token = token_value(wait_token(&d.handle("maps"), |_| true).await.as_ref());
    let api = Api::unix(&socket);
    assert_eq!(api.get("/livez", &[]).await.status, StatusCode::OK);
    assert_eq!(api.get("/readyz", &[]).await.status, StatusCode::OK);
    assert_eq!(
        api.get("/v1/token/maps", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reply = api.get_with_key("/v1/token/maps", &d.api_key()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["access_token"].as_str(), Some(token.as_str()));
    assert_eq!(sim.token_client(&token).as_deref(), Some("client-maps"));

    d.stop().await;
}

// ---------------------------------------------------------------------------
// Token files
// ---------------------------------------------------------------------------

/// `[[credentials.sinks]]` entries for files in `out`. The tests keep
/// `out` in a temporary directory of their own, so that it outlives the
/// daemon (whose directory goes with [`TestDaemon::stop`]).
fn sinks(out: &Path, entries: &[(&str, &str, Option<&str>)]) -> String {
    entries
        .iter()
        .map(|(file, format, mode)| {
            let mode = mode.map_or(String::new(), |m| format!("mode = \"{m}\"\n"));
            format!(
                "[[credentials.sinks]]\npath = \"{}\"\nformat = \"{format}\"\n{mode}",
                out.join(file).display()
            )
        })
        .collect()
}

/// Temporary files the atomic writer left behind in `dir`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".tmp."))
        .collect()
}

#[tokio::test]
async fn token_files_have_their_format_and_exact_mode() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_path_buf();
    let sink_config = sinks(
        &out,
        &[
            ("token.raw", "raw", Some("0640")),
            ("token.json", "json", Some("0440")),
            // No mode: the owner-only default.
            ("token.header", "header", None),
        ],
    );
    let config = format!(
        "{TCP_API}{}",
        mapsindoors("maps", "client-maps", &sim, &sink_config)
    );
    let d = TestDaemon::start_in(dir, &config).await;
    let token = token_value(wait_token(&d.handle("maps"), |_| true).await.as_ref());

    let raw = wait_file(&out.join("token.raw"), "the token", |b| {
        b == token.as_bytes()
    })
    .await;
    assert_eq!(raw, token.as_bytes(), "raw: the bare token, no newline");

    let header = wait_file(&out.join("token.header"), "the token", |b| {
        String::from_utf8_lossy(b).contains(&token)
    })
    .await;
    assert_eq!(
        String::from_utf8(header).unwrap(),
        format!("Authorization: Bearer {token}\n")
    );

    let json = wait_file(&out.join("token.json"), "the token", |b| {
        String::from_utf8_lossy(b).contains(&token)
    })
    .await;
    assert!(json.ends_with(b"\n"), "json sink ends with a newline");
    let doc: Value = serde_json::from_slice(&json).expect("json sink is JSON");
    assert_eq!(doc["access_token"].as_str(), Some(token.as_str()));
    assert_eq!(doc["token_type"], "Bearer");
    let expires_at = doc["expires_at"].as_str().expect("expires_at");
    let expires_at = humantime::parse_rfc3339(expires_at).expect("expires_at is RFC 3339");
    assert!(expires_at > SystemTime::now() + Duration::from_secs(86_000));

    assert_eq!(mode_of(&out.join("token.raw")), 0o640, "raw sink mode");
    assert_eq!(mode_of(&out.join("token.json")), 0o440, "json sink mode");
    assert_eq!(
        mode_of(&out.join("token.header")),
        0o600,
        "default sink mode"
    );

    d.stop().await;
    assert_eq!(leftovers(&out), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn token_files_are_rewritten_when_a_new_token_arrives() {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(2),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_path_buf();
    let sink_config = sinks(
        &out,
        &[
            ("token.raw", "raw", Some("0640")),
            ("token.json", "json", Some("0640")),
        ],
    );
    let config = format!(
        "{TCP_API}{}",
        mapsindoors("maps", "client-maps", &sim, &sink_config)
    );
    let d = TestDaemon::start_in(dir, &config).await;
    let handle = d.handle("maps");
    let raw_path = out.join("token.raw");
    let json_path = out.join("token.json");

    // Whatever token the file holds first (on a starved machine it may not
    // be the very first one), it is one the provider issued.
    let valid = |b: &[u8]| {
        std::str::from_utf8(b).is_ok_and(|t| sim.token_client(t).as_deref() == Some("client-maps"))
    };
    wait_token(&handle, |_| true).await;
    let first = wait_file(&raw_path, "a valid token", valid).await;
    let first = String::from_utf8(first).unwrap();

    // The next token event (the engine refreshes well before the 2s
    // lifetime runs out), then the file follows it.
    let next = token_value(
        wait_token(&handle, |t| token_value(t) != first)
            .await
            .as_ref(),
    );
    assert_ne!(next, first);
    let rewritten = wait_file(&raw_path, "a newer valid token", |b| {
        b != first.as_bytes() && valid(b)
    })
    .await;
    assert_ne!(rewritten, first.as_bytes());
    let json_token = |b: &[u8]| {
        serde_json::from_slice::<Value>(b)
            .ok()
            .and_then(|doc| doc["access_token"].as_str().map(str::to_owned))
    };
    wait_file(&json_path, "a newer token", |b| {
        json_token(b).is_some_and(|t| t != first && !t.is_empty())
    })
    .await;
    assert_eq!(mode_of(&raw_path), 0o640, "mode kept across rewrites");
    assert_eq!(mode_of(&json_path), 0o640, "mode kept across rewrites");

    d.stop().await;
    assert_eq!(leftovers(&out), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn token_file_replaces_a_symlink_instead_of_writing_through_it() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_path_buf();
    // An existing file the link points at, and a dangling link whose target
    // must not be created.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&victim, out.join("token.raw")).unwrap();
    let nowhere = dir.path().join("nowhere");
    std::os::unix::fs::symlink(&nowhere, out.join("token.header")).unwrap();

    let sink_config = sinks(
        &out,
        &[
            ("token.raw", "raw", Some("0640")),
            ("token.header", "header", None),
        ],
    );
    let config = format!(
        "{TCP_API}{}",
        mapsindoors("maps", "client-maps", &sim, &sink_config)
    );
    let d = TestDaemon::start_in(dir, &config).await;
    let token = token_value(wait_token(&d.handle("maps"), |_| true).await.as_ref());

    // wait_file only accepts a regular file, not the link.
    wait_file(&out.join("token.raw"), "the token", |b| {
        b == token.as_bytes()
    })
    .await;
    wait_file(&out.join("token.header"), "the token", |b| {
        String::from_utf8_lossy(b).contains(&token)
    })
    .await;
    for link in ["token.raw", "token.header"] {
        let meta = std::fs::symlink_metadata(out.join(link)).unwrap();
        assert!(meta.is_file(), "{link} is still a symlink");
    }
    assert_eq!(mode_of(&out.join("token.raw")), 0o640);
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"keep me",
        "the token was written through the symlink"
    );
    assert_eq!(mode_of(&victim), 0o644, "the link target's mode changed");
    assert!(
        std::fs::symlink_metadata(&nowhere).is_err(),
        "a dangling symlink's target was created"
    );

    d.stop().await;
}

#[tokio::test]
async fn a_second_daemon_does_not_take_over_a_live_unix_socket() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    let socket = dir.path().join("api.sock");
    let config = format!(
        r#"state_dir = "{{dir}}/state"
[api]
listen = "unix:{{dir}}/api.sock"
key_file = "{{dir}}/api.key"
{}"#,
        mapsindoors("maps", "client-maps", &sim, "")
    );
    let first = TestDaemon::start_in(dir, &config).await;
    wait_token(&first.handle("maps"), |_| true).await;

    // Same socket, own state: must refuse to start rather than unlink the
    // running daemon's socket and answer in its place.
    let other = tempfile::tempdir().unwrap();
    register(&sim, other.path(), "maps", "client-maps");
    let text = config
        .replace("{dir}/api.sock", &socket.display().to_string())
        .replace("{dir}", &other.path().display().to_string());
    let second_config = rekeyd::config::Config::from_toml(&text).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    match rekeyd::daemon::start(&second_config, shutdown.clone()).await {
        Ok(_) => panic!("a second daemon started on a socket that is in use"),
        Err(e) => assert!(e.to_string().contains("api.sock"), "{e}"),
    }
    shutdown.cancel();

    // The first daemon still answers on its socket.
    let api = Api::unix(&socket);
    let reply = api.get_with_key("/v1/token/maps", &first.api_key()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    first.stop().await;
}

#[tokio::test]
async fn a_stale_unix_socket_is_replaced() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path(), "maps", "client-maps");
    // A socket file nobody listens on, as a killed daemon leaves behind.
    let socket = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let config = format!(
        r#"state_dir = "{{dir}}/state"
[api]
listen = "unix:{{dir}}/api.sock"
key_file = "{{dir}}/api.key"
{}"#,
        mapsindoors("maps", "client-maps", &sim, "")
    );
    let d = TestDaemon::start_in(dir, &config).await;
    let api = Api::unix(&socket);
    assert_eq!(api.get("/livez", &[]).await.status, StatusCode::OK);
    d.stop().await;
}
