//! I7: no secret, token or API key in any log line. The daemon binary runs
//! through a full cycle (bootstrap, logins, refreshes, secret rotations,
//! rejected secret, 5xx, garbage and dropped replies, API and file serving,
//! shutdown) with `RUST_LOG=trace`, in text and JSON format, and every byte
//! it wrote is scanned for the values.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rekeyd::sim::{FaultScope, Faults, SimOptions, SimProvider};

/// Polling is the only way to observe another process; bounded.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A failed assertion must not leave the daemon running.
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn config(dir: &Path, sim: &SimProvider, log_format: &str) -> String {
    let d = dir.display();
    format!(
        r#"state_dir = "{d}/state"
[api]
listen = "unix:{d}/api.sock"
key_file = "{d}/api.key"
[log]
format = "{log_format}"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "maps-client"
customer_id = "cust"
initial_secret_file = "{d}/maps.secret"
[credentials.endpoints]
token_url = "{maps}"
secrets_url = "{secrets}"
[credentials.rotation]
every = "1s"
grace = "0s"
[[credentials.sinks]]
path = "{d}/maps.token"
format = "header"

[[credentials]]
name = "places"
provider = "mappls"
client_id = "places-client"
initial_secret_file = "{d}/places.secret"
[credentials.endpoints]
token_url = "{mappls}"
[[credentials.sinks]]
path = "{d}/places.json"
format = "json"

[[credentials]]
name = "idp"
provider = "oauth2"
client_id = "idp-client"
initial_secret_file = "{d}/idp.secret"
[credentials.endpoints]
token_url = "{oauth2}"
"#,
        maps = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
        mappls = sim.mappls_token_url(),
        oauth2 = sim.oauth2_token_url(),
    )
}

fn rekeyd(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rekeyd"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "trace");
    cmd
}

async fn full_cycle_leaks_nothing(log_format: &str) {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(3),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut secrets = Vec::new();
    for (client, file) in [
        ("maps-client", "maps"),
        ("places-client", "places"),
        ("idp-client", "idp"),
    ] {
        sim.add_client(client, "cust");
        let (_, value) = sim.add_secret(client, "bootstrap");
        secrets.push(value.clone());
        // places starts with a wrong secret: the rejection path logs too.
        let value = if file == "places" {
            format!("wrong-{value}")
        } else {
            value
        };
        std::fs::write(dir.path().join(format!("{file}.secret")), &value).unwrap();
        secrets.push(value);
    }
    let config_path = dir.path().join("rekeyd.toml");
    std::fs::write(&config_path, config(dir.path(), &sim, log_format)).unwrap();

    let mut child = KillOnDrop(
        rekeyd(&["run"], &config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).unwrap();
        buf
    });

    wait_until("first logins", || sim.stats().logins_ok >= 2).await;
    // Rotated secrets of "maps" are collected while they live.
    let mut seen_secrets = std::collections::HashSet::new();
    let mut remember = |sim: &SimProvider| {
        for s in sim.secrets("maps-client") {
            seen_secrets.insert(s.value);
        }
    };
    wait_until("two completed rotations", || {
        remember(&sim);
        sim.stats().secrets_deleted >= 2
    })
    .await;
    // "places" holds a wrong secret, so once rejected it stays locked out
    // with the provider's rejection as its last error until the faults
    // below (which may replace that error with a 5xx). The status the CLI
    // prints then, provider text included, is scanned with the logs.
    let mut status_text = String::new();
    wait_until("the rejection of places in rekeyd status", || {
        let out = rekeyd(&["status", "--json"], &config_path)
            .output()
            .unwrap();
        status_text = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<serde_json::Value>(&status_text).is_ok_and(|doc| {
            doc["credentials"].as_array().is_some_and(|rows| {
                rows.iter().any(|row| {
                    row["name"] == "places"
                        && row["locked_out"] == true
                        && row["last_error"]
                            .as_str()
                            .is_some_and(|e| e.contains("invalid_client"))
                })
            })
        })
    })
    .await;

    // Transient trouble on every token endpoint, one kind after another.
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        fail_next: 2,
        garbage_next: 1,
        drop_next: 1,
        ..Faults::default()
    });
    wait_until("faults consumed", || {
        let f = sim.faults();
        f.fail_next + f.garbage_next + f.drop_next == 0
    })
    .await;
    let logins = sim.stats().logins_ok;
    wait_until("refreshes after the faults", || {
        sim.stats().logins_ok >= logins + 4
    })
    .await;

    // Serve tokens through the API (the CLI) and read the token files.
    let mut served = Vec::new();
    for name in ["maps", "idp"] {
        // Right after a burst of faults a credential may be between tokens
        // for a moment: ask again (bounded) rather than fail.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let out = loop {
            let out = rekeyd(&["token", name], &config_path).output().unwrap();
            if out.status.success() || tokio::time::Instant::now() > deadline {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            out.status.success(),
            "rekeyd token {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(token.starts_with("sim_"), "a sim token was served");
        served.push(token);
        // The CLI's own logs are scanned too.
        let cli_logs = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !cli_logs.contains("sim_"),
            "rekeyd token logged a token: {cli_logs}"
        );
    }
    let file = std::fs::read_to_string(dir.path().join("maps.token")).unwrap();
    assert!(file.starts_with("Authorization: Bearer sim_"));

    remember(&sim);
    secrets.extend(seen_secrets);
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let exit = child.wait().unwrap();
    assert!(exit.success(), "daemon exits 0 on SIGTERM: {exit:?}");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let logs = String::from_utf8(stderr_reader.join().unwrap()).unwrap() + &stdout + &status_text;

    assert!(
        logs.len() > 10_000,
        "trace logging was on ({} bytes)",
        logs.len()
    );
    assert!(logs.contains("token refreshed"), "the cycle was logged");
    // Every token the sim issues starts with "sim_": none may appear at all.
    if let Some(at) = logs.find("sim_") {
        panic!(
            "a token reached the logs: ...{}...",
            &logs[at.saturating_sub(200)..at + 10]
        );
    }
    let key = std::fs::read_to_string(dir.path().join("api.key")).unwrap();
    for value in secrets
        .iter()
        .chain(served.iter())
        .chain([&key.trim().to_string()])
    {
        assert!(
            !logs.contains(value.as_str()),
            "a secret value reached the logs"
        );
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_at_trace_hold_no_secret_or_token() {
    full_cycle_leaks_nothing("text").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_at_trace_hold_no_secret_or_token() {
    full_cycle_leaks_nothing("json").await;
}

// ---------------------------------------------------------------------------
// Provider text: stand-ins that echo every secret they can, a token reply
// whose lifetime is already over, secret-API refusals, and a configuration
// typo next to an assertion. Nothing of it may reach the logs (text and
// JSON, trace level), `rekeyd status --json`, GET /v1/status, the API's 503
// detail, GET /metrics or stderr.
// ---------------------------------------------------------------------------

/// An assertion an operator put in `extra_params` (RFC 7521).
const ASSERTION: &str = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJzdmMifQ.assertion-signature";

/// The daemon's stderr, read as it is written.
struct Stderr(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Stderr {
    fn capture(mut pipe: std::process::ChildStderr) -> Stderr {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buffer.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Stderr(buffer)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The local API on its unix socket.
struct Api {
    client: reqwest::Client,
    key: String,
}

impl Api {
    fn new(dir: &Path) -> Api {
        let client = reqwest::Client::builder()
            .unix_socket(dir.join("api.sock"))
            .build()
            .unwrap();
        let key = std::fs::read_to_string(dir.join("api.key"))
            .unwrap()
            .trim()
            .to_string();
        Api { client, key }
    }

    async fn request(&self, method: reqwest::Method, path: &str) -> (u16, String) {
        let response = self
            .client
            .request(method, format!("http://localhost{path}"))
            .header("X-Rekeyd-Key", &self.key)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        self.request(reqwest::Method::GET, path).await
    }

    async fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/v1/status").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The status row of one credential.
    async fn credential(&self, name: &str) -> serde_json::Value {
        self.status().await["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no credential {name} in the status"))
    }
}

/// Polls `check` (an async condition) until it holds, for up to a minute.
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Sims {
    /// Echoes every secret on its token endpoints (idp, idp-post, places).
    echo: SimProvider,
    /// Answers every login with `expires_in: 0` (zero).
    zero: SimProvider,
    /// The rotating MapsIndoors credential (maps).
    maps: SimProvider,
}

fn echo_config(dir: &Path, sims: &Sims, log_format: &str, maps_secret_id: &str) -> String {
    let d = dir.display();
    format!(
        r#"state_dir = "{d}/state"
[api]
listen = "unix:{d}/api.sock"
key_file = "{d}/api.key"
[log]
format = "{log_format}"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "maps-client"
customer_id = "cust"
initial_secret_file = "{d}/maps.secret"
initial_secret_id = "{maps_secret_id}"
[credentials.endpoints]
token_url = "{maps_token}"
secrets_url = "{maps_secrets}"
[credentials.rotation]
every = "24h"
grace = "0s"

[[credentials]]
name = "places"
provider = "mappls"
client_id = "places-client"
initial_secret_file = "{d}/places.secret"
[credentials.endpoints]
token_url = "{mappls}"

[[credentials]]
name = "idp"
provider = "oauth2"
client_id = "idp-client"
initial_secret_file = "{d}/idp.secret"
extra_params = {{ client_assertion = "{ASSERTION}" }}
[credentials.endpoints]
token_url = "{oauth2}"

[[credentials]]
name = "idp-post"
provider = "oauth2"
auth_method = "client_secret_post"
client_id = "idp-post-client"
initial_secret_file = "{d}/idp-post.secret"
extra_params = {{ client_assertion = "{ASSERTION}" }}
[credentials.endpoints]
token_url = "{oauth2}"

[[credentials]]
name = "zero"
provider = "mapsindoors"
client_id = "zero-client"
initial_secret_file = "{d}/zero.secret"
[credentials.endpoints]
token_url = "{zero}"
[[credentials.sinks]]
path = "{d}/zero.token"
"#,
        maps_token = sims.maps.mapsindoors_token_url(),
        maps_secrets = sims.maps.mapsindoors_secrets_url(),
        mappls = sims.echo.mappls_token_url(),
        oauth2 = sims.echo.oauth2_token_url(),
        zero = sims.zero.mapsindoors_token_url(),
    )
}

async fn echoed_provider_text_leaks_nothing(log_format: &str) {
    use rekeyd::sim::{ExpiresIn, TokenReply};
    let options = SimOptions {
        token_lifetime: Duration::from_secs(3),
        ..SimOptions::default()
    };
    let sims = Sims {
        echo: SimProvider::start(options.clone()).await.unwrap(),
        zero: SimProvider::start(options.clone()).await.unwrap(),
        maps: SimProvider::start(options).await.unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut secrets = vec![ASSERTION.to_string()];
    let mut add = |sim: &SimProvider, client: &str, file: &str| {
        sim.add_client(client, "cust");
        let (id, value) = sim.add_secret(client, "bootstrap");
        std::fs::write(dir.path().join(format!("{file}.secret")), &value).unwrap();
        secrets.push(value);
        id
    };
    let maps_id = add(&sims.maps, "maps-client", "maps");
    add(&sims.echo, "places-client", "places");
    add(&sims.echo, "idp-client", "idp");
    add(&sims.echo, "idp-post-client", "idp-post");
    add(&sims.zero, "zero-client", "zero");
    // From the first request on: every token request to the echo sim is
    // refused with the request's secrets in every field; every token the
    // zero sim issues comes with `expires_in: 0`.
    sims.echo.set_faults(Faults {
        scope: FaultScope::Token,
        echo_next: u32::MAX,
        ..Faults::default()
    });
    sims.zero.set_token_reply(TokenReply {
        expires_in: ExpiresIn::Fixed(serde_json::json!(0)),
        ..TokenReply::default()
    });

    let config_path = dir.path().join("rekeyd.toml");
    let config_text = echo_config(dir.path(), &sims, log_format, &maps_id);
    std::fs::write(&config_path, &config_text).unwrap();
    let mut child = KillOnDrop(
        rekeyd(&["run"], &config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = Stderr::capture(child.stderr.take().unwrap());
    // Everything shown to anyone, to be scanned at the end.
    let mut shown = Vec::new();

    wait_until("the API key", || dir.path().join("api.sock").exists()).await;
    let api = Api::new(dir.path());
    wait_for(
        "the echoed refusals and the zero lifetime in the status",
        || async {
            let status = api.status().await.to_string();
            status.matches("[redacted]").count() >= 3 && status.contains("expires_in 0")
        },
    )
    .await;
    for name in ["places", "idp", "idp-post", "zero"] {
        let (code, body) = api.get(&format!("/v1/token/{name}")).await;
        assert_eq!(code, 503, "{name}: {body}");
        let expected = if name == "zero" {
            "token endpoint returned expires_in 0"
        } else {
            "[redacted]"
        };
        assert!(body.contains(expected), "{name}: {body}");
        shown.push(body);
    }
    assert!(
        !dir.path().join("zero.token").exists(),
        "an expired token reached a sink"
    );

    // The rotating credential: its secret API echoes, then refuses for good.
    wait_for("a token for maps", || async {
        api.get("/v1/token/maps").await.0 == 200
    })
    .await;
    sims.maps.set_faults(Faults {
        scope: FaultScope::Secrets,
        echo_next: 1,
        ..Faults::default()
    });
    assert_eq!(
        api.request(reqwest::Method::POST, "/v1/rotate/maps")
            .await
            .0,
        202
    );
    wait_for("an echoed secret-API refusal", || async {
        api.credential("maps").await["rotation_needs_operator"] == "[redacted]"
    })
    .await;
    shown.push(api.status().await.to_string());
    sims.maps.set_faults(Faults {
        too_many_secrets: true,
        ..Faults::default()
    });
    assert_eq!(
        api.request(reqwest::Method::POST, "/v1/rotate/maps")
            .await
            .0,
        202
    );
    wait_for("too many secrets", || async {
        api.credential("maps").await["rotation_needs_operator"] == "too_many_secrets"
    })
    .await;
    shown.push(api.status().await.to_string());
    let text_status = rekeyd(&["status"], &config_path).output().unwrap();
    let text_status = String::from_utf8_lossy(&text_status.stdout).into_owned();
    assert!(
        text_status.contains("maps: rotation needs operator: too_many_secrets"),
        "{text_status}"
    );
    shown.push(text_status);
    sims.maps.set_faults(Faults::default());
    assert_eq!(
        api.request(reqwest::Method::POST, "/v1/rotate/maps")
            .await
            .0,
        202
    );
    wait_for("the rotation once fixed", || async {
        let row = api.credential("maps").await;
        row["rotation_needs_operator"].is_null()
            && row["last_rotated_at"].is_string()
            && row["rotation_phase"] == "idle"
    })
    .await;
    for s in sims.maps.secrets("maps-client") {
        secrets.push(s.value);
    }
    // Its token endpoint echoes too, at the next refreshes.
    sims.maps.set_faults(Faults {
        scope: FaultScope::Token,
        echo_next: 2,
        ..Faults::default()
    });
    wait_for("an echoed refusal for maps", || async {
        api.credential("maps").await["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("[redacted]"))
    })
    .await;
    shown.push(api.status().await.to_string());
    let (code, metrics) = api.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("rekeyd_rotation_needs_operator"),
        "{metrics}"
    );
    shown.push(metrics);
    let status = rekeyd(&["status", "--json"], &config_path)
        .output()
        .unwrap();
    shown.push(String::from_utf8_lossy(&status.stdout).into_owned());
    shown.push(String::from_utf8_lossy(&status.stderr).into_owned());
    let text_status = rekeyd(&["status"], &config_path).output().unwrap();
    shown.push(String::from_utf8_lossy(&text_status.stdout).into_owned());

    // A typo on the line of the assertion: `rekeyd check` and a reload
    // report its position, not its text.
    let broken = config_text.replace(
        &format!("client_assertion = \"{ASSERTION}\" }}"),
        &format!("client_assertion = \"{ASSERTION}\" oops }}"),
    );
    assert_ne!(broken, config_text);
    std::fs::write(&config_path, &broken).unwrap();
    let check = rekeyd(&["check"], &config_path).output().unwrap();
    assert_eq!(check.status.code(), Some(78));
    let check_err = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(
        check_err.contains("TOML syntax error at line"),
        "{check_err}"
    );
    shown.push(check_err);
    // Signals through kill(2): kill(1) comes with procps, which a fresh
    // machine (a slim Rust image) may lack.
    let pid = child.id() as i32;
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_until("the reload to be refused", || {
        stderr.text().contains("TOML syntax error at line")
    })
    .await;

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let exit = child.wait().unwrap();
    assert!(exit.success(), "daemon exits 0 on SIGTERM: {exit:?}");
    let logs = stderr.text();
    assert!(
        logs.len() > 10_000,
        "trace logging was on ({} bytes)",
        logs.len()
    );
    for needle in [
        "[redacted]",
        "token endpoint returned expires_in 0",
        "rotation needs an operator",
        "too_many_secrets",
    ] {
        assert!(logs.contains(needle), "the logs lack {needle:?}");
    }
    shown.push(logs);

    let key = std::fs::read_to_string(dir.path().join("api.key")).unwrap();
    secrets.push(key.trim().to_string());
    for (i, text) in shown.iter().enumerate() {
        if let Some(at) = text.find("sim_") {
            panic!(
                "a token reached output #{i}: ...{}...",
                &text[at.saturating_sub(200)..at + 10]
            );
        }
        for value in &secrets {
            assert!(
                !text.contains(value.as_str()),
                "a secret value reached output #{i}"
            );
        }
        // Provider text is scrubbed, bounded, printable: no fragment long
        // enough to hold half a secret either.
        for value in &secrets {
            let half = &value[..value.len() / 2];
            assert!(!text.contains(half), "half a secret reached output #{i}");
        }
    }
    for sim in [sims.echo, sims.zero, sims.maps] {
        sim.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn echoed_provider_text_in_text_logs_holds_no_secret() {
    echoed_provider_text_leaks_nothing("text").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn echoed_provider_text_in_json_logs_holds_no_secret() {
    echoed_provider_text_leaks_nothing("json").await;
}
