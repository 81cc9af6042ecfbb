//! Crash safety of secret rotation, end to end (DESIGN.md I1-I5, I7).
//!
//! The real binary, built with `--features failpoints`, aborts (SIGABRT) at
//! one of the driver's crash points (`FAILPOINTS=<point>=return`); then
//! `rekeyd rotate` runs again without failpoints and must converge:
//!
//! - the journal is idle and the stored secret logs in at the provider;
//! - the client holds exactly one secret tagged `rekeyd:maps:`, the stored
//!   one, and nothing else of ours: no orphan (I3);
//! - the bootstrap secret is deleted when its id was configured
//!   (`initial_secret_id`) and kept, with a warning, when it was not (I4);
//! - a hand-made secret of the same client and another client's secrets
//!   under the same customer are untouched, even one whose description
//!   carries our rotation's tag (I4).
//!
//! After every crash the stored secret must still log in (I1), and no
//! secret value or token may appear in anything rekeyd wrote to stderr (I7).
//!
//! How each point is reached (`crashes_for`):
//! - on the path of a fresh rotation (journal idle → creating → created →
//!   promoted → idle with the old secret to retire → idle):
//!   `rotation-after-persist-creating`, `-create`, `-persist-created`,
//!   `-verify`, `-persist-promoted`, `-persist-retire`, `-delete-old`,
//!   `-persist-idle`: one crash, then the clean run resumes;
//! - only when resuming a `creating` journal: `rotation-after-list` and
//!   `rotation-after-delete-tagged`. A first crash at `rotation-after-create`
//!   leaves a tagged secret whose value was never stored; the resumed run
//!   lists it (crash after the list, before deleting it) or deletes it
//!   (crash right after the delete), and the clean run recovers.
//!
//! `one_rotation_crashed_at_every_point_in_turn` walks a single rotation
//! through all points in sequence, and `list_crash_with_nothing_to_recover`
//! reaches `rotation-after-list` from a `creating` journal with no orphan.
//!
//! The store is bootstrapped as an operator's first start does it: `rekeyd
//! run` copies `initial_secret_file` (and `initial_secret_id`) into the
//! empty store, and is stopped with SIGTERM once it reports it has started.
//! (`rekeyd rotate` on an empty store refuses: there is nothing to rotate.)

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use rekeyd::rotation::driver::CRASH_POINTS;
use rekeyd::sim::{SimOptions, SimProvider, SimSecret};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const NAME: &str = "maps";
const CLIENT: &str = "maps-client";
const OTHER_CLIENT: &str = "other-client";
const CUSTOMER: &str = "cust";
const TAG_PREFIX: &str = "rekeyd:maps:";
const MANUAL_DESCRIPTION: &str = "created by hand";
const SIGABRT: i32 = 6;
/// A failure rather than a hang when a run does not end.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The crashes (point, journal phase it leaves) that bring a rotation to
/// `point`, in order. Every entry of `CRASH_POINTS` must be listed here.
fn crashes_for(point: &str) -> Vec<(&'static str, &'static str)> {
    match point {
        "rotation-after-persist-creating" => vec![("rotation-after-persist-creating", "creating")],
        // Only reached when resuming `creating`: crash after the create call
        // first, so that the resumed run has an orphan to list and delete.
        "rotation-after-list" => vec![
            ("rotation-after-create", "creating"),
            ("rotation-after-list", "creating"),
        ],
        "rotation-after-delete-tagged" => vec![
            ("rotation-after-create", "creating"),
            ("rotation-after-delete-tagged", "creating"),
        ],
        "rotation-after-create" => vec![("rotation-after-create", "creating")],
        "rotation-after-persist-created" => vec![("rotation-after-persist-created", "created")],
        "rotation-after-verify" => vec![("rotation-after-verify", "created")],
        "rotation-after-persist-promoted" => vec![("rotation-after-persist-promoted", "promoted")],
        // The old secret is retired in the write that ends the rotation
        // (S1: that write licenses its delete), so the journal is idle with
        // the old secret still to delete.
        "rotation-after-persist-retire" => vec![("rotation-after-persist-retire", "idle")],
        "rotation-after-delete-old" => vec![("rotation-after-delete-old", "idle")],
        "rotation-after-persist-idle" => vec![("rotation-after-persist-idle", "idle")],
        other => panic!("crash point {other:?} has no scenario in tests/crash_points.rs"),
    }
}

/// A simulated provider, a state directory and a configuration, plus what
/// the test has seen so far.
struct World {
    sim: SimProvider,
    dir: tempfile::TempDir,
    config: PathBuf,
    initial_id_given: bool,
    bootstrap: SimSecret,
    manual: SimSecret,
    /// The other client's secrets as they must stay.
    other: Vec<SimSecret>,
    decoy_planted: bool,
    /// stderr and stdout of every rekeyd run so far.
    logs: String,
    /// Every secret value the provider or the store has held (orphans too).
    values: BTreeSet<String>,
}

fn sim_secret(sim: &SimProvider, client: &str, id: &str) -> SimSecret {
    sim.secrets(client)
        .into_iter()
        .find(|s| s.id == id)
        .expect("secret just added")
}

fn fingerprint(secrets: &[SimSecret]) -> Vec<(String, String, String, String)> {
    secrets
        .iter()
        .map(|s| {
            (
                s.id.clone(),
                s.description.clone(),
                s.value.clone(),
                s.created_at.clone(),
            )
        })
        .collect()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

impl World {
    async fn new(initial_id_given: bool) -> World {
        let sim = SimProvider::start(SimOptions::default()).await.unwrap();
        sim.add_client(CLIENT, CUSTOMER);
        sim.add_client(OTHER_CLIENT, CUSTOMER);
        let (bootstrap_id, _) = sim.add_secret(CLIENT, "bootstrap");
        let (other_id, _) = sim.add_secret(OTHER_CLIENT, "other client's secret");
        let (manual_id, _) = sim.add_secret(CLIENT, MANUAL_DESCRIPTION);
        let bootstrap = sim_secret(&sim, CLIENT, &bootstrap_id);
        let manual = sim_secret(&sim, CLIENT, &manual_id);
        let other = vec![sim_secret(&sim, OTHER_CLIENT, &other_id)];

        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("maps.secret"), &bootstrap.value).unwrap();
        let id_line = if initial_id_given {
            format!("initial_secret_id = \"{}\"", bootstrap.id)
        } else {
            String::new()
        };
        let config = dir.path().join("rekeyd.toml");
        std::fs::write(
            &config,
            format!(
                r#"state_dir = "{d}/state"

[[credentials]]
name = "{NAME}"
provider = "mapsindoors"
client_id = "{CLIENT}"
customer_id = "{CUSTOMER}"
initial_secret_file = "{d}/maps.secret"
{id_line}
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
[credentials.rotation]
every = "24h"
grace = "0s"
"#,
                token = sim.mapsindoors_token_url(),
                secrets = sim.mapsindoors_secrets_url(),
            ),
        )
        .unwrap();
        let values = [&bootstrap, &manual, &other[0]]
            .iter()
            .map(|s| s.value.clone())
            .collect();
        World {
            sim,
            dir,
            config,
            initial_id_given,
            bootstrap,
            manual,
            other,
            decoy_planted: false,
            logs: String::new(),
            values,
        }
    }

    fn record_path(&self) -> PathBuf {
        self.dir.path().join("state/credentials/maps.json")
    }

    fn record(&self) -> Value {
        let bytes = std::fs::read(self.record_path()).expect("the store holds a record");
        serde_json::from_slice(&bytes).expect("the record is JSON")
    }

    fn rekeyd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rekeyd"));
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "trace")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Notes every secret value now at the provider or in the store, so the
    /// log scan looks for all of them.
    fn collect_values(&mut self) {
        for s in self.sim.secrets(CLIENT) {
            self.values.insert(s.value);
        }
        if self.record_path().exists() {
            let r = self.record();
            for v in [
                &r["current"]["value"],
                &r["rotation"]["pending"]["value"],
                &r["rotation"]["old"]["value"],
            ] {
                if let Some(v) = v.as_str() {
                    self.values.insert(v.to_string());
                }
            }
        }
    }

    /// First start: `rekeyd run` stores the initial secret; stopped with
    /// SIGTERM as soon as it says it has started.
    async fn bootstrap(&mut self) {
        let mut child = self
            .rekeyd(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut logs = String::new();
        let started = tokio::time::timeout(RUN_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                logs.push_str(&line);
                logs.push('\n');
                if line.contains("rekeyd started") {
                    return true;
                }
            }
            false
        })
        .await
        .expect("rekeyd run starts in time");
        assert!(started, "rekeyd run ended before starting:\n{logs}");
        let pid = child.id().expect("running") as i32;
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        tokio::time::timeout(RUN_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                logs.push_str(&line);
                logs.push('\n');
            }
        })
        .await
        .expect("rekeyd run stops in time");
        let status = tokio::time::timeout(RUN_TIMEOUT, child.wait())
            .await
            .expect("rekeyd run exits in time")
            .unwrap();
        self.logs.push_str(&logs);
        assert!(status.success(), "rekeyd run: {status:?}\n{logs}");
        self.collect_values();

        let r = self.record();
        assert_eq!(r["rotation"]["phase"], "idle");
        assert_eq!(r["current"]["value"], self.bootstrap.value.as_str());
        if self.initial_id_given {
            assert_eq!(r["current"]["id"], self.bootstrap.id.as_str());
        } else {
            assert!(r["current"]["id"].is_null());
        }
    }

    /// `rekeyd rotate maps`, with one crash point armed if given.
    async fn rotate(&mut self, failpoint: Option<&str>) -> Output {
        let mut cmd = self.rekeyd(&["rotate", NAME]);
        if let Some(point) = failpoint {
            cmd.env("FAILPOINTS", format!("{point}=return"));
        }
        let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .expect("rekeyd rotate ends in time")
            .unwrap();
        self.logs.push_str(&text(&out.stderr));
        self.logs.push_str(&text(&out.stdout));
        self.collect_values();
        out
    }

    /// Runs a rotation that must abort at `point`, leaving the journal in
    /// `phase` and a stored secret that still logs in (I1).
    async fn crash(&mut self, point: &str, phase: &str) {
        let out = self.rotate(Some(point)).await;
        assert!(
            !out.status.success(),
            "FAILPOINTS={point}=return: rekeyd rotate exited 0; the point was not reached\n{}",
            text(&out.stderr)
        );
        assert_eq!(
            out.status.signal(),
            Some(SIGABRT),
            "FAILPOINTS={point}=return: rekeyd rotate must abort there: {:?}\n{}",
            out.status,
            text(&out.stderr)
        );
        let r = self.record();
        assert_eq!(
            r["rotation"]["phase"], phase,
            "journal after a crash at {point}"
        );
        let current = r["current"]["value"].as_str().unwrap().to_string();
        assert!(
            login(&self.sim, &current).await,
            "I1: after a crash at {point} the stored secret no longer logs in"
        );
        if phase == "creating" && !self.decoy_planted {
            // I4: another client's secret carrying our rotation's tag is
            // still not ours; recovery must leave it alone.
            let rid = r["rotation"]["rid"].as_str().unwrap();
            let (id, _) = self
                .sim
                .add_secret(OTHER_CLIENT, &format!("{TAG_PREFIX}{rid}"));
            let decoy = sim_secret(&self.sim, OTHER_CLIENT, &id);
            self.values.insert(decoy.value.clone());
            self.other.push(decoy);
            self.decoy_planted = true;
        }
    }

    /// A clean `rekeyd rotate maps`, which must succeed; returns its stderr.
    async fn finish(&mut self) -> String {
        let out = self.rotate(None).await;
        let stderr = text(&out.stderr);
        assert!(
            out.status.success(),
            "rekeyd rotate: {:?}\n{stderr}",
            out.status
        );
        stderr
    }

    async fn assert_converged(&self) {
        let r = self.record();
        assert_eq!(r["rotation"]["phase"], "idle", "journal: {r}");
        assert!(r["last_rotated_at"].is_string());
        let current_value = r["current"]["value"].as_str().unwrap();
        let current_id = r["current"]["id"]
            .as_str()
            .expect("the rotated secret's id is stored");
        assert!(
            login(&self.sim, current_value).await,
            "the stored secret logs in"
        );

        let ours = self.sim.secrets(CLIENT);
        let tagged: Vec<&SimSecret> = ours
            .iter()
            .filter(|s| s.description.starts_with(TAG_PREFIX))
            .collect();
        assert_eq!(
            tagged.len(),
            1,
            "exactly one secret tagged {TAG_PREFIX}: {tagged:?}"
        );
        assert_eq!(
            tagged[0].id, current_id,
            "the tagged secret is the stored one"
        );
        assert!(
            tagged[0].value == current_value,
            "the tagged secret's value is the stored one"
        );
        assert!(
            ours.iter().any(|s| s.id == self.manual.id
                && s.description == MANUAL_DESCRIPTION
                && s.value == self.manual.value),
            "the hand-made secret is untouched: {ours:?}"
        );
        let bootstrap_kept = ours.iter().any(|s| s.id == self.bootstrap.id);
        if self.initial_id_given {
            assert!(
                !bootstrap_kept,
                "the bootstrap secret (id known) is deleted"
            );
            assert!(!login(&self.sim, &self.bootstrap.value).await);
        } else {
            assert!(bootstrap_kept, "the bootstrap secret (id unknown) is kept");
        }
        // Tagged one + hand-made one (+ bootstrap when kept): no orphan.
        assert_eq!(
            ours.len(),
            2 + usize::from(!self.initial_id_given),
            "no orphan: {ours:?}"
        );
        assert_eq!(
            fingerprint(&self.sim.secrets(OTHER_CLIENT)),
            fingerprint(&self.other),
            "the other client's secrets are untouched"
        );
    }

    /// I7: no secret value the test has seen, and no token, in any output.
    fn assert_no_secret_in_logs(&self) {
        assert!(!self.logs.is_empty());
        for value in &self.values {
            assert!(
                !self.logs.contains(value.as_str()),
                "a secret value reached rekeyd's output"
            );
        }
        if let Some(at) = self.logs.find("sim_") {
            let context = self.logs.get(at.saturating_sub(200)..at).unwrap_or("");
            panic!("a token reached rekeyd's output: ...{context}");
        }
    }
}

/// Logs in at the sim's MapsIndoors token endpoint: `true` on a token,
/// `false` on `invalid_client`.
async fn login(sim: &SimProvider, secret: &str) -> bool {
    let response = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .post(sim.mapsindoors_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", secret),
        ])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    match status {
        200 => {
            assert!(body["access_token"].as_str().unwrap().starts_with("sim_"));
            true
        }
        400 if body["error"] == "invalid_client" => false,
        _ => panic!("unexpected token endpoint reply {status}: {body}"),
    }
}

/// Bootstrap, crash as `crashes` says, rotate cleanly, check everything.
async fn crash_and_recover(crashes: Vec<(&'static str, &'static str)>) {
    let mut world = World::new(true).await;
    world.bootstrap().await;
    for (point, phase) in crashes {
        world.crash(point, phase).await;
    }
    world.finish().await;
    world.assert_converged().await;
    world.assert_no_secret_in_logs();
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_crash_point_converges() {
    // Independent worlds: run them side by side, report every failure.
    let tasks: Vec<_> = CRASH_POINTS
        .iter()
        .map(|&point| {
            let crashes = crashes_for(point);
            (point, tokio::spawn(crash_and_recover(crashes)))
        })
        .collect();
    let mut failures = Vec::new();
    for (point, task) in tasks {
        if let Err(e) = task.await {
            let message = if e.is_panic() {
                let payload = e.into_panic();
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            } else {
                e.to_string()
            };
            failures.push(format!("{point}: {message}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_rotation_crashed_at_every_point_in_turn() {
    // Each resumed run gets one step further before the next crash.
    let chain = [
        ("rotation-after-persist-creating", "creating"),
        ("rotation-after-list", "creating"),
        ("rotation-after-create", "creating"),
        ("rotation-after-delete-tagged", "creating"),
        ("rotation-after-persist-created", "created"),
        ("rotation-after-verify", "created"),
        ("rotation-after-persist-promoted", "promoted"),
        ("rotation-after-persist-retire", "idle"),
        ("rotation-after-delete-old", "idle"),
        ("rotation-after-persist-idle", "idle"),
    ];
    let covered: BTreeSet<&str> = chain.iter().map(|(p, _)| *p).collect();
    let all: BTreeSet<&str> = CRASH_POINTS.iter().copied().collect();
    assert_eq!(covered, all, "the chain passes every crash point");

    let mut world = World::new(true).await;
    world.bootstrap().await;
    let mut rid = None;
    for (point, phase) in chain {
        world.crash(point, phase).await;
        let r = world.record();
        if phase != "idle" {
            let this = r["rotation"]["rid"].as_str().unwrap().to_string();
            // All of it is one rotation, resumed again and again.
            assert_eq!(rid.get_or_insert_with(|| this.clone()), &this);
        }
    }
    // The journal is idle: this run is a second, uninterrupted rotation.
    world.finish().await;
    world.assert_converged().await;
    world.assert_no_secret_in_logs();
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_crash_with_nothing_to_recover() {
    crash_and_recover(vec![
        ("rotation-after-persist-creating", "creating"),
        ("rotation-after-list", "creating"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_initial_secret_id_keeps_bootstrap_and_warns() {
    for crash in [None, Some(("rotation-after-persist-promoted", "promoted"))] {
        let mut world = World::new(false).await;
        world.bootstrap().await;
        if let Some((point, phase)) = crash {
            world.crash(point, phase).await;
        }
        let stderr = world.finish().await;
        assert!(
            stderr.contains("initial_secret_id"),
            "the run that finishes the rotation warns about initial_secret_id ({crash:?}):\n{stderr}"
        );
        world.assert_converged().await;
        // I4: without an id nothing of the operator's is deleted, and a
        // rotation without crashes leaves nothing to clean up either.
        assert_eq!(world.sim.stats().secrets_deleted, 0);
        world.assert_no_secret_in_logs();
        world.sim.shutdown().await;
    }
}
