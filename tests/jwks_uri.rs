//! Key rotation of a `private_key_jwt` client whose server fetches its
//! keys from a `jwks_uri` (`[credentials.jwks]`): rekeyd publishes the
//! bootstrap key on start, serves the JWK Set on its diagnostics listener,
//! and a rotation run by the daemon adds the new key next to the old one,
//! proves a login signed with it against a real server (oidc-provider,
//! `tests/oidc`) that fetches the set again for the unknown `kid`, and
//! withdraws the old key. And the Kubernetes Secret publisher against the
//! fake API server: keys added and withdrawn through `resourceVersion`
//! conflicts, other writers' data kept.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/kube_fake.rs"]
mod kube_fake;
#[path = "support/oidc.rs"]
mod oidc;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use oidc::{OidcOptions, OidcServer};
use rekeyd::config::{JWKS_SECRET_KEY, JwksConfig, SecretSink};
use rekeyd::provider::jwks_publish::JwksKeys;
use rekeyd::provider::key::{self, Alg, ClientKey};
use rekeyd::provider::{CreateRequest, Deleted, ErrorKind, SecretApi, jwks};
use rekeyd::store::Store;
use rekeyd::store::file::FileStore;
use rekeyd::token::Token;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::sync::watch;

const SERVE_PATH: &str = "/jwks/app.json";
const DEADLINE: Duration = Duration::from_secs(90);

/// Everything the daemon logs, in memory.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The client's `jwks_uri` must be in the server's client list before
/// the server starts, and the daemon (whose diagnostics listener binds
/// port 0) can start only once the server's token URL is known: the
/// `jwks_uri` is a relay the test binds first, which forwards each fetch
/// to the diagnostics listener as it is (status, headers, body) once the
/// daemon is up.
async fn relay(target: watch::Receiver<Option<SocketAddr>>) -> SocketAddr {
    async fn forward(State(mut target): State<watch::Receiver<Option<SocketAddr>>>) -> Response {
        let Ok(addr) = target.wait_for(Option::is_some).await.map(|a| a.unwrap()) else {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        };
        let reply = reqwest::get(format!("http://{addr}{SERVE_PATH}"))
            .await
            .expect("the diagnostics listener answers");
        let status = StatusCode::from_u16(reply.status().as_u16()).unwrap();
        let mut headers = axum::http::HeaderMap::new();
        for name in ["content-type", "cache-control"] {
            if let Some(v) = reply.headers().get(name) {
                headers.insert(name, v.to_str().unwrap().parse().unwrap());
            }
        }
        let body = reply.bytes().await.unwrap();
        (status, headers, body).into_response()
    }
    let app = Router::new()
        .route(SERVE_PATH, get(forward))
        .with_state(target);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn served(diag: SocketAddr) -> reqwest::Response {
    reqwest::get(format!("http://{diag}{SERVE_PATH}"))
        .await
        .unwrap()
}

async fn served_set(diag: SocketAddr) -> Value {
    serde_json::from_slice(&served(diag).await.bytes().await.unwrap()).unwrap()
}

fn kid_of(assertion: &str) -> Option<String> {
    use base64::Engine as _;
    let header = assertion.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let header: Value = serde_json::from_slice(&bytes).ok()?;
    header["kid"].as_str().map(str::to_string)
}

fn private_d(stored: &SecretString) -> String {
    let jwk: Value = serde_json::from_str(stored.expose_secret()).unwrap();
    jwk["d"].as_str().unwrap().to_string()
}

/// The daemon starts with the bootstrap key, publishes it (nothing was
/// published before) and logs in; a rotation publishes a second key,
/// proves it once the server has fetched the set again, withdraws the
/// first, and ends with exactly one key served: the one the server
/// accepts logins signed with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_rotates_a_key_published_at_its_jwks_uri() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );

    let (set_target, target) = watch::channel(None);
    let relay = relay(target).await;
    let Some(server) = OidcServer::start_with(OidcOptions {
        clients: Some(json!([{
            "client_id": "jwks-client",
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "ES256",
            "jwks_uri": format!("http://{relay}{SERVE_PATH}"),
        }])),
        log_assertions: true,
        jwks_uri_fresh_secs: Some(1),
        ..OidcOptions::default()
    })
    .await
    else {
        return;
    };

    let pem = key::generate_pem(Alg::Es256).unwrap();
    let first = ClientKey::from_file_text(&pem).unwrap();
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "app.key", &pem);
    let config = format!(
        r#"state_dir = "{{dir}}/state"
[diag]
listen = "127.0.0.1:0"

[[credentials]]
name = "app"
provider = "oauth2"
client_id = "jwks-client"
auth_method = "private_key_jwt"
initial_key_file = "{{dir}}/app.key"
[credentials.endpoints]
token_url = "{token_url}"
[credentials.rotation]
every = "24h"
grace = "0s"
[credentials.jwks]
serve_path = "{SERVE_PATH}"
"#,
        token_url = server.token_url(),
    );
    let d = daemon::TestDaemon::start_in(dir, &config).await;
    let diag = d.diag_addr.expect("the diagnostics listener is on TCP");
    set_target.send(Some(diag)).unwrap();

    // A fresh install serves its bootstrap key, from the default file.
    let file = d.dir.path().join("state/jwks/app.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let reply = served(diag).await;
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.headers()["content-type"], "application/jwk-set+json");
    assert_eq!(reply.headers()["cache-control"], "max-age=30");
    let set: Value = serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
    assert_eq!(jwks::ids(&set), [first.kid()]);
    assert!(set["keys"][0].get("d").is_none(), "public members only");
    let http = reqwest::Client::new();
    let post = http
        .post(format!("http://{diag}{SERVE_PATH}"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    let other = reqwest::get(format!("http://{diag}/jwks/other.json"))
        .await
        .unwrap();
    assert_eq!(other.status(), 404, "only the configured path is served");

    // The server fetched the set through the jwks_uri and accepts the key.
    let handle = d.handle("app");
    let first_token = tokio::time::timeout(daemon::EVENT_TIMEOUT, async {
        let mut rx = handle.token.clone();
        rx.wait_for(Option::is_some).await.map(|_| ())
    })
    .await;
    assert!(
        matches!(first_token, Ok(Ok(()))),
        "no first token\nserver:\n{}\ndaemon:\n{}",
        server.logs(),
        logs.text()
    );

    handle.rotate_now.notify_one();
    let store = FileStore::new(&d.config.state_dir);
    let started = Instant::now();
    let (record, set) = loop {
        let record = store.load("app").await.unwrap().unwrap().value;
        let set = served_set(diag).await;
        if record.current.id.as_deref() != Some(first.kid())
            && !record.is_unfinished()
            && record.retire.is_empty()
            && jwks::ids(&set).len() == 1
        {
            break (record, set);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the rotation did not end: phase {}, served {:?}\nserver:\n{}",
            record.phase(),
            jwks::ids(&set),
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let new_kid = record.current.id.clone().unwrap();
    assert_eq!(jwks::ids(&set), [new_kid.as_str()], "exactly the new key");
    assert_ne!(new_kid, first.kid());

    // The server was sent assertions signed with the new key and accepted
    // them (the rotation's proof), and accepts a login signed with it now.
    assert!(
        server
            .assertions()
            .iter()
            .any(|(status, a)| *status == 200 && kid_of(a).as_deref() == Some(new_kid.as_str())),
        "a login signed with the new key was accepted"
    );
    let provider = rekeyd::provider::build(&d.config.credentials[0]).unwrap();
    provider
        .login(&record.current.value)
        .await
        .expect("a login signed with the new key is accepted");

    // No private key member ever reached the logs.
    let text = logs.text();
    assert!(
        text.contains("public key published") && text.contains("rotation complete"),
        "the daemon logged: {text}"
    );
    for d_member in [
        private_d(&first.to_secret()),
        private_d(&record.current.value),
    ] {
        assert!(!text.contains(&d_member), "a private key in the logs");
    }
    d.stop().await;
}

fn bearer() -> Token {
    Token::new(
        SecretString::from("unused".to_string()),
        "Bearer".into(),
        None,
        Duration::from_secs(60),
    )
}

/// The Secret publisher writes at the `resourceVersion` it read: each
/// conflict (another writer got in first) is read again and merged, so
/// the other writer's data keys survive and the set ends as wanted.
#[tokio::test]
async fn the_secret_publisher_adds_and_withdraws_keys_through_conflicts() {
    let fake = kube_fake::KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.kubeconfig(dir.path(), "apps", "token-a");
    let keys = JwksKeys::new(
        "c".into(),
        &JwksConfig {
            file: None,
            serve_path: None,
            kubernetes_secret: Some(SecretSink {
                namespace: None,
                secret: "app-jwks".into(),
                key: JWKS_SECRET_KEY.into(),
                kubeconfig: Some(kubeconfig),
            }),
        },
    );
    let set = || -> Value {
        let data = fake.secret_data("apps", "app-jwks").expect("the Secret");
        serde_json::from_slice(&data[JWKS_SECRET_KEY]).unwrap()
    };
    let old = key::generate(Alg::Es256).unwrap();
    let new = key::generate(Alg::Es256).unwrap();

    // An account that may not create Secrets is told to create it first.
    fake.fail(kube_fake::FailRule {
        method: Some(axum::http::Method::POST),
        kind: Some(kube_fake::Kind::Secret),
        code: 403,
        remaining: Some(1),
    });
    let e = keys.publish_initial(&[&old.to_secret()]).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Refused);
    assert!(e.to_string().contains("create it beforehand"), "{e}");

    // Created with the bootstrap key; an existing set is left alone.
    assert!(keys.publish_initial(&[&old.to_secret()]).await.unwrap());
    assert!(!keys.publish_initial(&[&new.to_secret()]).await.unwrap());
    assert_eq!(jwks::ids(&set()), [old.kid()]);

    fake.inject_conflicts_adding_keys(2, "other");
    let secret = new.to_secret();
    let request = CreateRequest {
        description: "",
        value: Some(&secret),
    };
    let created = keys.create(&bearer(), request).await.unwrap();
    assert_eq!(created.id.as_deref(), Some(new.kid()));
    assert_eq!(fake.conflicts_left(), 0, "both conflicts were met");
    assert_eq!(jwks::ids(&set()), [old.kid(), new.kid()]);
    let data = fake.secret_data("apps", "app-jwks").unwrap();
    assert!(
        data.contains_key("other1") && data.contains_key("other2"),
        "the other writer's keys are kept: {:?}",
        data.keys().collect::<Vec<_>>()
    );
    // Publishing again writes nothing.
    keys.create(&bearer(), request).await.unwrap();
    assert_eq!(jwks::ids(&set()), [old.kid(), new.kid()]);
    let listed: Vec<String> = keys
        .list(&bearer())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, [old.kid(), new.kid()]);

    fake.inject_conflicts(3);
    assert_eq!(
        keys.delete(&bearer(), old.kid()).await.unwrap(),
        Deleted::Deleted
    );
    assert_eq!(fake.conflicts_left(), 0);
    assert_eq!(jwks::ids(&set()), [new.kid()]);
    assert!(set()["keys"][0].get("d").is_none(), "public members only");
    assert_eq!(
        keys.delete(&bearer(), old.kid()).await.unwrap(),
        Deleted::NotFound
    );

    // The last key is never withdrawn, and a writer that never stops
    // conflicting is an error that names the Secret, not a loop.
    let e = keys.delete(&bearer(), new.kid()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Refused);
    fake.inject_conflicts(1000);
    let third = key::generate(Alg::Es256).unwrap();
    let third_secret = third.to_secret();
    let e = keys
        .create(
            &bearer(),
            CreateRequest {
                description: "",
                value: Some(&third_secret),
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("apps/app-jwks"), "{e}");
    assert!(!e.to_string().contains(&private_d(&third_secret)));
}
