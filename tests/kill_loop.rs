//! I1/I3/I4/I5/I7 under `kill -9`: the daemon binary rotates a MapsIndoors
//! secret every second against a flaky simulated provider (latency, random
//! 5xx, lost replies, lost `create` replies, slow propagation) and is killed
//! at random moments, dozens of times. After a last, undisturbed run the
//! provider must hold exactly the secrets it should: the stored one (which
//! works), the operator's and the other client's, and no orphan.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rekeyd::config::Config;
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use rekeyd::store::Store;
use rekeyd::store::file::FileStore;
use secrecy::ExposeSecret;
use tokio::process::{Child, Command};
use tokio::time::Instant;

const CLIENT: &str = "maps-client";
const OTHER_CLIENT: &str = "other-client";
const CUSTOMER: &str = "cust";
const TAG: &str = "rekeyd:maps:";

/// Iterations of start / run a random while / `kill -9`.
const KILLS: usize = 50;
/// The whole loop stops early rather than exceed this.
const LOOP_BUDGET: Duration = Duration::from_secs(75);

struct Setup {
    dir: tempfile::TempDir,
    sim: SimProvider,
    bootstrap_id: String,
    manual: (String, String),
    other: (String, String),
    /// Every secret value seen (at the sim or in the store): none may be logged.
    values: HashSet<String>,
    /// Every run's captured stdout + stderr.
    logs: Vec<PathBuf>,
}

impl Setup {
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("rekeyd.toml")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn write_config(&self, every: &str, log_format: &str) {
        let d = self.dir.path().display();
        let text = format!(
            r#"state_dir = "{d}/state"
[log]
format = "{log_format}"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "{CLIENT}"
customer_id = "{CUSTOMER}"
initial_secret_file = "{d}/maps.secret"
initial_secret_id = "{boot}"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
request_timeout = "5s"
[credentials.rotation]
every = "{every}"
grace = "0s"
"#,
            boot = self.bootstrap_id,
            token = self.sim.mapsindoors_token_url(),
            secrets = self.sim.mapsindoors_secrets_url(),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Starts `rekeyd run`, its output going to a fresh log file.
    fn spawn(&mut self) -> Child {
        let log = self
            .dir
            .path()
            .join(format!("run-{:03}.log", self.logs.len()));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        self.logs.push(log);
        Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("start rekeyd")
    }

    /// Remembers the values of our client's secrets as they are now.
    fn remember_sim_values(&mut self) {
        for s in self.sim.secrets(CLIENT) {
            self.values.insert(s.value);
        }
    }

    /// The stored record as JSON, read the way an operator would (the
    /// daemon is another process).
    fn stored(&self) -> Option<serde_json::Value> {
        let path = self.state_dir().join("credentials/maps.json");
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Remembers every secret value in the store; returns its phase.
    fn remember_stored_values(&mut self) -> Option<String> {
        let doc = self.stored()?;
        for v in [
            &doc["current"]["value"],
            &doc["rotation"]["pending"]["value"],
            &doc["rotation"]["old"]["value"],
        ] {
            if let Some(v) = v.as_str() {
                self.values.insert(v.to_string());
            }
        }
        doc["rotation"]["phase"].as_str().map(str::to_string)
    }
}

fn last_rotated_at(doc: &serde_json::Value) -> Option<SystemTime> {
    doc["last_rotated_at"]
        .as_str()
        .map(|t| humantime::parse_rfc3339(t).expect("valid timestamp"))
}

fn signal(child: &Child, sig: i32) {
    let pid = child.id().expect("child running") as i32;
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to {pid}");
}

async fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    tokio::time::timeout(timeout, child.wait())
        .await
        .expect("rekeyd exits in time")
        .unwrap()
}

/// The plans alternate between runs: one plan has one scope.
fn plan(iteration: usize) -> Faults {
    let latency = Some((Duration::ZERO, Duration::from_millis(50)));
    if iteration.is_multiple_of(2) {
        // Everything flaky: logins, list, create, delete.
        Faults {
            scope: FaultScope::All,
            latency,
            random_5xx: 0.1,
            random_drop: 0.1,
            ..Faults::default()
        }
    } else {
        // Secrets created whose value never reaches us (I3 recovery).
        Faults {
            scope: FaultScope::Only(Endpoint::SecretsCreate),
            latency,
            random_5xx: 0.1,
            random_drop: 0.4,
            ..Faults::default()
        }
    }
}

/// The store's current secret exists at the provider (I1: whatever moment
/// the process died, what we would log in with has not been deleted).
fn assert_current_exists(setup: &Setup, when: &str) {
    let Some(doc) = setup.stored() else { return };
    let current = doc["current"]["value"].as_str().expect("current value");
    assert!(
        setup.sim.secrets(CLIENT).iter().any(|s| s.value == current),
        "{when}: the stored current secret is gone at the provider (phase {})",
        doc["rotation"]["phase"]
    );
}

/// The journal has nothing left to do: idle, no secret it licensed for
/// deletion (`retire`) still waiting for its delete, and no sweep owed
/// (`listing_owed`). A rotation turns idle first and deletes the old
/// secret and sweeps right after; a stop in between leaves that work to
/// the next start, so a check made then would find the old secret still
/// at the provider.
fn settled(doc: &serde_json::Value) -> bool {
    doc["rotation"]["phase"] == "idle"
        && doc["retire"]
            .as_array()
            .is_none_or(|pending| pending.is_empty())
        && doc["listing_owed"] != true
}

/// Runs the daemon undisturbed until the journal is settled and `done`
/// holds for the stored record, then stops it with SIGTERM.
async fn run_until(
    setup: &mut Setup,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut child = setup.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    let doc = loop {
        setup.remember_sim_values();
        setup.remember_stored_values();
        if let Some(doc) = setup.stored()
            && settled(&doc)
            && done(&doc)
        {
            break doc;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("rekeyd exited early ({status}) while waiting for {what}");
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(setup.logs.last().unwrap()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "timed out waiting for {what}; journal phase: {}\nlast log lines (newest first):\n{}",
                setup
                    .stored()
                    .map_or("none".to_string(), |d| d["rotation"]["phase"].to_string()),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "rekeyd exits 0 on SIGTERM: {status}");
    setup.remember_stored_values();
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_converges_without_lockout_or_orphans() {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(3),
        propagation_delay: Duration::from_millis(200),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    sim.add_client(OTHER_CLIENT, CUSTOMER);
    let (bootstrap_id, bootstrap) = sim.add_secret(CLIENT, "portal: initial secret");
    let manual = sim.add_secret(CLIENT, "made by hand for a script");
    let other = sim.add_secret(OTHER_CLIENT, "someone else's");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("maps.secret"), &bootstrap).unwrap();
    let mut setup = Setup {
        dir,
        sim,
        bootstrap_id,
        values: [bootstrap, manual.1.clone(), other.1.clone()]
            .into_iter()
            .collect(),
        manual,
        other,
        logs: Vec::new(),
    };

    let started = Instant::now();
    let mut kills = 0;
    let mut phases_at_kill = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..KILLS {
        if started.elapsed() > LOOP_BUDGET {
            break;
        }
        setup.write_config("1s", if i % 3 == 2 { "json" } else { "text" });
        setup.sim.set_faults(plan(i));
        let mut child = setup.spawn();
        let run_for = Duration::from_millis(rand::rng().random_range(100..=1500));
        let until = Instant::now() + run_for;
        while Instant::now() < until {
            setup.remember_sim_values();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "rekeyd exited by itself ({status}) in run {i}: {}",
                std::fs::read_to_string(setup.logs.last().unwrap()).unwrap_or_default()
            );
        }
        signal(&child, libc::SIGKILL);
        let status = wait_exit(&mut child, Duration::from_secs(10)).await;
        assert!(!status.success(), "killed, not exited: {status}");
        kills += 1;
        setup.remember_sim_values();
        let phase = setup
            .remember_stored_values()
            .unwrap_or_else(|| "no record".into());
        *phases_at_kill.entry(phase).or_default() += 1;
        assert_current_exists(&setup, &format!("after kill {kills}"));
    }
    let loop_time = started.elapsed();

    // Calm weather: at least one complete rotation after this restart.
    setup.sim.set_faults(Faults::default());
    let restart = SystemTime::now();
    let doc = run_until(&mut setup, "a full rotation after the restart", |doc| {
        last_rotated_at(doc).is_some_and(|t| t > restart)
    })
    .await;
    assert!(last_rotated_at(&doc).unwrap() > restart);
    // SIGTERM may have landed in the next rotation (every 1s): a restart
    // that schedules none finishes it, as an operator's would.
    let mut settles = 0;
    setup.remember_stored_values();
    while !setup.stored().is_some_and(|doc| settled(&doc)) {
        settles += 1;
        assert!(settles <= 3, "the journal does not settle");
        setup.write_config("1h", "text");
        run_until(&mut setup, "the interrupted rotation to finish", |_| true).await;
    }

    // The stored secret works at the provider.
    let state_dir = setup.state_dir();
    let record = FileStore::new(&state_dir)
        .load("maps")
        .await
        .unwrap()
        .expect("record")
        .value;
    assert_eq!(record.rotation.phase(), "idle");
    let config = Config::load(&setup.config_path()).unwrap();
    let provider = rekeyd::provider::build(config.credential("maps").unwrap()).unwrap();
    let token = provider
        .login(&record.current.value)
        .await
        .expect("the stored secret logs in");
    assert_eq!(
        setup
            .sim
            .token_client(token.access_token.expose_secret())
            .as_deref(),
        Some(CLIENT)
    );

    // Exactly one secret of ours at the provider, the stored one (I3).
    let ours = setup.sim.secrets(CLIENT);
    let tagged: Vec<_> = ours
        .iter()
        .filter(|s| s.description.starts_with(TAG))
        .collect();
    assert_eq!(
        tagged.len(),
        1,
        "exactly one tagged secret remains: {tagged:?}"
    );
    assert_eq!(Some(&tagged[0].id), record.current.id.as_ref());
    assert_eq!(tagged[0].value, record.current.value.expose_secret());
    // The bootstrap secret (id given) was rotated away; the operator's and
    // the other client's secrets are untouched (I4).
    assert!(
        ours.iter().all(|s| s.id != setup.bootstrap_id),
        "bootstrap secret deleted"
    );
    assert!(
        ours.iter()
            .any(|s| s.id == setup.manual.0 && s.value == setup.manual.1),
        "manual secret untouched"
    );
    assert_eq!(ours.len(), 2, "ours: the stored one and the manual one");
    let theirs = setup.sim.secrets(OTHER_CLIENT);
    assert_eq!(theirs.len(), 1);
    assert_eq!(
        (&theirs[0].id, &theirs[0].value),
        (&setup.other.0, &setup.other.1)
    );

    // I7: no secret value and no token ("sim_...") in any run's output.
    let mut logs = String::new();
    for path in &setup.logs {
        logs.push_str(&std::fs::read_to_string(path).unwrap());
    }
    assert!(logs.contains("token refreshed"), "the runs were logged");
    if let Some(at) = logs.find("sim_") {
        panic!(
            "a token reached the logs: ...{}...",
            &logs[at.saturating_sub(200)..at]
        );
    }
    for value in &setup.values {
        assert!(
            !logs.contains(value.as_str()),
            "a secret value reached the logs"
        );
    }

    let completed = logs.matches("rotation complete").count();
    let recovered = logs
        .matches("deleting a secret from an interrupted rotation")
        .count();
    let resumed = logs.matches("resuming rotation").count();
    let stats = setup.sim.stats();
    eprintln!(
        "kill loop: {kills} kills in {loop_time:?} (phase at kill: {phases_at_kill:?}); \
         {completed} rotations completed, {resumed} resumed, {recovered} orphans recovered, \
         {settles} settle runs; sim: {} created, {} deleted, {} faults, {} responses dropped",
        stats.secrets_created,
        stats.secrets_deleted,
        stats.faults_injected,
        stats.responses_dropped
    );
    assert!(kills >= 20, "enough kills happened: {kills}");
    assert!(completed >= 1);
    // Every secret ever created is gone except the stored one.
    assert_eq!(stats.secrets_created, stats.secrets_deleted, "{stats:?}");
    setup.sim.shutdown().await;
}
