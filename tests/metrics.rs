//! What a running `rekeyd run` (a child process, against the in-process
//! simulated provider, API on a unix socket) tells monitoring: `GET
//! /metrics` in OpenMetrics text, `GET /readyz/{name}`, rotations asked for
//! with `POST /v1/rotate/{name}` or SIGUSR1, and JSON log lines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use serde_json::Value;
use tokio::time::Instant;

#[path = "support/process.rs"]
mod process;

use process::{RekeydProcess, TIMEOUT};

/// The daemon and a client for its API socket (`<dir>/api.sock`).
struct Daemon {
    process: RekeydProcess,
    client: reqwest::Client,
}

impl Daemon {
    fn spawn(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon {
            process: RekeydProcess::spawn(config, &dir.join("daemon.log"), env),
            client: reqwest::Client::builder()
                .unix_socket(dir.join("api.sock"))
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    fn signal(&self, signal: i32) {
        self.process.signal(signal)
    }

    /// Polls (another process: no in-process signal) until `check` holds.
    async fn wait_until(&mut self, what: &str, mut check: impl AsyncFnMut(&Daemon) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !check(self).await {
            self.process.keep_waiting(what, deadline).await;
        }
    }

    /// `method path`, with the API key if given: status, content type, body.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> (u16, String, String) {
        let mut request = self
            .client
            .request(method, format!("http://localhost{path}"));
        if let Some(key) = key {
            request = request.header("X-Rekeyd-Key", key);
        }
        match request.send().await {
            Ok(r) => {
                let content_type = r
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                (
                    r.status().as_u16(),
                    content_type,
                    r.text().await.unwrap_or_default(),
                )
            }
            Err(e) => (0, String::new(), e.to_string()),
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = self.call(reqwest::Method::GET, path, None).await;
        (status, body)
    }

    async fn post(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let (status, _, body) = self.call(reqwest::Method::POST, path, key).await;
        (status, body)
    }

    async fn metrics(&self) -> Metrics {
        let (status, content_type, body) = self.call(reqwest::Method::GET, "/metrics", None).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        Metrics::parse(body)
    }

    async fn stop(self) -> String {
        self.process.stop().await.1
    }
}

/// An exposition: series (name with labels, as written) to value.
struct Metrics {
    text: String,
    series: BTreeMap<String, f64>,
}

impl Metrics {
    fn parse(text: String) -> Metrics {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
                (series.to_string(), value.parse().unwrap())
            })
            .collect();
        Metrics { text, series }
    }

    /// The value of one series, e.g. `rekeyd_token_valid{credential="maps"}`.
    fn get(&self, series: &str) -> Option<f64> {
        self.series.get(series).copied()
    }

    fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no series {series}\n{}", self.text))
    }

    /// Series of metric `name` whose labels include every `labels` pair.
    fn matching(&self, name: &str, labels: &[&str]) -> Vec<(&str, f64)> {
        self.series
            .iter()
            .filter(|(s, _)| {
                s.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{'))
                    && labels.iter().all(|l| s.contains(l))
            })
            .map(|(s, v)| (s.as_str(), *v))
            .collect()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

struct Setup {
    sim: SimProvider,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// Credentials: `maps` (MapsIndoors, rotated daily), `places` (Mappls,
    /// no rotation) and `down` (MapsIndoors, a secret the provider rejects).
    async fn new(lifetime: Duration, log: &str) -> Setup {
        let sim = SimProvider::start(SimOptions {
            token_lifetime: lifetime,
            ..SimOptions::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (client, file) in [
            ("maps-client", "maps"),
            ("places-client", "places"),
            ("down-client", "down"),
        ] {
            sim.add_client(client, "cust");
            let (_, secret) = sim.add_secret(client, "bootstrap");
            let secret = if file == "down" {
                format!("wrong-{secret}")
            } else {
                secret
            };
            rekeyd::fsutil::write_atomic(
                &dir.path().join(format!("{file}.secret")),
                secret.as_bytes(),
                0o600,
            )
            .unwrap();
        }
        let d = dir.path().display();
        let text = format!(
            r#"state_dir = "{d}/state"
{log}
[api]
listen = "unix:{d}/api.sock"
key_file = "{d}/api.key"

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
name = "down"
provider = "mapsindoors"
client_id = "down-client"
initial_secret_file = "{d}/down.secret"
[credentials.endpoints]
token_url = "{maps}"
"#,
            maps = sim.mapsindoors_token_url(),
            secrets = sim.mapsindoors_secrets_url(),
            mappls = sim.mappls_token_url(),
        );
        let config = dir.path().join("rekeyd.toml");
        std::fs::write(&config, text).unwrap();
        Setup { sim, dir, config }
    }

    fn spawn(&self, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(self.dir.path(), &self.config, env)
    }

    fn key(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("api.key"))
            .unwrap()
            .trim()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readyz_and_rotation_requests() {
    let setup = Setup::new(Duration::from_secs(86_400), "").await;
    // The first two Mappls logins meet a 503 page.
    setup.sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::MapplsToken),
        fail_next: 2,
        ..Faults::default()
    });
    let mut daemon = setup.spawn(&[]);
    daemon
        .wait_until("maps and places ready, down tried", async |d| {
            d.get("/readyz/maps").await.0 == 200
                && d.get("/readyz/places").await.0 == 200
                && d.log().contains("invalid_client")
        })
        .await;
    let key = setup.key();

    // Per-credential readiness; no key needed.
    let (status, body) = daemon.get("/readyz/maps").await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, &doc["ready"]), (200, &Value::Bool(true)), "{body}");
    let (status, body) = daemon.get("/readyz/down").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = daemon.get("/readyz/nope").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(daemon.get("/readyz").await.0, 503);

    let m = daemon.metrics().await;
    let expiry = m.value(r#"rekeyd_token_expiry_timestamp_seconds{credential="maps"}"#);
    let now = unix_now();
    assert!(
        (now + 86_000.0..now + 86_500.0).contains(&expiry),
        "expiry {expiry}, now {now}"
    );
    assert!(
        m.get(r#"rekeyd_token_expiry_timestamp_seconds{credential="down"}"#)
            .is_none(),
        "down never had a token"
    );
    assert_eq!(m.value(r#"rekeyd_token_valid{credential="maps"}"#), 1.0);
    assert_eq!(m.value(r#"rekeyd_token_valid{credential="places"}"#), 1.0);
    assert_eq!(m.value(r#"rekeyd_token_valid{credential="down"}"#), 0.0);
    assert_eq!(
        m.value(r#"rekeyd_refresh_attempts_total{credential="places",result="transient"}"#),
        2.0
    );
    assert_eq!(
        m.value(r#"rekeyd_refresh_attempts_total{credential="places",result="success"}"#),
        1.0
    );
    assert_eq!(
        m.value(r#"rekeyd_refresh_attempts_total{credential="maps",result="success"}"#),
        1.0
    );
    assert!(
        m.value(r#"rekeyd_refresh_attempts_total{credential="down",result="rejected"}"#) >= 1.0
    );
    assert_eq!(m.value(r#"rekeyd_locked_out{credential="down"}"#), 1.0);
    assert_eq!(m.value(r#"rekeyd_locked_out{credential="maps"}"#), 0.0);
    let bucket = "rekeyd_provider_request_duration_seconds_bucket";
    for labels in [
        &[r#"operation="mappls login""#, r#"status="503""#][..],
        &[r#"operation="mappls login""#, r#"status="201""#],
        &[r#"operation="mapsindoors login""#, r#"status="200""#],
        &[r#"operation="mapsindoors login""#, r#"status="400""#],
    ] {
        let found = m.matching(bucket, labels);
        assert!(!found.is_empty(), "no {bucket} with {labels:?}\n{}", m.text);
        // The +Inf bucket counts every request.
        assert!(
            found
                .iter()
                .any(|(s, v)| s.contains(r#"le="+Inf""#) && *v >= 1.0),
            "{found:?}"
        );
    }
    let count = m.value(
        r#"rekeyd_provider_request_duration_seconds_count{operation="mappls login",status="503"}"#,
    );
    assert_eq!(count, 2.0);
    assert!(m.matching("rekeyd_rotation_attempts_total", &[]).is_empty());

    // POST /v1/rotate/{name}: needs the key; only rotating credentials.
    assert_eq!(daemon.post("/v1/rotate/maps", None).await.0, 401);
    assert_eq!(daemon.post("/v1/rotate/maps", Some("wrong")).await.0, 401);
    let (status, body) = daemon.post("/v1/rotate/places", Some(&key)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(daemon.post("/v1/rotate/nope", Some(&key)).await.0, 404);
    assert_eq!(setup.sim.stats().secrets_created, 0);
    let (status, body) = daemon.post("/v1/rotate/maps", Some(&key)).await;
    assert_eq!(status, 202, "{body}");
    let success =
        r#"rekeyd_rotation_attempts_total{credential="maps",result="success",phase="idle"}"#;
    daemon
        .wait_until("a rotation counted", async |d| {
            d.metrics().await.get(success) == Some(1.0)
        })
        .await;
    // The bootstrap secret stays (no initial_secret_id): nothing deleted.
    let stats = setup.sim.stats();
    assert_eq!((stats.secrets_created, stats.secrets_deleted), (1, 0));
    let last_series = r#"rekeyd_last_rotation_timestamp_seconds{credential="maps"}"#;
    let due_series = r#"rekeyd_rotation_next_due_timestamp_seconds{credential="maps"}"#;
    // The schedule updates the next due time when it looks again, just
    // after counting the attempt.
    daemon
        .wait_until("the next rotation 24h after the last", async |d| {
            let m = d.metrics().await;
            match (m.get(last_series), m.get(due_series)) {
                (Some(last), Some(due)) => (due - last - 86_400.0).abs() < 1.0,
                _ => false,
            }
        })
        .await;
    let m = daemon.metrics().await;
    let last = m.value(last_series);
    let now = unix_now();
    assert!((now - 60.0..=now + 1.0).contains(&last), "{last} vs {now}");
    assert!(
        m.get(r#"rekeyd_rotation_next_due_timestamp_seconds{credential="places"}"#)
            .is_none()
    );

    // SIGUSR1 asks every rotating credential for a rotation.
    daemon.signal(libc::SIGUSR1);
    daemon
        .wait_until("a second rotation counted", async |d| {
            d.metrics().await.get(success) == Some(2.0)
        })
        .await;
    // This time the old secret is one rekeyd created: deleted.
    let stats = setup.sim.stats();
    assert_eq!((stats.secrets_created, stats.secrets_deleted), (2, 1));
    assert!(daemon.log().contains("SIGUSR1"));

    // No secret, token or API key in the exposition.
    let m = daemon.metrics().await;
    let mut values: Vec<String> = vec![key.clone()];
    for client in ["maps-client", "places-client", "down-client"] {
        values.extend(setup.sim.secrets(client).into_iter().map(|s| s.value));
    }
    for file in ["maps", "places", "down"] {
        values.push(
            std::fs::read_to_string(setup.dir.path().join(format!("{file}.secret"))).unwrap(),
        );
    }
    for name in ["maps", "places"] {
        let (status, _, body) = daemon
            .call(
                reqwest::Method::GET,
                &format!("/v1/token/{name}"),
                Some(&key),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        values.push(doc["access_token"].as_str().unwrap().to_string());
    }
    assert!(!m.text.contains("sim_"), "a token in /metrics");
    for value in &values {
        assert!(
            !m.text.contains(value.as_str()),
            "a secret value in /metrics"
        );
    }
    daemon.stop().await;
    setup.sim.shutdown().await;
}

/// Every stderr line is a JSON object; lines from a credential's tasks say
/// which credential.
async fn json_logs(env: &[(&str, &str)], log_section: &str) {
    let setup = Setup::new(Duration::from_secs(2), log_section).await;
    setup.sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::MapplsToken),
        fail_next: 1,
        ..Faults::default()
    });
    let mut daemon = setup.spawn(env);
    daemon
        .wait_until("refreshes of maps and places", async |d| {
            let log = d.log();
            log.matches("token refreshed").count() >= 4 && log.contains("invalid_client")
        })
        .await;
    let log = daemon.stop().await;
    let mut engine_lines = BTreeMap::<String, usize>::new();
    for line in log.lines() {
        let doc: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(doc["timestamp"].is_string(), "{line}");
        assert!(doc["level"].is_string(), "{line}");
        assert!(doc["message"].is_string(), "{line}");
        if doc["target"] == "rekeyd::token::engine" {
            let name = doc["credential"]
                .as_str()
                .unwrap_or_else(|| panic!("engine line without its credential: {line}"));
            *engine_lines.entry(name.to_string()).or_default() += 1;
        }
    }
    for name in ["maps", "places", "down"] {
        assert!(
            engine_lines.get(name).is_some_and(|n| *n >= 1),
            "no engine line for {name}: {engine_lines:?}\n{log}"
        );
    }
    setup.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_from_the_config_file() {
    json_logs(&[], "[log]\nformat = \"json\"\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_from_the_environment() {
    json_logs(&[("REKEYD__LOG__FORMAT", "json")], "").await;
}
