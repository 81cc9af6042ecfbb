//! `[[credentials.hooks]]` of a running `rekeyd run` (a child process,
//! against the in-process simulated provider): command hooks run without a
//! shell, with the credential and the event in their environment and never
//! the token; a failing hook is retried with backoff and a hanging one is
//! killed at its timeout, neither holding up the token engine; signal hooks
//! signal the process named in a pid file, read afresh every time; rotation
//! hooks run after a rotation.
//!
//! The hook programs are small scripts the test writes (the daemon itself
//! runs them directly, not through a shell).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rekeyd::sim::{SimOptions, SimProvider};
use tokio::process::{Child, Command};
use tokio::time::Instant;

#[path = "support/process.rs"]
mod process;

use process::{RekeydProcess as Daemon, TIMEOUT};

struct Setup {
    sim: SimProvider,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// A sim issuing `lifetime` tokens, with client `maps-client` and its
    /// secret in `maps.secret`.
    async fn new(lifetime: Duration) -> Setup {
        let sim = SimProvider::start(SimOptions {
            token_lifetime: lifetime,
            ..SimOptions::default()
        })
        .await
        .unwrap();
        sim.add_client("maps-client", "cust");
        let (_, secret) = sim.add_secret("maps-client", "bootstrap");
        let dir = tempfile::tempdir().unwrap();
        rekeyd::fsutil::write_atomic(&dir.path().join("maps.secret"), secret.as_bytes(), 0o600)
            .unwrap();
        let config = dir.path().join("rekeyd.toml");
        Setup { sim, dir, config }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Writes the configuration: credential `maps` with a token sink and
    /// `extra` (rotation, hooks) appended to it.
    fn write_config(&self, extra: &str) {
        let d = self.dir.path().display();
        let text = format!(
            r#"state_dir = "{d}/state"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "maps-client"
customer_id = "cust"
initial_secret_file = "{d}/maps.secret"
[credentials.endpoints]
token_url = "{token_url}"
secrets_url = "{secrets_url}"
[[credentials.sinks]]
path = "{d}/maps.token"
{extra}"#,
            token_url = self.sim.mapsindoors_token_url(),
            secrets_url = self.sim.mapsindoors_secrets_url(),
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Writes an executable `#!/bin/sh` script; returns its path.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path(file)).unwrap_or_default()
    }

    fn spawn(&self, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(&self.config, &self.dir.path().join("daemon.log"), env)
    }
}

/// Whether `pid` is a running process (a zombie, killed but not yet
/// reaped by whoever inherited it, counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Waits (bounded) for `pid` to be gone: a SIGKILL takes effect shortly
/// after it is sent.
async fn assert_gone(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) left running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TOML string array.
fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_hook_gets_credential_and_event_but_never_the_token() {
    let setup = Setup::new(Duration::from_secs(2)).await;
    let out = setup.path("hook.out");
    // One line per run: what the environment says, then each argument.
    let script = setup.script(
        "hook.sh",
        &format!(
            r#"{{ printf 'cred=%s event=%s notify=%s watchdog=%s argc=%s' "$REKEYD_CREDENTIAL" "$REKEYD_EVENT" "${{NOTIFY_SOCKET-unset}}" "${{WATCHDOG_USEC-unset}}" "$#"
for a in "$@"; do printf ' [%s]' "$a"; done
echo; }} >> {out}"#,
            out = out.display()
        ),
    );
    let argv = [script.to_str().unwrap(), "--flag", "two words", "$HOME"];
    setup.write_config(&format!(
        "[[credentials.hooks]]\non = [\"token\"]\ncommand = {}\ntimeout = \"10s\"\n",
        toml_list(&argv)
    ));
    // The daemon's own supervisor variables must not reach the hook.
    let notify = tokio::net::UnixDatagram::bind(setup.path("notify.sock")).unwrap();
    let notify_path = setup.path("notify.sock");
    let mut daemon = setup.spawn(&[
        ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "10000000"),
    ]);
    // Tokens live 2 s: the hook runs for the first token and again after
    // refreshes.
    daemon
        .wait_until("three hook runs", |_| {
            setup.read("hook.out").lines().count() >= 3
        })
        .await;
    let (_, log) = daemon.stop().await;
    drop(notify);

    let expected =
        "cred=maps event=token notify=unset watchdog=unset argc=3 [--flag] [two words] [$HOME]";
    let text = setup.read("hook.out");
    for line in text.lines() {
        assert_eq!(line, expected, "{text}");
    }
    let token = setup.read("maps.token");
    assert!(token.starts_with("sim_"), "{token}");
    assert!(!text.contains("sim_"), "a token reached the hook: {text}");
    assert!(log.contains("hook ran"), "{log}");
    assert!(!log.contains("sim_"), "a token reached the log");
    setup.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_hook_is_retried_with_backoff_while_tokens_keep_coming() {
    let setup = Setup::new(Duration::from_secs(2)).await;
    let attempts = setup.path("attempts");
    let script = setup.script(
        "fail.sh",
        &format!("date +%s.%N >> {}\nexit 1", attempts.display()),
    );
    setup.write_config(&format!(
        "[[credentials.hooks]]\non = [\"token\"]\ncommand = [{:?}]\n",
        script.to_str().unwrap()
    ));
    let mut daemon = setup.spawn(&[]);
    daemon
        .wait_until("the first attempt", |_| !setup.read("attempts").is_empty())
        .await;
    let logins = setup.sim.stats().logins_ok;
    let first_token = setup.read("maps.token");
    // Retries of one event are 1 s, 2 s, 4 s, 8 s apart (5 attempts, 15 s):
    // three attempts and two more logins all fall within the first event's
    // retries, so the engine did not wait for the hook.
    daemon
        .wait_until("three attempts and two more logins", |_| {
            setup.read("attempts").lines().count() >= 3 && setup.sim.stats().logins_ok >= logins + 2
        })
        .await;
    assert_ne!(
        setup.read("maps.token"),
        first_token,
        "token file not refreshed"
    );
    let (_, log) = daemon.stop().await;

    let times: Vec<f64> = setup
        .read("attempts")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(times.len() >= 3, "{times:?}");
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= 0.9, "first retry after {}s: {gaps:?}", gaps[0]);
    assert!(gaps[1] >= 1.9, "second retry after {}s: {gaps:?}", gaps[1]);
    let failures: Vec<&str> = log.lines().filter(|l| l.contains("hook failed")).collect();
    assert!(failures.len() >= 2, "{log}");
    assert!(failures[0].contains("exit status: 1"), "{}", failures[0]);
    assert!(failures[0].contains("fail.sh"), "{}", failures[0]);
    assert!(failures[0].contains("retry_in"), "{}", failures[0]);
    assert!(failures[0].contains("WARN"), "{}", failures[0]);
    setup.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_hook_is_killed_at_its_timeout() {
    let setup = Setup::new(Duration::from_secs(2)).await;
    let pids = setup.path("pids");
    // exec: the pid written is the process the daemon must kill.
    let script = setup.script(
        "hang.sh",
        &format!("echo $$ >> {}\nexec /bin/sleep 60", pids.display()),
    );
    setup.write_config(&format!(
        "[[credentials.hooks]]\non = [\"token\"]\ncommand = [{:?}]\ntimeout = \"1s\"\n",
        script.to_str().unwrap()
    ));
    let mut daemon = setup.spawn(&[]);
    daemon
        .wait_until("the hook to start", |_| !setup.read("pids").is_empty())
        .await;
    let started = Instant::now();
    let first: i32 = setup.read("pids").lines().next().unwrap().parse().unwrap();
    let logins = setup.sim.stats().logins_ok;
    daemon
        .wait_until("the timeout to be logged", |d| {
            d.log().contains("did not finish within 1s; killed")
        })
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "killed after {took:?}, timeout 1s"
    );
    daemon
        .wait_until("the hung hook to be gone", |_| !alive(first))
        .await;
    // Tokens keep coming while the hook hangs, times out and is retried.
    daemon
        .wait_until("two more logins", |_| {
            setup.sim.stats().logins_ok >= logins + 2
        })
        .await;
    let (_, log) = daemon.stop().await;
    let line = log
        .lines()
        .find(|l| l.contains("did not finish within 1s; killed"))
        .unwrap();
    assert!(
        line.contains("hang.sh") && line.contains("hook failed"),
        "{line}"
    );
    for pid in setup.read("pids").lines() {
        let pid: i32 = pid.parse().unwrap();
        assert_gone(pid, "a hook process").await;
    }
    setup.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_hanging_hook() {
    let setup = Setup::new(Duration::from_secs(3600)).await;
    let pids = setup.path("pids");
    let script = setup.script(
        "hang.sh",
        &format!("echo $$ >> {}\nexec /bin/sleep 60", pids.display()),
    );
    setup.write_config(&format!(
        "[[credentials.hooks]]\non = [\"token\"]\ncommand = [{:?}]\ntimeout = \"60s\"\n",
        script.to_str().unwrap()
    ));
    let mut daemon = setup.spawn(&[]);
    daemon
        .wait_until("the hook to start", |_| !setup.read("pids").is_empty())
        .await;
    let pid: i32 = setup.read("pids").trim().parse().unwrap();
    let (took, log) = daemon.stop().await;
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM took {took:?} with a hook running\n{log}"
    );
    assert_gone(pid, "the hook started before SIGTERM").await;
    setup.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hook_runs_for_the_first_token() {
    // One token for the whole test: each hook has exactly one event to see,
    // however late its task starts after the engine's first login.
    let setup = Setup::new(Duration::from_secs(3600)).await;
    let out = setup.path("hook.out");
    let script = setup.script("ran.sh", &format!("echo \"$1\" >> {}", out.display()));
    let mut hooks = String::new();
    for i in 0..12 {
        hooks.push_str(&format!(
            "[[credentials.hooks]]\non = [\"token\"]\ncommand = [{:?}, \"{i}\"]\n",
            script.to_str().unwrap()
        ));
    }
    setup.write_config(&hooks);
    let mut daemon = setup.spawn(&[]);
    daemon
        .wait_until("all twelve hooks", |_| {
            setup.read("hook.out").lines().count() >= 12
        })
        .await;
    let (_, log) = daemon.stop().await;
    let mut ran: Vec<u32> = setup
        .read("hook.out")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    ran.sort();
    assert_eq!(ran, (0..12).collect::<Vec<_>>(), "{log}");
    setup.sim.shutdown().await;
}

/// `/bin/sleep 60`, whose default action for SIGHUP and SIGUSR1 is to die:
/// its exit status says which signal it got.
fn sleeper() -> Child {
    Command::new("/bin/sleep")
        .arg("60")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn write_pid(path: &Path, child: &Child) {
    rekeyd::fsutil::write_atomic(path, format!("{}\n", child.id().unwrap()).as_bytes(), 0o644)
        .unwrap();
}

async fn killed_by(child: &mut Child, what: &str) -> i32 {
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} was not signalled"))
        .unwrap();
    status
        .signal()
        .unwrap_or_else(|| panic!("{what} exited without a signal: {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_hooks_signal_the_process_in_the_pid_file_read_each_time() {
    let setup = Setup::new(Duration::from_secs(2)).await;
    let hup_pid = setup.path("hup.pid");
    let usr1_pid = setup.path("usr1.pid");
    setup.write_config(&format!(
        r#"[[credentials.hooks]]
on = ["token"]
signal = "HUP"
pid_file = "{}"
[[credentials.hooks]]
on = ["token"]
signal = "SIGUSR1"
pid_file = "{}"
"#,
        hup_pid.display(),
        usr1_pid.display()
    ));
    let mut first = sleeper();
    let mut other = sleeper();
    write_pid(&hup_pid, &first);
    write_pid(&usr1_pid, &other);
    let daemon = setup.spawn(&[]);
    assert_eq!(killed_by(&mut first, "the HUP process").await, libc::SIGHUP);
    assert_eq!(
        killed_by(&mut other, "the USR1 process").await,
        libc::SIGUSR1
    );

    // The process was replaced: the next event signals the new one.
    let mut second = sleeper();
    write_pid(&hup_pid, &second);
    assert_eq!(
        killed_by(&mut second, "the restarted HUP process").await,
        libc::SIGHUP
    );
    let (_, log) = daemon.stop().await;
    assert!(log.contains("hook ran"), "{log}");
    setup.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_hook_runs_after_a_rotation() {
    let setup = Setup::new(Duration::from_secs(3600)).await;
    let out = setup.path("hook.out");
    let script = setup.script(
        "rotated.sh",
        &format!(
            "echo \"$REKEYD_CREDENTIAL $REKEYD_EVENT\" >> {}",
            out.display()
        ),
    );
    setup.write_config(&format!(
        r#"[credentials.rotation]
every = "2s"
grace = "0s"
[[credentials.hooks]]
on = ["rotation"]
command = [{:?}]
"#,
        script.to_str().unwrap()
    ));
    let mut daemon = setup.spawn(&[]);
    // The script's output comes before the daemon logs that it ran: wait
    // for both, or a stop in between would find no "hook ran".
    daemon
        .wait_until("the rotation hook to run and be logged", |d| {
            !setup.read("hook.out").is_empty() && d.log().contains("hook ran")
        })
        .await;
    // The hook runs once the new secret is in use.
    let stats = setup.sim.stats();
    assert!(stats.secrets_created >= 1, "{stats:?}");
    assert!(daemon.log().contains("new secret verified and in use"));
    let (_, log) = daemon.stop().await;
    let text = setup.read("hook.out");
    // Only rotations: the login at start-up is no rotation event.
    for line in text.lines() {
        assert_eq!(line, "maps rotation", "{text}");
    }
    assert!(log.contains("hook ran"), "{log}");
    setup.sim.shutdown().await;
}
