//! Smoke test of the oidc-provider test server itself (tests/oidc), so that a
//! broken harness shows up as such and not as a rekeyd failure.

#[path = "support/oidc.rs"]
mod oidc;

use oidc::{BASIC_CLIENT, OidcOptions, OidcServer, POST_CLIENT};
use reqwest::StatusCode;

async fn post_form(req: reqwest::RequestBuilder) -> (StatusCode, serde_json::Value) {
    let resp = req.send().await.expect("request failed");
    let status = resp.status();
    let body = resp.bytes().await.expect("body");
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("non-JSON answer ({e}): {}", String::from_utf8_lossy(&body)));
    (status, json)
}

async fn token_basic(
    srv: &OidcServer,
    id: &str,
    secret: &str,
    scope: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let req = reqwest::Client::new()
        .post(srv.token_url())
        .basic_auth(id, Some(secret))
        .form(&form);
    post_form(req).await
}

async fn token_post(
    srv: &OidcServer,
    id: &str,
    secret: &str,
    scope: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", id),
        ("client_secret", secret),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let req = reqwest::Client::new().post(srv.token_url()).form(&form);
    post_form(req).await
}

fn access_token(body: &serde_json::Value) -> &str {
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {body}"))
}

#[tokio::test]
async fn discovery_matches_helper_urls() {
    let Some(srv) = OidcServer::start().await else {
        return;
    };
    let resp = reqwest::get(srv.discovery_url()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(doc["issuer"], srv.issuer());
    assert_eq!(doc["token_endpoint"], srv.token_url());
    assert_eq!(doc["introspection_endpoint"], srv.introspection_url());
    assert_eq!(doc["revocation_endpoint"], srv.revocation_url());
}

#[tokio::test]
async fn client_secret_basic_token_is_active() {
    let Some(srv) = OidcServer::start().await else {
        return;
    };
    let (status, body) = token_basic(&srv, BASIC_CLIENT, &srv.basic_secret, Some("api:read")).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", srv.logs());
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "api:read");
    assert!(body["expires_in"].as_u64().unwrap() > 0, "{body}");

    let info = srv
        .introspect(BASIC_CLIENT, &srv.basic_secret, access_token(&body))
        .await;
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["client_id"], BASIC_CLIENT);
    assert_eq!(info["scope"], "api:read");
    assert_eq!(info["iss"], srv.issuer());
}

#[tokio::test]
async fn client_secret_post_token_is_active() {
    let Some(srv) = OidcServer::start().await else {
        return;
    };
    let (status, body) = token_post(&srv, POST_CLIENT, &srv.post_secret, None).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", srv.logs());
    assert!(body["expires_in"].as_u64().unwrap() > 0, "{body}");
    let token = access_token(&body);

    // Its own token, and via the other client too.
    let info = srv.introspect(POST_CLIENT, &srv.post_secret, token).await;
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["client_id"], POST_CLIENT);
    let info = srv
        .introspect_post(POST_CLIENT, &srv.post_secret, token)
        .await;
    assert_eq!(info["client_id"], POST_CLIENT);
    let info = srv.introspect(BASIC_CLIENT, &srv.basic_secret, token).await;
    assert_eq!(info["client_id"], POST_CLIENT);

    let info = srv
        .introspect(POST_CLIENT, &srv.post_secret, "not-a-token")
        .await;
    assert_eq!(info, serde_json::json!({ "active": false }));
}

#[tokio::test]
async fn wrong_secrets_and_wrong_methods_are_rejected() {
    let Some(srv) = OidcServer::start().await else {
        return;
    };

    let (status, body) = token_basic(&srv, BASIC_CLIENT, "wrong", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");

    let (status, body) = token_post(&srv, POST_CLIENT, "wrong", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");

    // One client's secret does not work for the other.
    let (status, _) = token_basic(&srv, BASIC_CLIENT, &srv.post_secret, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Registered method is enforced (server.js strict mode).
    let (status, body) = token_post(&srv, BASIC_CLIENT, &srv.basic_secret, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");
    let (status, body) = token_basic(&srv, POST_CLIENT, &srv.post_secret, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // No credentials at all.
    let req = reqwest::Client::new()
        .post(srv.token_url())
        .form(&[("grant_type", "client_credentials")]);
    let (status, body) = post_form(req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request");
}

#[tokio::test]
async fn short_ttl_tokens_expire() {
    let Some(srv) = OidcServer::start_with(OidcOptions {
        token_ttl_secs: Some(1),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let (status, body) = token_basic(&srv, BASIC_CLIENT, &srv.basic_secret, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_in"], 1);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let info = srv
        .introspect(BASIC_CLIENT, &srv.basic_secret, access_token(&body))
        .await;
    assert_eq!(info["active"], false, "{info}");
}
