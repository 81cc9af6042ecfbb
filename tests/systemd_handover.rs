//! What systemd hands the service, used as systemd hands it: the bootstrap
//! secret under `$CREDENTIALS_DIRECTORY` (`initial_secret_credential`,
//! LoadCredential=) and the token API's listening socket (socket
//! activation, `LISTEN_FDS`), without systemd: the test sets the variables
//! and the descriptor up the way systemd does (sd_listen_fds(3)).

use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rekeyd::sim::{SimOptions, SimProvider};
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(30);
const API_KEY: &str = "test-api-key-0123456789";

/// Registers client "client-maps" at the sim; returns its secret.
fn register(sim: &SimProvider) -> String {
    sim.add_client("client-maps", "cust");
    sim.add_secret("client-maps", "bootstrap").1
}

/// A configuration of one MapsIndoors credential "maps" at the sim whose
/// bootstrap secret is `secret_key` (a whole `initial_secret_...` line),
/// serving its token to `<dir>/maps.token` and, with `listen`, on the API.
fn config(sim: &SimProvider, dir: &Path, secret_key: &str, listen: Option<&Path>) -> PathBuf {
    let d = dir.display();
    let api = listen.map_or(String::new(), |sock| {
        format!(
            "[api]\nlisten = \"unix:{}\"\nkey_file = \"{d}/api.key\"\n",
            sock.display()
        )
    });
    let text = format!(
        r#"state_dir = "{d}/state"
{api}
[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "client-maps"
{secret_key}
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
[[credentials.sinks]]
path = "{d}/maps.token"
[[credentials.hooks]]
on = ["token"]
command = ["/bin/sh", "-c", "env > {d}/hook.env"]
"#,
        token = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
    );
    let path = dir.join("rekeyd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `rekeyd run` as systemd would start it: none of the caller's REKEYD_*,
/// systemd or failpoint variables, `env` added, logging to `log`.
fn command(program: &str, log: &Path, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("REKEYD")
            || n.starts_with("LISTEN_")
            || [
                "NOTIFY_SOCKET",
                "WATCHDOG_USEC",
                "FAILPOINTS",
                "CREDENTIALS_DIRECTORY",
            ]
            .contains(&&*n)
        {
            command.env_remove(&name);
        }
    }
    command
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    command
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Polls `check` until it holds, failing with the daemon's log after
/// `TIMEOUT` or when the daemon exits.
async fn wait_for(child: &mut Child, log: &Path, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what}: rekeyd exited ({status}):\n{}", read(log));
        }
        assert!(
            Instant::now() < deadline,
            "{what}: timed out:\n{}",
            read(log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The token file holds a token the sim issued to client-maps.
fn has_token(sim: &SimProvider, dir: &Path) -> bool {
    sim.token_client(read(&dir.join("maps.token")).trim())
        .as_deref()
        == Some("client-maps")
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// The bootstrap secret is read from `$CREDENTIALS_DIRECTORY/<name>`, where
/// LoadCredential= / LoadCredentialEncrypted= put it: the sim accepts only
/// that secret, so a token proves it was used.
#[tokio::test]
async fn the_bootstrap_secret_comes_from_the_credentials_directory() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let secret = register(&sim);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let creds = d.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    rekeyd::fsutil::write_atomic(&creds.join("maps.secret"), secret.as_bytes(), 0o400).unwrap();
    let config = config(&sim, d, "initial_secret_credential = \"maps.secret\"", None);
    let log = d.join("rekeyd.log");
    let mut child = command(env!("CARGO_BIN_EXE_rekeyd"), &log, &[])
        .args(["run", "--config"])
        .arg(&config)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .spawn()
        .unwrap();
    wait_for(&mut child, &log, "a token from the credential", || {
        has_token(&sim, d)
    })
    .await;
    assert!(!read(&log).contains(&secret), "the secret was logged");
    stop(child);

    // Without the variable (a unit without LoadCredential=): exit 78 naming
    // the key, before anything is written.
    let fresh = tempfile::tempdir().unwrap();
    let config = self::config(
        &sim,
        fresh.path(),
        "initial_secret_credential = \"maps.secret\"",
        None,
    );
    let out = command(env!("CARGO_BIN_EXE_rekeyd"), &d.join("second.log"), &[])
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("`credentials[0].initial_secret_credential`")
            && stderr.contains("LoadCredential="),
        "{stderr}"
    );
    assert!(!fresh.path().join("state").exists(), "state was touched");
}

/// `rekeyd run` with `listener` as descriptor 3 and `LISTEN_FDS=1`,
/// `LISTEN_FDNAMES=api`, `LISTEN_PID` its own pid: what systemd does for a
/// service with a socket unit. A shell sets `LISTEN_PID=$$` and execs
/// rekeyd, which keeps the pid: setenv(3) in a `pre_exec` closure would
/// allocate between fork and exec, which is not async-signal-safe in a
/// multi-threaded test process; dup2 and fcntl there are.
fn spawn_activated(fd: &impl AsRawFd, config: &Path, log: &Path) -> Child {
    let fd = fd.as_raw_fd();
    let mut command = command(
        "/bin/sh",
        log,
        &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "api")],
    );
    command
        .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["run", "--config"])
        .arg(config);
    // SAFETY: dup2 and fcntl are async-signal-safe and change only the
    // child's descriptor table.
    unsafe {
        command.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 clears close-on-exec on the copy; the original, when it
            // already was 3, still has it.
            if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().expect("rekeyd starts")
}

/// Sends `GET /v1/token/maps` with the key on `stream` and reads the reply
/// (the daemon closes after it: `Connection: close`).
fn get_token(mut stream: std::os::unix::net::UnixStream) -> String {
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    write!(
        stream,
        "GET /v1/token/maps HTTP/1.1\r\nHost: rekeyd\r\nX-Rekeyd-Key: {API_KEY}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

fn access_token(reply: &str) -> String {
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{reply}");
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    json["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// The socket systemd would have opened (rekeyd.socket) is bound and
/// listening before rekeyd starts; a client connects then, and gets its
/// token once rekeyd serves, on that very socket (rekeyd neither rebinds
/// nor re-modes it). A reload keeps serving it, and hooks do not inherit
/// the LISTEN_* variables.
#[tokio::test]
async fn a_passed_socket_serves_clients_that_connected_before_the_start() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let secret = register(&sim);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    rekeyd::fsutil::write_atomic(&d.join("maps.secret"), secret.as_bytes(), 0o600).unwrap();
    rekeyd::fsutil::write_atomic(&d.join("api.key"), API_KEY.as_bytes(), 0o600).unwrap();
    let sock = d.join("api.sock");
    let config = config(
        &sim,
        d,
        &format!("initial_secret_file = \"{}/maps.secret\"", d.display()),
        Some(&sock),
    );
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // SocketMode=0600, which rekeyd's own bind would make 0660.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    let inode = std::fs::metadata(&sock).unwrap().ino();
    let early = std::os::unix::net::UnixStream::connect(&sock).expect("queued by the kernel");

    let log = d.join("rekeyd.log");
    let mut child = spawn_activated(&listener, &config, &log);
    drop(listener);
    wait_for(&mut child, &log, "the first token", || has_token(&sim, d)).await;
    let token = access_token(&get_token(early));
    assert_eq!(sim.token_client(&token).as_deref(), Some("client-maps"));
    let text = read(&log);
    assert!(
        text.lines()
            .any(|l| l.contains("listening") && l.contains("socket_activated=true")),
        "{text}"
    );
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.ino(), inode, "the socket file was replaced");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "re-moded");

    // SIGHUP: the configuration is re-read, the socket keeps serving.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait_for(&mut child, &log, "the reload", || {
        read(&log).contains("configuration reloaded")
    })
    .await;
    let stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let token = access_token(&get_token(stream));
    assert_eq!(sim.token_client(&token).as_deref(), Some("client-maps"));

    wait_for(&mut child, &log, "the token hook", || {
        read(&d.join("hook.env")).contains("REKEYD_CREDENTIAL=maps")
    })
    .await;
    let env = read(&d.join("hook.env"));
    assert!(
        !env.contains("LISTEN_"),
        "a hook inherited LISTEN_*:\n{env}"
    );
    stop(child);
}

/// A passed socket no listener uses (the socket unit and the configuration
/// disagree) stops the start as a configuration error naming the key and
/// both addresses.
#[tokio::test]
async fn a_passed_socket_no_listener_uses_is_a_configuration_error() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let secret = register(&sim);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    rekeyd::fsutil::write_atomic(&d.join("maps.secret"), secret.as_bytes(), 0o600).unwrap();
    let config = config(
        &sim,
        d,
        &format!("initial_secret_file = \"{}/maps.secret\"", d.display()),
        Some(&d.join("api.sock")),
    );
    let other = d.join("other.sock");
    let listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
    let log = d.join("rekeyd.log");
    let status = spawn_activated(&listener, &config, &log).wait().unwrap();
    let text = read(&log);
    assert_eq!(status.code(), Some(78), "{text}");
    assert!(
        text.contains("`api.listen`")
            && text.contains(&format!("unix:{}", other.display()))
            && text.contains("FileDescriptorName=api"),
        "{text}"
    );
    assert!(!d.join("state").exists(), "state was touched");
    assert!(!d.join("api.sock").exists(), "rekeyd listened anyway");
}
