//! The systemd notification protocol, seen from systemd's side: the test
//! binds the `NOTIFY_SOCKET` datagram socket itself and runs `rekeyd run`
//! as a child process against the in-process simulated provider.
//!
//! READY=1 comes once every credential has a token or an error (a failing
//! one is named in STATUS=), WATCHDOG=1 keeps coming while the daemon is
//! healthy, SIGHUP brings RELOADING=1 (with MONOTONIC_USEC=) and then
//! READY=1 again, SIGTERM brings STOPPING=1 and exit status 0. Without
//! NOTIFY_SOCKET the daemon runs all the same.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use tokio::net::UnixDatagram;
use tokio::time::Instant;

#[path = "support/process.rs"]
mod process;

use process::{RekeydProcess as Daemon, TIMEOUT};

/// The socket systemd would listen on.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        NotifySocket {
            socket: UnixDatagram::bind(&path).unwrap(),
            path,
            seen: Vec::new(),
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Receives messages until one satisfies `accept`; returns it.
    async fn wait_for(
        &mut self,
        what: &str,
        daemon: &Daemon,
        accept: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                Ok(n) => n.unwrap(),
                Err(_) => panic!(
                    "no {what} notification within {TIMEOUT:?}; got {:?}\n{}",
                    self.seen,
                    daemon.log()
                ),
            };
            let message = String::from_utf8(buf[..n].to_vec()).unwrap();
            self.seen.push(message.clone());
            if accept(&message) {
                return message;
            }
        }
    }
}

/// The `KEY=` line of a notification, if present.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

fn has(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

fn monotonic_usec() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    i128::from(ts.tv_sec) * 1_000_000 + i128::from(ts.tv_nsec) / 1_000
}

fn credential(dir: &Path, name: &str, client: &str, sim: &SimProvider) -> String {
    format!(
        r#"
[[credentials]]
name = "{name}"
provider = "mapsindoors"
client_id = "{client}"
initial_secret_file = "{dir}/{name}.secret"
[credentials.endpoints]
token_url = "{token_url}"
"#,
        dir = dir.display(),
        token_url = sim.mapsindoors_token_url(),
    )
}

fn header(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"state_dir = "{d}/state"
[api]
listen = "unix:{d}/api.sock"
key_file = "{d}/api.key"
"#
    )
}

/// A sim with one working client, its secret in `dir/<name>.secret`.
async fn sim_with_client(dir: &Path, name: &str, client: &str) -> SimProvider {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    sim.add_client(client, "cust");
    let (_, secret) = sim.add_secret(client, "bootstrap");
    rekeyd::fsutil::write_atomic(
        &dir.join(format!("{name}.secret")),
        secret.as_bytes(),
        0o600,
    )
    .unwrap();
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_status_watchdog_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let good = sim_with_client(dir.path(), "good", "good-client").await;
    // Every request to the second provider fails with a 503 page.
    let bad = sim_with_client(dir.path(), "bad", "bad-client").await;
    bad.set_faults(Faults {
        scope: FaultScope::All,
        fail_next: u32::MAX,
        ..Faults::default()
    });
    let config = dir.path().join("rekeyd.toml");
    let both = header(dir.path())
        + &credential(dir.path(), "good", "good-client", &good)
        + &credential(dir.path(), "bad", "bad-client", &bad);
    std::fs::write(&config, &both).unwrap();

    let mut notify = NotifySocket::bind(dir.path());
    let mut daemon = Daemon::spawn(
        &config,
        &dir.path().join("daemon.log"),
        &[
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    // READY once both credentials were tried, the failing one named.
    let ready = notify
        .wait_for("READY=1", &daemon, |m| has(m, "READY=1"))
        .await;
    assert_eq!(
        field(&ready, "STATUS"),
        Some("1/2 credentials have a valid token; failing: bad"),
        "{ready:?}"
    );
    assert!(good.stats().logins_ok >= 1, "READY before good had a token");
    assert!(
        bad.stats().requests_to(Endpoint::MapsIndoorsToken) >= 1,
        "READY before bad was tried"
    );

    // The watchdog is fed every WATCHDOG_USEC/2 = 100 ms.
    let started = Instant::now();
    for _ in 0..5 {
        notify
            .wait_for("WATCHDOG=1", &daemon, |m| has(m, "WATCHDOG=1"))
            .await;
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "5 pings took {took:?}");

    // SIGHUP with a configuration that drops the failing credential:
    // RELOADING=1 stamped with the monotonic clock, then READY=1 again, and
    // STATUS follows the new set of credentials.
    std::fs::write(
        &config,
        header(dir.path()) + &credential(dir.path(), "good", "good-client", &good),
    )
    .unwrap();
    let before = monotonic_usec();
    daemon.signal(libc::SIGHUP);
    let reloading = notify
        .wait_for("RELOADING=1", &daemon, |m| has(m, "RELOADING=1"))
        .await;
    let after = monotonic_usec();
    let stamp: i128 = field(&reloading, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("RELOADING without MONOTONIC_USEC: {reloading:?}"))
        .parse()
        .unwrap();
    assert!(
        before <= stamp && stamp <= after,
        "MONOTONIC_USEC={stamp} not within [{before}, {after}]"
    );
    let ready = notify
        .wait_for("READY=1 after RELOADING=1", &daemon, |m| has(m, "READY=1"))
        .await;
    assert!(field(&ready, "STATUS").is_some(), "{ready:?}");
    let all_good = "1/1 credentials have a valid token";
    if field(&ready, "STATUS") != Some(all_good) {
        notify
            .wait_for("STATUS after the reload", &daemon, |m| {
                field(m, "STATUS") == Some(all_good)
            })
            .await;
    }
    assert!(daemon.log().contains("configuration reloaded"));

    // Still fed after the reload.
    notify
        .wait_for("WATCHDOG=1 after the reload", &daemon, |m| {
            has(m, "WATCHDOG=1")
        })
        .await;

    daemon.signal(libc::SIGTERM);
    notify
        .wait_for("STOPPING=1", &daemon, |m| has(m, "STOPPING=1"))
        .await;
    let status = daemon.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.log());

    // Exactly two READY=1: start-up and the reload.
    let readies = notify.seen.iter().filter(|m| has(m, "READY=1")).count();
    assert_eq!(readies, 2, "{:?}", notify.seen);
    good.shutdown().await;
    bad.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_keeps_pace_while_tokens_change() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim_with_client(dir.path(), "good", "good-client").await;
    // Tokens of 2 s: a refresh (a token and a status change) every ~1.5 s.
    sim.set_token_lifetime(Duration::from_secs(2));
    let config = dir.path().join("rekeyd.toml");
    std::fs::write(
        &config,
        header(dir.path()) + &credential(dir.path(), "good", "good-client", &sim),
    )
    .unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let mut daemon = Daemon::spawn(
        &config,
        &dir.path().join("daemon.log"),
        &[
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    notify
        .wait_for("READY=1", &daemon, |m| has(m, "READY=1"))
        .await;
    // systemd expects a ping within every 200 ms; the daemon sends one every
    // 100 ms. Whatever else the daemon is busy with (here: two refreshes),
    // pings must not stall for anywhere near a second.
    let logins = sim.stats().logins_ok;
    let mut pings = vec![Instant::now()];
    while sim.stats().logins_ok < logins + 2 {
        notify
            .wait_for("WATCHDOG=1", &daemon, |m| has(m, "WATCHDOG=1"))
            .await;
        pings.push(Instant::now());
    }
    let longest = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest < Duration::from_millis(700),
        "the watchdog went {longest:?} without a ping ({} pings)\n{:?}",
        pings.len(),
        notify.seen
    );
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit().await.code(), Some(0), "{}", daemon.log());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_meant_for_another_process_is_not_fed() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim_with_client(dir.path(), "good", "good-client").await;
    let config = dir.path().join("rekeyd.toml");
    std::fs::write(
        &config,
        header(dir.path()) + &credential(dir.path(), "good", "good-client", &sim),
    )
    .unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    // WATCHDOG_PID names another process (as after a fork): sd_notify says
    // the watchdog is not ours to feed. A 10 ms interval would otherwise
    // ping at once (the first tick is immediate) and many times over.
    let mut daemon = Daemon::spawn(
        &config,
        &dir.path().join("daemon.log"),
        &[
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "20000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    let ready = notify
        .wait_for("READY=1", &daemon, |m| has(m, "READY=1"))
        .await;
    assert_eq!(
        field(&ready, "STATUS"),
        Some("1/1 credentials have a valid token")
    );
    daemon.signal(libc::SIGHUP);
    notify
        .wait_for("RELOADING=1", &daemon, |m| has(m, "RELOADING=1"))
        .await;
    notify
        .wait_for("READY=1", &daemon, |m| has(m, "READY=1"))
        .await;
    daemon.signal(libc::SIGTERM);
    notify
        .wait_for("STOPPING=1", &daemon, |m| has(m, "STOPPING=1"))
        .await;
    assert_eq!(daemon.wait_exit().await.code(), Some(0), "{}", daemon.log());
    assert!(
        !notify.seen.iter().any(|m| has(m, "WATCHDOG=1")),
        "{:?}",
        notify.seen
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_socket_the_daemon_runs_normally() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim_with_client(dir.path(), "good", "good-client").await;
    let config = dir.path().join("rekeyd.toml");
    std::fs::write(
        &config,
        header(dir.path()) + &credential(dir.path(), "good", "good-client", &sim),
    )
    .unwrap();
    // A watchdog request without a socket to answer on is ignored too.
    let mut daemon = Daemon::spawn(
        &config,
        &dir.path().join("daemon.log"),
        &[("WATCHDOG_USEC", "200000")],
    );
    let client = reqwest::Client::builder()
        .unix_socket(dir.path().join("api.sock"))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(r) = client.get("http://localhost/readyz").send().await
            && r.status() == reqwest::StatusCode::OK
        {
            break;
        }
        daemon.keep_waiting("ready", deadline).await;
    }
    daemon.signal(libc::SIGHUP);
    daemon
        .wait_until("the reload", |d| d.log().contains("configuration reloaded"))
        .await;
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("1/1 credentials have a valid token"), "{log}");
    assert!(!log.contains("sd_notify failed"), "{log}");
    sim.shutdown().await;
}
