//! The rotation history (README "Audit trail") end to end against the
//! simulated MapsIndoors provider: the entries of a full rotation, of an
//! aborted one and of `set-secret`, the hash chain as `rekeyd history
//! --verify` checks it (edited and removed entries found, naming the first
//! bad one), the bound with its marker, no secret value anywhere in the
//! history, `GET /v1/history/{name}` behind the API key, and the same
//! steps in a (fake) systemd journal with their MESSAGE_IDs.

#[path = "support/daemon.rs"]
mod daemon;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use daemon::{EVENT_TIMEOUT, TestDaemon};
use rekeyd::config::Config;
use rekeyd::history::{self, Step, chain};
use rekeyd::rotation::driver::{Outcome, Rotator};
use rekeyd::rotation::operator::{self, SetSecret};
use rekeyd::sim::{SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::sha256_hex;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_rekeyd");
const CLIENT: &str = "maps-client";
const CUSTOMER: &str = "cust";

struct World {
    sim: Arc<SimProvider>,
    bootstrap: (String, String),
    dir: tempfile::TempDir,
}

async fn world(propagation: Duration) -> World {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(60),
        propagation_delay: propagation,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let bootstrap = sim.add_secret(CLIENT, "portal: initial secret");
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "maps.secret", &bootstrap.1);
    World {
        sim: Arc::new(sim),
        bootstrap,
        dir,
    }
}

impl World {
    /// The configuration, with `store` the body of `[store]` and `api`
    /// adding a TCP token API.
    fn config_text(&self, store: &str, api: bool) -> String {
        self.config_with(store, api, "every = \"1h\"\ngrace = \"0s\"")
    }

    /// [`World::config_text`] with `rotation` the body of
    /// `[credentials.rotation]`.
    fn config_with(&self, store: &str, api: bool, rotation: &str) -> String {
        let dir = self.dir.path().display();
        let mut text = format!("state_dir = \"{dir}/state\"\n");
        if api {
            text.push_str(&format!(
                "[api]\nlisten = \"127.0.0.1:0\"\nkey_file = \"{dir}/api.key\"\n"
            ));
        }
        text.push_str(&format!("[store]\n{store}\n"));
        text.push_str(&format!(
            r#"[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "{CLIENT}"
customer_id = "{CUSTOMER}"
initial_secret_file = "{dir}/maps.secret"
initial_secret_id = "{}"
[credentials.endpoints]
token_url = "{}"
secrets_url = "{}"
[credentials.rotation]
{rotation}
"#,
            self.bootstrap.0,
            self.sim.mapsindoors_token_url(),
            self.sim.mapsindoors_secrets_url()
        ));
        text
    }

    /// Writes the configuration file and returns its path and parse.
    fn config(&self, store: &str) -> (std::path::PathBuf, Config) {
        let text = self.config_text(store, false);
        let path = self.dir.path().join("rekeyd.toml");
        std::fs::write(&path, &text).unwrap();
        (path, Config::from_toml(&text).unwrap())
    }

    fn rotator(&self, config: &Config, verify_window: Duration) -> Rotator {
        let cred = config.credential("maps").unwrap();
        let store =
            Arc::new(FileStore::new(&config.state_dir).with_history_limit(config.history_limit));
        Rotator {
            name: "maps".into(),
            client_id: CLIENT.into(),
            provider: rekeyd::provider::build(cred).unwrap(),
            secret_api: rekeyd::provider::build_secret_api(cred)
                .unwrap()
                .expect("secret API configured"),
            secret_api_bearer: None,
            store,
            grace: Duration::ZERO,
            verify_window,
            status: None,
            refresh_now: None,
            clock: rekeyd::rotation::driver::system_clock(),
        }
    }

    /// Every secret value the provider ever held for our client that the
    /// test can know: what must never appear in a history.
    fn secret_values(&self) -> Vec<String> {
        let mut values: Vec<String> = self
            .sim
            .secrets(CLIENT)
            .into_iter()
            .map(|s| s.value)
            .collect();
        values.push(self.bootstrap.1.clone());
        values
    }
}

async fn bootstrap(config: &Config) {
    let store = FileStore::new(&config.state_dir);
    rekeyd::daemon::ensure_bootstrapped(config, 0, &store)
        .await
        .unwrap();
}

async fn rotate(rotator: &Rotator) -> Outcome {
    tokio::time::timeout(
        EVENT_TIMEOUT,
        rotator.rotate(true, false, &CancellationToken::new()),
    )
    .await
    .expect("rotation ends")
    .expect("rotation runs")
}

fn history_path(config: &Config) -> std::path::PathBuf {
    FileStore::new(&config.state_dir).history_path("maps")
}

fn steps(doc: &chain::Document) -> Vec<Step> {
    doc.entries.iter().map(|e| e.step).collect()
}

/// I7: neither a secret value nor its SHA-256 is in `bytes`.
fn assert_no_secret(bytes: &[u8], values: &[String], what: &str) {
    let text = String::from_utf8_lossy(bytes);
    for value in values {
        assert!(
            !text.contains(value.as_str()),
            "{what} holds a secret value"
        );
        let digest = sha256_hex(&SecretString::from(value.clone()));
        assert!(!text.contains(&digest), "{what} holds a secret's SHA-256");
    }
}

fn history_cli(config_path: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("history")
        .args(args)
        .arg("--config")
        .arg(config_path)
        .env_remove("REKEYD_CONFIG")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_rotation_is_recorded_step_by_step_and_the_chain_verifies() {
    let w = world(Duration::ZERO).await;
    let (path, config) = w.config("");
    bootstrap(&config).await;
    let rotator = w.rotator(&config, Duration::from_secs(10));
    assert_eq!(rotate(&rotator).await, Outcome::Rotated);

    let doc = history::load(rotator.store.as_ref(), "maps")
        .await
        .unwrap()
        .expect("a history");
    assert_eq!(
        steps(&doc),
        [
            Step::Forced,
            Step::Started,
            Step::Created,
            Step::Verified,
            Step::Promoted,
            Step::Completed,
            Step::Deleted,
        ]
    );
    let new_id = rotator
        .store
        .load("maps")
        .await
        .unwrap()
        .unwrap()
        .value
        .current
        .id
        .unwrap();
    let rid = doc.entries[1]
        .rid
        .clone()
        .expect("started names the rotation");
    assert_eq!(doc.entries[1].detail.as_deref(), Some("forced"));
    for e in &doc.entries[..6] {
        assert_eq!(e.rid.as_deref(), Some(rid.as_str()), "{e:?}");
    }
    assert_eq!(doc.entries[2].secret_id.as_deref(), Some(new_id.as_str()));
    assert_eq!(doc.entries[4].secret_id.as_deref(), Some(new_id.as_str()));
    assert_eq!(
        doc.entries[6].secret_id.as_deref(),
        Some(w.bootstrap.0.as_str()),
        "the old secret's deletion names it"
    );
    chain::verify(&doc, "maps").unwrap();
    let bytes = std::fs::read(history_path(&config)).unwrap();
    assert_no_secret(&bytes, &w.secret_values(), "the history");

    let out = history_cli(&path, &["--verify"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("maps: 7 entries, chain intact"));
    let out = history_cli(&path, &["maps", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["verified"], true);
    assert_eq!(json["entries"][2]["step"], "created");
    assert_no_secret(&out.stdout, &w.secret_values(), "history --json");
    let out = history_cli(&path, &["maps"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("created") && table.contains(&new_id),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_or_removed_entry_fails_verify_naming_the_first_bad_entry() {
    let w = world(Duration::ZERO).await;
    let (path, config) = w.config("");
    bootstrap(&config).await;
    let rotator = w.rotator(&config, Duration::from_secs(10));
    assert_eq!(rotate(&rotator).await, Outcome::Rotated);
    let file = history_path(&config);
    let original = std::fs::read(&file).unwrap();
    let doc = chain::decode(&original).unwrap();

    // Editing: the deleted secret's id changed to hide what was deleted.
    let mut edited = doc.clone();
    edited.entries[2].secret_id = Some("someone-elses".into());
    std::fs::write(&file, chain::encode(&edited)).unwrap();
    let out = history_cli(&path, &["--verify", "maps"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("entry 3 (seq 3)"), "{stderr}");

    // Removing one entry in the middle.
    let mut cut = doc.clone();
    cut.entries.remove(4);
    std::fs::write(&file, chain::encode(&cut)).unwrap();
    let out = history_cli(&path, &["--verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("entry 4 (seq 5)"));

    // Removing the oldest entries without a marker.
    let mut front = doc.clone();
    front.entries.drain(..2);
    std::fs::write(&file, chain::encode(&front)).unwrap();
    let out = history_cli(&path, &["--verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("entry 0 (seq 2)"));

    // Printing a broken history shows it and says so.
    let out = history_cli(&path, &["maps"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    std::fs::write(&file, &original).unwrap();
    assert!(history_cli(&path, &["--verify"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_drops_the_oldest_entries_behind_a_marker_that_verifies() {
    let w = world(Duration::ZERO).await;
    let (path, config) = w.config("history_limit = 10");
    assert_eq!(config.history_limit, 10);
    bootstrap(&config).await;
    let rotator = w.rotator(&config, Duration::from_secs(10));
    for _ in 0..3 {
        assert_eq!(rotate(&rotator).await, Outcome::Rotated);
    }
    let doc = chain::decode(&std::fs::read(history_path(&config)).unwrap()).unwrap();
    // 21 entries written, 10 kept: the marker and the newest 9.
    assert_eq!(doc.entries.len(), 10);
    let marker = &doc.entries[0];
    assert_eq!(marker.step, Step::Truncated);
    assert_eq!(marker.dropped, Some(12));
    assert_eq!(doc.entries[1].seq, 12);
    assert_eq!(doc.entries[9].seq, 20);
    assert_eq!(doc.entries[9].step, Step::Deleted);
    let out = history_cli(&path, &["--verify"]);
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_rotation_and_an_operator_install_are_recorded() {
    // New secrets take longer to propagate than the verify window.
    let w = world(Duration::from_secs(30)).await;
    let (_, config) = w.config("");
    bootstrap(&config).await;
    let rotator = w.rotator(&config, Duration::from_secs(1));
    assert_eq!(rotate(&rotator).await, Outcome::Aborted);
    let doc = history::load(rotator.store.as_ref(), "maps")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        steps(&doc),
        [
            Step::Forced,
            Step::Started,
            Step::Created,
            Step::Aborted,
            Step::Deleted
        ]
    );
    let refused = doc.entries[2].secret_id.clone();
    assert_eq!(doc.entries[3].secret_id, refused);
    assert_eq!(
        doc.entries[4].secret_id, refused,
        "the refused secret is deleted"
    );

    let (id, value) = w.sim.add_secret(CLIENT, "made by hand");
    let provider = rekeyd::provider::build(config.credential("maps").unwrap()).unwrap();
    operator::set_secret(
        rotator.store.as_ref(),
        provider.as_ref(),
        SetSecret {
            name: "maps",
            value: SecretString::from(value),
            id: Some(id.clone()),
            verify: false,
            force: false,
            retire_replaced: false,
        },
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let doc = history::load(rotator.store.as_ref(), "maps")
        .await
        .unwrap()
        .unwrap();
    let last = doc.entries.last().unwrap();
    assert_eq!(last.step, Step::Set);
    assert_eq!(last.secret_id.as_deref(), Some(id.as_str()));
    chain::verify(&doc, "maps").unwrap();
    assert_no_secret(
        &std::fs::read(history_path(&config)).unwrap(),
        &w.secret_values(),
        "the history",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_route_needs_the_api_key() {
    let w = world(Duration::ZERO).await;
    let text = w.config_text("", true);
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_in(dir, &text).await;
    let rotator = w.rotator(&d.config, Duration::from_secs(10));
    // Like `rekeyd rotate` beside the running daemon.
    let outcome = tokio::time::timeout(
        EVENT_TIMEOUT,
        rotator.rotate(true, true, &CancellationToken::new()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(outcome, Outcome::Rotated);
    let base = format!("http://{}", d.api_addr.unwrap());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{base}/v1/history/maps");
    let denied = client.get(&url).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    let wrong = client
        .get(&url)
        .header("X-Rekeyd-Key", "not-the-key")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let reply = client
        .get(&url)
        .header("X-Rekeyd-Key", d.api_key())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let body = reply.bytes().await.unwrap();
    assert_no_secret(&body, &w.secret_values(), "GET /v1/history");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["verified"], true);
    assert_eq!(json["entries"].as_array().unwrap().len(), 7);
    let unknown = client
        .get(format!("{base}/v1/history/nope"))
        .header("X-Rekeyd-Key", d.api_key())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // A history that no longer parses is not an outage to retry: the
    // store answered, and an operator has to look at it.
    let file = FileStore::new(&d.config.state_dir).history_path("maps");
    std::fs::write(&file, b"{\"format\": 1, \"credential\": \"maps\", \"entr").unwrap();
    let reply = client
        .get(&url)
        .header("X-Rekeyd-Key", d.api_key())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 500);
    let json: serde_json::Value = serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
    assert_eq!(json["error"], "history_unreadable", "{json}");
    assert!(
        json["detail"].as_str().unwrap().contains("unreadable"),
        "{json}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_steps_reach_the_journal_with_their_message_ids() {
    let w = world(Duration::ZERO).await;
    let (path, _) = w.config("");
    let socket = w.dir.path().join("journal.socket");
    let journal = UnixDatagram::bind(&socket).unwrap();
    journal.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    let out = tokio::task::spawn_blocking({
        let (path, socket) = (path.clone(), socket.clone());
        move || {
            Command::new(BIN)
                .args(["rotate", "maps", "--config"])
                .arg(&path)
                .env_remove("REKEYD_CONFIG")
                // What systemd sets for a service logging to the journal.
                .env("JOURNAL_STREAM", "8:12345")
                .env("REKEYD_JOURNAL_SOCKET", &socket)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut datagrams = Vec::new();
    let mut buf = vec![0u8; 65536];
    while datagrams.len() < 7 {
        let n = journal.recv(&mut buf).expect("a journal entry per step");
        datagrams.push(buf[..n].to_vec());
    }
    let expected = [
        Step::Forced,
        Step::Started,
        Step::Created,
        Step::Verified,
        Step::Promoted,
        Step::Completed,
        Step::Deleted,
    ];
    for (datagram, step) in datagrams.iter().zip(expected) {
        let text = String::from_utf8_lossy(datagram);
        assert!(
            text.contains(&format!(
                "MESSAGE_ID={}\n",
                rekeyd::journal::message_id(step)
            )),
            "{text}"
        );
        assert!(text.contains("REKEYD_CREDENTIAL=maps\n"), "{text}");
        assert!(
            text.contains(&format!("REKEYD_STEP={}\n", step.as_str())),
            "{text}"
        );
        assert!(text.contains("REKEYD_HISTORY_DIGEST="), "{text}");
        assert_no_secret(datagram, &w.secret_values(), "a journal entry");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_older_than_max_secret_age_is_rotated_and_says_why() {
    let w = world(Duration::ZERO).await;
    // No schedule: only the age bound rotates.
    let text = w.config_with("", false, "max_secret_age = \"2s\"\ngrace = \"0s\"");
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_in(dir, &text).await;
    let store = FileStore::new(&d.config.state_dir);
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let started = loop {
        let doc = history::load(&store, "maps").await.unwrap();
        let started = doc.and_then(|doc| {
            doc.entries
                .iter()
                .find(|e| e.step == Step::Started)
                .cloned()
        });
        if let Some(started) = started {
            break started;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rotation within {EVENT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(started.detail.as_deref(), Some("max_secret_age"));
    assert_eq!(started.seq, 0, "not forced: no `forced` entry before it");
    // The metrics are one registry per process, shared by this file's
    // tests: tests/deploy.rs checks them on a daemon of its own.
    d.stop().await;
}

/// A history's fields reach the operator's terminal: a secret id the
/// provider chose, or an entry someone with write access to the store
/// wrote, must not carry escape sequences (cursor moves, a retitled
/// terminal) or a line break that forges a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_table_escapes_control_characters() {
    let w = world(Duration::ZERO).await;
    let (path, config) = w.config("");
    let mut doc = chain::Document::new("maps");
    chain::append(
        &mut doc,
        &[history::Event::new(Step::Created)
            .rid("r\u{1b}[2J")
            .secret(Some("s-1\u{1b}]0;owned\u{7}"))
            .detail("fine\r\n9      2026-01-01T00:00:00.000Z deleted")],
        std::time::SystemTime::now(),
        200,
    );
    let file = history_path(&config);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, chain::encode(&doc)).unwrap();

    let out = history_cli(&path, &["maps"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        !stdout.contains(['\u{1b}', '\u{7}', '\r']),
        "raw control characters in {stdout:?}"
    );
    // The header and one row: the line break in `detail` forged none.
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains(r"s-1\u{1b}]0;owned\u{7}"), "{stdout}");
    assert!(stdout.contains(r"fine\r\n9"), "{stdout}");

    // JSON escapes them by itself, and keeps the values exact.
    let out = history_cli(&path, &["maps", "--json"]);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        value["entries"][0]["secret_id"], "s-1\u{1b}]0;owned\u{7}",
        "{value}"
    );
}

/// The journal is the independent copy a history is compared with: when
/// the bound drops entries, the marker that says so reaches the journal
/// as well (MESSAGE_ID of `truncated`, its seq, count and digest), or a
/// genuine marker could not be told from a forged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_truncation_marker_reaches_the_journal() {
    let w = world(Duration::ZERO).await;
    let (path, config) = w.config("history_limit = 10");
    let socket = w.dir.path().join("journal.socket");
    let journal = UnixDatagram::bind(&socket).unwrap();
    journal.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    let rotate_cli = |path: std::path::PathBuf, socket: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["rotate", "maps", "--config"])
                .arg(&path)
                .env_remove("REKEYD_CONFIG")
                .env("JOURNAL_STREAM", "8:12345")
                .env("REKEYD_JOURNAL_SOCKET", &socket)
                .output()
                .unwrap()
        })
    };
    // 7 entries per forced rotation: the second one passes the bound and
    // ends with seq 13. Read while the commands run: a unix datagram
    // socket queues only a few datagrams (net.unix.max_dgram_qlen).
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut texts: Vec<String> = Vec::new();
        let done = |texts: &[String]| {
            let last_entry = texts
                .iter()
                .position(|t| t.contains("REKEYD_HISTORY_SEQ=13\n"));
            last_entry.is_some_and(|i| {
                texts[i + 1..]
                    .iter()
                    .any(|t| t.contains("REKEYD_STEP=truncated\n"))
            })
        };
        while !done(&texts) {
            let n = journal.recv(&mut buf).unwrap_or_else(|e| {
                panic!("no journal entry for the marker ({e}); got {texts:#?}")
            });
            texts.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        texts
    });
    for _ in 0..2 {
        let out = rotate_cli(path.clone(), socket.clone()).await.unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let texts = reader.join().unwrap();
    let doc = chain::decode(&std::fs::read(history_path(&config)).unwrap()).unwrap();
    let marker = &doc.entries[0];
    assert_eq!(marker.step, Step::Truncated);
    // The marker in the store is the last one the journal got.
    let text = texts.last().unwrap();
    assert!(
        text.contains(&format!(
            "MESSAGE_ID={}\n",
            rekeyd::journal::message_id(Step::Truncated)
        )),
        "{text}"
    );
    for field in [
        format!("REKEYD_HISTORY_SEQ={}\n", marker.seq),
        format!("REKEYD_HISTORY_DROPPED={}\n", marker.dropped.unwrap()),
        format!("REKEYD_HISTORY_DIGEST={}\n", marker.digest()),
        "PRIORITY=6\n".to_string(),
    ] {
        assert!(text.contains(&field), "{field:?} not in {text}");
    }
    assert_no_secret(text.as_bytes(), &w.secret_values(), "a journal entry");
}
