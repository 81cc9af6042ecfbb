//! rekeyd against a real third-party OAuth2 server (`oidc-provider` from
//! npm): both client authentication methods, tokens checked through the
//! server's own introspection endpoint, refresh before expiry, and token
//! profiles (`[[credentials.tokens]]`) of one client with other scopes.
//! oidc-provider has no secret-management API, so rotation under profiles
//! is tested against the simulated provider (`tests/profiles.rs`).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/oidc.rs"]
mod oidc;

use oidc::{BASIC_CLIENT, OidcOptions, OidcServer, POST_CLIENT};
use secrecy::ExposeSecret;

fn config(server: &OidcServer, client: &str, method: &str) -> String {
    format!(
        r#"state_dir = "{{dir}}/state"
[[credentials]]
name = "idp"
provider = "oauth2"
client_id = "{client}"
auth_method = "{method}"
scope = "api:read"
initial_secret_file = "{{dir}}/idp.secret"
[credentials.endpoints]
token_url = "{}"
"#,
        server.token_url()
    )
}

async fn token_is_active_for(server: &OidcServer, client: &str, secret: &str, method: &str) {
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "idp.secret", secret);
    let d = daemon::TestDaemon::start_in(dir, &config(server, client, method)).await;
    let handle = d.handle("idp");
    let token = daemon::wait_token(&handle, |_| true).await;
    let info = server
        .introspect(client, secret, token.access_token.expose_secret())
        .await;
    assert_eq!(
        info["active"],
        true,
        "introspection: {info}; server log:\n{}",
        server.logs()
    );
    assert_eq!(info["client_id"], client);
    assert_eq!(info["scope"], "api:read");
    d.stop().await;
}

#[tokio::test]
async fn client_secret_basic_token_is_active() {
    let Some(server) = OidcServer::start().await else {
        return;
    };
    let secret = server.basic_secret.clone();
    token_is_active_for(&server, BASIC_CLIENT, &secret, "client_secret_basic").await;
}

#[tokio::test]
async fn client_secret_post_token_is_active() {
    let Some(server) = OidcServer::start().await else {
        return;
    };
    let secret = server.post_secret.clone();
    token_is_active_for(&server, POST_CLIENT, &secret, "client_secret_post").await;
}

#[tokio::test]
async fn refreshes_before_expiry_and_rejects_wrong_method() {
    let Some(server) = OidcServer::start_with(OidcOptions {
        token_ttl_secs: Some(3),
        ..OidcOptions::default()
    })
    .await
    else {
        return;
    };
    let secret = server.basic_secret.clone();
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "idp.secret", &secret);
    let d =
        daemon::TestDaemon::start_in(dir, &config(&server, BASIC_CLIENT, "client_secret_basic"))
            .await;
    let handle = d.handle("idp");
    let first = daemon::wait_token(&handle, |_| true).await;
    let second = daemon::wait_token(&handle, |t| {
        t.access_token.expose_secret() != first.access_token.expose_secret()
    })
    .await;
    assert!(
        second.received_at < first.expires_at(),
        "the next token arrived before the first expired"
    );
    let info = server
        .introspect(BASIC_CLIENT, &secret, second.access_token.expose_secret())
        .await;
    assert_eq!(info["active"], true);
    d.stop().await;

    // The same client configured with the wrong method is refused, and the
    // error names the status and the server's error code.
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "idp.secret", &secret);
    let d = daemon::TestDaemon::start_in(dir, &config(&server, BASIC_CLIENT, "client_secret_post"))
        .await;
    let status = daemon::wait_status(&d.handle("idp"), |s| s.locked_out).await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains("HTTP 401") && error.contains("invalid_client"),
        "{error}"
    );
    d.stop().await;
}

/// One credential, two token profiles with other scopes, tokens living 3 s:
/// the server grants each its own scope, and each is refreshed on its own
/// lifetime with the one secret.
#[tokio::test]
async fn two_profiles_with_different_scopes_are_served_and_refreshed() {
    let Some(server) = OidcServer::start_with(OidcOptions {
        token_ttl_secs: Some(3),
        ..OidcOptions::default()
    })
    .await
    else {
        return;
    };
    let secret = server.basic_secret.clone();
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "idp.secret", &secret);
    let text = format!(
        r#"{}
[[credentials.tokens]]
name = "idp-read"
scope = "api:read"
[[credentials.tokens.sinks]]
path = "{{dir}}/read.token"

[[credentials.tokens]]
name = "idp-write"
scope = "api:write"
[[credentials.tokens.sinks]]
path = "{{dir}}/write.token"
"#,
        config(&server, BASIC_CLIENT, "client_secret_basic").replace("api:read", "api:admin")
    );
    let d = daemon::TestDaemon::start_in(dir, &text).await;
    for (name, scope, file) in [
        ("idp", "api:admin", None),
        ("idp-read", "api:read", Some("read.token")),
        ("idp-write", "api:write", Some("write.token")),
    ] {
        let handle = d.handle(name);
        let first = daemon::wait_token(&handle, |_| true).await;
        let second = daemon::wait_token(&handle, |t| {
            t.access_token.expose_secret() != first.access_token.expose_secret()
        })
        .await;
        assert!(
            second.received_at < first.expires_at(),
            "{name}: the next token arrived before the first expired"
        );
        let info = server
            .introspect(BASIC_CLIENT, &secret, second.access_token.expose_secret())
            .await;
        assert_eq!(
            info["active"],
            true,
            "{name}: {info}; server log:\n{}",
            server.logs()
        );
        assert_eq!(info["client_id"], BASIC_CLIENT, "{name}");
        assert_eq!(info["scope"], scope, "{name}: {info}");
        if let Some(file) = file {
            // The profile's own token file follows its refreshes.
            let path = d.dir.path().join(file);
            let deadline = tokio::time::Instant::now() + daemon::EVENT_TIMEOUT;
            loop {
                let held = std::fs::read_to_string(&path).unwrap_or_default();
                let served = handle
                    .valid_token()
                    .map(|t| t.access_token.expose_secret().to_string());
                if served.is_some_and(|s| s == held.trim()) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name}: {} never held the served token",
                    path.display()
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    d.stop().await;
}
