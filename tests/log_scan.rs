//! I7: no secret, token or API key in any log line. The daemon binary runs
//! through a full cycle (bootstrap, logins, refreshes, secret rotations,
//! rejected secret, 5xx, garbage and dropped replies, API and file serving,
//! shutdown) with `RUST_LOG=trace`, in text and JSON format, and every byte
//! it wrote is scanned for the values.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rekeyd::sim::{FaultScope, Faults, SimOptions, SimProvider};

/// Polling is the only way to observe another process; bounded.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A failed assertion must not leave the daemon running.
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn config(dir: &Path, sim: &SimProvider, log_format: &str) -> String {
    let d = dir.display();
    format!(
        r#"state_dir = "{d}/state"
[api]
listen = "unix:{d}/api.sock"
key_file = "{d}/api.key"
[log]
format = "{log_format}"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "maps-client"
customer_id = "cust"
initial_secret_file = "{d}/maps.secret"
[credentials.endpoints]
token_url = "{maps}"
secrets_url = "{secrets}"
[credentials.rotation]
every = "1s"
grace = "0s"
[[credentials.sinks]]
path = "{d}/maps.token"
format = "header"

[[credentials]]
name = "places"
provider = "mappls"
client_id = "places-client"
initial_secret_file = "{d}/places.secret"
[credentials.endpoints]
token_url = "{mappls}"
[[credentials.sinks]]
path = "{d}/places.json"
format = "json"

[[credentials]]
name = "idp"
provider = "oauth2"
client_id = "idp-client"
initial_secret_file = "{d}/idp.secret"
[credentials.endpoints]
token_url = "{oauth2}"
"#,
        maps = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
        mappls = sim.mappls_token_url(),
        oauth2 = sim.oauth2_token_url(),
    )
}

fn rekeyd(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rekeyd"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "trace");
    cmd
}

async fn full_cycle_leaks_nothing(log_format: &str) {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(3),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut secrets = Vec::new();
    for (client, file) in [
        ("maps-client", "maps"),
        ("places-client", "places"),
        ("idp-client", "idp"),
    ] {
        sim.add_client(client, "cust");
        let (_, value) = sim.add_secret(client, "bootstrap");
        secrets.push(value.clone());
        // places starts with a wrong secret: the rejection path logs too.
        let value = if file == "places" {
            format!("wrong-{value}")
        } else {
            value
        };
        std::fs::write(dir.path().join(format!("{file}.secret")), &value).unwrap();
        secrets.push(value);
    }
    let config_path = dir.path().join("rekeyd.toml");
    std::fs::write(&config_path, config(dir.path(), &sim, log_format)).unwrap();

    let mut child = KillOnDrop(
        rekeyd(&["run"], &config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).unwrap();
        buf
    });

    wait_until("first logins", || sim.stats().logins_ok >= 2).await;
    // Rotated secrets of "maps" are collected while they live.
    let mut seen_secrets = std::collections::HashSet::new();
    let mut remember = |sim: &SimProvider| {
        for s in sim.secrets("maps-client") {
            seen_secrets.insert(s.value);
        }
    };
    wait_until("two completed rotations", || {
        remember(&sim);
        sim.stats().secrets_deleted >= 2
    })
    .await;
    // "places" holds a wrong secret, so once rejected it stays locked out
    // with the provider's rejection as its last error until the faults
    // below (which may replace that error with a 5xx). The status the CLI
    // prints then, provider text included, is scanned with the logs.
    let mut status_text = String::new();
    wait_until("the rejection of places in rekeyd status", || {
        let out = rekeyd(&["status", "--json"], &config_path)
            .output()
            .unwrap();
        status_text = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<serde_json::Value>(&status_text).is_ok_and(|doc| {
            doc["credentials"].as_array().is_some_and(|rows| {
                rows.iter().any(|row| {
                    row["name"] == "places"
                        && row["locked_out"] == true
                        && row["last_error"]
                            .as_str()
                            .is_some_and(|e| e.contains("invalid_client"))
                })
            })
        })
    })
    .await;

    // Transient trouble on every token endpoint, one kind after another.
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        fail_next: 2,
        garbage_next: 1,
        drop_next: 1,
        ..Faults::default()
    });
    wait_until("faults consumed", || {
        let f = sim.faults();
        f.fail_next + f.garbage_next + f.drop_next == 0
    })
    .await;
    let logins = sim.stats().logins_ok;
    wait_until("refreshes after the faults", || {
        sim.stats().logins_ok >= logins + 4
    })
    .await;

    // Serve tokens through the API (the CLI) and read the token files.
    let mut served = Vec::new();
    for name in ["maps", "idp"] {
        // Right after a burst of faults a credential may be between tokens
        // for a moment: ask again (bounded) rather than fail.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let out = loop {
            let out = rekeyd(&["token", name], &config_path).output().unwrap();
            if out.status.success() || tokio::time::Instant::now() > deadline {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            out.status.success(),
            "rekeyd token {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(token.starts_with("sim_"), "a sim token was served");
        served.push(token);
        // The CLI's own logs are scanned too.
        let cli_logs = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !cli_logs.contains("sim_"),
            "rekeyd token logged a token: {cli_logs}"
        );
    }
    let file = std::fs::read_to_string(dir.path().join("maps.token")).unwrap();
    assert!(file.starts_with("Authorization: Bearer sim_"));

    remember(&sim);
    secrets.extend(seen_secrets);
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let exit = child.wait().unwrap();
    assert!(exit.success(), "daemon exits 0 on SIGTERM: {exit:?}");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let logs = String::from_utf8(stderr_reader.join().unwrap()).unwrap() + &stdout + &status_text;

    assert!(
        logs.len() > 10_000,
        "trace logging was on ({} bytes)",
        logs.len()
    );
    assert!(logs.contains("token refreshed"), "the cycle was logged");
    // Every token the sim issues starts with "sim_": none may appear at all.
    if let Some(at) = logs.find("sim_") {
        panic!(
            "a token reached the logs: ...{}...",
            &logs[at.saturating_sub(200)..at + 10]
        );
    }
    let key = std::fs::read_to_string(dir.path().join("api.key")).unwrap();
    for value in secrets
        .iter()
        .chain(served.iter())
        .chain([&key.trim().to_string()])
    {
        assert!(
            !logs.contains(value.as_str()),
            "a secret value reached the logs"
        );
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_at_trace_hold_no_secret_or_token() {
    full_cycle_leaks_nothing("text").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_at_trace_hold_no_secret_or_token() {
    full_cycle_leaks_nothing("json").await;
}
