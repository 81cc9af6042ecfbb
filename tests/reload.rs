//! SIGHUP reloads the configuration of a running `rekeyd run`: credentials
//! added start, removed ones stop (their journals stay), changed ones
//! restart while the token already served stays served, and a new
//! configuration that is invalid, or that names a missing bootstrap secret,
//! is rejected as a whole with a log line naming the key, the old one
//! staying in force.
//!
//! The daemon is a child process; the simulated provider runs in the test;
//! the API listens on a unix socket in the test's temporary directory. A
//! `[credentials.jwks]` `serve_path` a reload adds is served from then on
//! (with a real server, oidc-provider, for the credential's logins).

use std::path::{Path, PathBuf};

use std::time::Duration;

use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use tokio::time::Instant;

#[path = "support/oidc.rs"]
mod oidc;
#[path = "support/process.rs"]
mod process;

use process::{RekeydProcess, TIMEOUT};

/// The daemon and a client for its API socket (`<dir>/api.sock`).
struct Daemon {
    process: RekeydProcess,
    socket: PathBuf,
    client: reqwest::Client,
}

impl Daemon {
    fn spawn(dir: &Path, config: &Path) -> Daemon {
        let socket = dir.join("api.sock");
        Daemon {
            process: RekeydProcess::spawn(config, &dir.join("daemon.log"), &[]),
            client: reqwest::Client::builder()
                .unix_socket(socket.clone())
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            socket,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    fn signal(&self, signal: i32) {
        self.process.signal(signal)
    }

    fn assert_running(&mut self) {
        self.process.assert_running()
    }

    /// Polls (another process: no in-process signal) until `check` holds.
    async fn wait_until(&mut self, what: &str, mut check: impl AsyncFnMut(&Daemon) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !check(self).await {
            self.process.keep_waiting(what, deadline).await;
        }
    }

    /// Waits for the `n`th log line containing `text`.
    async fn wait_log(&mut self, text: &str, n: usize) {
        self.wait_until(&format!("log line #{n} {text:?}"), async |d| {
            d.log().matches(text).count() >= n
        })
        .await
    }

    /// `GET path` with the API key: status and body.
    async fn get(&self, path: &str, key: &str) -> (u16, String) {
        match self
            .client
            .get(format!("http://localhost{path}"))
            .header("X-Rekeyd-Key", key)
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => panic!("GET {path} on {}: {e}", self.socket.display()),
        }
    }

    /// The access token `GET /v1/token/{name}` serves now.
    async fn token(&self, name: &str, key: &str) -> String {
        let (status, body) = self.get(&format!("/v1/token/{name}"), key).await;
        assert_eq!(status, 200, "GET /v1/token/{name}: {body}\n{}", self.log());
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        doc["access_token"].as_str().unwrap().to_string()
    }

    async fn stop(self) {
        self.process.stop().await;
    }
}

struct Setup {
    sim: SimProvider,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// A sim with clients `a`, `b`, `c` and their secrets in files.
    async fn new() -> Setup {
        let sim = SimProvider::start(SimOptions::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c"] {
            let client = format!("{name}-client");
            sim.add_client(&client, "cust");
            let (_, secret) = sim.add_secret(&client, "bootstrap");
            rekeyd::fsutil::write_atomic(
                &dir.path().join(format!("{name}.secret")),
                secret.as_bytes(),
                0o600,
            )
            .unwrap();
        }
        let config = dir.path().join("rekeyd.toml");
        Setup { sim, dir, config }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A credential of client `client` (a, b or c); `extra` goes at the
    /// end of its table (sub-tables included).
    fn credential(&self, name: &str, client: &str, extra: &str) -> String {
        format!(
            r#"
[[credentials]]
name = "{name}"
provider = "mapsindoors"
client_id = "{client}-client"
initial_secret_file = "{dir}/{client}.secret"
{extra}
[credentials.endpoints]
token_url = "{token_url}"
"#,
            dir = self.dir.path().display(),
            token_url = self.sim.mapsindoors_token_url(),
        )
    }

    fn write_config(&self, credentials: &[String]) {
        let d = self.dir.path().display();
        let mut text = format!(
            r#"state_dir = "{d}/state"
[api]
listen = "unix:{d}/api.sock"
key_file = "{d}/api.key"
"#
        );
        for c in credentials {
            text.push_str(c);
        }
        std::fs::write(&self.config, text).unwrap();
    }
}

fn sink(path: &Path) -> String {
    format!("[[credentials.sinks]]\npath = \"{}\"\n", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_removes_and_changes_credentials() {
    let setup = Setup::new().await;
    let a = setup.credential("a", "a", &sink(&setup.path("a.token")));
    let b = setup.credential("b", "b", "");
    let new = setup.credential("new", "c", "");
    setup.write_config(&[a.clone(), b.clone()]);
    let mut daemon = Daemon::spawn(setup.dir.path(), &setup.config);
    daemon
        .wait_until("ready", async |d| {
            d.client
                .get("http://localhost/readyz")
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    let key = std::fs::read_to_string(setup.path("api.key"))
        .unwrap()
        .trim()
        .to_string();
    let token_a = daemon.token("a", &key).await;
    let token_b = daemon.token("b", &key).await;
    assert_eq!(daemon.get("/v1/token/new", &key).await.0, 404);

    // Added: it starts and is served; the others are not touched.
    setup.write_config(&[a.clone(), b.clone(), new.clone()]);
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded", 1).await;
    daemon
        .wait_until("the new credential's token", async |d| {
            d.get("/v1/token/new", &key).await.0 == 200
        })
        .await;
    let token_new = daemon.token("new", &key).await;
    assert_eq!(
        setup.sim.token_client(&token_new).as_deref(),
        Some("c-client")
    );
    assert!(daemon.log().contains("credential added"));
    assert_eq!(daemon.token("a", &key).await, token_a, "a was restarted");
    assert_eq!(daemon.token("b", &key).await, token_b, "b was restarted");

    // Removed: its token is no longer served; its journal stays.
    setup.write_config(&[a.clone(), new.clone()]);
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded", 2).await;
    let (status, body) = daemon.get("/v1/token/b", &key).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_credential"), "{body}");
    assert!(
        setup.path("state/credentials/b.json").exists(),
        "the removed credential's journal was deleted"
    );
    assert_eq!(daemon.token("new", &key).await, token_new);
    // Nor is it monitored: no series left to go stale (and alert) for it.
    let (status, metrics) = daemon.get("/metrics", "").await;
    assert_eq!(status, 200, "{metrics}");
    assert!(metrics.contains(r#"credential="a""#), "{metrics}");
    assert!(!metrics.contains(r#"credential="b""#), "{metrics}");

    // Changed (another sink, another refresh margin): the credential
    // restarts, and a restarted engine logs in at once. With the provider
    // failing that login, what is served right after the reload is the
    // token served before it, through the API and in the new sink file.
    let requests = setup.sim.stats().requests_to(Endpoint::MapsIndoorsToken);
    setup.sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::MapsIndoorsToken),
        fail_next: u32::MAX,
        ..Faults::default()
    });
    let a2_token = setup.path("a2.token");
    let changed_a = setup.credential(
        "a",
        "a",
        &format!(
            "{}[credentials.refresh]\nbefore_expiry = \"1h\"\n",
            sink(&a2_token)
        ),
    );
    setup.write_config(&[changed_a.clone(), new.clone()]);
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded", 2 + 1).await;
    assert!(daemon.log().contains("credential configuration changed"));
    daemon
        .wait_until("the new sink file", async |_| a2_token.exists())
        .await;
    assert_eq!(daemon.token("a", &key).await, token_a);
    assert_eq!(std::fs::read_to_string(&a2_token).unwrap(), token_a);
    daemon
        .wait_until("the restarted engine's login attempt", async |_| {
            setup.sim.stats().requests_to(Endpoint::MapsIndoorsToken) > requests
        })
        .await;
    assert_eq!(daemon.token("a", &key).await, token_a, "token withdrawn");
    // Once the provider answers again, the new sink gets the new token and
    // the old sink file is left alone.
    setup.sim.set_faults(Faults::default());
    daemon
        .wait_until("a new token for a", async |_| {
            std::fs::read_to_string(&a2_token).is_ok_and(|t| t != token_a)
        })
        .await;
    let new_token_a = std::fs::read_to_string(&a2_token).unwrap();
    assert_eq!(daemon.token("a", &key).await, new_token_a);
    assert_eq!(
        std::fs::read_to_string(setup.path("a.token")).unwrap(),
        token_a,
        "the old sink is still written"
    );

    // An invalid configuration (unknown key): rejected with a line naming
    // the key; everything keeps being served as before.
    let typo = setup.credential("a", "a", "refresh_before = \"1h\"");
    setup.write_config(&[typo, new.clone(), b.clone()]);
    daemon.signal(libc::SIGHUP);
    daemon
        .wait_log(
            "new configuration rejected; the previous one stays in force",
            1,
        )
        .await;
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("new configuration rejected"))
        .unwrap();
    assert!(line.contains("refresh_before"), "{line}");
    assert!(line.contains("ERROR"), "{line}");
    daemon.assert_running();
    assert_eq!(daemon.token("a", &key).await, new_token_a);
    assert_eq!(daemon.token("new", &key).await, token_new);
    assert_eq!(daemon.get("/v1/token/b", &key).await.0, 404, "b came back");

    // A credential added with a missing bootstrap secret: the reload is
    // rejected as a whole (`new` is not removed either), naming the key.
    let d = setup.credential("d", "a", "").replace(
        &format!("{}/a.secret", setup.dir.path().display()),
        &format!("{}/missing.secret", setup.dir.path().display()),
    );
    setup.write_config(&[changed_a.clone(), d]);
    daemon.signal(libc::SIGHUP);
    daemon
        .wait_log(
            "reload failed; the previous configuration stays in force",
            1,
        )
        .await;
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("reload failed")).unwrap();
    assert!(
        line.contains("credentials[1].initial_secret_file"),
        "{line}"
    );
    assert!(line.contains("missing.secret"), "{line}");
    daemon.assert_running();
    assert_eq!(daemon.get("/v1/token/d", &key).await.0, 404);
    assert_eq!(
        daemon.token("new", &key).await,
        token_new,
        "new was removed"
    );
    assert_eq!(daemon.token("a", &key).await, new_token_a);
    assert!(!setup.path("state/credentials/d.json").exists());

    // Fixed: the next SIGHUP applies it.
    setup.write_config(&[changed_a, new]);
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded", 4).await;
    assert_eq!(daemon.token("new", &key).await, token_new);

    let log = daemon.log();
    for token in [&token_a, &token_b, &token_new, &new_token_a] {
        assert!(!log.contains(token.as_str()), "a token reached the log");
    }
    daemon.stop().await;
    setup.sim.shutdown().await;
}

/// Token profiles follow a reload like credentials: one added is served,
/// one kept keeps serving the token it had through its credential's
/// restart, and one removed is no longer served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_keeps_and_removes_token_profiles() {
    let setup = Setup::new().await;
    let profile = |name: &str, scope: &str| {
        format!("[[credentials.tokens]]\nname = \"{name}\"\nscope = \"{scope}\"\n")
    };
    let read = profile("a-read", "read");
    let write = profile("a-write", "write");
    setup.write_config(&[setup.credential("a", "a", &read)]);
    let mut daemon = Daemon::spawn(setup.dir.path(), &setup.config);
    daemon
        .wait_until("ready", async |d| {
            d.client
                .get("http://localhost/readyz")
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    let key = std::fs::read_to_string(setup.path("api.key"))
        .unwrap()
        .trim()
        .to_string();
    let token_read = daemon.token("a-read", &key).await;
    assert_eq!(daemon.get("/v1/token/a-write", &key).await.0, 404);

    // Added, and kept: the credential restarts (its configuration
    // changed) and its engines log in at once. With the provider failing
    // those logins, the kept profile still serves the token it had (its
    // channels outlive the restart), and the added one has none yet.
    let requests = setup.sim.stats().requests_to(Endpoint::MapsIndoorsToken);
    setup.sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::MapsIndoorsToken),
        fail_next: u32::MAX,
        ..Faults::default()
    });
    setup.write_config(&[setup.credential("a", "a", &format!("{read}{write}"))]);
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded", 1).await;
    daemon
        .wait_until("the restarted engines' login attempts", async |_| {
            setup.sim.stats().requests_to(Endpoint::MapsIndoorsToken) >= requests + 3
        })
        .await;
    assert_eq!(daemon.token("a-read", &key).await, token_read);
    assert_eq!(daemon.get("/v1/token/a-write", &key).await.0, 503);
    setup.sim.set_faults(Faults::default());
    daemon
        .wait_until("the added profile's token", async |d| {
            d.get("/v1/token/a-write", &key).await.0 == 200
        })
        .await;

    // Removed: neither profile is served any more; the credential is.
    setup.write_config(&[setup.credential("a", "a", "")]);
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded", 2).await;
    for name in ["a-read", "a-write"] {
        let (status, body) = daemon.get(&format!("/v1/token/{name}"), &key).await;
        assert_eq!(status, 404, "{name}: {body}");
    }
    daemon.token("a", &key).await;
    daemon.assert_running();
    daemon.stop().await;
}

/// A reload that adds `[credentials.jwks] serve_path` to a running
/// `private_key_jwt` credential: its restart publishes the key in use
/// (nothing was published before) and the diagnostics listener serves
/// the set at that path from then on; a reload that takes the path away
/// stops serving it. The server knows the key from its registration (its
/// own `jwks`): the point here is what the daemon serves, not a fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adding_a_jwks_serve_path_serves_the_set() {
    use rekeyd::provider::jwks;
    use rekeyd::provider::key::{self, Alg, ClientKey};

    const SERVE_PATH: &str = "/jwks/app.json";
    let pem = key::generate_pem(Alg::Es256).unwrap();
    let key = ClientKey::from_file_text(&pem).unwrap();
    let Some(server) = oidc::OidcServer::start_with(oidc::OidcOptions {
        clients: Some(serde_json::json!([{
            "client_id": "key-client",
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "ES256",
            "jwks": {"keys": [key.public_jwk()]},
        }])),
        ..oidc::OidcOptions::default()
    })
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    rekeyd::fsutil::write_atomic(&dir.path().join("app.key"), pem.as_bytes(), 0o600).unwrap();
    let config = dir.path().join("rekeyd.toml");
    let write_config = |jwks: &str| {
        let text = format!(
            r#"state_dir = "{d}/state"
[diag]
listen = "unix:{d}/diag.sock"

[[credentials]]
name = "app"
provider = "oauth2"
client_id = "key-client"
auth_method = "private_key_jwt"
initial_key_file = "{d}/app.key"
[credentials.endpoints]
token_url = "{token_url}"
{jwks}"#,
            token_url = server.token_url(),
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config("");
    let mut daemon = process::RekeydProcess::spawn(&config, &dir.path().join("daemon.log"), &[]);
    let diag = reqwest::Client::builder()
        .unix_socket(dir.path().join("diag.sock"))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let get = async |path: &str| {
        diag.get(format!("http://localhost{path}"))
            .send()
            .await
            .ok()
    };
    // Ready: the credential logged in with its key.
    let deadline = Instant::now() + TIMEOUT;
    while get("/readyz").await.is_none_or(|r| r.status() != 200) {
        daemon.keep_waiting("ready", deadline).await;
    }
    let status = |r: Option<reqwest::Response>| r.expect("the listener answers").status();
    assert_eq!(status(get(SERVE_PATH).await), 404, "nothing configured yet");

    // Added: published at the credential's restart and served at once.
    write_config(&format!(
        "[credentials.jwks]\nserve_path = \"{SERVE_PATH}\"\n"
    ));
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + TIMEOUT;
    while !daemon.log().contains("configuration reloaded") {
        daemon.keep_waiting("the first reload", deadline).await;
    }
    let reply = get(SERVE_PATH).await.expect("the listener answers");
    assert_eq!(reply.status(), 200, "{}", daemon.log());
    assert_eq!(reply.headers()["content-type"], "application/jwk-set+json");
    let set: serde_json::Value = serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
    assert_eq!(jwks::ids(&set), [key.thumbprint()], "the key in use");
    assert!(set["keys"][0].get("d").is_none(), "public members only");
    assert!(dir.path().join("state/jwks/app.json").exists());
    assert!(
        daemon
            .log()
            .contains("current public key published as the JWK Set"),
        "{}",
        daemon.log()
    );

    // Taken away: no longer served (the file stays where it was).
    write_config("");
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + TIMEOUT;
    while daemon.log().matches("configuration reloaded").count() < 2 {
        daemon.keep_waiting("the second reload", deadline).await;
    }
    assert_eq!(status(get(SERVE_PATH).await), 404);
    assert_eq!(status(get("/readyz").await), 200, "{}", daemon.log());
    let private: serde_json::Value =
        serde_json::from_str(secrecy::ExposeSecret::expose_secret(&key.to_secret())).unwrap();
    let d_member = private["d"].as_str().unwrap();
    assert!(!daemon.log().contains(d_member), "a private key in the log");
    daemon.stop().await;
}
