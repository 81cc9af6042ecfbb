//! Key-based clients against a real authorization server (`oidc-provider`
//! from npm, tests/oidc/server.js): `private_key_jwt` logins signed with
//! ES256, RS256 and EdDSA keys (RFC 7523 §2.2), a new assertion for every
//! attempt, a replayed assertion refused by the server, and
//! `client_assertion_file` read afresh after the file is replaced the way
//! the kubelet replaces a projected service-account token.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/oidc.rs"]
mod oidc;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use oidc::{OidcOptions, OidcServer};
use rekeyd::provider::assertion;
use rekeyd::provider::key::{Alg, ClientKey, generate_pem};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

/// A client_secret_basic client that introspects the others' tokens.
const INTROSPECTOR: &str = "introspector";
const INTROSPECTOR_SECRET: &str = "introspector-secret-0123456789";

fn key_client(client_id: &str, key: &ClientKey) -> Value {
    json!({
        "client_id": client_id,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": key.alg().as_str(),
        "jwks": {"keys": [key.public_jwk()]},
    })
}

async fn server(clients: Vec<Value>) -> Option<OidcServer> {
    let mut all = clients;
    all.push(json!({
        "client_id": INTROSPECTOR,
        "client_secret": INTROSPECTOR_SECRET,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "token_endpoint_auth_method": "client_secret_basic",
    }));
    OidcServer::start_with(OidcOptions {
        clients: Some(Value::Array(all)),
        log_assertions: true,
        ..OidcOptions::default()
    })
    .await
}

fn credential(name: &str, client_id: &str, key_file: &str, server: &OidcServer) -> String {
    format!(
        r#"
[[credentials]]
name = "{name}"
provider = "oauth2"
client_id = "{client_id}"
auth_method = "private_key_jwt"
initial_key_file = "{{dir}}/{key_file}"
scope = "api:read"
[credentials.endpoints]
token_url = "{}"
"#,
        server.token_url()
    )
}

/// The JOSE header and claims of a compact JWS.
fn decode(jwt: &str) -> (Value, Value) {
    let mut parts = jwt.split('.');
    let mut part = || serde_json::from_slice(&B64.decode(parts.next().unwrap()).unwrap()).unwrap();
    (part(), part())
}

/// Polls `check` until it holds (the server's log is written by another
/// process: there is no event to await).
async fn eventually(what: &str, server: &OidcServer, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within 60 s; server log:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn private_key_jwt_logs_in_with_es256_rs256_and_eddsa_keys() {
    let es_pem = generate_pem(Alg::Es256).unwrap();
    let es = ClientKey::from_file_text(&es_pem).unwrap();
    let rs_pem = generate_pem(Alg::Rs256).unwrap();
    let rs = ClientKey::from_file_text(&rs_pem).unwrap();
    // The Ed25519 key comes as a JWK file with its own kid.
    let mut ed_jwk: Value = serde_json::from_str(
        ClientKey::from_file_text(&generate_pem(Alg::EdDsa).unwrap())
            .unwrap()
            .to_secret()
            .expose_secret(),
    )
    .unwrap();
    ed_jwk["kid"] = "ed-key-1".into();
    let ed = ClientKey::from_jwk_json(&ed_jwk.to_string()).unwrap();
    let Some(server) = server(vec![
        key_client("es-client", &es),
        key_client("rs-client", &rs),
        key_client("ed-client", &ed),
    ])
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "es.pem", &es_pem);
    daemon::write_secret(dir.path(), "rs.pem", &rs_pem);
    daemon::write_secret(dir.path(), "ed.jwk", &ed_jwk.to_string());
    let config = format!(
        "state_dir = \"{{dir}}/state\"\n{}{}{}",
        // A token profile signs with the credential's key.
        credential("es", "es-client", "es.pem", &server)
            + "[[credentials.tokens]]\nname = \"es-write\"\nscope = \"api:write\"\n",
        credential("rs", "rs-client", "rs.pem", &server),
        credential("ed", "ed-client", "ed.jwk", &server),
    );
    let d = daemon::TestDaemon::start_in(dir, &config).await;
    let profile = daemon::wait_token(&d.handle("es-write"), |_| true).await;
    let info = server
        .introspect(
            INTROSPECTOR,
            INTROSPECTOR_SECRET,
            profile.access_token.expose_secret(),
        )
        .await;
    assert_eq!(
        (info["client_id"].as_str(), info["scope"].as_str()),
        (Some("es-client"), Some("api:write"))
    );
    for (name, client, key) in [
        ("es", "es-client", &es),
        ("rs", "rs-client", &rs),
        ("ed", "ed-client", &ed),
    ] {
        let handle = d.handle(name);
        let token = daemon::wait_token(&handle, |_| true).await;
        let info = server
            .introspect(
                INTROSPECTOR,
                INTROSPECTOR_SECRET,
                token.access_token.expose_secret(),
            )
            .await;
        assert_eq!(info["active"], true, "{name}: {info}\n{}", server.logs());
        assert_eq!(info["client_id"], client);
        // The assertion the server accepted: signed with this key.
        let accepted: Vec<(Value, Value)> = server
            .assertions()
            .iter()
            .filter(|(status, _)| *status == 200)
            .map(|(_, jwt)| decode(jwt))
            .filter(|(_, claims)| claims["iss"] == client)
            .collect();
        // "es" logged in for its token profile too, with its own jti.
        let logins = if name == "es" { 2 } else { 1 };
        assert_eq!(accepted.len(), logins, "{name}: {accepted:?}");
        for (header, claims) in &accepted {
            assert_eq!(header["alg"], key.alg().as_str());
            assert_eq!(header["kid"], key.kid());
            assert_eq!(claims["sub"], client);
            assert_eq!(claims["aud"], server.token_url());
            assert_eq!(
                claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
                60
            );
        }
        if logins == 2 {
            assert_ne!(accepted[0].1["jti"], accepted[1].1["jti"]);
        }
        // Status shows the method and the key in use, never the key.
        let status = handle.status.borrow().clone();
        let auth = status.client_auth.expect("client_auth in status");
        assert_eq!(auth.auth_method, "private_key_jwt");
        assert_eq!(auth.key_id.as_deref(), Some(key.kid()));
        assert!(auth.key_created_at.is_some());
        let shown = serde_json::to_string(&*handle.status.borrow()).unwrap();
        let d_value = private_d(key);
        assert!(!shown.contains(&d_value), "{shown}");
    }
    // The store holds the key as a private JWK, mode 0600, not the PEM.
    let record = d.dir.path().join("state/credentials/rs.json");
    let meta = std::fs::metadata(&record).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let stored = std::fs::read_to_string(&record).unwrap();
    assert!(
        stored.contains(rs.kid()) && !stored.contains("BEGIN"),
        "{stored}"
    );
    // Debug of the configuration and of the keys shows no key material.
    for key in [&es, &rs, &ed] {
        let d_value = private_d(key);
        let config = format!("{:?}", d.config);
        let shown = format!("{key:?}");
        assert!(
            !config.contains(&d_value) && !shown.contains(&d_value),
            "{shown}"
        );
        assert!(shown.contains(key.kid()), "{shown}");
    }
    // The kid of a PEM key is its RFC 7638 thumbprint; a JWK keeps its own.
    assert_eq!(es.kid(), es.thumbprint());
    assert_eq!(ed.kid(), "ed-key-1");
    d.stop().await;
}

fn private_d(key: &ClientKey) -> String {
    let jwk: Value = serde_json::from_str(key.to_secret().expose_secret()).unwrap();
    jwk["d"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn every_attempt_has_its_own_jti_and_a_replayed_assertion_is_refused() {
    let key = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
    // "stranger" is registered with another key than rekeyd holds: every
    // login is refused, and each retry must still sign anew.
    let other = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
    let Some(server) = server(vec![
        key_client("app", &key),
        key_client("stranger", &other),
    ])
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pem = generate_pem(Alg::Es256).unwrap();
    let held = ClientKey::from_file_text(&pem).unwrap();
    daemon::write_secret(dir.path(), "app.jwk", key.to_secret().expose_secret());
    daemon::write_secret(dir.path(), "stranger.pem", &pem);
    let config = format!(
        "state_dir = \"{{dir}}/state\"\n{}{}",
        credential("app", "app", "app.jwk", &server),
        credential("stranger", "stranger", "stranger.pem", &server),
    );
    let d = daemon::TestDaemon::start_in(dir, &config).await;

    // Refused logins, retried at once on request: a new jti each time.
    let stranger = d.handle("stranger");
    let of_stranger = || {
        server
            .assertions()
            .into_iter()
            .filter(|(_, jwt)| decode(jwt).1["iss"] == "stranger")
            .collect::<Vec<_>>()
    };
    for attempts in 1..=3 {
        eventually("a refused attempt", &server, || {
            of_stranger().len() >= attempts
        })
        .await;
        stranger.refresh_now.notify_one();
    }
    let refused = of_stranger();
    assert!(
        refused.iter().all(|(status, _)| *status == 401),
        "{refused:?}"
    );
    let mut jtis: Vec<String> = refused
        .iter()
        .map(|(_, jwt)| decode(jwt).1["jti"].as_str().unwrap().to_string())
        .collect();
    let attempts = jtis.len();
    jtis.sort();
    jtis.dedup();
    assert_eq!(jtis.len(), attempts, "a jti was sent twice");
    assert!(
        refused
            .iter()
            .all(|(_, jwt)| decode(jwt).0["kid"] == held.kid())
    );
    let status = daemon::wait_status(&stranger, |s| s.last_error.is_some()).await;
    let error = status.last_error.unwrap();
    assert!(error.contains("invalid_client"), "{error}");
    for (_, jwt) in &refused {
        assert!(!error.contains(jwt.as_str()), "{error}");
    }

    // The server refuses an assertion it has seen (RFC 7523 §3 item 7):
    // rekeyd's first one, sent again.
    let app = d.handle("app");
    let first = daemon::wait_token(&app, |_| true).await;
    let sent: Vec<String> = server
        .assertions()
        .into_iter()
        .filter(|(status, jwt)| *status == 200 && decode(jwt).1["iss"] == "app")
        .map(|(_, jwt)| jwt)
        .collect();
    assert_eq!(sent.len(), 1);
    let replay = |assertion: String| {
        let url = server.token_url();
        async move {
            reqwest::Client::new()
                .post(url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", "app"),
                    ("client_assertion_type", assertion::JWT_BEARER),
                    ("client_assertion", assertion.as_str()),
                ])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(replay(sent[0].clone()).await, 401, "{}", server.logs());
    // The same request with a newly minted assertion is accepted, so the
    // refusal above was the replay.
    let fresh = assertion::mint(&key, "app", &server.token_url(), SystemTime::now()).unwrap();
    assert_eq!(replay(fresh.expose_secret().to_string()).await, 200);
    assert_eq!(replay(fresh.expose_secret().to_string()).await, 401);

    // rekeyd's next login mints a new one and succeeds.
    app.refresh_now.notify_one();
    let second = daemon::wait_token(&app, |t| {
        t.access_token.expose_secret() != first.access_token.expose_secret()
    })
    .await;
    assert!(second.received_at > first.received_at);
    let by_rekeyd: Vec<String> = server
        .assertions()
        .into_iter()
        .filter(|(status, jwt)| *status == 200 && decode(jwt).1["iss"] == "app")
        .map(|(_, jwt)| decode(&jwt).1["jti"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(by_rekeyd.len(), 3, "rekeyd's two logins and the minted one");
    assert_ne!(by_rekeyd[0], by_rekeyd[2]);
    d.stop().await;
}

/// Writes `token` the way the kubelet updates a projected volume: a new
/// timestamped directory, a `..data` symlink swapped to it by rename, and
/// `token -> ..data/token` unchanged.
fn kubelet_write(volume: &Path, generation: u32, token: &str) {
    let data = volume.join(format!("..2026_11_30_{generation:02}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("token"), token).unwrap();
    let tmp = volume.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, volume.join("..data")).unwrap();
    let link = volume.join("token");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/token", &link).unwrap();
    }
}

fn assertion_file_config(server: &OidcServer, volume: &Path) -> String {
    format!(
        r#"state_dir = "{{dir}}/state"
[[credentials]]
name = "workload"
provider = "oauth2"
client_id = "workload"
auth_method = "client_assertion_file"
client_assertion_file = "{}/token"
scope = "api:read"
[credentials.endpoints]
token_url = "{}"
"#,
        volume.display(),
        server.token_url()
    )
}

#[tokio::test]
async fn client_assertion_file_is_read_afresh_when_the_platform_replaces_it() {
    // The platform's issuer: a key the server trusts for client "workload"
    // (in Entra: the federated credential's issuer and subject).
    let issuer = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
    let Some(server) = server(vec![key_client("workload", &issuer)]).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("tokens");
    std::fs::create_dir(&volume).unwrap();
    let mint = || {
        assertion::mint(&issuer, "workload", &server.token_url(), SystemTime::now())
            .unwrap()
            .expose_secret()
            .to_string()
    };
    let one = mint();
    kubelet_write(&volume, 1, &one);
    let config = assertion_file_config(&server, &volume);
    let d = daemon::TestDaemon::start_in(dir, &config).await;
    let handle = d.handle("workload");
    let first = daemon::wait_token(&handle, |_| true).await;
    assert_eq!(server.assertions(), vec![(200, one.clone())]);
    let auth = handle.status.borrow().client_auth.clone().unwrap();
    assert_eq!(auth.auth_method, "client_assertion_file");
    assert_eq!(
        auth.assertion_file.as_deref(),
        Some(volume.join("token").to_str().unwrap())
    );
    assert!(auth.key_id.is_none());
    // Nothing is stored for the credential.
    let records = d.dir.path().join("state").join("credentials");
    assert!(!records.join("workload.json").exists());

    let two = mint();
    kubelet_write(&volume, 2, &two);
    handle.refresh_now.notify_one();
    let second = daemon::wait_token(&handle, |t| {
        t.access_token.expose_secret() != first.access_token.expose_secret()
    })
    .await;
    assert!(second.received_at > first.received_at);
    assert_eq!(
        server.assertions(),
        vec![(200, one), (200, two)],
        "the replaced file's assertion, and only it, was sent"
    );
    d.stop().await;
}

#[tokio::test]
async fn an_expired_assertion_file_is_reported_with_its_expiry() {
    let issuer = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
    let Some(server) = server(vec![key_client("workload", &issuer)]).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("tokens");
    std::fs::create_dir(&volume).unwrap();
    let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let claims = assertion::claims(
        "workload",
        &server.token_url(),
        issued,
        assertion::new_jti(),
    );
    let expired = assertion::sign(&issuer, &claims).unwrap();
    kubelet_write(&volume, 1, expired.expose_secret());
    let config = assertion_file_config(&server, &volume);
    let d = daemon::TestDaemon::start_in(dir, &config).await;
    let status = daemon::wait_status(&d.handle("workload"), |s| s.last_error.is_some()).await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains("expired at 2023-11-14T22:14:20Z")
            && error.contains(volume.join("token").to_str().unwrap()),
        "{error}"
    );
    assert!(!error.contains(expired.expose_secret()), "{error}");
    assert!(
        server.assertions().is_empty(),
        "an expired assertion is not sent"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_key_file_that_does_not_parse_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n";
    daemon::write_secret(dir.path(), "bad.pem", text);
    let config = format!(
        "state_dir = \"{0}/state\"\n[[credentials]]\nname = \"app\"\nprovider = \"oauth2\"\n\
         client_id = \"app\"\nauth_method = \"private_key_jwt\"\ninitial_key_file = \"{0}/bad.pem\"\n\
         [credentials.endpoints]\ntoken_url = \"http://127.0.0.1:9/token\"\n",
        dir.path().display()
    );
    let config = rekeyd::config::Config::from_toml(&config).unwrap();
    let err = match rekeyd::daemon::start(&config, tokio_util::sync::CancellationToken::new()).await
    {
        Ok(_) => panic!("a daemon with an unusable key started"),
        Err(e) => e,
    };
    let message = err.to_string();
    assert!(
        message.contains("credentials[0].initial_key_file")
            && message.contains("PKCS#8")
            && !message.contains("bm90IGEga2V5"),
        "{message}"
    );
    assert_eq!(err.exit_code(), 78);
}

/// I7 for keys: a daemon at trace level (text and JSON logs) whose clients
/// log in with keys and an assertion file, including refused logins,
/// writes neither a private key (its PEM lines, its JWK, any private
/// member) nor any assertion it sent, to its logs or `rekeyd status`.
async fn key_material_never_reaches_the_logs(log_format: &str) {
    let rs_pem = generate_pem(Alg::Rs256).unwrap();
    let rs = ClientKey::from_file_text(&rs_pem).unwrap();
    let ed_pem = generate_pem(Alg::EdDsa).unwrap();
    let ed = ClientKey::from_file_text(&ed_pem).unwrap();
    let issuer = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
    let other = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
    let Some(server) = OidcServer::start_with(OidcOptions {
        clients: Some(json!([
            key_client("app", &rs),
            key_client("stranger", &other),
            key_client("workload", &issuer)
        ])),
        log_assertions: true,
        token_ttl_secs: Some(2),
        ..OidcOptions::default()
    })
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    daemon::write_secret(dir.path(), "app.pem", &rs_pem);
    daemon::write_secret(dir.path(), "stranger.pem", &ed_pem);
    let volume = dir.path().join("tokens");
    std::fs::create_dir(&volume).unwrap();
    let workload_assertion =
        assertion::mint(&issuer, "workload", &server.token_url(), SystemTime::now()).unwrap();
    kubelet_write(&volume, 1, workload_assertion.expose_secret());
    let config = format!(
        "state_dir = \"{d}/state\"\n[api]\nlisten = \"unix:{d}/api.sock\"\nkey_file = \"{d}/api.key\"\n\
         [log]\nformat = \"{log_format}\"\n{}{}\n[[credentials]]\nname = \"workload\"\nprovider = \"oauth2\"\n\
         client_id = \"workload\"\nauth_method = \"client_assertion_file\"\n\
         client_assertion_file = \"{d}/tokens/token\"\n[credentials.endpoints]\ntoken_url = \"{}\"\n",
        credential("app", "app", "app.pem", &server),
        credential("stranger", "stranger", "stranger.pem", &server),
        server.token_url(),
    )
    .replace("{dir}", &d);
    let config_path = dir.path().join("rekeyd.toml");
    std::fs::write(&config_path, config).unwrap();
    let rekeyd = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"));
        cmd.args(args)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "trace");
        cmd
    };
    let mut child = rekeyd(&["run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut buf).unwrap();
        buf
    });
    let stop = scopeguard(pid);
    // Several refreshes of "app" (2 s tokens), refusals of "stranger", and
    // the assertion file's one accepted and its replays refused.
    let count = |client: &str, status: u16| {
        server
            .assertions()
            .iter()
            .filter(|(s, jwt)| *s == status && decode(jwt).1["iss"] == client)
            .count()
    };
    eventually("refreshes and refusals", &server, || {
        count("app", 200) >= 3 && count("stranger", 401) >= 1 && count("workload", 200) >= 1
    })
    .await;
    let status = rekeyd(&["status", "--json"]).output().unwrap();
    let status_text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status_text.contains(rs.kid()),
        "status shows the key id: {status_text}"
    );
    drop(stop);
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let logs = String::from_utf8(reader.join().unwrap()).unwrap() + &stdout + &status_text;
    assert!(
        logs.contains("TRACE") && logs.contains("oauth2 login failed"),
        "trace logging was on and the logins logged ({} bytes)",
        logs.len()
    );
    assert!(logs.contains("invalid_client"), "the refusals were logged");

    let mut never: Vec<String> = Vec::new();
    for pem in [&rs_pem, &ed_pem] {
        never.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                .map(str::to_string),
        );
    }
    for key in [&rs, &ed] {
        let secret = key.to_secret();
        never.push(secret.expose_secret().to_string());
        let jwk: Value = serde_json::from_str(secret.expose_secret()).unwrap();
        for member in ["d", "p", "q", "dp", "dq", "qi"] {
            if let Some(v) = jwk[member].as_str() {
                never.push(v.to_string());
            }
        }
    }
    let sent = server.assertions();
    assert!(sent.len() >= 5);
    for (_, jwt) in &sent {
        never.push(jwt.clone());
        never.push(jwt.rsplit('.').next().unwrap().to_string());
    }
    for value in &never {
        assert!(
            !logs.contains(value.as_str()),
            "key material or an assertion reached the logs"
        );
    }
}

/// Sends SIGTERM to the daemon when dropped (a failed assertion must not
/// leave it running).
struct Terminate(i32);

impl Drop for Terminate {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
    }
}

fn scopeguard(pid: i32) -> Terminate {
    Terminate(pid)
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_at_trace_hold_no_key_or_assertion() {
    key_material_never_reaches_the_logs("text").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_at_trace_hold_no_key_or_assertion() {
    key_material_never_reaches_the_logs("json").await;
}

/// A token endpoint that echoes the client assertion it was sent in its
/// refusal: the error rekeyd keeps holds it only as `[redacted]`.
#[tokio::test]
async fn an_echoed_assertion_is_scrubbed_from_the_error() {
    use axum::{Form, Json, Router, http::StatusCode, routing::post};
    use std::collections::HashMap;
    let app = Router::new().route(
        "/token",
        post(|Form(form): Form<HashMap<String, String>>| async move {
            let echoed = form.get("client_assertion").cloned().unwrap_or_default();
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_client", "error_description": format!("bad {echoed}")})),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "app.pem", &generate_pem(Alg::Es256).unwrap());
    let config = format!(
        "state_dir = \"{{dir}}/state\"\n[[credentials]]\nname = \"app\"\nprovider = \"oauth2\"\n\
         client_id = \"app\"\nauth_method = \"private_key_jwt\"\ninitial_key_file = \"{{dir}}/app.pem\"\n\
         [credentials.endpoints]\ntoken_url = \"http://{addr}/token\"\n"
    );
    let d = daemon::TestDaemon::start_in(dir, &config).await;
    let status = daemon::wait_status(&d.handle("app"), |s| s.last_error.is_some()).await;
    let error = status.last_error.unwrap();
    assert!(error.contains("bad [redacted]"), "{error}");
    // No part of a JWS survives: its header always starts like this.
    assert!(!error.contains("eyJ"), "{error}");
    d.stop().await;
}

/// `rekeyd set-secret` converts a PEM key on stdin into the stored JWK,
/// `rekeyd status --json` (daemon down: from the store) shows its kid, age
/// and public JWK but nothing private, and a client_assertion_file
/// credential has nothing to set.
#[test]
fn set_secret_stores_a_pem_key_as_a_jwk_and_status_shows_its_public_half() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let config_path = dir.path().join("rekeyd.toml");
    std::fs::write(
        &config_path,
        format!(
            "state_dir = \"{d}/state\"\n[[credentials]]\nname = \"app\"\nprovider = \"oauth2\"\n\
             client_id = \"app\"\nauth_method = \"private_key_jwt\"\ninitial_key_file = \"{d}/app.pem\"\n\
             [credentials.endpoints]\ntoken_url = \"http://127.0.0.1:9/token\"\n\
             [[credentials]]\nname = \"workload\"\nprovider = \"oauth2\"\nclient_id = \"w\"\n\
             auth_method = \"client_assertion_file\"\nclient_assertion_file = \"{d}/token\"\n\
             [credentials.endpoints]\ntoken_url = \"http://127.0.0.1:9/token\"\n"
        ),
    )
    .unwrap();
    let pem = generate_pem(Alg::EdDsa).unwrap();
    let key = ClientKey::from_file_text(&pem).unwrap();
    let set = |name: &str, input: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .args(["set-secret", name, "--no-verify", "--config"])
            .arg(&config_path)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let bad = set("app", "not a key at all");
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("neither PEM") && !stderr.contains("not a key at all"),
        "{stderr}"
    );
    let out = set("app", &pem);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = set("workload", "x");
    assert_eq!(out.status.code(), Some(78));

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["status", "--json", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let rows = doc["credentials"].as_array().unwrap();
    let app = rows.iter().find(|r| r["name"] == "app").unwrap();
    assert_eq!(app["auth_method"], "private_key_jwt");
    assert_eq!(app["key_id"], key.kid());
    assert!(app["key_created_at"].is_string());
    assert_eq!(app["public_jwk"], key.public_jwk());
    assert!(!text.contains(&private_d(&key)), "{text}");
    let workload = rows.iter().find(|r| r["name"] == "workload").unwrap();
    assert_eq!(workload["auth_method"], "client_assertion_file");
    assert_eq!(workload["assertion_file"], format!("{d}/token"));
    assert!(workload["last_error"].is_null(), "{workload}");
    // The text table says the same in words.
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["status", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!("app: private_key_jwt, key {}, age ", key.kid()))
            && table.contains(&format!(
                "workload: client_assertion_file, assertion read from {d}/token"
            )),
        "{table}"
    );
}

/// A credential switched from a secret to a key keeps the secret in the
/// store: its logins fail saying so (without the secret), and `rekeyd
/// set-secret` installs the key.
#[tokio::test]
async fn a_stored_secret_is_not_a_key_and_the_error_says_what_to_do() {
    // The store outlives both daemons.
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "app.secret", "old-client-secret-value");
    let secret_config = format!(
        "state_dir = \"{}\"\n[[credentials]]\nname = \"app\"\nprovider = \"oauth2\"\n\
         client_id = \"app\"\ninitial_secret_file = \"{{dir}}/app.secret\"\n\
         [credentials.endpoints]\ntoken_url = \"http://127.0.0.1:9/token\"\n",
        state.path().display()
    );
    // The secret-based daemon stores its secret, then the configuration
    // changes to a key.
    let d = daemon::TestDaemon::start_in(dir, &secret_config).await;
    d.stop().await;
    assert!(state.path().join("credentials/app.json").exists());
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "app.pem", &generate_pem(Alg::Es256).unwrap());
    let key_config = secret_config.replace(
        "initial_secret_file = \"{dir}/app.secret\"",
        "auth_method = \"private_key_jwt\"\ninitial_key_file = \"{dir}/app.pem\"",
    );
    assert_ne!(key_config, secret_config);
    let d = daemon::TestDaemon::start_in(dir, &key_config).await;
    let status = daemon::wait_status(&d.handle("app"), |s| s.last_error.is_some()).await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains("stored private key cannot be used") && error.contains("rekeyd set-secret"),
        "{error}"
    );
    assert!(!error.contains("old-client-secret-value"), "{error}");
    d.stop().await;
}

/// A JWKS file that exists already but lacks the key the client signs
/// with (a set someone else wrote) is left to the rotation, and the start
/// says so before any login fails, naming the key.
#[tokio::test]
async fn a_published_set_without_the_current_key_is_reported_at_start() {
    use axum::{Json, Router, http::StatusCode, routing::post};
    let app = Router::new().route(
        "/token",
        post(|| async {
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_client"})),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let pem = generate_pem(Alg::Es256).unwrap();
    let key = ClientKey::from_file_text(&pem).unwrap();
    daemon::write_secret(dir.path(), "app.pem", &pem);
    let someone_elses = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
    let set = json!({"keys": [someone_elses.public_jwk()]}).to_string();
    std::fs::write(dir.path().join("jwks.json"), &set).unwrap();
    let config_path = dir.path().join("rekeyd.toml");
    std::fs::write(
        &config_path,
        format!(
            "state_dir = \"{d}/state\"\n[[credentials]]\nname = \"app\"\nprovider = \"oauth2\"\n\
             client_id = \"app\"\nauth_method = \"private_key_jwt\"\ninitial_key_file = \"{d}/app.pem\"\n\
             [credentials.endpoints]\ntoken_url = \"http://{addr}/token\"\n\
             [credentials.rotation]\nevery = \"30d\"\nverify_window = \"1s\"\n\
             [credentials.jwks]\nfile = \"{d}/jwks.json\"\n"
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .args(["rotate", "app", "--config"])
            .arg(&config_path)
            .env_remove("FAILPOINTS")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("rekeyd rotate ends in time")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The server refuses every login: the new key is never proven, and the
    // rotation ends without a promotion.
    assert!(!stderr.contains("verified and in use"), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("does not hold the current public key"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(warning.contains(key.kid()), "{warning}");
    assert!(!stderr.contains(&private_d(&key)), "no private member");
}
