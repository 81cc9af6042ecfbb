//! The listeners under clients that misbehave: half-sent requests, idle
//! keep-alive connections, clients that never read, more connections than
//! allowed, a file-descriptor limit the connections could exhaust; and the
//! diagnostics listener (`[diag]`), which serves probes and metrics and
//! never a token.
//!
//! Timeouts are configured small, and every test waits for the close or
//! the state it asserts (with a deadline), never for a fixed time.

#[path = "support/daemon.rs"]
mod daemon;

use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::{EVENT_TIMEOUT, TestDaemon, wait_token, write_secret};
use rekeyd::config::{Config, ConfigError};
use rekeyd::sim::{SimOptions, SimProvider};
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

const KEY_HEADER: &str = "X-Rekeyd-Key";

// ---------------------------------------------------------------------------
// Set-up

/// Registers `client` at the sim and writes its secret to `<dir>/maps.secret`.
fn register(sim: &SimProvider, dir: &Path) {
    sim.add_client("client-maps", "cust");
    let (_, secret) = sim.add_secret("client-maps", "bootstrap");
    write_secret(dir, "maps.secret", &secret);
}

/// A configuration: `listeners` (the `[api]` and `[diag]` sections), then
/// one MapsIndoors credential "maps" at the sim; `{dir}` is the test's
/// directory.
fn config(sim: &SimProvider, listeners: &str, extra: &str) -> String {
    format!(
        r#"state_dir = "{{dir}}/state"
{listeners}
[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "client-maps"
initial_secret_file = "{{dir}}/maps.secret"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
{extra}
"#,
        token = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
    )
}

/// Where a listener is.
#[derive(Clone, Debug)]
enum Target {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(target: &Target) -> Box<dyn Stream> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let result: std::io::Result<Box<dyn Stream>> = match target {
            Target::Tcp(addr) => tokio::net::TcpStream::connect(addr)
                .await
                .map(|s| Box::new(s) as _),
            Target::Unix(path) => tokio::net::UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as _),
        };
        match result {
            Ok(stream) => return stream,
            // A unix socket's backlog is full (a flood faster than the
            // server accepts): the kernel refuses rather than queues.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            Err(e) => panic!("connect {target:?}: {e}"),
        }
    }
}

/// Reads until the server closes the connection (end of file or reset);
/// returns what arrived. Fails the test if it stays open.
async fn wait_closed(stream: &mut dyn Stream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {EVENT_TIMEOUT:?}"));
    got
}

/// Sends `GET path` on a kept-alive connection and reads one response:
/// (status, body).
async fn get(stream: &mut dyn Stream, path: &str, headers: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: rekeyd\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let read = async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().unwrap())
                    })
                    .expect("content-length");
                if raw.len() >= end + 4 + length {
                    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                    let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + length]);
                    return (status, body.to_string());
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "GET {path}: closed mid-response");
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response"))
}

/// One request on a new connection.
async fn get_once(target: &Target, path: &str, headers: &str) -> (u16, String) {
    let mut stream = connect(target).await;
    get(&mut *stream, path, headers).await
}

async fn start(listeners: &str) -> (SimProvider, TestDaemon) {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&sim, dir.path());
    let d = TestDaemon::start_in(dir, &config(&sim, listeners, "")).await;
    (sim, d)
}

// ---------------------------------------------------------------------------
// Timeouts

/// Clients that send half a request line and then nothing are closed once
/// `header_timeout` has passed, on every listener (the token API on a unix
/// socket, the diagnostics listener on TCP), and the daemon serves on.
#[tokio::test]
async fn half_sent_requests_are_closed_after_the_header_timeout() {
    let (_sim, d) = start(
        r#"[api]
listen = "unix:{dir}/api.sock"
key_file = "{dir}/api.key"
header_timeout = "300ms"
idle_timeout = "1h"
[diag]
listen = "127.0.0.1:0"
header_timeout = "300ms"
idle_timeout = "1h"
"#,
    )
    .await;
    let api = Target::Unix(d.dir.path().join("api.sock"));
    let diag = Target::Tcp(d.diag_addr.unwrap());
    let header_timeout = Duration::from_millis(300);

    for (target, partial) in [(&api, "GET /v1/tok"), (&diag, "GET /rea")] {
        let mut streams = Vec::new();
        for _ in 0..20 {
            let mut s = connect(target).await;
            // Before the write: the server's clock starts when it reads.
            let sent = Instant::now();
            s.write_all(partial.as_bytes()).await.unwrap();
            streams.push((s, sent));
        }
        for (mut s, sent) in streams {
            let got = wait_closed(&mut *s, &format!("{target:?}: {partial:?}")).await;
            // Closed by the header timeout: not before it, and with
            // idle_timeout an hour, by nothing else.
            assert!(
                sent.elapsed() >= header_timeout,
                "{target:?}: closed after {:?}",
                sent.elapsed()
            );
            assert!(
                got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
                "{target:?}: {}",
                String::from_utf8_lossy(&got)
            );
        }
    }
    // Still serving.
    let (status, _) = get_once(&diag, "/livez", "").await;
    assert_eq!(status, 200);
    let key = format!("{KEY_HEADER}: {}\r\n", d.api_key());
    wait_token(&d.handle("maps"), |_| true).await;
    let (status, body) = get_once(&api, "/v1/token/maps", &key).await;
    assert_eq!(status, 200, "{body}");
    d.stop().await;
}

/// A kept-alive connection that sends no further request is closed after
/// `idle_timeout`, which is independent of `header_timeout`; a connection
/// that never sends anything is closed after it too.
#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (_sim, d) = start(
        r#"[api]
listen = "127.0.0.1:0"
key_file = "{dir}/api.key"
header_timeout = "1h"
request_timeout = "1h"
idle_timeout = "300ms"
"#,
    )
    .await;
    let api = Target::Tcp(d.api_addr.unwrap());
    let idle_timeout = Duration::from_millis(300);

    // Instants are taken before what starts the server's clock, so that
    // its deadline cannot precede ours.
    let opened = Instant::now();
    let mut silent = connect(&api).await;
    let mut kept = connect(&api).await;
    let mut last_request = Instant::now();
    for _ in 0..3 {
        // Requests in a row, each within the idle timeout of the last.
        last_request = Instant::now();
        assert_eq!(get(&mut *kept, "/livez", "").await.0, 200);
    }
    wait_closed(&mut *kept, "kept-alive connection").await;
    assert!(
        last_request.elapsed() >= idle_timeout,
        "{:?}",
        last_request.elapsed()
    );
    wait_closed(&mut *silent, "silent connection").await;
    assert!(opened.elapsed() >= idle_timeout, "{:?}", opened.elapsed());
    d.stop().await;
}

/// A client that sends requests but never reads the responses stalls the
/// server's writes; `request_timeout` ends the connection (the idle
/// timeout is an hour, so nothing else can).
#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_by_the_request_timeout() {
    let (_sim, d) = start(
        r#"[api]
listen = "127.0.0.1:0"
key_file = "{dir}/api.key"
header_timeout = "500ms"
request_timeout = "500ms"
idle_timeout = "1h"
"#,
    )
    .await;
    let api = Target::Tcp(d.api_addr.unwrap());
    let mut stream = connect(&api).await;
    let batch = "GET /metrics HTTP/1.1\r\nHost: rekeyd\r\n\r\n".repeat(100);
    // Writes succeed until the server's send buffer and ours are full;
    // once the server gives up on the connection, they fail.
    let flood = async {
        loop {
            if stream.write_all(batch.as_bytes()).await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, flood)
        .await
        .expect("the server still holds a connection that reads nothing");
    assert_eq!(get_once(&api, "/livez", "").await.0, 200);
    d.stop().await;
}

// ---------------------------------------------------------------------------
// Connection caps

/// Beyond `max_connections`, a new connection gets 503 and is closed at
/// once (every timeout is an hour, so only the refusal can close it); when
/// a connection ends, its slot is free again.
#[tokio::test]
async fn connections_beyond_the_cap_are_refused_at_once() {
    let (_sim, d) = start(
        r#"[api]
listen = "127.0.0.1:0"
key_file = "{dir}/api.key"
max_connections = 4
header_timeout = "1h"
request_timeout = "1h"
idle_timeout = "1h"
"#,
    )
    .await;
    let api = Target::Tcp(d.api_addr.unwrap());
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = connect(&api).await;
        assert_eq!(get(&mut *s, "/livez", "").await.0, 200);
        held.push(s);
    }
    for attempt in 0..3 {
        let mut extra = connect(&api).await;
        // The request may reach the server before or after the refusal.
        let _ = extra
            .write_all(b"GET /livez HTTP/1.1\r\nHost: rekeyd\r\n\r\n")
            .await;
        let got = wait_closed(&mut *extra, "connection over the cap").await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty()
                || (text.starts_with("HTTP/1.1 503") && text.contains("too_many_connections")),
            "attempt {attempt}: {text}"
        );
    }
    // The held connections are still served.
    assert_eq!(get(&mut *held[0], "/livez", "").await.0, 200);

    // One goes away: its slot is given back (once the server has seen the
    // close, hence the retries).
    drop(held.pop());
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let mut s = connect(&api).await;
        let _ = s
            .write_all(b"GET /livez HTTP/1.1\r\nHost: rekeyd\r\n\r\n")
            .await;
        let mut first = [0u8; 12];
        if s.read_exact(&mut first).await.is_ok() && &first == b"HTTP/1.1 200" {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.stop().await;
}

/// With the file-descriptor limit at 256 and 300 connections sending half
/// a request (timeouts an hour, so they stay), the daemon keeps refreshing
/// its token, reading its store record and writing its token file, and
/// the diagnostics listener answers /readyz. Connections beyond the cap
/// the limit leaves room for are refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_file_limit_and_a_connection_flood_do_not_stop_refresh() {
    raise_own_fd_limit(1024);
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(2),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    register(&sim, d);
    let token_file = d.join("maps.token");
    let text = config(
        &sim,
        r#"[api]
listen = "unix:{dir}/api.sock"
key_file = "{dir}/api.key"
header_timeout = "1h"
request_timeout = "1h"
idle_timeout = "1h"
[diag]
listen = "unix:{dir}/diag.sock"
"#,
        r#"[[credentials.sinks]]
path = "{dir}/maps.token"
"#,
    )
    .replace("{dir}", &d.display().to_string());
    let config_path = d.join("rekeyd.toml");
    std::fs::write(&config_path, text).unwrap();
    let log_path = d.join("rekeyd.log");
    let mut child = spawn_with_fd_limit(&config_path, &log_path, 256);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let api = Target::Unix(d.join("api.sock"));
    let diag = Target::Unix(d.join("diag.sock"));
    // Started once both listeners are logged (after they bound).
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while log().lines().filter(|l| l.contains("listening")).count() < 2 {
        assert!(child.try_wait().unwrap().is_none(), "exited:\n{}", log());
        assert!(Instant::now() < deadline, "not listening:\n{}", log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cap = logged_cap(&log(), "api");

    // The flood. Each connection waits in a task for the server to close
    // it (holding it open until then) and reports the close.
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let mut holders = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let mut s = connect(&api).await;
        let _ = s.write_all(b"GET /v1/tok").await;
        let closed_tx = closed_tx.clone();
        holders.spawn(async move {
            let mut byte = [0u8; 1];
            let _ = s.read(&mut byte).await;
            let _ = closed_tx.send(());
        });
    }
    // Everything beyond the cap the daemon logged is refused at once; the
    // cap leaves most of the 256 descriptors to the engine.
    assert!(
        (1..128).contains(&cap),
        "cap {cap}:
{}",
        log()
    );
    for _ in 0..300 - cap {
        tokio::time::timeout(EVENT_TIMEOUT, closed.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "connections over the cap {cap} stay open:
{}",
                    log()
                )
            });
    }

    // With the flood in place: new tokens, the token file follows, and
    // /readyz answers on the diagnostics listener.
    let logins = sim.stats().logins_ok;
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while sim.stats().logins_ok < logins + 3 {
        assert!(child.try_wait().unwrap().is_none(), "exited:\n{}", log());
        assert!(
            Instant::now() < deadline,
            "no refresh under the flood:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let current = std::fs::read_to_string(&token_file).unwrap_or_default();
        if sim.token_client(&current).as_deref() == Some("client-maps") {
            break;
        }
        assert!(Instant::now() < deadline, "stale token file:\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = get_once(&diag, "/readyz", "").await;
    assert_eq!(status, 200, "{body}\n{}", log());
    let log_text = log();
    assert!(
        !log_text.contains("Too many open files"),
        "ran out of descriptors:\n{log_text}"
    );
    // The connections within the cap were held all along (their timeouts
    // are an hour): the flood was in place.
    assert!(closed.try_recv().is_err(), "a held connection was closed");
    holders.abort_all();
    let _ = child.kill();
    let _ = child.wait();
}

/// The `max_connections` the daemon logged for `listener` at start-up.
fn logged_cap(log: &str, listener: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("listening") && l.contains(&format!("listener=\"{listener}\"")))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("max_connections="))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no listening line for {listener}:\n{log}"))
}

fn raise_own_fd_limit(at_least: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < at_least && limit.rlim_max >= at_least {
            limit.rlim_cur = at_least;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    assert!(
        limit.rlim_cur >= at_least,
        "the test needs {at_least} file descriptors; the hard limit is {}",
        limit.rlim_max
    );
}

/// `rekeyd run` with RLIMIT_NOFILE set to `nofile` (soft and hard) before
/// it starts, logging at info to `log`.
fn spawn_with_fd_limit(config: &Path, log: &Path, nofile: u64) -> std::process::Child {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"));
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("REKEYD")
            || ["NOTIFY_SOCKET", "WATCHDOG_USEC", "FAILPOINTS"].contains(&&*n)
        {
            command.env_remove(&name);
        }
    }
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().expect("rekeyd starts")
}

// ---------------------------------------------------------------------------
// The diagnostics listener

/// `[diag]` serves /livez, /readyz, /readyz/{name} and /metrics, with no
/// key and whatever proxy headers, and no token, status or rotation even
/// with the right key; the token API then serves /v1/... only and points
/// probes to the diagnostics listener.
#[tokio::test]
async fn the_diagnostics_listener_serves_probes_and_metrics_and_never_tokens() {
    let (_sim, d) = start(
        r#"[api]
listen = "unix:{dir}/api.sock"
key_file = "{dir}/api.key"
[diag]
listen = "127.0.0.1:0"
"#,
    )
    .await;
    let api = Target::Unix(d.dir.path().join("api.sock"));
    let diag = Target::Tcp(d.diag_addr.expect("diag listens on TCP"));
    assert_eq!(d.api_addr, None);
    let token = wait_token(&d.handle("maps"), |_| true).await;
    let token = token.access_token.expose_secret().to_string();
    let key = format!("{KEY_HEADER}: {}\r\n", d.api_key());

    let relayed = "X-Forwarded-For: 10.1.2.3\r\n";
    for headers in ["", relayed] {
        for (path, want) in [
            ("/livez", "\"ok\""),
            ("/readyz", "\"ready\":true"),
            ("/readyz/maps", "\"ready\":true"),
            ("/metrics", "rekeyd_token_valid{credential=\"maps\"} 1"),
        ] {
            let (status, body) = get_once(&diag, path, headers).await;
            assert_eq!(status, 200, "diag {path} {headers:?}: {body}");
            assert!(body.contains(want), "diag {path}: {body}");
        }
    }
    assert_eq!(get_once(&diag, "/readyz/nope", "").await.0, 404);

    // Nothing secret, whatever is asked.
    for path in ["/v1/token/maps", "/v1/status", "/", "/v1/token/maps/"] {
        let (status, body) = get_once(&diag, path, &key).await;
        assert_eq!(status, 404, "diag {path}: {body}");
        assert!(!body.contains(&token), "diag {path} leaked the token");
    }
    let mut s = connect(&diag).await;
    s.write_all(
        format!("POST /v1/rotate/maps HTTP/1.1\r\nHost: rekeyd\r\n{key}content-length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let got = wait_closed_or_response(&mut *s).await;
    assert!(!got.starts_with("HTTP/1.1 2"), "diag rotated: {got}");

    // The token API: tokens with the key; probes and metrics moved.
    let (status, body) = get_once(&api, "/v1/token/maps", &key).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&token));
    for path in ["/livez", "/readyz", "/readyz/maps", "/metrics"] {
        let (status, body) = get_once(&api, path, "").await;
        assert_eq!(status, 404, "api {path}: {body}");
        assert!(body.contains("served_by_diag"), "api {path}: {body}");
    }
    d.stop().await;
}

/// Reads one response head (or until close): the status line and headers.
async fn wait_closed_or_response(stream: &mut dyn Stream) -> String {
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, read).await.unwrap();
    String::from_utf8_lossy(&raw).to_string()
}

/// Without `[diag]` the token API serves the probes and metrics as before
/// (tests/api.rs covers the rest of that set-up).
#[tokio::test]
async fn without_diag_the_api_serves_probes_and_metrics() {
    let (_sim, d) = start(
        r#"[api]
listen = "127.0.0.1:0"
key_file = "{dir}/api.key"
"#,
    )
    .await;
    let api = Target::Tcp(d.api_addr.unwrap());
    assert_eq!(d.diag_addr, None);
    wait_token(&d.handle("maps"), |_| true).await;
    for path in ["/livez", "/readyz", "/readyz/maps", "/metrics"] {
        assert_eq!(get_once(&api, path, "").await.0, 200, "{path}");
    }
    // Unknown paths get the plain 404 they always got.
    assert_eq!(get_once(&api, "/nope", "").await, (404, String::new()));
    d.stop().await;
}

// ---------------------------------------------------------------------------
// Configuration

const CREDENTIAL: &str = r#"
[[credentials]]
name = "maps"
provider = "mappls"
client_id = "c"
initial_secret_file = "/etc/rekeyd/maps.secret"
"#;

fn parse(head: &str) -> Result<Config, ConfigError> {
    Config::from_toml(&format!(
        "state_dir = \"/var/lib/rekeyd\"\n{head}{CREDENTIAL}"
    ))
}

#[test]
fn listener_settings_are_read_with_their_defaults() {
    let config = parse("[api]\n[diag]\nlisten = \"0.0.0.0:9861\"\n").unwrap();
    let api = config.api.unwrap();
    let diag = config.diag.unwrap();
    // Beyond loopback without allow_non_loopback: it serves no token.
    assert_eq!(diag.listen.to_string(), "0.0.0.0:9861");
    assert_eq!(api.limits.max_connections, 256);
    assert_eq!(diag.limits.max_connections, 64);
    for limits in [api.limits, diag.limits] {
        assert_eq!(limits.header_timeout, Duration::from_secs(5));
        assert_eq!(limits.request_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
    }

    let config = parse(
        "[api]\nlisten = \"unix:/run/rekeyd/api.sock\"\nmax_connections = 32\nheader_timeout = \"2s\"\n\
         request_timeout = \"3s\"\nidle_timeout = \"90s\"\n[diag]\nlisten = \"unix:/run/rekeyd/diag.sock\"\n",
    )
    .unwrap();
    let api = config.api.unwrap();
    assert_eq!(api.limits.max_connections, 32);
    assert_eq!(api.limits.header_timeout, Duration::from_secs(2));
    assert_eq!(api.limits.request_timeout, Duration::from_secs(3));
    assert_eq!(api.limits.idle_timeout, Duration::from_secs(90));
    assert_eq!(
        config.diag.unwrap().listen.to_string(),
        "unix:/run/rekeyd/diag.sock"
    );
    // A daemon with diagnostics and no token API at all.
    let config = parse("[diag]\nlisten = \"[::]:9861\"\n").unwrap();
    assert!(config.api.is_none() && config.diag.is_some());
}

/// Each bad listener setting is refused with the key it is about, and
/// `rekeyd check` exits 78 naming it.
#[test]
fn bad_listener_settings_are_refused_naming_the_key() {
    let cases = [
        ("[diag]\n", "diag.listen", "required"),
        (
            "[diag]\nlisten = \"localhost:9861\"\n",
            "diag.listen",
            "IP:PORT",
        ),
        (
            "[diag]\nlisten = \"unix:diag.sock\"\n",
            "diag.listen",
            "absolute",
        ),
        (
            "[api]\nlisten = \"127.0.0.1:9860\"\n[diag]\nlisten = \"0.0.0.0:9860\"\n",
            "diag.listen",
            "overlaps api.listen",
        ),
        (
            "[api]\nlisten = \"unix:/run/x.sock\"\n[diag]\nlisten = \"unix:/run/x.sock\"\n",
            "diag.listen",
            "overlaps",
        ),
        (
            "[diag]\nlisten = \"0.0.0.0:1\"\nport = 2\n",
            "port",
            "unknown",
        ),
        (
            "[api]\nmax_connections = 0\n",
            "api.max_connections",
            "between 1",
        ),
        (
            "[api]\nmax_connections = -3\n",
            "api.max_connections",
            "between 1",
        ),
        (
            "[diag]\nlisten = \"0.0.0.0:1\"\nidle_timeout = \"0s\"\n",
            "diag.idle_timeout",
            "more than 0s",
        ),
        (
            "[api]\nrequest_timeout = \"2h\"\n",
            "api.request_timeout",
            "at most 1h",
        ),
        (
            "[api]\nheader_timeout = \"soon\"\n",
            "api.header_timeout",
            "soon",
        ),
        (
            "[api]\nheader_timeout = \"20s\"\n",
            "api.header_timeout",
            "longer than api.request_timeout",
        ),
        ("[api]\nlisten = \"0.0.0.0:9860\"\n", "api.listen", "[diag]"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (head, key, words) in cases {
        let err = parse(head).expect_err(head).to_string();
        assert!(err.contains(key) && err.contains(words), "{head:?}: {err}");
        let path = dir.path().join("rekeyd.toml");
        let mut file = std::fs::File::create(&path).unwrap();
        write!(file, "state_dir = \"/var/lib/rekeyd\"\n{head}{CREDENTIAL}").unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .args(["check", "--config"])
            .arg(&path)
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{head:?}: {stderr}");
        assert!(stderr.contains(key), "{head:?}: {stderr}");
    }
}
