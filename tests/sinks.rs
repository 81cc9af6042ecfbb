//! Token files under trouble: a write that fails is retried with backoff
//! until it lands, without waiting for the next token; a file holding an
//! old, expired or no token shows in status, `/readyz/{name}` and the
//! metrics; a failed write never leaves a partial file or a temp file; and
//! `owner` and `group` are set on every write, with a clear error when
//! rekeyd lacks the right. An in-process daemon (tests/support/daemon.rs)
//! against the simulated provider, except where another user is needed.
//!
//! The fault is one that needs neither root nor a special file system: a
//! non-empty directory where the token file belongs, which the final
//! rename cannot replace (after the content was written to a temp file,
//! so the temp file's removal is checked too). tests/disk_faults.rs fills a
//! real disk.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/tools.rs"]
mod tools;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::{EVENT_TIMEOUT, TestDaemon, wait_token, write_secret};
use rekeyd::credential::{CredentialHandle, SinkFreshness, SinkReport, SinkState};
use rekeyd::sim::{SimOptions, SimProvider};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::time::Instant;

const CLIENT: &str = "client-maps";

/// A sim with our client, and a config for credential "maps" with an API
/// on TCP port 0 and `sinks` (`[[credentials.sinks]]` blocks).
async fn setup(lifetime: Duration) -> (SimProvider, tempfile::TempDir) {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: lifetime,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, "cust");
    let (_, secret) = sim.add_secret(CLIENT, "bootstrap");
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "maps.secret", &secret);
    (sim, dir)
}

fn config(sim: &SimProvider, listen: &str, sinks: &str) -> String {
    format!(
        r#"state_dir = "{{dir}}/state"
[api]
listen = "{listen}"
key_file = "{{dir}}/api.key"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "{CLIENT}"
initial_secret_file = "{{dir}}/maps.secret"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
{sinks}"#,
        token = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
    )
}

fn sink(path: &Path, extra: &str) -> String {
    format!(
        "[[credentials.sinks]]\npath = \"{}\"\n{extra}\n",
        path.display()
    )
}

/// Puts a non-empty directory where the token file belongs: every write
/// fails at its last step, the rename, with EISDIR.
fn block(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("{}: {e}", path.display()),
    }
    std::fs::create_dir(path).unwrap();
    std::fs::write(path.join("keep"), b"").unwrap();
}

fn unblock(path: &Path) {
    std::fs::remove_dir_all(path).unwrap();
}

/// Temp files the atomic writer left in `dir`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".tmp."))
        .collect()
}

/// Waits for a published change of the credential's token files that
/// satisfies `accept`.
async fn wait_sinks(handle: &CredentialHandle, what: &str, accept: impl Fn(&[SinkState]) -> bool) {
    tokio::time::timeout(EVENT_TIMEOUT, handle.sinks.wait_for(accept))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", handle.sink_reports()));
}

/// Polls the first file's report until `accept` holds: expiry comes with
/// time alone, without an event.
async fn wait_report(
    handle: &CredentialHandle,
    what: &str,
    accept: impl Fn(&SinkReport) -> bool,
) -> SinkReport {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let report = handle.sink_reports().remove(0);
        if accept(&report) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Api {
    client: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    fn of(d: &TestDaemon) -> Api {
        Api {
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: format!("http://{}", d.api_addr.expect("TCP API")),
            key: d.api_key(),
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .header("X-Rekeyd-Key", &self.key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn json(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.get(path).await;
        let doc = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        (status, doc)
    }

    /// The first token file's row of `/v1/status`.
    async fn sink_status(&self) -> Value {
        let (status, doc) = self.json("/v1/status").await;
        assert_eq!(status, 200, "{doc}");
        doc["credentials"][0]["sinks"][0].clone()
    }

    /// The value of the token file series `metric` for `path`.
    async fn sink_metric(&self, metric: &str, path: &Path) -> f64 {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        let series = format!(
            "rekeyd_{metric}{{credential=\"maps\",path=\"{}\"}} ",
            path.display()
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }
}

fn token_value(t: &rekeyd::token::Token) -> String {
    t.access_token.expose_secret().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_is_retried_until_it_lands_without_a_new_token() {
    // Tokens for a day: no refresh comes to the rescue.
    let (sim, dir) = setup(Duration::from_secs(86_400)).await;
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("maps.token");
    block(&path);
    let text = config(&sim, "127.0.0.1:0", &sink(&path, "format = \"raw\""));
    let d = TestDaemon::start_in(dir, &text).await;
    let handle = d.handle("maps");
    let api = Api::of(&d);
    let token = wait_token(&handle, |_| true).await;

    // Retried, not given up after one failure.
    wait_sinks(&handle, "two failed writes", |s| {
        s[0].consecutive_failures >= 2
    })
    .await;
    let row = api.sink_status().await;
    assert_eq!(row["path"], path.display().to_string(), "{row}");
    assert_eq!(row["freshness"], "missing", "{row}");
    assert!(row["consecutive_failures"].as_u64().unwrap() >= 2, "{row}");
    let error = row["last_error"].as_str().unwrap();
    assert!(error.contains("Is a directory (os error 21)"), "{row}");
    let (status, body) = api.json("/readyz/maps").await;
    assert_eq!(status, 503, "a file without a token is not ready: {body}");
    assert_eq!(body["token"], true, "{body}");
    assert_eq!(
        body["sinks"][path.display().to_string()],
        "missing",
        "{body}"
    );
    assert_eq!(api.json("/readyz").await.0, 503);
    assert_eq!(api.sink_metric("sink_token_valid", &path).await, 0.0);
    assert_eq!(api.sink_metric("sink_current", &path).await, 0.0);
    assert!(
        leftovers(out.path()).is_empty(),
        "{:?}",
        leftovers(out.path())
    );

    // The disk recovers: the same token lands, no new login needed.
    let logins = sim.stats().logins_ok;
    unblock(&path);
    wait_sinks(&handle, "the write to land", |s| s[0].token.is_some()).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), token_value(&token));
    assert_eq!(sim.stats().logins_ok, logins, "landed without a new token");
    let row = api.sink_status().await;
    assert_eq!(row["freshness"], "current", "{row}");
    assert_eq!(row["consecutive_failures"], 0, "{row}");
    assert!(row["last_error"].is_null(), "{row}");
    assert!(row["last_written_at"].is_string(), "{row}");
    let (status, body) = api.json("/readyz/maps").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["sinks"][path.display().to_string()],
        "current",
        "{body}"
    );
    assert_eq!(api.sink_metric("sink_token_valid", &path).await, 1.0);
    assert_eq!(api.sink_metric("sink_current", &path).await, 1.0);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        leftovers(out.path()).is_empty(),
        "{:?}",
        leftovers(out.path())
    );
    d.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_left_with_an_old_then_expired_token_shows_everywhere() {
    // Ten-second tokens, refreshed at 70-80%: the old one still lives for
    // two seconds or more after its successor arrives.
    let (sim, dir) = setup(Duration::from_secs(10)).await;
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("maps.token");
    let socket = dir.path().join("api.sock");
    let text = config(
        &sim,
        &format!("unix:{}", socket.display()),
        &sink(&path, "format = \"header\""),
    );
    // The CLI reads the same configuration.
    let config_path = out.path().join("rekeyd.toml");
    std::fs::write(
        &config_path,
        text.replace("{dir}", &dir.path().display().to_string()),
    )
    .unwrap();
    let d = TestDaemon::start_in(dir, &text).await;
    let handle = d.handle("maps");
    let first = wait_token(&handle, |_| true).await;
    wait_sinks(&handle, "the first write", |s| s[0].token.is_some()).await;
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("Authorization: Bearer {}\n", token_value(&first))
    );

    block(&path);
    let second = wait_token(&handle, |t| token_value(t) != token_value(&first)).await;
    let report = wait_report(&handle, "an old token", |r| r.consecutive_failures >= 1).await;
    // The file holds the first token; the engine serves the second.
    assert_eq!(report.token_expires_at, Some(first.expires_at_wall()));
    if first.is_valid(handle.clock.now()) {
        assert_eq!(report.freshness, SinkFreshness::Old, "{report:?}");
    }
    let report = wait_report(&handle, "an expired token", |r| {
        r.freshness == SinkFreshness::Expired
    })
    .await;
    assert!(
        report
            .last_error
            .as_deref()
            .unwrap()
            .contains("os error 21"),
        "{report:?}"
    );
    assert!(
        second.is_valid(handle.clock.now()),
        "the engine still serves a valid token"
    );
    assert!(!handle.ready(), "a file with an expired token is not ready");

    let out_cli = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["status", "--config"])
        .arg(&config_path)
        .env_remove("REKEYD_CONFIG")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out_cli.stdout);
    assert!(
        table.contains(&format!(
            "maps: token file {} holds an expired token",
            path.display()
        )) && table.contains("os error 21"),
        "{table}"
    );
    let out_cli = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["status", "--json", "--config"])
        .arg(&config_path)
        .env_remove("REKEYD_CONFIG")
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out_cli.stdout).unwrap();
    let row = &doc["credentials"][0];
    assert_eq!(row["ready"], false, "{doc}");
    assert_eq!(row["sinks"][0]["freshness"], "expired", "{doc}");
    let text = String::from_utf8_lossy(&out_cli.stdout);
    for token in [&first, &second] {
        assert!(!text.contains(&token_value(token)), "status shows a token");
    }

    // Freed: the file gets the token being served.
    unblock(&path);
    wait_report(&handle, "the current token", |r| {
        r.freshness == SinkFreshness::Current
    })
    .await;
    let served = handle.token.borrow().clone().unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("Authorization: Bearer {}\n", token_value(&served))
    );
    assert!(handle.ready());
    assert!(
        leftovers(out.path()).is_empty(),
        "{:?}",
        leftovers(out.path())
    );
    d.stop().await;
    sim.shutdown().await;
}

fn owner_of(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_and_group_are_set_on_every_write_before_the_file_appears() {
    // As root any ids; otherwise our own uid and one of our groups, which
    // chown(2) allows without privileges: a supplementary group where we
    // have one, as the file gets our primary group anyway.
    // SAFETY: these calls only read the process's credentials; getgroups
    // writes at most the length given into the buffer we own.
    let (uid, gid) = unsafe {
        if libc::geteuid() == 0 {
            (65_532, 65_533)
        } else {
            let primary = libc::getegid();
            let mut groups = [0 as libc::gid_t; 64];
            let n = libc::getgroups(groups.len() as i32, groups.as_mut_ptr());
            let other = groups[..n.max(0) as usize].iter().find(|g| **g != primary);
            (libc::geteuid(), other.copied().unwrap_or(primary))
        }
    };
    let (sim, dir) = setup(Duration::from_secs(2)).await;
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("maps.token");
    let text = config(
        &sim,
        "127.0.0.1:0",
        &sink(
            &path,
            &format!("owner = {uid}\ngroup = \"{gid}\"\nmode = 0o640"),
        ),
    );
    let d = TestDaemon::start_in(dir, &text).await;
    let handle = d.handle("maps");
    wait_token(&handle, |_| true).await;
    // Watch the file through several rewrites: whenever it exists, it has
    // its owner, group and mode, and a whole token.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "three tokens in the file: {seen:?}"
        );
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            assert_eq!((meta.uid(), meta.gid()), (uid, gid), "owner and group");
            assert_eq!(meta.permissions().mode() & 0o777, 0o640);
            if let Ok(content) = std::fs::read_to_string(&path) {
                assert!(sim.token_client(&content).is_some(), "a whole token");
                seen.insert(content);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(owner_of(&path), (uid, gid));
    d.stop().await;
    assert!(
        leftovers(out.path()).is_empty(),
        "{:?}",
        leftovers(out.path())
    );
    sim.shutdown().await;
}

/// The uid and gid a child runs as when it must lack the right to give
/// files away: `nobody` when we are root, else ourselves.
fn unprivileged() -> Option<(u32, u32)> {
    // SAFETY: reads the process's credentials.
    (unsafe { libc::geteuid() } == 0).then_some((65_534, 65_534))
}

/// `rekeyd ARGS --config CONFIG` as [`unprivileged`], output captured.
fn rekeyd_unprivileged(args: &[&str], config: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"));
    cmd.args(args).arg("--config").arg(config);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("REKEYD") || name == "NOTIFY_SOCKET" {
            cmd.env_remove(name);
        }
    }
    if let Some((uid, gid)) = unprivileged() {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_to_give_the_file_away_the_error_names_the_sink_and_errno() {
    let (sim, dir) = setup(Duration::from_secs(86_400)).await;
    let d = dir.path();
    let path = d.join("tokens/maps.token");
    std::fs::create_dir(d.join("tokens")).unwrap();
    let socket = d.join("api.sock");
    // Root is the owner no unprivileged process may give a file to.
    let text = config(
        &sim,
        &format!("unix:{}", socket.display()),
        &sink(&path, "owner = \"root\"\nformat = \"raw\""),
    )
    .replace("{dir}", &d.display().to_string());
    let config_path = d.join("rekeyd.toml");
    std::fs::write(&config_path, &text).unwrap();
    if let Some((uid, gid)) = unprivileged() {
        for entry in [
            d.to_path_buf(),
            d.join("tokens"),
            d.join("maps.secret"),
            config_path.clone(),
        ] {
            std::os::unix::fs::chown(&entry, Some(uid), Some(gid)).unwrap();
        }
    }

    // `rekeyd check` says so before anything runs.
    let out = match rekeyd_unprivileged(&["check"], &config_path).output() {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tools::skip(&format!(
                "uid 65534 cannot run {} ({e}): the build is in a directory only root may enter",
                env!("CARGO_BIN_EXE_rekeyd")
            ));
            return;
        }
        other => other.unwrap(),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: config key `credentials[0].sinks[0].owner`")
            && stderr.contains("CAP_CHOWN")
            && stderr.contains(&path.display().to_string()),
        "{stderr}"
    );

    // The daemon runs, logs why each write fails, and keeps retrying.
    let log = d.join("daemon.log");
    let mut child = rekeyd_unprivileged(&["run"], &config_path)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder()
        .unix_socket(socket.clone())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let body: Value = loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "rekeyd exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        if let Ok(r) = client.get("http://localhost/readyz/maps").send().await {
            let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            if body["token"] == true {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no token: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(
        body["sinks"][path.display().to_string()],
        "missing",
        "{body}"
    );
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let logged = loop {
        let logged = std::fs::read_to_string(&log).unwrap();
        if logged.contains("cannot write token file") {
            break logged;
        }
        assert!(Instant::now() < deadline, "{logged}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let line = logged
        .lines()
        .find(|l| l.contains("cannot write token file"))
        .unwrap();
    assert!(
        line.contains("maps")
            && line.contains(&path.display().to_string())
            && line.contains("cannot set owner 0")
            && line.contains("Operation not permitted (os error 1)"),
        "{line}"
    );
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(child.wait().unwrap().success());
    assert!(!path.exists(), "no file with the wrong owner");
    assert!(leftovers(&d.join("tokens")).is_empty());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_file_a_killed_process_left_is_removed_at_start() {
    let (sim, dir) = setup(Duration::from_secs(86_400)).await;
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("maps.token");
    // What `kill -9` between a temp file's create and its rename leaves: a
    // pid no process has (above the kernel's pid_max).
    let dead = out
        .path()
        .join(".maps.token.tmp.2147483646.00000000000000aa");
    std::fs::write(&dead, b"half of an old token").unwrap();
    let text = config(&sim, "127.0.0.1:0", &sink(&path, "format = \"raw\""));
    let d = TestDaemon::start_in(dir, &text).await;
    let handle = d.handle("maps");
    wait_sinks(&handle, "the token file", |s| s[0].token.is_some()).await;
    assert!(path.exists());
    assert!(
        leftovers(out.path()).is_empty(),
        "{:?}",
        leftovers(out.path())
    );
    d.stop().await;
}
