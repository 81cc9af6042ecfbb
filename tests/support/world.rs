//! One rotating MapsIndoors credential (`maps`) against the simulated
//! provider, its state directory and its configuration file, for tests that
//! run the `rekeyd` binary the way an operator does (`run`, `rotate`,
//! `set-secret`, `status`) and then check what the provider and the journal
//! hold.
//!
//! Include after `process.rs`, whose child-process helper it uses:
//! ```ignore
//! #[path = "support/process.rs"]
//! mod process;
//! #[path = "support/world.rs"]
//! mod world;
//! ```
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rekeyd::sim::{SimOptions, SimProvider, SimSecret};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, SecretEntry, Store};
use secrecy::SecretString;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;

use crate::process::{BIN, RekeydProcess};

pub const NAME: &str = "maps";
pub const CLIENT: &str = "maps-client";
pub const CUSTOMER: &str = "cust";
/// What every secret rekeyd creates for `maps` is described with (I3).
pub const TAG_PREFIX: &str = "rekeyd:maps:";
/// A command that should take seconds fails the test after this long.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How the credential is configured.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `[credentials.rotation] grace`, with `every = "24h"` (rotations only
    /// when asked for); `None`: no rotation section at all.
    pub grace: Option<&'static str>,
    /// `[credentials.endpoints] request_timeout`. Changing it changes the
    /// credential's configuration, so a reload restarts its tasks, and
    /// nothing else.
    pub request_timeout: &'static str,
    /// `[credentials.rotation] on_login = true` (with a rotation section).
    pub on_login: bool,
    /// A token file, `maps.token` in the test's directory ([`World::token_file`]).
    pub token_file: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            grace: Some("0s"),
            request_timeout: "10s",
            on_login: false,
            token_file: false,
        }
    }
}

pub struct World {
    pub sim: SimProvider,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The operator's first secret, stored with its id (`initial_secret_id`)
    /// so that the first rotation deletes it.
    pub bootstrap: SimSecret,
    /// Names the log file of each spawned process.
    spawned: AtomicUsize,
    /// Everything rekeyd printed, for the I7 scan.
    output: Mutex<String>,
    /// Every secret value seen at the provider or in the store.
    values: Mutex<BTreeSet<String>>,
}

impl World {
    /// A sim with client `maps-client` and one secret, the secret in
    /// `maps.secret`, the configuration written, and the store holding the
    /// bootstrap secret (as the daemon's first start leaves it), so that
    /// the first journal write of any process is a rotation's.
    pub async fn new(options: SimOptions, settings: &Settings) -> World {
        let sim = SimProvider::start(options).await.unwrap();
        sim.add_client(CLIENT, CUSTOMER);
        let (id, _) = sim.add_secret(CLIENT, "portal: initial secret");
        let bootstrap = sim
            .secrets(CLIENT)
            .into_iter()
            .find(|s| s.id == id)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("maps.secret"), &bootstrap.value).unwrap();
        let world = World {
            config: dir.path().join("rekeyd.toml"),
            sim,
            dir,
            bootstrap,
            spawned: AtomicUsize::new(0),
            output: Mutex::new(String::new()),
            values: Mutex::new(BTreeSet::new()),
        };
        world.write_config(settings);
        let record = CredentialRecord::new(SecretEntry {
            id: Some(world.bootstrap.id.clone()),
            value: SecretString::from(world.bootstrap.value.clone()),
            created_at: SystemTime::now(),
            expires_at: None,
        });
        FileStore::new(&world.dir.path().join("state"))
            .compare_and_swap(NAME, None, &record)
            .await
            .unwrap();
        world.remember_values();
        world
    }

    pub fn write_config(&self, settings: &Settings) {
        let d = self.dir.path().display();
        let mut rotation = match settings.grace {
            Some(grace) => {
                format!("[credentials.rotation]\nevery = \"24h\"\ngrace = \"{grace}\"\n")
            }
            None => String::new(),
        };
        if settings.on_login {
            rotation.push_str("on_login = true\n");
        }
        if settings.token_file {
            rotation.push_str(&format!(
                "[[credentials.sinks]]\npath = \"{}\"\n",
                self.token_file().display()
            ));
        }
        let text = format!(
            r#"state_dir = "{d}/state"
[api]
listen = "unix:{d}/api.sock"
key_file = "{d}/api.key"

[[credentials]]
name = "{NAME}"
provider = "mapsindoors"
client_id = "{CLIENT}"
customer_id = "{CUSTOMER}"
initial_secret_file = "{d}/maps.secret"
initial_secret_id = "{boot}"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
request_timeout = "{timeout}"
{rotation}"#,
            boot = self.bootstrap.id,
            token = self.sim.mapsindoors_token_url(),
            secrets = self.sim.mapsindoors_secrets_url(),
            timeout = settings.request_timeout,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Where [`Settings::token_file`] has the token written.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("maps.token")
    }

    fn record_path(&self) -> PathBuf {
        self.dir.path().join("state/credentials/maps.json")
    }

    /// The journal as an operator reads it (`cat`): replaced by rename, so
    /// never half written.
    pub fn record(&self) -> Value {
        let bytes = std::fs::read(self.record_path()).expect("the store holds a record");
        serde_json::from_slice(&bytes).expect("the record is JSON")
    }

    /// The phase as `rekeyd status` shows it: the rotation's phase, or
    /// `retiring` while idle with secrets still to delete.
    pub fn phase(&self) -> String {
        phase_of(&self.record())
    }

    pub fn version(&self) -> u64 {
        self.record()["version"].as_u64().expect("version")
    }

    /// Whether a process is inside a journal write right now: every write
    /// holds the credential's write lock from its version check to its
    /// rename.
    pub fn write_in_flight(&self) -> bool {
        let path = self.dir.path().join("state/credentials/maps.lock");
        let Ok(file) = std::fs::File::open(path) else {
            return false;
        };
        match file.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(e)) => panic!("lock probe: {e}"),
        }
    }

    fn next_log(&self, what: &str) -> PathBuf {
        let n = self.spawned.fetch_add(1, Ordering::SeqCst);
        self.dir.path().join(format!("{n:02}-{what}.log"))
    }

    /// `rekeyd ARGS --config ...` in the background, stderr to a log file.
    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> RekeydProcess {
        let log = self.next_log(args[0]);
        RekeydProcess::spawn_command(args, &self.config, &log, env)
    }

    /// Like [`World::spawn`], with `input` on stdin (through a 0600 file).
    pub fn spawn_with_input(&self, args: &[&str], input: &str) -> RekeydProcess {
        let log = self.next_log(args[0]);
        let stdin = log.with_extension("stdin");
        rekeyd::fsutil::write_atomic(&stdin, input.as_bytes(), 0o600).unwrap();
        RekeydProcess::spawn_command_with_stdin(args, &self.config, &log, &[], Some(&stdin))
    }

    /// Notes a finished process's output for the I7 scan.
    pub fn keep_output(&self, text: &str) {
        self.output.lock().unwrap().push_str(text);
    }

    /// `rekeyd ARGS --config ...` to completion, `stdin` written to it.
    pub async fn run(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(BIN);
        command.args(args).arg("--config").arg(&self.config);
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy();
            if n.starts_with("REKEYD") || n == "FAILPOINTS" || n == "NOTIFY_SOCKET" {
                command.env_remove(&name);
            }
        }
        command
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("rekeyd starts");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("rekeyd {args:?} did not end in time"))
            .unwrap();
        self.keep_output(&text(&out.stderr));
        self.keep_output(&text(&out.stdout));
        self.remember_values();
        out
    }

    /// `rekeyd status --json`: the row of `maps`.
    pub async fn status(&self) -> Value {
        let out = self.run(&["status", "--json"], None, &[]).await;
        let doc: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}\n{}", text(&out.stderr)));
        doc["credentials"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == NAME))
            .cloned()
            .unwrap_or_else(|| panic!("no row for {NAME}: {doc}"))
    }

    /// `GET path` on the daemon's local API (unix socket), with the key:
    /// status and JSON body. For polling; `status` is the operator's view.
    pub async fn api(&self, path: &str) -> (u16, Value) {
        let key = std::fs::read_to_string(self.dir.path().join("api.key")).expect("api key");
        let client = reqwest::Client::builder()
            .unix_socket(self.dir.path().join("api.sock"))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let response = client
            .get(format!("http://localhost{path}"))
            .header(rekeyd::serve::api::KEY_HEADER, key.trim())
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        let body = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
        (status, body)
    }

    /// Logs in at the sim's token endpoint: `true` on a token, `false` on
    /// `invalid_client`.
    pub async fn login(&self, secret: &str) -> bool {
        let response = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
            .post(self.sim.mapsindoors_token_url())
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
            200 => true,
            400 if body["error"] == "invalid_client" => false,
            _ => panic!("unexpected token endpoint reply {status}: {body}"),
        }
    }

    /// The client's secrets tagged for `maps`.
    pub fn tagged(&self) -> Vec<SimSecret> {
        self.sim
            .secrets(CLIENT)
            .into_iter()
            .filter(|s| s.description.starts_with(TAG_PREFIX))
            .collect()
    }

    pub fn at_sim(&self, id: &str) -> bool {
        self.sim.secrets(CLIENT).iter().any(|s| s.id == id)
    }

    /// Remembers every secret value now at the sim or in the store.
    pub fn remember_values(&self) {
        let mut values = self.values.lock().unwrap();
        for s in self.sim.secrets(CLIENT) {
            values.insert(s.value);
        }
        if let Ok(bytes) = std::fs::read(self.record_path())
            && let Ok(r) = serde_json::from_slice::<Value>(&bytes)
        {
            for v in [
                &r["current"]["value"],
                &r["rotation"]["pending"]["value"],
                &r["rotation"]["old"]["value"],
            ] {
                if let Some(v) = v.as_str() {
                    values.insert(v.to_string());
                }
            }
        }
    }

    /// The journal is finished and what it stores works: idle with nothing
    /// left to delete, the stored secret logs in (I1), and every secret of
    /// ours at the provider is the stored one (I3: nothing untracked).
    pub async fn assert_settled(&self) -> Value {
        self.remember_values();
        let r = self.record();
        assert_eq!(phase_of(&r), "idle", "journal: {r}");
        let current = r["current"]["value"].as_str().unwrap();
        assert!(
            self.login(current).await,
            "I1: the stored secret does not log in"
        );
        for s in self.tagged() {
            assert!(
                Some(s.id.as_str()) == r["current"]["id"].as_str() && s.value == current,
                "I3: secret {} is tagged {TAG_PREFIX} but is not the stored one (journal: current {})",
                s.id,
                r["current"]["id"]
            );
        }
        r
    }

    /// I7: no secret value seen, and no token, in anything rekeyd printed.
    pub fn assert_no_secret_printed(&self, more: &[String]) {
        self.remember_values();
        let mut output = self.output.lock().unwrap().clone();
        for m in more {
            output.push_str(m);
        }
        assert!(!output.is_empty(), "nothing was collected");
        for value in self.values.lock().unwrap().iter() {
            assert!(
                !output.contains(value.as_str()),
                "I7: a secret value reached rekeyd's output"
            );
        }
        if let Some(at) = output.find("sim_") {
            let context = output.get(at.saturating_sub(200)..at).unwrap_or("");
            panic!("I7: a token reached rekeyd's output: ...{context}");
        }
    }
}

/// What a command logs when it has to wait for another process's claim.
pub const WAITING_FOR_THE_CLAIM: &str =
    "another process is rotating this credential; waiting for it to finish";

/// See [`World::phase`].
pub fn phase_of(record: &Value) -> String {
    let phase = record["rotation"]["phase"].as_str().unwrap_or("?");
    let retiring = record["retire"].as_array().is_some_and(|r| !r.is_empty());
    if phase == "idle" && retiring {
        "retiring".into()
    } else {
        phase.into()
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls until `check` holds; fails the test if `process` exits or
/// `timeout` passes (with its log).
pub async fn wait_for(
    process: &mut RekeydProcess,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(&RekeydProcess) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check(process) {
        process.keep_waiting(what, deadline).await;
    }
}

/// The text after the first `offset` bytes of a log (a process's log only
/// grows).
pub fn since(log: &str, offset: usize) -> &str {
    log.get(offset..).unwrap_or("")
}

/// `delete_after` of a promoted journal.
pub fn delete_after(record: &Value) -> SystemTime {
    let text = record["rotation"]["delete_after"]
        .as_str()
        .unwrap_or_else(|| panic!("not promoted: {record}"));
    humantime::parse_rfc3339(text).unwrap()
}
