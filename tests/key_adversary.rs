//! Key rotation of `private_key_jwt` clients against a hostile or quirky
//! server, a careless operator and reloads: each case is a way the client
//! could end with no key the server accepts (I1), a key published that
//! rekeyd forgets (I3), or a private key where anyone can read it (I7).
//!
//! `rekeyd set-secret` and `rekeyd rotate` are the real binary.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/kube_fake.rs"]
mod kube_fake;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::routing::post;
use rekeyd::config::{Config, JwksConfig};
use rekeyd::provider::jwks_publish::JwksKeys;
use rekeyd::provider::key::{self, Alg, ClientKey};
use rekeyd::provider::{CreateRequest, ErrorKind, SecretApi};
use rekeyd::sim::{SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, SecretEntry, Store};
use rekeyd::token::Token;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The private member of a key (`d`: every key type has one).
fn private_d(key: &ClientKey) -> String {
    let jwk: Value = serde_json::from_str(key.to_secret().expose_secret()).unwrap();
    jwk["d"].as_str().unwrap().to_string()
}

/// The private JWK of `key` as JSON.
fn private_jwk(key: &ClientKey) -> Value {
    serde_json::from_str(key.to_secret().expose_secret()).unwrap()
}

fn unused_bearer() -> Token {
    Token::new(
        SecretString::from("unused".to_string()),
        "Bearer".into(),
        None,
        Duration::from_secs(60),
    )
}

fn file_publisher(path: &Path) -> JwksKeys {
    JwksKeys::new(
        "app".into(),
        &JwksConfig {
            file: Some(path.to_path_buf()),
            serve_path: None,
            kubernetes_secret: None,
        },
    )
}

/// I7, a careless operator: the `serve_path` of `[credentials.jwks]` is
/// served on the diagnostics listener (often on every interface) to anyone.
/// Whatever its file holds, a private key never leaves through it: not a
/// set whose key carries its private members (an operator who wrote the
/// set by hand from the private JWK), nor a file that holds no JWK Set at
/// all (the key file itself, given as `file` by mistake, or a file
/// replaced behind rekeyd's back). A set of public keys is served as is.
#[tokio::test]
async fn the_served_jwks_never_carries_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = key::generate(Alg::Es256).unwrap();
    let rsa = key::generate(Alg::Rs256).unwrap();
    let pem = key::generate_pem(Alg::Es256).unwrap();
    let files = [
        (
            "/jwks/hand.json",
            json!({"keys": [private_jwk(&key)]}).to_string(),
        ),
        (
            "/jwks/rsa.json",
            json!({"keys": [rsa.public_jwk(), private_jwk(&rsa)]}).to_string(),
        ),
        ("/jwks/pem.json", pem.clone()),
        (
            "/jwks/public.json",
            json!({"keys": [key.public_jwk()]}).to_string(),
        ),
    ];
    let registry = Arc::new(rekeyd::daemon::Registry::new());
    let mut served = BTreeMap::new();
    for (i, (path, content)) in files.iter().enumerate() {
        let file = dir.path().join(format!("{i}.json"));
        std::fs::write(&file, content).unwrap();
        served.insert(path.to_string(), file);
    }
    registry.set_jwks_files(served);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = rekeyd::serve::api::diag_router(registry);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let secrets = [private_d(&key), private_d(&rsa), pem.clone()];
    for (path, _) in &files {
        let reply = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        let status = reply.status().as_u16();
        let body = reply.text().await.unwrap();
        for secret in &secrets {
            assert!(
                !body.contains(secret.as_str()),
                "{path}: a private key was served ({status})"
            );
        }
        assert!(!body.contains("PRIVATE KEY"), "{path}: {body}");
        if *path == "/jwks/public.json" {
            assert_eq!(status, 200, "{body}");
            let set: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(set, json!({"keys": [key.public_jwk()]}));
        } else {
            assert_eq!(status, 503, "{path}: {body}");
        }
    }
}

/// I7: a set an operator wrote by hand with the private JWK in it (its
/// thumbprint is the current key's, so nothing else warns) is neither
/// taken as published nor rewritten: every write of the publisher would
/// carry the private members on into a file of mode 0644.
#[tokio::test]
async fn a_published_set_holding_a_private_key_is_refused_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let current = key::generate(Alg::Es256).unwrap();
    let hand_written = json!({"keys": [private_jwk(&current)]}).to_string();
    std::fs::write(&path, &hand_written).unwrap();
    let keys = file_publisher(&path);

    let e = keys
        .publish_initial(&[&current.to_secret()])
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("private"), "{e}");
    assert!(!e.to_string().contains(&private_d(&current)), "{e}");

    let new = key::generate(Alg::Es256).unwrap();
    let request = CreateRequest {
        description: "",
        value: Some(&new.to_secret()),
    };
    let e = keys.create(&unused_bearer(), request).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Refused, "{e}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        hand_written,
        "nothing was rewritten"
    );
}

/// A token endpoint that accepts any login and counts them.
async fn counting_token_endpoint() -> (String, Arc<AtomicUsize>) {
    let logins = Arc::new(AtomicUsize::new(0));
    let counter = logins.clone();
    let app = Router::new().route(
        "/token",
        post(move || {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({
                    "access_token": format!("token-{n}"),
                    "token_type": "Bearer",
                    "expires_in": 3600,
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/token"), logins)
}

fn key_credential_config(dir: &Path, token_url: &str, jwks_file: &Path) -> String {
    format!(
        r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
provider = "oauth2"
client_id = "app"
auth_method = "private_key_jwt"
initial_key_file = "{d}/app.pem"
[credentials.endpoints]
token_url = "{token_url}"
[credentials.jwks]
file = "{jwks}"
"#,
        d = dir.display(),
        jwks = jwks_file.display(),
    )
}

/// I8, a reload: an operator moves `[credentials.jwks]` to a file that
/// holds something else (another tool's set in another shape, a web
/// page). The reload fails, as it should, and says that the previous
/// configuration stays in force; so it must: the credential keeps
/// refreshing its token, rather than being stopped for a new one that
/// never starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_jwks_cannot_be_published_leaves_the_credential_running() {
    let dir = tempfile::tempdir().unwrap();
    let (token_url, logins) = counting_token_endpoint().await;
    daemon::write_secret(
        dir.path(),
        "app.pem",
        &key::generate_pem(Alg::Es256).unwrap(),
    );
    let first = dir.path().join("www/jwks.json");
    let config = Config::from_toml(&key_credential_config(dir.path(), &token_url, &first)).unwrap();
    let shutdown = CancellationToken::new();
    let mut running = rekeyd::daemon::start(&config, shutdown.clone())
        .await
        .unwrap();
    let handle = running.credentials()["app"].clone();
    daemon::wait_token(&handle, |_| true).await;
    assert!(first.exists(), "the bootstrap key was published");

    let taken = dir.path().join("www/index.html");
    std::fs::write(&taken, "<html>not a JWK Set</html>").unwrap();
    let moved = Config::from_toml(&key_credential_config(dir.path(), &token_url, &taken)).unwrap();
    let e = running.reload(&moved).await.unwrap_err();
    assert!(e.to_string().contains("no JWK Set"), "{e}");
    assert_eq!(
        std::fs::read_to_string(&taken).unwrap(),
        "<html>not a JWK Set</html>"
    );

    // The previous configuration is in force: the engine still answers a
    // refresh (a new login, a new token).
    let before = logins.load(Ordering::SeqCst);
    handle.refresh_now.notify_one();
    let refreshed = tokio::time::timeout(daemon::EVENT_TIMEOUT, async {
        let mut rx = handle.token.clone();
        rx.wait_for(|t| {
            t.as_ref()
                .is_some_and(|t| t.access_token.expose_secret() != format!("token-{}", before - 1))
        })
        .await
        .map(|_| ())
    })
    .await;
    assert!(
        matches!(refreshed, Ok(Ok(()))),
        "the credential no longer refreshes after the failed reload ({} logins)",
        logins.load(Ordering::SeqCst)
    );
    shutdown.cancel();
    running.wait().await;
}

const APP: &str = "app-client";
const ADMIN: &str = "admin-client";

/// An Okta app with a key of another deployment (`other`, active) next to
/// the bootstrap key `first`; the store holds `first` (as the daemon's
/// first start leaves it) and the administrative client's secret.
struct Okta {
    sim: SimProvider,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    first: ClientKey,
    other: ClientKey,
}

impl Okta {
    async fn new() -> Okta {
        let first = key::generate(Alg::Es256).unwrap();
        let other = key::generate(Alg::Es256).unwrap();
        let published = vec![first.public_jwk(), other.public_jwk()];
        Okta::with_keys(first, other, published).await
    }

    /// The app with the public JWKs `published` (each with a kid of its
    /// own) and the store holding `first`.
    async fn with_keys(first: ClientKey, other: ClientKey, published: Vec<Value>) -> Okta {
        let sim = SimProvider::start(SimOptions::default()).await.unwrap();
        sim.add_client(APP, "org");
        sim.add_client(ADMIN, "org");
        for jwk in &published {
            sim.add_okta_key(APP, jwk);
        }
        let (admin_id, admin_secret) = sim.add_secret(ADMIN, "");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let org = sim.okta_org_url();
        let text = format!(
            r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
provider = "okta"
org_url = "{org}"
app_id = "{APP}"
client_id = "{APP}"
auth_method = "private_key_jwt"
initial_key_file = "{d}/app.key"
secret_api_credential = "admin"
[credentials.rotation]
every = "24h"
grace = "0s"

[[credentials]]
name = "admin"
provider = "okta"
org_url = "{org}"
app_id = "{ADMIN}"
client_id = "{ADMIN}"
initial_secret_file = "{d}/admin.secret"
"#
        );
        daemon::write_secret(dir.path(), "admin.secret", &admin_secret);
        let config_path = dir.path().join("rekeyd.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&text).unwrap();
        let store = FileStore::new(&config.state_dir);
        for (name, id, value) in [
            ("app", first.thumbprint(), first.to_secret()),
            ("admin", admin_id, SecretString::from(admin_secret)),
        ] {
            let record = CredentialRecord::new(SecretEntry {
                id: Some(id),
                value,
                created_at: SystemTime::now(),
                expires_at: None,
            });
            store.compare_and_swap(name, None, &record).await.unwrap();
        }
        Okta {
            sim,
            dir,
            config_path,
            first,
            other,
        }
    }

    /// `rekeyd ARGS --config ...` with `stdin`: exit success and output.
    async fn rekeyd(&self, args: &[&str], stdin: &str) -> (bool, String) {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("FAILPOINTS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut input, stdin.as_bytes())
            .await
            .unwrap();
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("rekeyd ends in time")
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        (out.status.success(), text)
    }

    /// The kids of the app's active keys at the sim.
    fn active(&self) -> Vec<String> {
        (self.sim.okta_keys(APP).into_iter())
            .filter(|k| k.active)
            .map(|k| k.kid)
            .collect()
    }
}

/// I1, a careless operator: `rekeyd set-secret --no-verify` with a key
/// that was never added at Okta (the wrong file). The install itself is
/// the operator's call; retiring the key it replaces is not: nothing
/// proved the new key, and the key it replaced is the one that works.
/// Here the app has a second active key (another deployment's), so
/// Okta's last-active-key check does not stop the withdrawal: the
/// client would be left with no key Okta accepts, and the working key
/// could not even be installed again (the journal counts it retired).
#[tokio::test]
async fn set_secret_without_verification_never_withdraws_the_working_key() {
    let w = Okta::new().await;
    let wrong = key::generate_pem(Alg::Es256).unwrap();
    let (ok, out) = w
        .rekeyd(&["set-secret", "app", "--no-verify"], &wrong)
        .await;
    assert!(ok, "{out}");

    // The daemon's next start finishes whatever work the journal holds
    // (here `rekeyd rotate`, which then only finishes it).
    let state = w.dir.path().join("state");
    let record = FileStore::new(&state).load("app").await.unwrap().unwrap();
    let out = if record.value.is_unfinished() {
        w.rekeyd(&["rotate", "app"], "").await.1
    } else {
        String::new()
    };
    let first = w.first.kid().to_string();
    assert!(
        w.active().contains(&first),
        "the working key was withdrawn for an unproven one: active {:?}\n{out}",
        w.active()
    );
    assert!(w.active().contains(&w.other.kid().to_string()));

    // The operator notices and puts the working key back.
    let pem_of_first = w.first.to_secret();
    let (ok, out) = w
        .rekeyd(&["set-secret", "app"], pem_of_first.expose_secret())
        .await;
    assert!(ok, "the working key can be installed again: {out}");
    w.sim.shutdown().await;
    drop(w.dir);
}

/// `key` with the kid `kid` (the same key material).
fn with_kid(key: &ClientKey, kid: &str) -> ClientKey {
    let mut jwk = private_jwk(key);
    jwk["kid"] = kid.into();
    ClientKey::from_jwk_json(&jwk.to_string()).unwrap()
}

/// I3, a quirky app: Okta holds the bootstrap key twice, under two kids
/// (uploaded twice, once by hand and once by a script). rekeyd names a key
/// by its thumbprint, so both are the one key it withdraws: a rotation
/// that deactivated and deleted only the first copy would leave the old
/// key active, still accepted and forgotten by the journal.
#[tokio::test]
async fn every_copy_of_a_withdrawn_key_goes_at_okta() {
    let generated = key::generate(Alg::Es256).unwrap();
    let first = with_kid(&generated, "first-by-hand");
    let copy = with_kid(&generated, "first-by-script");
    let unused = key::generate(Alg::Es256).unwrap();
    let published = vec![first.public_jwk(), copy.public_jwk()];
    let w = Okta::with_keys(first, unused, published).await;
    let (ok, out) = w.rekeyd(&["rotate", "app"], "").await;
    assert!(ok, "{out}");

    let state = w.dir.path().join("state");
    let record = FileStore::new(&state).load("app").await.unwrap().unwrap();
    assert_eq!(record.value.phase(), "idle", "{out}");
    let current = key::from_secret(&record.value.current.value).unwrap();
    let keys: Vec<(String, bool)> = (w.sim.okta_keys(APP).into_iter())
        .map(|k| (k.kid, k.active))
        .collect();
    assert_eq!(
        keys,
        [(current.kid().to_string(), true)],
        "exactly the new key is left\n{out}"
    );
    w.sim.shutdown().await;
    drop(w.dir);
}

/// I3, a reload mid-rotation: the grace period of a rotation is running
/// (the old key `old` and the new `new` both published in the JWKS file)
/// when the operator adds a Kubernetes Secret as a second place. A place
/// with no set yet must get every key the journal still counts on, not
/// the current one alone: a key counts as published only where every
/// place holds it, so the old key would never be listed again, its
/// withdrawal would be given up as "gone", and it would stay in the file,
/// accepted, forgotten by the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_added_mid_rotation_gets_every_key_the_journal_counts_on() {
    let fake = kube_fake::KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (token_url, _) = counting_token_endpoint().await;
    let old = key::generate(Alg::Es256).unwrap();
    let new = key::generate(Alg::Es256).unwrap();
    daemon::write_secret(
        dir.path(),
        "app.pem",
        &key::generate_pem(Alg::Es256).unwrap(),
    );
    let file = dir.path().join("www/jwks.json");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let both = json!({"keys": [old.public_jwk(), new.public_jwk()]});
    std::fs::write(&file, both.to_string()).unwrap();

    let text = format!(
        "{}[credentials.rotation]\nevery = \"24h\"\ngrace = \"1h\"\n",
        key_credential_config(dir.path(), &token_url, &file)
    )
    .replace(
        "[credentials.jwks]\n",
        "[credentials.jwks]\nkubernetes_secret = \"app-jwks\"\n",
    );
    let mut config = Config::from_toml(&text).unwrap();
    let kubeconfig = fake.kubeconfig(dir.path(), "apps", "token-a");
    let jwks = config.credentials[0].jwks.as_deref_mut().unwrap();
    jwks.kubernetes_secret.as_mut().unwrap().kubeconfig = Some(kubeconfig);

    // The journal in the grace period: `new` promoted, `old` kept.
    let store = Arc::new(FileStore::new(&config.state_dir));
    let entry = |k: &ClientKey| SecretEntry {
        id: Some(k.thumbprint()),
        value: k.to_secret(),
        created_at: SystemTime::now(),
        expires_at: None,
    };
    let mut record = CredentialRecord::new(entry(&new));
    record.rotation = rekeyd::store::Rotation::Promoted {
        rid: "r1".into(),
        old: entry(&old),
        delete_after: SystemTime::now(),
    };
    store.compare_and_swap("app", None, &record).await.unwrap();

    // The daemon (re)starts the credential with the new place.
    rekeyd::daemon::ensure_bootstrapped(&config, 0, store.as_ref())
        .await
        .unwrap();
    let in_secret = || -> Vec<String> {
        let data = fake.secret_data("apps", "app-jwks").expect("the Secret");
        rekeyd::provider::jwks::ids(&serde_json::from_slice(&data["jwks.json"]).unwrap())
    };
    let mut held = in_secret();
    held.sort();
    let mut both_ids = vec![old.thumbprint(), new.thumbprint()];
    both_ids.sort();
    assert_eq!(held, both_ids, "the new place holds what the file holds");

    // The grace period ends: the old key goes from both places.
    let cred = config.credential("app").unwrap();
    let rotator = rekeyd::rotation::driver::Rotator {
        name: "app".into(),
        client_id: "app".into(),
        provider: rekeyd::provider::build(cred).unwrap(),
        secret_api: rekeyd::provider::build_secret_api(cred).unwrap().unwrap(),
        secret_api_bearer: None,
        store: store.clone(),
        grace: Duration::ZERO,
        verify_window: Duration::from_secs(5),
        status: None,
        refresh_now: None,
        clock: rekeyd::rotation::driver::system_clock(),
    };
    let once = rotator
        .settle_once(None, Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(once.phase, "idle", "{once:?}");
    let in_file: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        rekeyd::provider::jwks::ids(&in_file),
        [new.thumbprint()],
        "the old key is withdrawn from the file"
    );
    assert_eq!(in_secret(), [new.thumbprint()]);
}
