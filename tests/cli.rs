//! The `rekeyd` binary as operators use it: `check` (also `--json`), `run`
//! (with signals), `token`, `status`, `demo`, `man`, `completions`,
//! `--help` and `--version`, and `NO_COLOR`. The simulated provider runs in
//! the test process; the daemon is a real child process whose API listens
//! on a unix socket in the test's temporary directory (no fixed ports).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use clap::CommandFactory;
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::Instant;

#[path = "support/tools.rs"]
mod tools;

const BIN: &str = env!("CARGO_BIN_EXE_rekeyd");

/// Upper bound for anything that should take seconds; a clear failure
/// rather than a hung test when it does not happen.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM/SIGINT. Shutdown waits
/// at most 5s for its tasks; the rest is slack for a loaded machine.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

const EXIT_UNAVAILABLE: i32 = 69;
const EXIT_CONFIG: i32 = 78;

/// `rekeyd ARGS`, isolated from the caller's REKEYD_* environment and
/// killed if the test drops it (a failing test leaves no daemon behind).
fn rekeyd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(BIN);
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("REKEYD") {
            command.env_remove(name);
        }
    }
    command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a short-lived `rekeyd` command to completion.
async fn run_cli<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_with_timeout(rekeyd(args), TIMEOUT).await
}

async fn run_with_timeout(mut command: Command, timeout: Duration) -> Output {
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    Output {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A sim with one MapsIndoors client, a config file pointing at it, and the
/// paths the daemon will use.
struct Setup {
    sim: SimProvider,
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    secret: String,
}

impl Setup {
    async fn new() -> Setup {
        let sim = SimProvider::start(SimOptions::default()).await.unwrap();
        sim.add_client("cli-maps", "cust");
        let (_, secret) = sim.add_secret("cli-maps", "bootstrap");
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("maps.secret");
        rekeyd::fsutil::write_atomic(&secret_file, secret.as_bytes(), 0o600).unwrap();
        let socket = dir.path().join("api.sock");
        let config = dir.path().join("rekeyd.toml");
        let text = format!(
            r#"state_dir = "{dir}/state"

[api]
listen = "unix:{socket}"
key_file = "{dir}/api.key"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "cli-maps"
initial_secret_file = "{secret_file}"
[credentials.endpoints]
token_url = "{token_url}"
secrets_url = "{secrets_url}"
"#,
            dir = dir.path().display(),
            socket = socket.display(),
            secret_file = secret_file.display(),
            token_url = sim.mapsindoors_token_url(),
            secrets_url = sim.mapsindoors_secrets_url(),
        );
        std::fs::write(&config, text).unwrap();
        Setup {
            sim,
            dir,
            config,
            socket,
            secret,
        }
    }

    fn config_arg(&self) -> String {
        self.config.display().to_string()
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// A `rekeyd run` child process; its output goes to files so a chatty log
/// can never fill a pipe and block it.
struct Daemon {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    fn spawn(setup: &Setup) -> Daemon {
        let stdout = setup.dir.path().join("daemon.stdout");
        let stderr = setup.dir.path().join("daemon.stderr");
        let child = rekeyd(["run", "--config", &setup.config_arg()])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("rekeyd run starts");
        Daemon {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "--- daemon stdout ---\n{}\n--- daemon stderr ---\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Polls `/readyz` on the socket until every credential has a token.
    /// The daemon is another process: there is no in-process signal.
    async fn wait_ready(&mut self, socket: &Path) {
        self.wait_for(socket, "/readyz").await
    }

    /// Polls `path` on the socket until it answers 200.
    async fn wait_for(&mut self, socket: &Path, path: &str) {
        let client = reqwest::Client::builder()
            .unix_socket(socket.to_path_buf())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(response) = client.get(format!("http://localhost{path}")).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "rekeyd run exited ({status}) before it was ready\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not answer 200 within {TIMEOUT:?}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` (libc::SIGTERM, SIGINT) to this child only.
    async fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("daemon still running") as i32;
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "signal {signal} to {pid}"
        );
    }

    /// Waits for the child to exit; returns its status and how long it took.
    async fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => (status.unwrap(), started.elapsed()),
            Err(_) => panic!(
                "rekeyd run did not exit within {timeout:?}\n{}",
                self.output()
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// rekeyd check
// ---------------------------------------------------------------------------

#[tokio::test]
async fn check_prints_the_effective_config_without_secrets() {
    let setup = Setup::new().await;
    let out = run_cli(["check", "--config", &setup.config_arg()]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON config: {e}\n{out}"));
    assert_eq!(doc["credentials"][0]["name"], "maps", "{out}");
    assert_eq!(doc["credentials"][0]["provider"], "mapsindoors", "{out}");
    assert_eq!(doc["credentials"][0]["client_id"], "cli-maps", "{out}");
    assert_eq!(
        doc["api"]["listen"],
        format!("unix:{}", setup.socket.display()),
        "{out}"
    );
    assert!(
        !out.stdout.contains(&setup.secret) && !out.stderr.contains(&setup.secret),
        "check printed the secret"
    );
    assert!(out.stderr.contains("is valid"), "{out}");
    // check touches nothing.
    assert!(!setup.state_dir().exists(), "check created the state dir");
}

#[tokio::test]
async fn check_rejects_an_invalid_config_with_exit_78_naming_the_key() {
    let setup = Setup::new().await;
    let valid = std::fs::read_to_string(&setup.config).unwrap();
    let cases: [(&str, String, &str); 5] = [
        (
            "world-readable sink",
            format!("{valid}[[credentials.sinks]]\npath = \"/tmp/t\"\nmode = \"0644\"\n"),
            "credentials[0].sinks[0].mode",
        ),
        (
            "unknown provider",
            valid.replace("provider = \"mapsindoors\"", "provider = \"acme\""),
            "credentials[0].provider",
        ),
        (
            "missing client_id",
            valid.replace("client_id = \"cli-maps\"\n", ""),
            "credentials[0].client_id",
        ),
        (
            "non-loopback API",
            valid.replace(
                &format!("listen = \"unix:{}\"", setup.socket.display()),
                "listen = \"0.0.0.0:9860\"",
            ),
            "api.listen",
        ),
        (
            "unknown key",
            valid.replace("[api]\n", "[api]\nlisten_address = \"x\"\n"),
            "listen_address",
        ),
    ];
    for (what, text, key) in cases {
        assert_ne!(text, valid, "{what}: the case did not change the file");
        let path = setup.dir.path().join("invalid.toml");
        std::fs::write(&path, &text).unwrap();
        let out = run_cli(["check", "--config", &path.display().to_string()]).await;
        assert_eq!(out.code(), Some(EXIT_CONFIG), "{what}: {out}");
        assert!(
            out.stderr.contains(key),
            "{what}: stderr does not name {key}\n{out}"
        );
        assert!(out.stdout.is_empty(), "{what}: {out}");
    }

    let missing = setup.dir.path().join("missing.toml");
    let out = run_cli(["check", "--config", &missing.display().to_string()]).await;
    assert_eq!(out.code(), Some(EXIT_CONFIG), "missing file: {out}");
    assert!(out.stderr.contains("missing.toml"), "{out}");
}

#[tokio::test]
async fn check_json_prints_one_object_with_secret_values_redacted() {
    let setup = Setup::new().await;
    let valid = std::fs::read_to_string(&setup.config).unwrap();
    // extra_params values may be secrets (an API key a provider wants in
    // the form): shown by key only.
    let planted = "xp-planted-4f1c9e";
    let text = valid.replace(
        "[credentials.endpoints]\n",
        &format!("extra_params = {{ vendor_key = \"{planted}\" }}\n[credentials.endpoints]\n"),
    );
    assert_ne!(text, valid);
    std::fs::write(&setup.config, &text).unwrap();

    let out = run_cli(["check", "--json", "--config", &setup.config_arg()]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stderr.is_empty(), "--json keeps stderr empty: {out}");
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document: {e}\n{out}"));
    assert_eq!(doc["valid"], true, "{out}");
    assert_eq!(doc["file"], setup.config_arg(), "{out}");
    assert!(doc["warnings"].is_array(), "{out}");
    let cred = &doc["config"]["credentials"][0];
    assert_eq!(cred["name"], "maps", "{out}");
    assert_eq!(cred["client_id"], "cli-maps", "{out}");
    assert_eq!(cred["extra_params"]["vendor_key"], "[redacted]", "{out}");
    // Secret files by their path, never their content.
    assert_eq!(
        cred["initial_secret_file"],
        setup.dir.path().join("maps.secret").display().to_string(),
        "{out}"
    );
    assert_eq!(
        doc["config"]["api"]["key_file"],
        setup.dir.path().join("api.key").display().to_string(),
        "{out}"
    );
    for secret in [planted, setup.secret.as_str()] {
        assert!(
            !out.stdout.contains(secret),
            "check --json printed a secret\n{out}"
        );
    }
    assert!(!setup.state_dir().exists(), "check created the state dir");

    // The same effective configuration as `rekeyd check` prints.
    let plain = run_cli(["check", "--config", &setup.config_arg()]).await;
    let plain: Value = serde_json::from_str(&plain.stdout).unwrap();
    assert_eq!(doc["config"], plain, "{out}");

    // An error is a JSON object too, still exit 78, naming the key.
    let bad = text.replace(
        &format!("listen = \"unix:{}\"", setup.socket.display()),
        "listen = \"0.0.0.0:9860\"",
    );
    assert_ne!(bad, text);
    std::fs::write(&setup.config, &bad).unwrap();
    let out = run_cli(["check", "--json", "--config", &setup.config_arg()]).await;
    assert_eq!(out.code(), Some(EXIT_CONFIG), "{out}");
    assert!(out.stderr.is_empty(), "{out}");
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("the error is not JSON: {e}\n{out}"));
    assert_eq!(doc["valid"], false, "{out}");
    assert!(
        doc["error"].as_str().unwrap().contains("api.listen"),
        "{out}"
    );
    assert!(doc.get("config").is_none(), "{out}");
    assert!(!out.stdout.contains(planted), "{out}");
}

#[tokio::test]
async fn check_quiet_is_silent_for_a_valid_config_and_not_for_an_error() {
    let setup = Setup::new().await;
    let out = run_cli(["check", "--quiet", "--config", &setup.config_arg()]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out}");
    let missing = setup.dir.path().join("missing.toml");
    let out = run_cli(["check", "-q", "--config", &missing.display().to_string()]).await;
    assert_eq!(out.code(), Some(EXIT_CONFIG), "{out}");
    assert!(out.stderr.contains("missing.toml"), "{out}");
}

// ---------------------------------------------------------------------------
// rekeyd run / token / status, and signals
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_token_and_status_and_stops_on_sigterm() {
    let setup = Setup::new().await;
    let config = setup.config_arg();
    let mut daemon = Daemon::spawn(&setup);
    daemon.wait_ready(&setup.socket).await;

    // rekeyd token NAME: the bare token on stdout, one the provider issued.
    let out = run_cli(["token", "maps", "--config", &config]).await;
    assert_eq!(out.code(), Some(0), "{out}\n{}", daemon.output());
    let token = out.stdout.trim().to_string();
    assert!(!token.is_empty(), "{out}");
    assert_eq!(out.stdout, format!("{token}\n"), "only the token on stdout");
    assert_eq!(
        setup.sim.token_client(&token).as_deref(),
        Some("cli-maps"),
        "the printed token is valid at the provider"
    );

    // rekeyd status --json
    let out = run_cli(["status", "--json", "--config", &config]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{out}"));
    assert_eq!(doc["daemon_reachable"], true, "{out}");
    let rows = doc["credentials"].as_array().expect("credentials array");
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["name"], "maps", "{out}");
    assert_eq!(rows[0]["provider"], "mapsindoors", "{out}");
    assert_eq!(rows[0]["ready"], true, "{out}");
    assert!(rows[0]["token_expires_at"].is_string(), "{out}");
    for (what, value) in [("token", &token), ("secret", &setup.secret)] {
        assert!(
            !out.stdout.contains(value.as_str()),
            "status prints the {what}"
        );
    }

    // rekeyd status (table)
    let out = run_cli(["status", "--config", &config]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("maps "))
        .unwrap_or_else(|| panic!("no row for maps\n{out}"));
    assert!(
        row.contains("mapsindoors") && row.contains(" yes "),
        "{out}"
    );
    assert!(!out.stdout.contains(&token), "status prints the token");

    // rekeyd token for a name the config does not have.
    let out = run_cli(["token", "unknown", "--config", &config]).await;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(
        out.stderr.contains("no credential named \"unknown\""),
        "unclear message\n{out}"
    );

    // SIGTERM: a clean exit, quickly.
    daemon.signal(libc::SIGTERM).await;
    let (status, took) = daemon.wait_exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.output());
    assert!(took < EXIT_TIMEOUT, "took {took:?}");
    let log = daemon.output();
    assert!(log.contains("SIGTERM"), "shutdown is logged\n{log}");
    assert!(!log.contains(&token), "the log holds the token");
    assert!(!log.contains(&setup.secret), "the log holds the secret");

    // The daemon is gone (its socket file may remain): status says so.
    let out = run_cli(["status", "--config", &config]).await;
    assert_eq!(out.code(), Some(EXIT_UNAVAILABLE), "{out}");
    assert!(out.stdout.contains("not reachable"), "{out}");
    let out = run_cli(["token", "maps", "--config", &config]).await;
    assert_eq!(out.code(), Some(EXIT_UNAVAILABLE), "{out}");
    assert!(out.stderr.contains("not reachable"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_status_while_the_provider_is_down() {
    let setup = Setup::new().await;
    setup.sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::MapsIndoorsToken),
        fail_next: 1000,
        ..Faults::default()
    });
    let config = setup.config_arg();
    let mut daemon = Daemon::spawn(&setup);
    daemon.wait_for(&setup.socket, "/livez").await;

    // No valid token: `rekeyd token` prints nothing and exits 69.
    let out = run_cli(["token", "maps", "--config", &config]).await;
    assert_eq!(out.code(), Some(EXIT_UNAVAILABLE), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(out.stderr.contains("no_valid_token"), "{out}");

    // The daemon is up, so status succeeds and shows the credential not ready.
    let out = run_cli(["status", "--json", "--config", &config]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{out}"));
    assert_eq!(doc["daemon_reachable"], true, "{out}");
    assert_eq!(doc["credentials"][0]["name"], "maps", "{out}");
    assert_eq!(doc["credentials"][0]["ready"], false, "{out}");

    daemon.signal(libc::SIGTERM).await;
    let (status, _) = daemon.wait_exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hung_login_still_exits_promptly() {
    let setup = Setup::new().await;
    // The provider never answers the first login (request timeout: 30s).
    setup.sim.set_faults(Faults {
        scope: FaultScope::Only(Endpoint::MapsIndoorsToken),
        hang_next: 1,
        ..Faults::default()
    });
    let mut daemon = Daemon::spawn(&setup);
    daemon.wait_for(&setup.socket, "/livez").await;
    // The sim is in this process but has no event for "request received".
    let deadline = Instant::now() + TIMEOUT;
    while setup.sim.stats().requests_to(Endpoint::MapsIndoorsToken) == 0 {
        assert!(
            Instant::now() < deadline,
            "the daemon never tried to log in\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.signal(libc::SIGTERM).await;
    let (status, took) = daemon.wait_exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.output());
    assert!(took < EXIT_TIMEOUT, "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_on_sigint() {
    let setup = Setup::new().await;
    let mut daemon = Daemon::spawn(&setup);
    daemon.wait_ready(&setup.socket).await;
    daemon.signal(libc::SIGINT).await;
    let (status, took) = daemon.wait_exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.output());
    assert!(took < EXIT_TIMEOUT, "took {took:?}");
    assert!(daemon.output().contains("SIGINT"), "{}", daemon.output());
}

#[tokio::test]
async fn status_without_a_running_daemon_exits_69() {
    let setup = Setup::new().await;
    let config = setup.config_arg();

    let out = run_cli(["status", "--config", &config]).await;
    assert_eq!(out.code(), Some(EXIT_UNAVAILABLE), "{out}");
    assert!(out.stdout.contains("not reachable"), "{out}");

    let out = run_cli(["status", "--json", "--config", &config]).await;
    assert_eq!(out.code(), Some(EXIT_UNAVAILABLE), "{out}");
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{out}"));
    assert_eq!(doc["daemon_reachable"], false, "{out}");
    assert!(doc["daemon_error"].is_string(), "{out}");
    assert_eq!(doc["credentials"][0]["name"], "maps", "{out}");

    // Even with the key file in place (a daemon ran once), nobody listens.
    std::fs::write(setup.dir.path().join("api.key"), "some-key\n").unwrap();
    let out = run_cli(["status", "--config", &config]).await;
    assert_eq!(out.code(), Some(EXIT_UNAVAILABLE), "{out}");
    assert!(out.stdout.contains("not reachable"), "{out}");

    assert!(!setup.state_dir().exists(), "status created the state dir");
}

#[tokio::test]
async fn run_with_a_missing_initial_secret_exits_78_and_creates_nothing() {
    let setup = Setup::new().await;
    std::fs::remove_file(setup.dir.path().join("maps.secret")).unwrap();
    let out = run_cli(["run", "--config", &setup.config_arg()]).await;
    assert_eq!(out.code(), Some(EXIT_CONFIG), "{out}");
    assert!(
        out.stderr.contains("credentials[0].initial_secret_file"),
        "stderr does not name the key\n{out}"
    );
    assert!(
        !setup.state_dir().exists(),
        "the state dir was created by a run that could not start"
    );
    assert!(
        !setup.dir.path().join("api.key").exists(),
        "API key created"
    );
    assert!(!setup.socket.exists(), "API socket created");
}

// ---------------------------------------------------------------------------
// --help and demo
// ---------------------------------------------------------------------------

#[tokio::test]
async fn help_lists_every_subcommand() {
    let out = run_cli(["--help"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    // The ones operators are told about, and whatever else the parser has.
    let mut commands: Vec<String> = ["run", "check", "token", "status", "demo"]
        .map(String::from)
        .to_vec();
    commands.extend(
        rekeyd::cli::Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .filter(|name| name != "help"),
    );
    for command in &commands {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "--help does not list `{command}`\n{out}"
        );
    }
}

/// The features this test binary, and so the rekeyd binary of the same
/// build, was compiled with: asked of cfg! here, not of rekeyd::build.
fn compiled_features() -> Vec<&'static str> {
    let mut features = Vec::new();
    if cfg!(feature = "etcd") {
        features.push("etcd");
    }
    if cfg!(feature = "failpoints") {
        features.push("failpoints");
    }
    features
}

#[tokio::test]
async fn version_names_the_compiled_features() {
    let out = run_cli(["--version"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    let features = compiled_features();
    let features = if features.is_empty() {
        "none".to_string()
    } else {
        features.join(",")
    };
    assert_eq!(
        out.stdout.trim_end(),
        format!(
            "rekeyd {} (features: {features})",
            env!("CARGO_PKG_VERSION")
        ),
        "{out}"
    );
}

#[tokio::test]
async fn a_failpoints_build_warns_at_every_daemon_start_and_only_then() {
    let setup = Setup::new().await;
    let test_build = compiled_features().contains(&"failpoints");
    let out = run_cli(["run", "--once", "--config", &setup.config_arg()]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("TEST BUILD"))
        .collect();
    if test_build {
        assert_eq!(warnings.len(), 1, "{out}");
        assert!(warnings[0].contains("WARN"), "{out}");
        assert!(warnings[0].contains("failpoints"), "{out}");
    } else {
        assert!(warnings.is_empty(), "{out}");
    }
    // Not a daemon start: no warning.
    let out = run_cli(["check", "--config", &setup.config_arg()]).await;
    assert!(!out.stderr.contains("TEST BUILD"), "{out}");
}

#[tokio::test]
async fn man_prints_the_pages_of_the_command_and_its_subcommands() {
    let subcommands: Vec<String> = rekeyd::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|name| name != "help")
        .collect();
    let out = run_cli(["man"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains(".TH rekeyd 1"), "{out}");
    assert!(out.stdout.contains(".SH SUBCOMMANDS"), "{out}");
    for name in &subcommands {
        // Roff escapes the hyphen: rekeyd\-run(1).
        let reference = format!("rekeyd\\-{}(1)", name.replace('-', "\\-"));
        assert!(out.stdout.contains(&reference), "no {reference}\n{out}");
    }
    let out = run_cli(["man", "run"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains(".TH rekeyd-run 1"), "{out}");
    assert!(out.stdout.contains("\\-\\-once"), "{out}");
    let out = run_cli(["man", "no-such-command"]).await;
    assert_eq!(out.code(), Some(2), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(["man", "--dir", &dir.path().display().to_string()]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    let mut want: Vec<String> = subcommands
        .iter()
        .map(|n| format!("rekeyd-{n}.1"))
        .collect();
    want.push("rekeyd.1".into());
    want.sort();
    assert_eq!(pages, want);
    // man(1) renders it (when installed): the page is valid roff.
    if let Some(man) = tools::find("man", "apt-get install man-db") {
        let out = std::process::Command::new(man)
            .args(["-l", "-P", "cat"])
            .arg(dir.path().join("rekeyd.1"))
            .env("MANWIDTH", "100")
            // cargo's (the build's libraries) confuses groff's.
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Words as justified text spaces them.
        let text = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(text.contains("rekeyd-run(1)"), "{text}");
        assert!(text.contains("Exit status: 0 success"), "{text}");
    }
}

#[tokio::test]
async fn completions_complete_the_subcommands_in_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _rekeyd"),
        ("zsh", "#compdef rekeyd"),
        ("fish", "complete -c rekeyd"),
        ("elvish", "edit:completion:arg-completer[rekeyd]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = run_cli(["completions", shell]).await;
        assert_eq!(out.code(), Some(0), "{shell}: {out}");
        assert!(out.stdout.contains(marker), "{shell}: no {marker:?}\n{out}");
        assert!(out.stdout.contains("set-secret"), "{shell}: {out}");
    }
    let out = run_cli(["completions", "tcsh"]).await;
    assert_eq!(out.code(), Some(2), "{out}");

    // bash runs it: "rekeyd ch<TAB>" offers check, "rekeyd token --format <TAB>"
    // the formats.
    let Some(bash) = tools::find("bash", "apt-get install bash") else {
        return;
    };
    let script = run_cli(["completions", "bash"]).await.stdout;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rekeyd.bash");
    std::fs::write(&file, script).unwrap();
    let complete = |words: &str| {
        let out = std::process::Command::new(&bash)
            .arg("-c")
            .arg(format!(
                "source {file}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
                 [ \"${{COMP_WORDS[-1]}}\" = EMPTY ] && COMP_WORDS[-1]=''; \
                 _rekeyd rekeyd \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                file = file.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let offered = complete("rekeyd ch");
    assert!(offered.contains(&"check".to_string()), "{offered:?}");
    assert!(!offered.contains(&"run".to_string()), "{offered:?}");
    let offered = complete("rekeyd token --format EMPTY");
    assert!(
        offered.contains(&"exec-credential".to_string()),
        "{offered:?}"
    );
}

/// Runs `rekeyd ARGS` with stderr on a pseudo-terminal (where the text log
/// is coloured) and returns what it wrote there.
async fn stderr_on_a_terminal(args: &[&str], no_color: Option<&str>) -> String {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; no name,
    // termios or window size is passed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here only.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut command = rekeyd(args);
    command.stdout(Stdio::null()).stderr(Stdio::from(slave));
    match no_color {
        Some(value) => command.env("NO_COLOR", value),
        None => command.env_remove("NO_COLOR"),
    };
    let mut child = command.spawn().unwrap();
    // The child has the terminal; the copy in `command` closes with it, so
    // the master reads EOF (EIO) once the child exits.
    drop(command);
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .expect("rekeyd did not exit")
        .unwrap();
    let text = tokio::time::timeout(TIMEOUT, reader)
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}\n{text}");
    text
}

#[tokio::test]
async fn no_color_turns_off_the_coloured_log_on_a_terminal() {
    // The demo logs INFO lines (tokens refreshed) in any build.
    let args = ["demo", "--duration", "2s"];
    let coloured = stderr_on_a_terminal(&args, None).await;
    assert!(coloured.contains("INFO"), "{coloured}");
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal:\n{coloured}"
    );
    // https://no-color.org: present and non-empty.
    let plain = stderr_on_a_terminal(&args, Some("1")).await;
    assert!(plain.contains("INFO"), "{plain}");
    assert!(
        !plain.contains('\x1b'),
        "NO_COLOR=1 still coloured:\n{plain}"
    );
    let empty = stderr_on_a_terminal(&args, Some("")).await;
    assert!(
        empty.contains("\x1b["),
        "an empty NO_COLOR is unset:\n{empty}"
    );
}

#[tokio::test]
async fn demo_shows_both_credentials_and_exits_0() {
    let started = Instant::now();
    let out = run_with_timeout(rekeyd(["demo", "--duration", "12s"]), TIMEOUT + TIMEOUT).await;
    let took = started.elapsed();
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(took < TIMEOUT, "the 12s demo took {took:?}\n{out}");
    for name in ["maps", "places"] {
        let line = out
            .stdout
            .lines()
            .find(|l| {
                l.strip_prefix(">>> demo:")
                    .is_some_and(|rest| rest.trim_start().starts_with(&format!("{name} ")))
            })
            .unwrap_or_else(|| panic!("no \">>> demo:\" line for {name}\n{out}"));
        assert!(line.contains("token #"), "{line}");
        assert!(
            line.contains(&format!("GET /v1/token/{name} -> 200")),
            "the demo's API did not serve {name}: {line}"
        );
    }
    assert!(out.stdout.contains("demo finished"), "{out}");
}

#[tokio::test]
async fn demo_rotates_through_each_provider() {
    // The demo rotates every 25s: by 40s each provider made a new secret
    // (rekeyd's own value, or for Entra the provider's, tagged). The 15s
    // beyond the rotation are for a loaded machine, not a target.
    let run = |provider: &'static str| {
        run_with_timeout(
            rekeyd(["demo", "--duration", "40s", "--provider", provider]),
            TIMEOUT + TIMEOUT,
        )
    };
    let (okta, auth0, keycloak, entra) =
        tokio::join!(run("okta"), run("auth0"), run("keycloak"), run("entra"));
    for (provider, out) in [
        ("Okta", okta),
        ("Auth0", auth0),
        ("Keycloak", keycloak),
        ("Entra", entra),
    ] {
        assert_eq!(out.code(), Some(0), "{provider}: {out}");
        assert!(
            out.stdout.contains(&format!("simulated {provider}")),
            "{out}"
        );
        let finished = out
            .stdout
            .lines()
            .find(|l| l.starts_with("demo finished"))
            .unwrap_or_else(|| panic!("{provider}: no summary\n{out}"));
        // "... N logins, M secrets created and K deleted at the ..."
        let created: u64 = finished
            .split(", ")
            .find_map(|part| part.split_once(" secrets created"))
            .and_then(|(n, _)| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{provider}: {finished}"));
        assert!(
            created >= 1,
            "{provider}: no rotation in the demo: {finished}"
        );
    }
}
