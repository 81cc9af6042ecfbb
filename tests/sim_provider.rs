//! End-to-end tests of the simulated provider over real loopback HTTP.
//!
//! These pin down the wire behaviour that the daemon's provider modules and
//! integration tests rely on, quirks and faults included.

use std::time::Duration;

use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use serde_json::Value;

const CLIENT: &str = "client-a";
const CUSTOMER: &str = "cust-1";

/// No connection pooling: faults that abort connections (and clock jumps
/// that may time out idle ones) must not leak into the next request.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn start() -> SimProvider {
    start_with(SimOptions::default()).await
}

async fn start_with(options: SimOptions) -> SimProvider {
    let sim = SimProvider::start(options).await.unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    sim
}

async fn json(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn secrets_url(sim: &SimProvider, params: &[(&str, &str)]) -> url::Url {
    url::Url::parse_with_params(&sim.mapsindoors_secrets_url(), params).unwrap()
}

async fn mi_login_raw(sim: &SimProvider, client_id: &str, secret: &str) -> reqwest::Response {
    http()
        .post(sim.mapsindoors_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
        ])
        .send()
        .await
        .unwrap()
}

/// Logs in at the MapsIndoors endpoint and returns the access token.
async fn mi_token(sim: &SimProvider, client_id: &str, secret: &str) -> String {
    let response = mi_login_raw(sim, client_id, secret).await;
    assert_eq!(response.status(), StatusCode::OK);
    json(response).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn create_secret_raw(sim: &SimProvider, token: &str, description: &str) -> reqwest::Response {
    http()
        .post(secrets_url(
            sim,
            &[("customerId", CUSTOMER), ("description", description)],
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn list_secrets(sim: &SimProvider, token: &str) -> Vec<Value> {
    let response = http()
        .get(secrets_url(sim, &[("customerId", CUSTOMER)]))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    json(response).await.as_array().unwrap().clone()
}

async fn delete_secret(sim: &SimProvider, token: &str, id: &str) -> StatusCode {
    http()
        .delete(secrets_url(sim, &[("customerId", CUSTOMER), ("id", id)]))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

/// Moves tokio's clock forward without letting it auto-advance while real
/// network I/O is in flight (the test runtime is single-threaded).
async fn jump_clock(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// A request that failed on the way back: either no response at all, or a
/// body that breaks off.
async fn assert_transport_error(result: reqwest::Result<reqwest::Response>) {
    match result {
        Err(e) => assert!(!e.is_status(), "{e}"),
        Ok(response) => {
            let body = response.bytes().await;
            assert!(body.is_err(), "expected the body to fail, got {body:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// MapsIndoors
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mapsindoors_login_ok() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");

    let response = mi_login_raw(&sim, CLIENT, &secret).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(content_type(&response).starts_with("application/json"));
    assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
    let body = json(response).await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 86_400);
    assert_eq!(body["scope"], "client-apis");
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(sim.token_client(token).as_deref(), Some(CLIENT));

    let scoped = http()
        .post(sim.mapsindoors_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", &secret),
            ("scope", "custom"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(json(scoped).await["scope"], "custom");
    assert_eq!(sim.stats().logins_ok, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn mapsindoors_rejects_bad_credentials_with_400() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");

    for (client, secret) in [(CLIENT, "wrong"), ("nobody", secret.as_str()), (CLIENT, "")] {
        let response = mi_login_raw(&sim, client, secret).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json(response).await["error"], "invalid_client");
    }
    assert_eq!(sim.stats().logins_rejected, 3);

    let no_grant = http()
        .post(sim.mapsindoors_token_url())
        .form(&[("client_id", CLIENT), ("client_secret", &secret)])
        .send()
        .await
        .unwrap();
    assert_eq!(no_grant.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(no_grant).await["error"], "unsupported_grant_type");

    let not_form = http()
        .post(sim.mapsindoors_token_url())
        .header(CONTENT_TYPE, "application/json")
        .body(r#"{"grant_type":"client_credentials"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(not_form.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(not_form).await["error"], "invalid_request");
    sim.shutdown().await;
}

#[tokio::test]
async fn secret_api_create_list_delete() {
    let sim = start().await;
    sim.add_client("client-b", CUSTOMER);
    sim.add_client("client-other", "cust-2");
    let (seed_id, seed) = sim.add_secret(CLIENT, "seed");
    let (b_id, _) = sim.add_secret("client-b", "b's own");
    sim.add_secret("client-other", "not ours");
    let token = mi_token(&sim, CLIENT, &seed).await;

    let created = create_secret_raw(&sim, &token, "rekeyd:cred:r1").await;
    assert_eq!(created.status(), StatusCode::OK);
    let created = json(created).await;
    let new_id = created["id"].as_str().unwrap().to_owned();
    let new_value = created["secret"].as_str().unwrap().to_owned();
    assert_eq!(new_id.len(), 32);
    assert_eq!(new_value.len(), 43);
    assert_eq!(created["description"], "rekeyd:cred:r1");
    assert!(created["createdAt"].as_str().unwrap().ends_with('Z'));

    // The listing spans the whole customer and never carries values.
    let listed = list_secrets(&sim, &token).await;
    let ids: Vec<&str> = listed.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![seed_id.as_str(), b_id.as_str(), new_id.as_str()]);
    assert_eq!(listed[1]["client_id"], "client-b");
    for entry in &listed {
        assert!(entry.get("secret").is_none() && entry.get("value").is_none());
        assert!(entry["createdAt"].is_string() && entry["description"].is_string());
        assert!(!entry.to_string().contains(&new_value));
    }

    // The new secret works (no propagation delay by default).
    mi_token(&sim, CLIENT, &new_value).await;

    assert_eq!(delete_secret(&sim, &token, &seed_id).await, StatusCode::OK);
    assert_eq!(
        delete_secret(&sim, &token, &seed_id).await,
        StatusCode::NOT_FOUND
    );
    let remaining: Vec<String> = sim.secrets(CLIENT).into_iter().map(|s| s.id).collect();
    assert_eq!(remaining, vec![new_id]);
    // The deleted secret no longer logs in; the token it minted stays valid.
    let response = mi_login_raw(&sim, CLIENT, &seed).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(sim.token_client(&token).is_some());

    let stats = sim.stats();
    assert_eq!((stats.secrets_created, stats.secrets_deleted), (1, 1));
    assert_eq!(stats.requests_to(Endpoint::SecretsDelete), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn secret_api_requires_a_valid_bearer_for_the_right_customer() {
    let sim = start().await;
    sim.add_client("client-other", "cust-2");
    let (_, seed) = sim.add_secret(CLIENT, "seed");
    let (_, other) = sim.add_secret("client-other", "seed");
    let url = secrets_url(&sim, &[("customerId", CUSTOMER)]);

    let anonymous = http().get(url.clone()).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(anonymous.bytes().await.unwrap().is_empty());

    let bogus = http()
        .get(url.clone())
        .bearer_auth("sim_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bogus.status(), StatusCode::UNAUTHORIZED);

    let other_token = mi_token(&sim, "client-other", &other).await;
    let foreign = http()
        .get(url.clone())
        .bearer_auth(&other_token)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::FORBIDDEN);

    // Only tokens from the MapsIndoors IdentityServer open the secret API.
    let mappls = http()
        .post(sim.mappls_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", &seed),
        ])
        .send()
        .await
        .unwrap();
    let mappls_token = json(mappls).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let wrong_issuer = http()
        .get(url.clone())
        .bearer_auth(&mappls_token)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_issuer.status(), StatusCode::UNAUTHORIZED);

    let token = mi_token(&sim, CLIENT, &seed).await;
    let no_description = http()
        .post(secrets_url(&sim, &[("customerId", CUSTOMER)]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(no_description.status(), StatusCode::BAD_REQUEST);
    assert_eq!(sim.secrets(CLIENT).len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let sim = start().await;
    sim.set_token_lifetime(Duration::from_secs(10));
    let (_, seed) = sim.add_secret(CLIENT, "seed");
    let response = mi_login_raw(&sim, CLIENT, &seed).await;
    let token = json(response).await;
    assert_eq!(token["expires_in"], 10);
    let token = token["access_token"].as_str().unwrap().to_owned();
    assert_eq!(list_secrets(&sim, &token).await.len(), 1);

    jump_clock(Duration::from_secs(11)).await;
    assert_eq!(sim.token_client(&token), None);
    let expired = http()
        .get(secrets_url(&sim, &[("customerId", CUSTOMER)]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    sim.shutdown().await;
}

#[tokio::test]
async fn new_secrets_are_refused_until_propagated() {
    let sim = start_with(SimOptions {
        propagation_delay: Duration::from_secs(30),
        ..SimOptions::default()
    })
    .await;
    let (_, seed) = sim.add_secret(CLIENT, "seed");
    // Seeded secrets are usable at once.
    let token = mi_token(&sim, CLIENT, &seed).await;
    let created = json(create_secret_raw(&sim, &token, "new").await).await;
    let value = created["secret"].as_str().unwrap().to_owned();

    let early = mi_login_raw(&sim, CLIENT, &value).await;
    assert_eq!(early.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(early).await["error"], "invalid_client");

    jump_clock(Duration::from_secs(29)).await;
    let still_early = mi_login_raw(&sim, CLIENT, &value).await;
    assert_eq!(still_early.status(), StatusCode::BAD_REQUEST);

    jump_clock(Duration::from_secs(1)).await;
    mi_token(&sim, CLIENT, &value).await;
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------
// Mappls
// ---------------------------------------------------------------------------

async fn mappls_login(sim: &SimProvider, secret: &str) -> reqwest::Response {
    http()
        .post(sim.mappls_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", secret),
        ])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn mappls_login_answers_201_with_lowercase_bearer() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    let response = mappls_login(&sim, &secret).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
    let body = json(response).await;
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 86_400);
    assert_eq!(body["scope"], "READ");
    assert_eq!(body["project_code"], "prj123");
    assert_eq!(body["client_id"], CLIENT);
    assert_eq!(
        sim.token_client(body["access_token"].as_str().unwrap())
            .as_deref(),
        Some(CLIENT)
    );
    sim.shutdown().await;

    let sim = start_with(SimOptions {
        mappls_success_status: 200,
        ..SimOptions::default()
    })
    .await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    assert_eq!(mappls_login(&sim, &secret).await.status(), StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn mappls_enforces_form_content_type_and_answers_401() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    let not_form = http()
        .post(sim.mappls_token_url())
        .header(CONTENT_TYPE, "application/json")
        .body(format!(
            r#"{{"grant_type":"client_credentials","client_id":"{CLIENT}","client_secret":"{secret}"}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(not_form.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(not_form).await["error"], "invalid_request");

    let bad = mappls_login(&sim, "wrong").await;
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let body = json(bad).await;
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_description"], "Bad client credentials");
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------
// Generic OAuth2
// ---------------------------------------------------------------------------

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn introspect(sim: &SimProvider, token: &str) -> Value {
    let response = http()
        .post(sim.oauth2_introspect_url())
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    json(response).await
}

#[tokio::test]
async fn oauth2_client_secret_basic_and_post() {
    let sim = start().await;
    // Characters that must be form-encoded inside the Basic header.
    let awkward = "svc:one+two/é";
    sim.add_client(awkward, CUSTOMER);
    let (_, secret) = sim.add_secret(awkward, "seed");

    let basic = http()
        .post(sim.oauth2_token_url())
        .basic_auth(urlencode(awkward), Some(urlencode(&secret)))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "read write"),
            ("audience", "https://api.example"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::OK);
    assert_eq!(basic.headers()[CACHE_CONTROL], "no-store");
    let body = json(basic).await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "read write");
    let basic_token = body["access_token"].as_str().unwrap().to_owned();

    let post = http()
        .post(sim.oauth2_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", awkward),
            ("client_secret", &secret),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::OK);
    let body = json(post).await;
    assert!(
        body.get("scope").is_none(),
        "no scope requested, none echoed"
    );
    let post_token = body["access_token"].as_str().unwrap().to_owned();

    let stats = sim.stats();
    assert_eq!(
        (stats.oauth2_basic_logins, stats.oauth2_post_logins),
        (1, 1)
    );

    let active = introspect(&sim, &basic_token).await;
    assert_eq!(active["active"], true);
    assert_eq!(active["client_id"], awkward);
    assert_eq!(active["scope"], "read write");
    assert!(active["exp"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(introspect(&sim, &post_token).await["active"], true);
    assert_eq!(
        introspect(&sim, "sim_unknown").await,
        serde_json::json!({"active": false})
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn oauth2_errors_follow_rfc6749() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    let grant = [("grant_type", "client_credentials")];

    let bad_basic = http()
        .post(sim.oauth2_token_url())
        .basic_auth(CLIENT, Some("wrong"))
        .form(&grant)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_basic.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(bad_basic.headers()[WWW_AUTHENTICATE], "Basic realm=\"sim\"");
    assert_eq!(json(bad_basic).await["error"], "invalid_client");

    let bad_post = http()
        .post(sim.oauth2_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", "wrong"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_post.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(bad_post).await["error"], "invalid_client");

    let no_auth = http()
        .post(sim.oauth2_token_url())
        .form(&grant)
        .send()
        .await
        .unwrap();
    assert_eq!(no_auth.status(), StatusCode::UNAUTHORIZED);

    let both = http()
        .post(sim.oauth2_token_url())
        .basic_auth(CLIENT, Some(&secret))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", &secret),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(both).await["error"], "invalid_request");

    let wrong_grant = http()
        .post(sim.oauth2_token_url())
        .basic_auth(CLIENT, Some(&secret))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_grant.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(wrong_grant).await["error"], "unsupported_grant_type");

    let stats = sim.stats();
    assert_eq!(stats.logins_ok, 0);
    assert_eq!(stats.logins_rejected, 3);
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

#[tokio::test]
async fn fail_next_answers_503_html_within_scope() {
    let sim = start().await;
    let (_, seed) = sim.add_secret(CLIENT, "seed");
    sim.set_faults(Faults {
        scope: FaultScope::Secrets,
        fail_next: 1,
        ..Faults::default()
    });
    // Out of scope: the login is unaffected and consumes nothing.
    let token = mi_token(&sim, CLIENT, &seed).await;
    assert_eq!(sim.faults().fail_next, 1);

    let failed = http()
        .get(secrets_url(&sim, &[("customerId", CUSTOMER)]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(content_type(&failed).starts_with("text/html"));
    assert_eq!(
        failed.text().await.unwrap(),
        "<html>Service Unavailable</html>"
    );

    assert_eq!(list_secrets(&sim, &token).await.len(), 1);
    let stats = sim.stats();
    assert_eq!(stats.faults_injected, 1);
    assert_eq!(stats.requests_to(Endpoint::SecretsList), 2);
    assert_eq!(healthz(&sim).await, StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn quota_next_sends_retry_after() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    sim.set_faults(Faults {
        quota_next: 2,
        quota_retry_after: Some(120),
        ..Faults::default()
    });

    let mappls = mappls_login(&sim, &secret).await;
    assert_eq!(mappls.status(), StatusCode::FORBIDDEN);
    assert_eq!(mappls.headers()[RETRY_AFTER], "120");
    assert_eq!(json(mappls).await["error"], "quota_exceeded");

    let mi = mi_login_raw(&sim, CLIENT, &secret).await;
    assert_eq!(mi.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(mi.headers()[RETRY_AFTER], "120");

    // Quota errors are answered before the credentials are even looked at.
    assert_eq!(sim.stats().logins_ok, 0);

    sim.update_faults(|f| {
        f.quota_next = 1;
        f.quota_retry_after = None;
    });
    let no_header = mi_login_raw(&sim, CLIENT, &secret).await;
    assert_eq!(no_header.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(no_header.headers().get(RETRY_AFTER).is_none());

    assert_eq!(
        mappls_login(&sim, &secret).await.status(),
        StatusCode::CREATED
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn drop_next_performs_the_request_but_loses_the_reply() {
    let sim = start().await;
    let (_, seed) = sim.add_secret(CLIENT, "seed");
    let token = mi_token(&sim, CLIENT, &seed).await;
    sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::SecretsCreate),
        drop_next: 1,
        ..Faults::default()
    });

    let result = http()
        .post(secrets_url(
            &sim,
            &[("customerId", CUSTOMER), ("description", "lost")],
        ))
        .bearer_auth(&token)
        .send()
        .await;
    assert_transport_error(result).await;

    // The secret exists at the provider although the client never saw it:
    // an orphan for recovery to find.
    let secrets = sim.secrets(CLIENT);
    assert_eq!(secrets.len(), 2);
    assert_eq!(secrets[1].description, "lost");
    let stats = sim.stats();
    assert_eq!((stats.secrets_created, stats.responses_dropped), (1, 1));

    // Logins can be lost too.
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        random_drop: 1.0,
        ..Faults::default()
    });
    let result = http()
        .post(sim.oauth2_token_url())
        .basic_auth(CLIENT, Some(&seed))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await;
    assert_transport_error(result).await;
    assert_eq!(sim.stats().oauth2_basic_logins, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn garbage_next_answers_200_html() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    sim.set_faults(Faults {
        garbage_next: 1,
        ..Faults::default()
    });
    let response = mi_login_raw(&sim, CLIENT, &secret).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(content_type(&response).starts_with("text/html"));
    let body = response.bytes().await.unwrap();
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    assert!(body.starts_with(b"<!DOCTYPE html>"));
    sim.shutdown().await;
}

#[tokio::test]
async fn huge_next_streams_an_endless_json_body() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    sim.set_faults(Faults {
        huge_next: 1,
        ..Faults::default()
    });
    let mut response = mi_login_raw(&sim, CLIENT, &secret).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(content_type(&response).starts_with("application/json"));
    // Streamed, so there is no length to check up front.
    assert_eq!(response.content_length(), None);

    let mut read = 0usize;
    while read < 3 * 1024 * 1024 {
        let chunk = response.chunk().await.unwrap().expect("body ended early");
        read += chunk.len();
    }
    drop(response);

    // Still serving, and shutdown is not held up by the abandoned stream.
    assert_eq!(healthz(&sim).await, StatusCode::OK);
    mi_token(&sim, CLIENT, &secret).await;
    tokio::time::timeout(Duration::from_secs(10), sim.shutdown())
        .await
        .unwrap();
}

#[tokio::test]
async fn hang_next_never_answers() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::MapplsToken),
        hang_next: 1,
        ..Faults::default()
    });
    let err = http()
        .post(sim.mappls_token_url())
        .timeout(Duration::from_millis(200))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", &secret),
        ])
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(
        mappls_login(&sim, &secret).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(sim.stats().logins_ok, 1);

    // A request hung right now must not keep the server from stopping.
    sim.update_faults(|f| f.hang_next = 1);
    let url = sim.mappls_token_url();
    let hung = tokio::spawn(async move {
        http()
            .post(url)
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
    });
    while sim.stats().requests_to(Endpoint::MapplsToken) < 3 {
        tokio::task::yield_now().await;
    }
    tokio::time::timeout(Duration::from_secs(10), sim.shutdown())
        .await
        .unwrap();
    let _ = hung.await.unwrap();
}

#[tokio::test]
async fn random_5xx_and_latency() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        random_5xx: 1.0,
        latency: Some((Duration::from_millis(30), Duration::from_millis(40))),
        ..Faults::default()
    });
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let status = mi_login_raw(&sim, CLIENT, &secret).await.status();
        assert!(
            [500, 502, 503].contains(&status.as_u16()),
            "unexpected {status}"
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
    let stats = sim.stats();
    assert_eq!((stats.faults_injected, stats.logins_ok), (5, 0));
    sim.set_faults(Faults::default());
    mi_token(&sim, CLIENT, &secret).await;
    sim.shutdown().await;
}

async fn healthz(sim: &SimProvider) -> StatusCode {
    http()
        .get(format!("{}/healthz", sim.base_url()))
        .send()
        .await
        .unwrap()
        .status()
}

// ---------------------------------------------------------------------------
// Replies that test what rekeyd does with provider text and lifetimes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn too_many_secrets_refuses_creation_after_checking_the_bearer() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    let token = mi_token(&sim, CLIENT, &secret).await;
    sim.set_faults(Faults {
        too_many_secrets: true,
        ..Faults::default()
    });
    // The bearer is checked first, as a real API would.
    let response = create_secret_raw(&sim, "sim_unknown", "d").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    for _ in 0..2 {
        let response = create_secret_raw(&sim, &token, "d").await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = json(response).await;
        assert_eq!(body["error"], "too_many_secrets");
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.contains("maximum number of secrets (1)"),
            "{description}"
        );
    }
    assert_eq!(sim.secrets(CLIENT).len(), 1, "nothing was created");
    // Listing and deleting still work; clearing the condition lets
    // creation through.
    assert_eq!(list_secrets(&sim, &token).await.len(), 1);
    sim.update_faults(|f| f.too_many_secrets = false);
    let response = create_secret_raw(&sim, &token, "d").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sim.secrets(CLIENT).len(), 2);
}

#[tokio::test]
async fn echo_next_sends_every_secret_back_in_every_field() {
    let sim = start().await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    let (_, other) = sim.add_secret(CLIENT, "another of the client's secrets");
    sim.set_faults(Faults {
        echo_next: 1,
        ..Faults::default()
    });
    // A token endpoint, the secret in the body (and an assertion).
    let response = http()
        .post(sim.oauth2_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", secret.as_str()),
            ("client_assertion", "an-assertion-value"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let challenge = response.headers()[WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .to_owned();
    let echo_header = response.headers()["x-echo"].to_str().unwrap().to_owned();
    let body = json(response).await;
    for field in ["error", "error_uri", "code", "title"] {
        let text = body[field].as_str().unwrap();
        assert!(
            text.contains(&secret) || text.contains("an-assertion-value"),
            "{field}: {text}"
        );
    }
    for text in [
        body["error_description"].as_str().unwrap(),
        body["message"].as_str().unwrap(),
        body["detail"].as_str().unwrap(),
        echo_header.as_str(),
    ] {
        for value in [&secret, &other, &"an-assertion-value".to_string()] {
            assert!(text.contains(value.as_str()), "{text}");
        }
    }
    assert!(challenge.contains("error=\""), "{challenge}");
    assert!(body["request"].as_str().unwrap().contains(&secret));
    assert_eq!(sim.faults().echo_next, 0);

    // The secret API echoes the bearer token and the client's secrets.
    let token = mi_token(&sim, CLIENT, &secret).await;
    sim.set_faults(Faults {
        echo_next: 1,
        ..Faults::default()
    });
    let response = create_secret_raw(&sim, &token, "d").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = json(response).await;
    let message = body["message"].as_str().unwrap();
    for value in [&token, &secret, &other] {
        assert!(message.contains(value.as_str()), "{message}");
    }
}

#[tokio::test]
async fn token_replies_state_the_lifetime_as_told() {
    use rekeyd::sim::{ExpiresIn, TokenReply};
    let sim = start_with(SimOptions {
        token_lifetime: Duration::from_secs(600),
        ..SimOptions::default()
    })
    .await;
    let (_, secret) = sim.add_secret(CLIENT, "seed");
    let reply = |r: TokenReply| {
        sim.set_token_reply(r);
        let sim = &sim;
        let secret = secret.clone();
        async move { json(mi_login_raw(sim, CLIENT, &secret).await).await }
    };
    assert_eq!(reply(TokenReply::default()).await["expires_in"], 600);
    let body = reply(TokenReply {
        expires_in: ExpiresIn::SecondsAsString,
        ..TokenReply::default()
    })
    .await;
    assert_eq!(body["expires_in"], "600");
    let body = reply(TokenReply {
        expires_in: ExpiresIn::Omitted,
        ..TokenReply::default()
    })
    .await;
    assert!(body.get("expires_in").is_none(), "{body}");
    let body = reply(TokenReply {
        expires_in: ExpiresIn::Fixed(serde_json::json!("4.0")),
        ..TokenReply::default()
    })
    .await;
    assert_eq!(body["expires_in"], "4.0");

    // A JWT with an exp, which the secret API accepts as the bearer it is.
    let body = reply(TokenReply {
        expires_in: ExpiresIn::Omitted,
        jwt_exp_in: Some(-30),
    })
    .await;
    let jwt = body["access_token"].as_str().unwrap().to_owned();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    assert!(parts[2].starts_with("sim_"));
    use base64::Engine as _;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    let exp = claims["exp"].as_i64().unwrap();
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(exp - iat, -30);
    assert_eq!(sim.token_client(&jwt).as_deref(), Some(CLIENT));
    assert_eq!(list_secrets(&sim, &jwt).await.len(), 1);
}
