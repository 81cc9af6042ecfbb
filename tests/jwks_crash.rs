//! Key rotation of a `private_key_jwt` client whose keys rekeyd publishes
//! for its `jwks_uri` (`[credentials.jwks]`) in two places at once, a file
//! and a Kubernetes Secret (the fake API server), interrupted: a crash at
//! every step of the rotation, `kill -9` at random moments, and `kill -9`
//! between the two writes of one step. After every interruption the
//! journal's current key is in both places and a real server
//! (oidc-provider, `tests/oidc`) accepts a login signed with it; a clean
//! run then ends with exactly one key in both places, the journal's. And
//! a place added to the configuration in the middle of a rotation.
//!
//! The server fetches the client's `jwks_uri` from a web server the test
//! runs, which serves the Secret's `jwks.json` as a pod mounting the
//! Secret would (or the file, where said), and trusts what it fetched for no time at all
//! (`OIDC_JWKS_URI_FRESH=0`), so every login with a key it has not seen
//! fetches the set again: a login shows what is published now.
//!
//! `rekeyd rotate app` is the real binary (built with `--features
//! failpoints`, so crash points abort it with `FAILPOINTS=<point>=return`),
//! pointed at the fake API server by `KUBECONFIG`.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/kube_fake.rs"]
mod kube_fake;
#[path = "support/oidc.rs"]
mod oidc;
#[path = "support/rotate_runs.rs"]
mod rotate_runs;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use oidc::{OidcOptions, OidcServer};
use rand::Rng;
use rekeyd::config::{Config, JWKS_SECRET_KEY};
use rekeyd::provider::key::{self, Alg, ClientKey};
use rekeyd::provider::{assertion, jwks};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, Store};
use rotate_runs::{RUN_TIMEOUT, RotateRuns, private_d};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;
const CLIENT_ID: &str = "jwks-client";
const NAMESPACE: &str = "apps";
const SECRET: &str = "app-jwks";
const JWKS_PATH: &str = "/jwks.json";

/// The crash points of a key rotation, in the order a run meets them (as
/// in `tests/key_rotation.rs`).
const POINTS: [&str; 8] = [
    "rotation-after-persist-creating",
    "rotation-after-create",
    "rotation-after-persist-created",
    "rotation-after-verify",
    "rotation-after-persist-promoted",
    "rotation-after-list",
    "rotation-after-persist-retire",
    "rotation-after-delete-old",
];

struct World {
    server: OidcServer,
    fake: Arc<kube_fake::KubeFake>,
    /// The bootstrap key.
    first: ClientKey,
    _dir: tempfile::TempDir,
    config: Config,
    /// The JWKS file.
    file: PathBuf,
    /// The runs of `rekeyd rotate app`, their output and the keys they held.
    runs: RotateRuns,
}

/// Where the web server of the client's `jwks_uri` reads the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The Secret's `jwks.json`, as a pod mounting the Secret would.
    Secret,
    /// The file.
    File,
}

/// The web server of the client's `jwks_uri`: the set `source` holds, or
/// 404 while there is none.
async fn serve_set(
    fake: Arc<kube_fake::KubeFake>,
    file: PathBuf,
    source: Source,
) -> std::net::SocketAddr {
    let app = Router::new().route(
        JWKS_PATH,
        get(move || {
            let (fake, file) = (fake.clone(), file.clone());
            async move {
                let set = match source {
                    Source::Secret => fake
                        .secret_data(NAMESPACE, SECRET)
                        .and_then(|mut data| data.remove(JWKS_SECRET_KEY)),
                    Source::File => std::fs::read(&file).ok(),
                };
                match set {
                    Some(set) => ([("content-type", "application/json")], set).into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

impl World {
    /// A server whose `private_key_jwt` client fetches its keys from the
    /// Secret, and a configuration that publishes them in a file and in
    /// the Secret. `None` when Node.js is missing (skipped).
    async fn new() -> Option<World> {
        World::with(Source::Secret, true).await
    }

    /// A server whose client fetches its keys from `source`, and a
    /// configuration that publishes them in a file and, if `secret`, in
    /// the Secret.
    async fn with(source: Source, secret: bool) -> Option<World> {
        let fake = Arc::new(kube_fake::KubeFake::start().await);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("www/jwks.json");
        let web = serve_set(fake.clone(), file.clone(), source).await;
        let server = OidcServer::start_with(OidcOptions {
            clients: Some(json!([{
                "client_id": CLIENT_ID,
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "token_endpoint_auth_method": "private_key_jwt",
                "token_endpoint_auth_signing_alg": "ES256",
                "jwks_uri": format!("http://{web}{JWKS_PATH}"),
            }])),
            jwks_uri_fresh_secs: Some(0),
            ..OidcOptions::default()
        })
        .await?;
        let pem = key::generate_pem(Alg::Es256).unwrap();
        let first = ClientKey::from_file_text(&pem).unwrap();
        daemon::write_secret(dir.path(), "app.key", &pem);
        let kubeconfig = fake.kubeconfig(dir.path(), NAMESPACE, "token-a");
        let config_path = dir.path().join("rekeyd.toml");
        let config = write_config(&config_path, dir.path(), &server, &file, secret);
        let mut runs = RotateRuns::new(config_path);
        runs.env.push(("KUBECONFIG".into(), kubeconfig));
        runs.privates.push(private_d(&first.to_secret()));
        Some(World {
            server,
            fake,
            first,
            _dir: dir,
            config,
            file,
            runs,
        })
    }

    /// Rewrites the configuration: the keys published in the file and, if
    /// `secret`, in the Secret.
    fn reconfigure(&mut self, secret: bool) {
        self.config = write_config(
            &self.runs.config_path,
            self._dir.path(),
            &self.server,
            &self.file,
            secret,
        );
    }
}

/// Writes the configuration to `path`: the keys published in `file` and,
/// if `secret`, in the Secret.
fn write_config(
    path: &std::path::Path,
    dir: &std::path::Path,
    server: &OidcServer,
    file: &std::path::Path,
    secret: bool,
) -> Config {
    let d = dir.display();
    let mut text = format!(
        r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
provider = "oauth2"
client_id = "{CLIENT_ID}"
auth_method = "private_key_jwt"
initial_key_file = "{d}/app.key"
[credentials.endpoints]
token_url = "{token_url}"
[credentials.rotation]
every = "24h"
grace = "0s"
[credentials.jwks]
file = "{file}"
"#,
        token_url = server.token_url(),
        file = file.display(),
    );
    if secret {
        text.push_str(&format!("kubernetes_secret = \"{SECRET}\"\n"));
    }
    std::fs::write(path, &text).unwrap();
    Config::from_toml(&text).unwrap()
}

impl World {
    fn store(&self) -> FileStore {
        FileStore::new(&self.config.state_dir)
    }

    async fn record(&self) -> CredentialRecord {
        self.store().load("app").await.unwrap().unwrap().value
    }

    /// `rekeyd rotate app`, with one crash point armed if given.
    async fn rotate(&mut self, failpoint: Option<&str>) -> Output {
        let out = self.runs.rotate(failpoint).await;
        self.remember_keys().await;
        out
    }

    /// Notes every private key the journal holds, for the log check.
    async fn remember_keys(&mut self) {
        if let Ok(Some(record)) = self.store().load("app").await {
            self.runs.remember_keys(&record.value);
        }
    }

    /// The key ids (thumbprints) the file publishes, in order.
    fn in_file(&self) -> Vec<String> {
        let set: Value = serde_json::from_slice(&std::fs::read(&self.file).unwrap()).unwrap();
        assert_public_only(&set);
        jwks::ids(&set)
    }

    /// The key ids (thumbprints) the Secret publishes, in order.
    fn in_secret(&self) -> Vec<String> {
        let data: BTreeMap<String, Vec<u8>> = self
            .fake
            .secret_data(NAMESPACE, SECRET)
            .expect("the Secret exists");
        let set: Value = serde_json::from_slice(&data[JWKS_SECRET_KEY]).unwrap();
        assert_public_only(&set);
        jwks::ids(&set)
    }

    /// The HTTP status of a login signed with `key`.
    async fn login_with(&self, key: &ClientKey) -> u16 {
        let jwt =
            assertion::mint(key, CLIENT_ID, &self.server.token_url(), SystemTime::now()).unwrap();
        reqwest::Client::new()
            .post(self.server.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_assertion_type", assertion::JWT_BEARER),
                ("client_assertion", jwt.expose_secret()),
            ])
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// After an interruption: the journal's current key is in both places
    /// (next to at most one other, the rotation's old or new key), and the
    /// server accepts a login signed with it (I1).
    async fn assert_current_key_works(&self, when: &str) {
        let record = self.record().await;
        let current = key::from_secret(&record.current.value).unwrap();
        let id = current.thumbprint();
        assert_eq!(record.current.id.as_deref(), Some(id.as_str()), "{when}");
        let (file, secret) = (self.in_file(), self.in_secret());
        assert!(file.contains(&id), "{when}: not in the file: {file:?}");
        assert!(
            secret.contains(&id),
            "{when}: not in the Secret: {secret:?}"
        );
        assert!(
            file.len() <= 2 && secret.len() <= 2,
            "{when}: at most the old and the new key: {file:?} {secret:?}"
        );
        assert_eq!(
            self.login_with(&current).await,
            200,
            "I1 {when}: phase {}\n{}",
            record.phase(),
            self.runs.logs
        );
    }

    /// The end of every rotation: idle, nothing left to withdraw, exactly
    /// one key in both places, the journal's, and the server accepts it.
    async fn assert_one_key(&self, when: &str) -> ClientKey {
        let record = self.record().await;
        assert_eq!(record.phase(), "idle", "{when}: {}", self.runs.logs);
        assert!(record.retire.is_empty(), "{when}: {:?}", record.retire);
        let current = key::from_secret(&record.current.value).unwrap();
        let id = current.thumbprint();
        assert_eq!(record.current.id.as_deref(), Some(id.as_str()), "{when}");
        assert_eq!(self.in_file(), [id.as_str()], "{when}: the file");
        assert_eq!(self.in_secret(), [id.as_str()], "{when}: the Secret");
        assert_eq!(self.login_with(&current).await, 200, "{when}");
        current
    }

    /// I7: no private key in anything rekeyd printed.
    fn assert_nothing_leaked(&self) {
        self.runs.assert_nothing_leaked(&[]);
    }
}

/// A published set holds public members only.
fn assert_public_only(set: &Value) {
    for key in set["keys"].as_array().unwrap() {
        assert!(key.get("d").is_none(), "a private key was published");
    }
}

/// A crash at every step of the rotation, each followed by a clean run,
/// with the keys published in a file and in a Secret: after every crash
/// the journal's current key is in both places and logs in, and each
/// clean run ends with exactly one key in both, the journal's.
#[tokio::test]
async fn a_crash_at_every_step_leaves_the_current_key_in_both_places() {
    let Some(mut w) = World::new().await else {
        return;
    };
    let mut kids = vec![w.first.thumbprint()];
    for point in POINTS {
        let out = w.rotate(Some(point)).await;
        assert_eq!(
            out.status.signal(),
            Some(SIGABRT),
            "{point}: {}",
            w.runs.logs
        );
        w.assert_current_key_works(&format!("after {point}")).await;
        let out = w.rotate(None).await;
        assert!(out.status.success(), "{point}: {}", w.runs.logs);
        let key = w.assert_one_key(&format!("the run after {point}")).await;
        if !kids.contains(&key.thumbprint()) {
            kids.push(key.thumbprint());
        }
    }
    // Each crash interrupted a rotation that the clean run finished (or,
    // before the create, began anew): one new key each.
    assert_eq!(kids.len(), POINTS.len() + 1, "{kids:?}");
    w.assert_nothing_leaked();
}

/// `kill -9` of `rekeyd rotate` at random moments within an undisturbed
/// run's duration, with the keys published in a file and in a Secret (so
/// some kills fall between the two writes): after each kill the journal's
/// current key is in both places and logs in, and a last undisturbed run
/// leaves exactly one key in both, the journal's. Runs go on until
/// [`KILLS`] of them were killed (a run that ends before its moment is
/// not), at most [`MAX_RUNS`] of them.
#[tokio::test]
async fn kill_9_at_random_moments_leaves_the_current_key_in_both_places() {
    const KILLS: usize = 25;
    const MAX_RUNS: usize = 80;
    let Some(mut w) = World::new().await else {
        return;
    };
    // The first run publishes the bootstrap key, which later runs do not.
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    w.assert_one_key("the first run").await;
    // How long an undisturbed rotation takes here: the kills fall
    // anywhere within that.
    let started = tokio::time::Instant::now();
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let run = started.elapsed().as_millis() as u64;
    w.assert_one_key("the measured run").await;
    let mut rng = rand::rng();
    let mut phases = BTreeMap::<&'static str, u32>::new();
    let mut kills = 0;
    let mut runs = 0;
    // Runs after which the two places differed (killed between them).
    let mut split = 0;
    while kills < KILLS && runs < MAX_RUNS {
        runs += 1;
        let delay = Duration::from_millis(rng.random_range(0..run.max(2)));
        let status = w.runs.rotate_killed_after(delay).await;
        if status.signal() == Some(SIGKILL) {
            kills += 1;
        } else {
            assert!(status.success(), "run {runs} failed undisturbed");
        }
        w.remember_keys().await;
        *phases.entry(w.record().await.phase()).or_default() += 1;
        if w.in_file() != w.in_secret() {
            split += 1;
        }
        w.assert_current_key_works(&format!("after run {runs}"))
            .await;
    }
    // Finish whatever the last kill interrupted.
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    w.assert_one_key("the last run").await;
    eprintln!(
        "jwks kill loop: {kills} kills in {runs} runs of {run} ms, phases after each \
         {phases:?}, {split} between the two places"
    );
    assert_eq!(kills, KILLS, "enough runs were killed");
    w.assert_nothing_leaked();
}

/// Spawns `rekeyd rotate app` with the Secret's writes stalled, waits
/// until its Secret write reaches the fake API server (the file, written
/// first, then shows `want`) and kills it there.
async fn kill_between_the_places(w: &World, want: impl Fn(&[String]) -> bool) {
    let stall = kube_fake::Stall {
        method: Some(axum::http::Method::PUT),
        kind: Some(kube_fake::Kind::Secret),
    };
    let held_before = w.fake.held();
    w.fake.stall(stall);
    let mut child = w
        .runs
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::select! {
        _ = w.fake.stalled(held_before + 1) => {}
        status = child.wait() => panic!("the run ended before its Secret write: {status:?}"),
        _ = tokio::time::sleep(RUN_TIMEOUT) => panic!("the Secret write never came"),
    }
    assert!(
        want(&w.in_file()),
        "the file shows the write first: {:?}",
        w.in_file()
    );
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(SIGKILL));
}

/// A kill after the file was written and before the Secret was, once
/// while a new key is published and once while the old one is withdrawn
/// (the Secret's write is stalled at the fake API server, so the kill
/// falls there every time): the journal's current key is in both places
/// and logs in, the listing (keys every place holds) sends the next run
/// to publish again or withdraw again, and that run ends with exactly one
/// key in both places: the key the journal chose, not a third one.
#[tokio::test]
async fn a_kill_between_the_file_and_the_secret_is_finished_by_the_next_run() {
    let Some(mut w) = World::new().await else {
        return;
    };
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let second = w.assert_one_key("the first run").await.thumbprint();

    // Killed while publishing: the new key is in the file only.
    kill_between_the_places(&w, |ids| ids.len() == 2).await;
    w.remember_keys().await;
    let record = w.record().await;
    assert_eq!(record.phase(), "creating", "{}", w.runs.logs);
    let chosen = key::from_secret(record.chosen().unwrap())
        .unwrap()
        .thumbprint();
    assert_eq!(w.in_file(), [second.as_str(), chosen.as_str()]);
    assert_eq!(w.in_secret(), [second.as_str()], "the write was stalled");
    w.assert_current_key_works("after a kill while publishing")
        .await;
    // The stalled write may still land (as a real server may apply a
    // request whose sender died): either way the next run finishes.
    w.fake.unstall();
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let third = w
        .assert_one_key("the run after a kill while publishing")
        .await
        .thumbprint();
    assert_eq!(third, chosen, "the chosen key was published, not another");

    // Killed while withdrawing: the old key is gone from the file only.
    // (The crash leaves a rotation with only its withdrawal to do.)
    let out = w.rotate(Some("rotation-after-persist-retire")).await;
    assert_eq!(out.status.signal(), Some(SIGABRT), "{}", w.runs.logs);
    let fourth = w.record().await.current.id.unwrap();
    assert_eq!(w.in_secret(), [third.as_str(), fourth.as_str()]);
    kill_between_the_places(&w, |ids| ids.len() == 1).await;
    assert_eq!(w.in_file(), [fourth.as_str()]);
    assert_eq!(
        w.in_secret(),
        [third.as_str(), fourth.as_str()],
        "the write was stalled"
    );
    w.assert_current_key_works("after a kill while withdrawing")
        .await;
    w.fake.unstall();
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let last = w
        .assert_one_key("the run after a kill while withdrawing")
        .await;
    assert_eq!(last.thumbprint(), fourth, "the withdrawal was finished");
    w.assert_nothing_leaked();
}

/// A Secret added to the places (the configuration changed between two
/// runs, or by a reload) while a rotation's new key is published in the
/// file but not yet proven: the new place gets every key the journal
/// holds published (the current one and the pending one), so the
/// rotation goes on and ends with exactly one key in both places.
#[tokio::test]
async fn a_place_added_while_a_new_key_is_unproven_is_given_both_keys() {
    let Some(mut w) = World::with(Source::File, false).await else {
        return;
    };
    let out = w.rotate(Some("rotation-after-persist-created")).await;
    assert_eq!(out.status.signal(), Some(SIGABRT), "{}", w.runs.logs);
    let record = w.record().await;
    assert_eq!(record.phase(), "created");
    let pending = record.pending().unwrap().id.clone().unwrap();
    let first = w.first.thumbprint();
    assert_eq!(w.in_file(), [first.as_str(), pending.as_str()]);

    w.reconfigure(true);
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let last = w.assert_one_key("after the Secret was added").await;
    assert_eq!(last.thumbprint(), pending, "the rotation went on");
    w.assert_nothing_leaked();
}

/// A set that lost the key in use (a hand edit, a revert) makes every
/// login fail. Publishing needs no login (rekeyd writes the set itself),
/// so `rekeyd rotate` repairs it: a new key is published next to what the
/// set holds, proven and promoted, and the server accepts it; the lost key
/// is never withdrawn from a place that does not hold it.
#[tokio::test]
async fn a_rotation_repairs_a_set_that_lost_the_key_in_use() {
    let Some(mut w) = World::new().await else {
        return;
    };
    let out = w.rotate(None).await;
    assert!(out.status.success(), "{}", w.runs.logs);
    let lost = w.assert_one_key("the first rotation").await;

    // Someone writes a set without the key in use, in both places.
    let other = ClientKey::from_file_text(&key::generate_pem(Alg::Es256).unwrap()).unwrap();
    let set = json!({"keys": [other.public_jwk()]});
    std::fs::write(&w.file, set.to_string()).unwrap();
    w.fake.set_secret_entry(
        NAMESPACE,
        SECRET,
        JWKS_SECRET_KEY,
        set.to_string().as_bytes(),
    );
    // A login with a key the server has not seen makes it fetch the set
    // again (it keeps the keys it fetched until then): from now on it
    // does not accept the lost key.
    assert_eq!(w.login_with(&other).await, 200, "the server reads the set");
    assert!(
        !w.in_file().contains(&lost.thumbprint()),
        "the set lost the key"
    );

    // The run proves and promotes a new key, then waits for a listing to
    // show the lost key (never, here: it waits as it would for a listing
    // that lags); it is stopped there, as an operator would stop it.
    let mut child = w
        .runs
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let waiting = tokio::time::timeout(RUN_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            w.runs.logs.push_str(&line);
            w.runs.logs.push('\n');
            if line.contains("waiting before deleting") {
                return true;
            }
        }
        false
    })
    .await
    .expect("the run gets to its wait in time");
    assert!(waiting, "the run ended early: {}", w.runs.logs);
    let pid = child.id().expect("running") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopped = child.wait().await.unwrap();
    assert!(
        stopped.code().is_some(),
        "a handled stop, not a kill: {stopped:?}"
    );
    let record = w.record().await;
    assert_eq!(record.phase(), "retiring", "{}", w.runs.logs);
    let current = key::from_secret(&record.current.value).unwrap();
    assert_ne!(current.thumbprint(), lost.thumbprint(), "a new key");
    assert_eq!(
        w.login_with(&current).await,
        200,
        "repaired: {}",
        w.runs.logs
    );
    for (place, ids) in [("file", w.in_file()), ("Secret", w.in_secret())] {
        assert_eq!(
            ids,
            [other.thumbprint(), current.thumbprint()],
            "{place}: the set as found, with the new key"
        );
    }
    w.assert_nothing_leaked();
}
