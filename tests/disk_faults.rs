//! A state directory that cannot take a write, and a store record that
//! cannot be read, stop rekeyd before the provider is touched (DESIGN.md
//! I1, I2): a secret the provider creates but we cannot record would be an
//! orphan at best, and a record we cannot read may hold the only copy of a
//! working secret, so it is never replaced.
//!
//! Read-only and full disks are real filesystems: root ignores permission
//! bits, so each run mounts a small tmpfs over the state directory inside a
//! private mount namespace (`unshare -m`, or `unshare -r -m` for a non-root
//! user where user namespaces are allowed). The mount dies with the
//! namespace; the state directory underneath is never modified. Where no
//! namespace can be made, those tests report themselves skipped
//! (tests/support/tools.rs; a failure under `REKEYD_REQUIRE_TOOLS=1`):
//! `chmod` is no substitute here, since rekeyd restores its state
//! directory's 0700 mode (which the owner may always do).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use rekeyd::sim::{Endpoint, SimOptions, SimProvider, SimSecret};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, SecretEntry, Store};
use secrecy::SecretString;
use serde_json::Value;
use tokio::process::Command;

#[path = "support/tools.rs"]
mod tools;

const NAME: &str = "maps";
const CLIENT: &str = "maps-client";
const CUSTOMER: &str = "cust";
/// A failure rather than a hang when a run does not end.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

struct Setup {
    sim: SimProvider,
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The stored (bootstrap) secret and a hand-made one.
    secrets: Vec<SimSecret>,
    stored: SimSecret,
}

fn fingerprint(secrets: &[SimSecret]) -> Vec<(String, String, String)> {
    secrets
        .iter()
        .map(|s| (s.id.clone(), s.description.clone(), s.value.clone()))
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Setup {
    /// A sim with our client, its secret stored as the current one (id
    /// known, idle journal), and a hand-made second secret.
    async fn new() -> Setup {
        let sim = SimProvider::start(SimOptions::default()).await.unwrap();
        sim.add_client(CLIENT, CUSTOMER);
        let (stored_id, _) = sim.add_secret(CLIENT, "bootstrap");
        sim.add_secret(CLIENT, "created by hand");
        let secrets = sim.secrets(CLIENT);
        let stored = secrets.iter().find(|s| s.id == stored_id).unwrap().clone();

        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("maps.secret"), &stored.value).unwrap();
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
initial_secret_id = "{id}"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
[credentials.rotation]
every = "24h"
grace = "0s"
"#,
                id = stored.id,
                token = sim.mapsindoors_token_url(),
                secrets = sim.mapsindoors_secrets_url(),
            ),
        )
        .unwrap();
        let setup = Setup {
            sim,
            dir,
            config,
            secrets,
            stored,
        };
        FileStore::new(&setup.state_dir())
            .compare_and_swap(
                NAME,
                None,
                &CredentialRecord::new(SecretEntry {
                    id: Some(setup.stored.id.clone()),
                    value: SecretString::from(setup.stored.value.clone()),
                    created_at: SystemTime::now(),
                    expires_at: None,
                }),
            )
            .await
            .unwrap();
        setup
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn record_path(&self) -> PathBuf {
        self.state_dir().join("credentials/maps.json")
    }

    fn rekeyd_args(&self, command: &str) -> Vec<String> {
        let mut args = vec![
            env!("CARGO_BIN_EXE_rekeyd").to_string(),
            command.to_string(),
        ];
        if command == "rotate" {
            args.push(NAME.to_string());
        }
        args.push("--config".to_string());
        args.push(self.config.display().to_string());
        args
    }

    /// Runs `argv`, which must end in time.
    async fn run(&self, argv: &[String]) -> Output {
        let out = tokio::time::timeout(
            RUN_TIMEOUT,
            Command::new(&argv[0])
                .args(&argv[1..])
                .env("RUST_LOG", "debug")
                .env_remove("FAILPOINTS")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the run ends in time")
        .unwrap();
        self.assert_no_secret_in(&out);
        out
    }

    /// I7, for every run: neither secret value nor a token in the output.
    fn assert_no_secret_in(&self, out: &Output) {
        let all = text(&out.stderr) + &text(&out.stdout);
        for s in self.sim.secrets(CLIENT).iter().chain(&self.secrets) {
            assert!(!all.contains(&s.value), "a secret value reached the output");
        }
        assert!(!all.contains("sim_"), "a token reached the output");
    }

    /// Nothing was created at the provider and the client's secrets are as
    /// they were.
    fn assert_provider_untouched(&self) {
        let stats = self.sim.stats();
        assert_eq!(stats.secrets_created, 0);
        assert_eq!(stats.requests_to(Endpoint::SecretsCreate), 0);
        assert_eq!(stats.secrets_deleted, 0);
        assert_eq!(
            fingerprint(&self.sim.secrets(CLIENT)),
            fingerprint(&self.secrets)
        );
    }
}

/// Logs in at the sim's MapsIndoors token endpoint; `true` on a token.
async fn logs_in(sim: &SimProvider, secret: &str) -> bool {
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
    response.status() == reqwest::StatusCode::OK
}

fn current_value(record: &[u8]) -> String {
    let doc: Value = serde_json::from_slice(record).expect("record is JSON");
    doc["current"]["value"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// Read-only and full state directories
// ---------------------------------------------------------------------------

/// Inside the namespace: stage the state directory, mount a 1 MiB tmpfs over
/// it, copy the state back in, apply the fault, run the command, save the
/// record and the directory listing as the command left them, unmount.
const FAULT_SCRIPT: &str = r#"
set -eu
state=$1 work=$2 fault=$3
shift 3
mkdir "$work/stage"
cp -a "$state/." "$work/stage/"
mount -t tmpfs -o size=1m,mode=0700 rekeyd-test "$state"
cp -a "$work/stage/." "$state/"
case $fault in
    read-only) mount -o remount,ro "$state" ;;
    full) dd if=/dev/zero of="$state/filler" bs=4096 2>/dev/null || true ;;
    nearly-full)
        dd if=/dev/zero of="$state/filler" bs=4096 2>/dev/null || true
        truncate -s -16K "$state/filler" ;;
    *) echo "unknown fault $fault" >&2; exit 100 ;;
esac
set +e
"$@"
status=$?
cp "$state/credentials/maps.json" "$work/record-after"
ls -A "$state/credentials" > "$work/listing-after"
umount "$state"
exit $status
"#;

const NO_NAMESPACE: &str = "cannot mount a tmpfs in a private mount namespace here \
    (`unshare --mount` as root, or `unshare --map-root-user --mount` where user namespaces are allowed)";

/// How to enter a private mount namespace in which tmpfs can be mounted
/// here, if at all: as root `unshare -m`, otherwise a user namespace.
fn namespace() -> Option<&'static [&'static str]> {
    static CHOICE: OnceLock<Option<&'static [&'static str]>> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let candidates: [&'static [&'static str]; 2] = [
            &["unshare", "--mount", "--propagation", "private"],
            &[
                "unshare",
                "--map-root-user",
                "--mount",
                "--propagation",
                "private",
            ],
        ];
        let probe_dir = tempfile::tempdir().ok()?;
        candidates.into_iter().find(|argv| {
            std::process::Command::new(argv[0])
                .args(&argv[1..])
                .args(["sh", "-c", "mount -t tmpfs -o size=64k probe \"$1\"", "sh"])
                .arg(probe_dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

fn mounted(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.display().to_string();
    mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_str()))
}

/// `rekeyd rotate` on a state directory with `fault` must refuse before the
/// provider creates anything, naming the path and `reason`; the record
/// stays as it was and still logs in. Once the fault is gone, the same
/// rotation succeeds.
async fn rotation_refused_on(fault: &str, reason: &str) {
    let Some(namespace) = namespace() else {
        tools::skip(NO_NAMESPACE);
        return;
    };
    let setup = Setup::new().await;
    let state = setup.state_dir();
    let before = std::fs::read(setup.record_path()).unwrap();
    let work = setup.dir.path().join("work");
    std::fs::create_dir(&work).unwrap();

    let mut argv: Vec<String> = namespace.iter().map(|s| s.to_string()).collect();
    argv.extend(["sh", "-c", FAULT_SCRIPT, "sh"].map(String::from));
    argv.push(state.display().to_string());
    argv.push(work.display().to_string());
    argv.push(fault.to_string());
    argv.extend(setup.rekeyd_args("rotate"));
    let out = setup.run(&argv).await;
    let stderr = text(&out.stderr);

    assert!(!mounted(&state), "the tmpfs went away with the namespace");
    assert_eq!(
        out.status.code(),
        Some(1),
        "rekeyd rotate on a {fault} state directory fails: {:?}\n{stderr}",
        out.status
    );
    let credentials_dir = state.join("credentials").display().to_string();
    assert!(
        stderr.contains(&credentials_dir) && stderr.contains(reason),
        "the error names the path ({credentials_dir}) and {reason:?}:\n{stderr}"
    );
    setup.assert_provider_untouched();

    let after = std::fs::read(work.join("record-after")).unwrap();
    assert!(after == before, "the stored record is unchanged");
    assert!(logs_in(&setup.sim, &current_value(&after)).await);
    let listing = std::fs::read_to_string(work.join("listing-after")).unwrap();
    assert!(
        listing
            .lines()
            .all(|f| f == "maps.json" || f == "maps.lock" || f == "maps.rotate.lock"),
        "no temporary or probe file left behind: {listing:?}"
    );
    // The directory underneath was never written.
    assert!(std::fs::read(setup.record_path()).unwrap() == before);

    // With a healthy disk the same rotation goes through.
    let out = setup.run(&setup.rekeyd_args("rotate")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(setup.sim.stats().secrets_created, 1);
    let rotated = std::fs::read(setup.record_path()).unwrap();
    assert!(logs_in(&setup.sim, &current_value(&rotated)).await);
    setup.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_state_dir_refuses_before_creating() {
    rotation_refused_on("read-only", "Read-only file system").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_state_dir_refuses_before_creating() {
    rotation_refused_on("full", "No space left on device").await;
}

/// Room for a record or two, but not for the probe: a rotation writes the
/// journal several times and must not start on a disk about to fill up.
#[tokio::test(flavor = "multi_thread")]
async fn nearly_full_state_dir_refuses_before_creating() {
    rotation_refused_on("nearly-full", "No space left on device").await;
}

// ---------------------------------------------------------------------------
// Corrupt and truncated records
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_record_fails_loudly_and_is_kept() {
    let setup = Setup::new().await;
    let path = setup.record_path();
    let good = std::fs::read(&path).unwrap();
    let good_doc: Value = serde_json::from_slice(&good).unwrap();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut doc = good_doc.clone();
        edit(&mut doc);
        serde_json::to_vec_pretty(&doc).unwrap()
    };
    let variants: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("garbage", b"\0\0\0\x7fELF not a record\n".to_vec()),
        (
            "missing current secret",
            with(&|d| {
                d["current"].as_object_mut().unwrap().remove("value");
            }),
        ),
        (
            "empty current secret",
            with(&|d| d["current"]["value"] = "".into()),
        ),
        // A hand edit gone wrong: the secret where something else belongs.
        // The parser's complaint must not quote it (I7).
        (
            "bare secret as current",
            with(&|d| d["current"] = d["current"]["value"].clone()),
        ),
        (
            "secret as version",
            with(&|d| d["version"] = d["current"]["value"].clone()),
        ),
        ("unknown format", with(&|d| d["format"] = 99.into())),
        (
            "unknown phase",
            with(&|d| d["rotation"] = serde_json::json!({"phase": "exploded"})),
        ),
    ];
    let shown = path.display().to_string();
    for (what, bytes) in variants {
        std::fs::write(&path, &bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        for command in ["rotate", "run"] {
            let out = setup.run(&setup.rekeyd_args(command)).await;
            let stderr = text(&out.stderr);
            assert!(
                !out.status.success() && out.status.code().is_some(),
                "rekeyd {command} with a {what} record fails: {:?}\n{stderr}",
                out.status
            );
            assert!(
                stderr.contains(&shown) && stderr.contains("corrupt"),
                "rekeyd {command} with a {what} record names {shown}:\n{stderr}"
            );
            let meta = std::fs::metadata(&path).unwrap();
            assert!(
                std::fs::read(&path).unwrap() == bytes,
                "rekeyd {command} left the {what} record as it was"
            );
            assert_eq!(meta.modified().unwrap(), modified);
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
    }
    // Nothing reached the provider: no login, no secret API call.
    let stats = setup.sim.stats();
    assert_eq!(stats.requests.values().sum::<u64>(), 0, "{stats:?}");
    setup.assert_provider_untouched();
    setup.sim.shutdown().await;
}

// ---------------------------------------------------------------------------
// A token file on a disk that fills up for a moment
// ---------------------------------------------------------------------------

/// Inside the namespace: a 1 MiB tmpfs over the token directory, the daemon
/// in the background, and the disk filled and freed when the test says so
/// (by creating files in `work`, outside the tmpfs). Saves the token file
/// and the directory listing as the daemon left them, then stops it.
const SINK_FAULT_SCRIPT: &str = r#"
set -u
tokens=$1 work=$2
shift 2
mount -t tmpfs -o size=1m,mode=0755 rekeyd-tokens "$tokens" || exit 100
"$@" &
pid=$!
step() {
    while [ ! -e "$work/$1" ]; do
        kill -0 "$pid" 2>/dev/null || { umount "$tokens"; exit 101; }
        sleep 0.05
    done
}
step fill
dd if=/dev/zero of="$tokens/filler" bs=4096 2>/dev/null
touch "$work/filled"
step free
rm "$tokens/filler"
touch "$work/freed"
step done
cp "$tokens/maps.token" "$work/token-after"
ls -A "$tokens" > "$work/listing-after"
kill -TERM "$pid"
wait "$pid"
status=$?
umount "$tokens"
exit $status
"#;

/// The replayed report: with the token file's disk full for a moment, the
/// write fails when the token is refreshed; the file keeps the old token,
/// which expires. Now status, `/readyz/maps` and the metrics say so while
/// it lasts, the write is retried until it lands once there is room, and
/// the file is never partial nor are temp files left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_on_a_full_disk_is_shown_stale_and_written_once_there_is_room() {
    let Some(namespace) = namespace() else {
        tools::skip(NO_NAMESPACE);
        return;
    };
    // Eight-second tokens, as in the report.
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(8),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let (_, secret) = sim.add_secret(CLIENT, "bootstrap");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (tokens, work, socket) = (d.join("tokens"), d.join("work"), d.join("api.sock"));
    std::fs::create_dir(&tokens).unwrap();
    std::fs::create_dir(&work).unwrap();
    std::fs::write(d.join("maps.secret"), &secret).unwrap();
    let config = d.join("rekeyd.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{d}/state"
[api]
listen = "unix:{socket}"
key_file = "{d}/api.key"
[[credentials]]
name = "{NAME}"
provider = "mapsindoors"
client_id = "{CLIENT}"
initial_secret_file = "{d}/maps.secret"
[credentials.endpoints]
token_url = "{token}"
[[credentials.sinks]]
path = "{tokens}/maps.token"
"#,
            d = d.display(),
            socket = socket.display(),
            tokens = tokens.display(),
            token = sim.mapsindoors_token_url(),
        ),
    )
    .unwrap();
    let mut argv: Vec<String> = namespace.iter().map(|s| s.to_string()).collect();
    argv.extend(["sh", "-c", SINK_FAULT_SCRIPT, "sh"].map(String::from));
    argv.push(tokens.display().to_string());
    argv.push(work.display().to_string());
    argv.extend([
        env!("CARGO_BIN_EXE_rekeyd").to_string(),
        "run".to_string(),
        "--config".to_string(),
        config.display().to_string(),
    ]);
    let log = d.join("daemon.log");
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("RUST_LOG", "info")
        .env_remove("FAILPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder()
        .unix_socket(socket.clone())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    // Polls GET `path` (with the key once it exists) until `accept` holds.
    let mut poll = async |what: &str, path: &str, accept: &dyn Fn(u16, &Value) -> bool| -> Value {
        let deadline = tokio::time::Instant::now() + RUN_TIMEOUT;
        loop {
            let key = std::fs::read_to_string(d.join("api.key")).unwrap_or_default();
            if let Ok(response) = client
                .get(format!("http://localhost{path}"))
                .header("X-Rekeyd-Key", key.trim())
                .send()
                .await
            {
                let status = response.status().as_u16();
                let body: Value =
                    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default();
                if accept(status, &body) {
                    return body;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "exited ({status}) waiting for {what}:\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let sink_of = |body: &Value| body["credentials"][0]["sinks"][0].clone();
    let wait_file = async |name: &str| {
        let deadline = tokio::time::Instant::now() + RUN_TIMEOUT;
        while !work.join(name).exists() {
            assert!(tokio::time::Instant::now() < deadline, "no {name}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    poll("the first write", "/v1/status", &|_, b| {
        sink_of(b)["freshness"] == "current"
    })
    .await;
    std::fs::write(work.join("fill"), b"").unwrap();
    wait_file("filled").await;

    // The next token cannot be written: the file's token grows old, then
    // expires, and that shows.
    let body = poll("a failed write", "/v1/status", &|_, b| {
        sink_of(b)["consecutive_failures"].as_u64() >= Some(1)
    })
    .await;
    let error = sink_of(&body)["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("No space left on device"), "{body}");
    poll("the expired token", "/v1/status", &|_, b| {
        sink_of(b)["freshness"] == "expired"
    })
    .await;
    let ready = poll(
        "/readyz/maps to say so",
        &format!("/readyz/{NAME}"),
        &|s, _| s != 0,
    )
    .await;
    let file = format!("{}/maps.token", tokens.display());
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(ready["token"], true, "{ready}");
    assert_eq!(ready["sinks"][&file], "expired", "{ready}");
    let metrics = client
        .get("http://localhost/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "rekeyd_sink_token_valid{{credential=\"{NAME}\",path=\"{file}\"}} 0"
        )),
        "{metrics}"
    );

    // Room again: the retry lands with the token being served.
    std::fs::write(work.join("free"), b"").unwrap();
    wait_file("freed").await;
    let body = poll("the retried write", "/v1/status", &|_, b| {
        sink_of(b)["freshness"] == "current"
    })
    .await;
    let row = &body["credentials"][0];
    assert_eq!(row["ready"], true, "{body}");
    assert_eq!(
        sink_of(&body)["token_expires_at"],
        row["token_expires_at"],
        "{body}"
    );
    assert!(sink_of(&body)["last_error"].is_null(), "{body}");

    std::fs::write(work.join("done"), b"").unwrap();
    let status = tokio::time::timeout(RUN_TIMEOUT, child.wait())
        .await
        .expect("the daemon stops")
        .unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}\n{logged}");
    assert!(!mounted(&tokens), "the tmpfs went away with the namespace");
    let token = std::fs::read_to_string(work.join("token-after")).unwrap();
    assert_eq!(
        sim.token_client(&token).as_deref(),
        Some(CLIENT),
        "a whole token"
    );
    let listing = std::fs::read_to_string(work.join("listing-after")).unwrap();
    assert_eq!(listing.trim(), "maps.token", "no temp file left behind");
    assert!(logged.contains("cannot write token file"), "{logged}");
    assert!(
        logged.contains("token file written after failed attempts"),
        "{logged}"
    );
    assert!(!logged.contains(&token) && !logged.contains(&secret));
    sim.shutdown().await;
}
