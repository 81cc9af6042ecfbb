//! Forced refreshes end to end: `POST /v1/token/{name}/refresh` and `rekeyd
//! token NAME --fresh` against an in-process daemon (API on a unix socket)
//! and the simulated provider, whose token endpoint counts every login.
//!
//! The rate limit, as these tests pin it: a request while a forced login is
//! in flight waits for that login and gets its token; a request after it
//! finished, within `refresh.min_forced_interval` of its start, gets `429
//! refresh_rate_limited` with `Retry-After`; a request naming the refused
//! token gets the token served now without a login whenever that is
//! another one.

#[path = "support/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use daemon::{EVENT_TIMEOUT, TestDaemon, wait_token, write_secret};
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

const KEY_HEADER: &str = "X-Rekeyd-Key";

/// A daemon with one MapsIndoors credential "maps" at `sim`, its API on
/// `<dir>/api.sock`, forced logins at most once per `interval`. The
/// config is also written to `<dir>/rekeyd.toml` for the CLI. Returns the
/// daemon and the client secret.
async fn start(sim: &SimProvider, interval: &str) -> (TestDaemon, String) {
    start_with(sim, interval, "").await
}

/// [`start`], with `api` added to the `[api]` table.
async fn start_with(sim: &SimProvider, interval: &str, api: &str) -> (TestDaemon, String) {
    let dir = tempfile::tempdir().unwrap();
    sim.add_client("client-maps", "cust");
    let (_, secret) = sim.add_secret("client-maps", "bootstrap");
    write_secret(dir.path(), "maps.secret", &secret);
    let config = format!(
        r#"state_dir = "{{dir}}/state"
[api]
listen = "unix:{{dir}}/api.sock"
key_file = "{{dir}}/api.key"
{api}
[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "client-maps"
initial_secret_file = "{{dir}}/maps.secret"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
[credentials.refresh]
min_forced_interval = "{interval}"
"#,
        token = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
    );
    let on_disk = config.replace("{dir}", &dir.path().display().to_string());
    std::fs::write(dir.path().join("rekeyd.toml"), on_disk).unwrap();
    let d = TestDaemon::start_in(dir, &config).await;
    wait_token(&d.handle("maps"), |_| true).await;
    (d, secret)
}

fn logins(sim: &SimProvider) -> u64 {
    sim.stats().requests_to(Endpoint::MapsIndoorsToken)
}

fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn served(d: &TestDaemon) -> String {
    d.handle("maps")
        .valid_token()
        .expect("a valid token is served")
        .access_token
        .expose_secret()
        .to_string()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    text: String,
}

impl Reply {
    fn token(&self) -> &str {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text);
        self.body["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token: {}", self.text))
    }

    fn retry_after(&self) -> u64 {
        self.headers
            .get("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After (HTTP {}): {}", self.status, self.text))
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After is whole seconds")
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

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("the API answers");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    /// `POST /v1/token/maps/refresh` with `body` (none if `None`).
    async fn refresh(&self, body: Option<Value>) -> Reply {
        let mut request = self
            .client
            .post("http://localhost/v1/token/maps/refresh")
            .header(KEY_HEADER, &self.key);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        self.send(request).await
    }

    async fn refresh_rejecting(&self, token: &str) -> Reply {
        self.refresh(Some(json!({ "rejected_sha256": sha256_hex(token) })))
            .await
    }

    async fn get(&self) -> Reply {
        let request = self
            .client
            .get("http://localhost/v1/token/maps")
            .header(KEY_HEADER, &self.key);
        self.send(request).await
    }
}

/// Polls the sim until `n` logins reached it: they are counted as they
/// arrive, before any latency the sim adds.
async fn wait_logins(sim: &SimProvider, n: u64) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while logins(sim) < n {
        assert!(
            Instant::now() < deadline,
            "login #{n} never reached the sim"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn concurrent_forced_requests_make_one_login() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start(&sim, "1h").await;
    let api = Api::new(&d);
    let old = served(&d);
    let before = logins(&sim);

    // The login takes a while, so that the other requests come while it is
    // in flight: the first request is sent and seen at the sim before them.
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        latency: Some((Duration::from_secs(2), Duration::from_secs(2))),
        ..Faults::default()
    });
    let first = tokio::spawn({
        let api = Api::new(&d);
        async move { api.refresh(None).await }
    });
    wait_logins(&sim, before + 1).await;
    let others: Vec<_> = (0..7)
        .map(|i| {
            let api = Api::new(&d);
            let old = old.clone();
            tokio::spawn(async move {
                // With and without the refused token's digest: the one
                // served is the refused one, so both join the login.
                if i % 2 == 0 {
                    api.refresh(None).await
                } else {
                    api.refresh_rejecting(&old).await
                }
            })
        })
        .collect();

    let first = first.await.unwrap();
    let fresh = first.token().to_string();
    assert_ne!(fresh, old, "a forced refresh gives a new token");
    assert_eq!(sim.token_client(&fresh).as_deref(), Some("client-maps"));
    for other in others {
        let other = other.await.unwrap();
        assert_eq!(
            other.token(),
            fresh,
            "every request got the one login's token"
        );
    }
    assert_eq!(logins(&sim), before + 1, "exactly one login for 8 requests");
    assert_eq!(served(&d), fresh, "the new token is the one served");
    assert_eq!(api.get().await.token(), fresh);

    d.stop().await;
}

#[tokio::test]
async fn a_refused_older_token_gets_the_current_one_without_a_login() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start(&sim, "0s").await;
    let api = Api::new(&d);
    let old = served(&d);

    let reply = api.refresh_rejecting(&old).await;
    let current = reply.token().to_string();
    assert_ne!(current, old);
    let after_login = logins(&sim);

    // A slow replica still holds `old` and saw it refused: it gets the
    // current token, and rekeyd keeps it (no login, even with no
    // interval to wait for).
    for _ in 0..3 {
        let reply = api.refresh_rejecting(&old).await;
        assert_eq!(reply.token(), current);
        assert_eq!(
            reply
                .headers
                .get("cache-control")
                .map(|v| v.to_str().unwrap()),
            Some("no-store")
        );
        assert!(
            reply.body["expires_in"].as_u64().unwrap() > 86_000,
            "{}",
            reply.text
        );
    }
    assert_eq!(logins(&sim), after_login, "no login for an older token");
    assert_eq!(served(&d), current, "the current token was not thrown away");

    // Refusing the current one does log in (no interval configured).
    let newer = api.refresh_rejecting(&current).await.token().to_string();
    assert_ne!(newer, current);
    assert_eq!(logins(&sim), after_login + 1);

    // A body rekeyd cannot read is refused without quoting it.
    for body in [
        json!({ "rejected_sha256": "not-hex" }),
        json!({ "rejected_sha256": newer }),
        // Hex, but not a SHA-256's length.
        json!({ "rejected_sha256": &sha256_hex(&newer)[..62] }),
        json!({ "rejected_sha256": format!("{}00", sha256_hex(&newer)) }),
        json!({ "token": newer }),
        json!("not an object"),
        json!([1, 2]),
    ] {
        let reply = api.refresh(Some(body)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
        assert_eq!(reply.body["error"], "bad_request", "{}", reply.text);
        assert!(!reply.text.contains(&newer), "the answer quotes the body");
    }
    assert_eq!(logins(&sim), after_login + 1, "no login for a bad request");

    d.stop().await;
}

#[tokio::test]
async fn forced_logins_are_limited_to_one_per_interval() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start(&sim, "1h").await;
    let api = Api::new(&d);

    let fresh = api.refresh(None).await.token().to_string();
    let after_login = logins(&sim);

    // Finished, within the interval: refused with the time left, whether or
    // not the request names the token served now.
    for reply in [api.refresh(None).await, api.refresh_rejecting(&fresh).await] {
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            reply.text
        );
        assert_eq!(
            reply.body["error"], "refresh_rate_limited",
            "{}",
            reply.text
        );
        assert!(
            reply.body["detail"]
                .as_str()
                .unwrap()
                .contains("min_forced_interval"),
            "{}",
            reply.text
        );
        let retry = reply.retry_after();
        assert!((3590..=3600).contains(&retry), "Retry-After {retry}");
    }
    assert_eq!(logins(&sim), after_login, "no login within the interval");
    assert_eq!(api.get().await.token(), fresh, "the token is still served");

    d.stop().await;
}

#[tokio::test]
async fn a_forced_login_is_allowed_again_once_the_interval_is_over() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start(&sim, "1s").await;
    let api = Api::new(&d);

    let first = api.refresh(None).await.token().to_string();
    let after_first = logins(&sim);
    let started = Instant::now();
    let reply = api.refresh(None).await;
    // Unless this machine took a second between the two requests.
    if reply.status == StatusCode::TOO_MANY_REQUESTS {
        assert_eq!(reply.retry_after(), 1);
        assert_eq!(logins(&sim), after_first);
        // Asked again until the interval is over: each refusal costs the
        // provider nothing, and the interval does end.
        let second = loop {
            let reply = api.refresh(None).await;
            if reply.status == StatusCode::OK {
                break reply.token().to_string();
            }
            assert_eq!(
                reply.status,
                StatusCode::TOO_MANY_REQUESTS,
                "{}",
                reply.text
            );
            assert_eq!(logins(&sim), after_first, "a refused request logged in");
            assert!(
                started.elapsed() < EVENT_TIMEOUT,
                "the interval never ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_ne!(second, first);
    } else {
        assert_ne!(reply.token(), first);
    }
    assert_eq!(logins(&sim), after_first + 1);

    d.stop().await;
}

#[tokio::test]
async fn a_failed_forced_login_keeps_the_previous_token_served_and_says_why() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, secret) = start(&sim, "0s").await;
    let api = Api::new(&d);
    let old = served(&d);
    let before = logins(&sim);

    // The provider is down, for the forced login and for the retries the
    // engine goes on with in the background.
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        fail_next: u32::MAX,
        ..Faults::default()
    });
    let reply = api.refresh_rejecting(&old).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text);
    assert_eq!(reply.body["error"], "refresh_failed", "{}", reply.text);
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(detail.contains("503"), "the provider's status: {detail}");
    assert_eq!(reply.body["serving_previous_token"], true, "{}", reply.text);
    assert!(reply.headers.get("retry-after").is_none(), "{}", reply.text);
    for (what, value) in [("token", &old), ("secret", &secret)] {
        assert!(
            !reply.text.contains(value.as_str()),
            "the answer holds the {what}"
        );
    }
    assert!(
        logins(&sim) > before,
        "the forced login reached the provider"
    );

    // I8: the previous token is still served, by the API and to the engine's
    // readers, and the status says why the refresh failed.
    assert_eq!(api.get().await.token(), old);
    assert_eq!(served(&d), old);
    let status = d.handle("maps").status.borrow().clone();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("503")),
        "{status:?}"
    );

    d.stop().await;
}

#[tokio::test]
async fn a_quota_reply_holds_forced_logins_as_long_as_the_provider_asked() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start(&sim, "0s").await;
    let api = Api::new(&d);
    let old = served(&d);
    let before = logins(&sim);

    // Its Retry-After is passed on, and forced logins wait for it as the
    // engine does, although no interval is configured.
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        quota_next: 1,
        quota_retry_after: Some(120),
        ..Faults::default()
    });
    let reply = api.refresh(None).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text);
    assert_eq!(reply.body["error"], "refresh_failed", "{}", reply.text);
    assert_eq!(reply.retry_after(), 120);
    assert_eq!(reply.body["serving_previous_token"], true, "{}", reply.text);
    assert_eq!(logins(&sim), before + 1);

    let reply = api.refresh_rejecting(&old).await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.text
    );
    assert_eq!(
        reply.body["error"], "refresh_rate_limited",
        "{}",
        reply.text
    );
    assert!(
        reply.body["detail"].as_str().unwrap().contains("quota"),
        "{}",
        reply.text
    );
    // Retry-After plus the engine's spread of up to a tenth of it.
    let retry = reply.retry_after();
    assert!((110..=133).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        logins(&sim),
        before + 1,
        "no login during the quota backoff"
    );
    assert_eq!(api.get().await.token(), old);

    d.stop().await;
}

/// A `Retry-After` is the provider's text: one of years reaches
/// applications bounded like the engine's own wait (the quota backoff's
/// 30 minutes and its spread), and forced logins are held no longer.
#[tokio::test]
async fn a_retry_after_of_years_is_passed_on_bounded() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start(&sim, "0s").await;
    let api = Api::new(&d);
    let old = served(&d);
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        quota_next: 1,
        quota_retry_after: Some(100_000_000),
        ..Faults::default()
    });
    let reply = api.refresh(None).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text);
    let bound = 30 * 60 + 30;
    assert!(
        (1..=bound).contains(&reply.retry_after()),
        "Retry-After {}",
        reply.retry_after()
    );
    let reply = api.refresh_rejecting(&old).await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.text
    );
    assert!(
        (1..=bound).contains(&reply.retry_after()),
        "Retry-After {}",
        reply.retry_after()
    );
    d.stop().await;
}

/// `rekeyd token maps ARGS --config <dir>/rekeyd.toml`: exit code, stdout,
/// stderr.
async fn cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let config: PathBuf = dir.join("rekeyd.toml");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"));
    command
        .arg("token")
        .arg("maps")
        .args(args)
        .arg("--config")
        .arg(&config)
        .env_clear()
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(EVENT_TIMEOUT, command.output())
        .await
        .expect("rekeyd token ends in time")
        .unwrap();
    (
        out.status.code().expect("exited"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn rekeyd_token_fresh_asks_the_daemon_for_a_new_token() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start(&sim, "1h").await;
    let dir = d.dir.path().to_path_buf();
    let old = served(&d);
    let before = logins(&sim);

    let (code, stdout, stderr) = cli(&dir, &["--fresh"]).await;
    assert_eq!(code, 0, "{stderr}");
    let fresh = stdout.trim().to_string();
    assert_eq!(stdout, format!("{fresh}\n"), "only the token on stdout");
    assert_ne!(fresh, old);
    assert_eq!(sim.token_client(&fresh).as_deref(), Some("client-maps"));
    assert_eq!(served(&d), fresh);
    assert_eq!(logins(&sim), before + 1);

    // The refused token is an older one: the current token, no login.
    let (code, stdout, stderr) =
        cli(&dir, &["--fresh", "--rejected-sha256", &sha256_hex(&old)]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), fresh);
    assert_eq!(logins(&sim), before + 1);

    // Within the interval: exit 69 and why, on stderr.
    let (code, stdout, stderr) = cli(&dir, &["--fresh"]).await;
    assert_eq!(code, 69, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("HTTP 429"), "{stderr}");
    assert!(stderr.contains("refresh_rate_limited"), "{stderr}");
    assert!(stderr.contains("retry after"), "{stderr}");
    assert_eq!(logins(&sim), before + 1);

    // A digest that is not one is refused before asking, without quoting
    // it (it may be the token itself).
    let (code, _, stderr) = cli(&dir, &["--fresh", "--rejected-sha256", &fresh]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("64 hex digits"), "{stderr}");
    assert!(!stderr.contains(&fresh), "{stderr}");
    // --rejected-sha256 means nothing without --fresh.
    let (code, _, stderr) = cli(&dir, &["--rejected-sha256", &sha256_hex(&old)]).await;
    assert_eq!(code, 2, "{stderr}");

    // Without --fresh: the token served, no login.
    let (code, stdout, _) = cli(&dir, &[]).await;
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), fresh);
    assert_eq!(logins(&sim), before + 1);

    d.stop().await;
}

#[tokio::test]
async fn a_body_longer_than_a_digest_needs_is_refused_unread() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start(&sim, "0s").await;
    let api = Api::new(&d);
    let old = served(&d);
    let before = logins(&sim);

    // The largest body read: the digest object padded to the limit.
    let digest = json!({ "rejected_sha256": sha256_hex(&old) }).to_string();
    let limit = rekeyd::serve::api::MAX_REFRESH_BODY;
    let padded = format!("{digest:<limit$}");
    let reply = api
        .send(
            api.client
                .post("http://localhost/v1/token/maps/refresh")
                .header(KEY_HEADER, &api.key)
                .body(padded),
        )
        .await;
    assert_ne!(reply.token(), old, "a body at the limit is read");
    assert_eq!(logins(&sim), before + 1);

    // One byte more, even of whitespace (which alone means "no digest"):
    // 413 in the API's shape, and no login.
    let over = " ".repeat(limit + 1);
    let reply = api
        .send(
            api.client
                .post("http://localhost/v1/token/maps/refresh")
                .header(KEY_HEADER, &api.key)
                .body(over.clone()),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text
    );
    assert_eq!(reply.body["error"], "body_too_large", "{}", reply.text);
    // Without the key, the answer is 401 whatever the body.
    let reply = api
        .send(
            api.client
                .post("http://localhost/v1/token/maps/refresh")
                .body(" ".repeat(3 << 20)),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text);
    assert_eq!(logins(&sim), before + 1, "no login for a refused body");

    d.stop().await;
}

/// A login slower than the listener allows: `504 refresh_pending` before
/// the listener gives up on the request, and the login goes on: `GET`
/// serves its token once it lands, a request meanwhile joins it, and no
/// second login is made.
#[tokio::test]
async fn a_login_slower_than_the_request_timeout_answers_504_and_lands_later() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let (d, _) = start_with(
        &sim,
        "0s",
        "request_timeout = \"2s\"\nheader_timeout = \"2s\"\n",
    )
    .await;
    let api = Api::new(&d);
    let old = served(&d);
    let before = logins(&sim);
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        latency: Some((Duration::from_secs(8), Duration::from_secs(8))),
        ..Faults::default()
    });

    // Answered (not cut off by the listener, which would be an error
    // here) before the request_timeout.
    let reply = api.refresh_rejecting(&old).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text);
    assert_eq!(reply.body["error"], "refresh_pending", "{}", reply.text);
    // Still in flight: another request joins it (and is answered 504 too).
    let reply = api.refresh_rejecting(&old).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text);
    assert_eq!(api.get().await.token(), old, "served until the login lands");

    let fresh = wait_token(&d.handle("maps"), |t| {
        t.access_token.expose_secret() != old.as_str()
    })
    .await;
    assert_eq!(api.get().await.token(), fresh.access_token.expose_secret());
    assert_eq!(logins(&sim), before + 1, "one login for both requests");

    d.stop().await;
}
