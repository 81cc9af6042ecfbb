//! A `rekeyd run` child process for integration tests that need the real
//! binary (signals, exit codes, the notify socket).
//!
//! Include from an integration test with
//! ```ignore
//! #[path = "support/process.rs"]
//! mod process;
//! ```
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_rekeyd");
/// Upper bound for anything that should take seconds.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Shutdown waits at most 5 s for its tasks; the rest is slack.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A `rekeyd run` child (or another subcommand: `spawn_command`), isolated
/// from the caller's REKEYD_*, FAILPOINTS and systemd variables, killed if
/// the test drops it; stderr and stdout go to files.
pub struct RekeydProcess {
    pub child: Child,
    log: PathBuf,
}

impl RekeydProcess {
    pub fn spawn(config: &Path, log: &Path, env: &[(&str, &str)]) -> RekeydProcess {
        RekeydProcess::spawn_command(&["run"], config, log, env)
    }

    /// Like [`RekeydProcess::spawn`], for any subcommand (`["rotate",
    /// "maps"]`): `rekeyd ARGS... --config CONFIG`. `FAILPOINTS` is passed
    /// only when `env` sets it.
    pub fn spawn_command(
        args: &[&str],
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> RekeydProcess {
        RekeydProcess::spawn_command_with_stdin(args, config, log, env, None)
    }

    /// Like [`RekeydProcess::spawn_command`], with stdin read from `stdin`
    /// (`set-secret` reads the secret there) instead of `/dev/null`.
    pub fn spawn_command_with_stdin(
        args: &[&str],
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
        stdin: Option<&Path>,
    ) -> RekeydProcess {
        let mut command = Command::new(BIN);
        command.args(args).arg("--config").arg(config);
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy();
            if n.starts_with("REKEYD")
                || [
                    "NOTIFY_SOCKET",
                    "WATCHDOG_USEC",
                    "WATCHDOG_PID",
                    "FAILPOINTS",
                ]
                .contains(&n.as_ref())
            {
                command.env_remove(&name);
            }
        }
        command
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(match stdin {
                Some(path) => Stdio::from(File::open(path).unwrap()),
                None => Stdio::null(),
            })
            .stdout(File::create(log.with_extension("out")).unwrap())
            .stderr(File::create(log).unwrap())
            .kill_on_drop(true);
        RekeydProcess {
            child: command.spawn().expect("rekeyd starts"),
            log: log.to_path_buf(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the process printed on stdout (next to the log, `.out`).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("out")).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("daemon still running") as i32;
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("rekeyd exited ({status})\n{}", self.log());
        }
    }

    /// One round of a poll for `what`: fails the test if the daemon exited
    /// or `deadline` passed, else sleeps a little.
    pub async fn keep_waiting(&mut self, what: &str, deadline: Instant) {
        self.assert_running();
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            self.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Polls (another process: no in-process signal) until `check` holds.
    pub async fn wait_until(&mut self, what: &str, mut check: impl FnMut(&RekeydProcess) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !check(self) {
            self.keep_waiting(what, deadline).await;
        }
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("rekeyd did not exit in time\n{}", self.log()),
        }
    }

    /// SIGTERM, then asserts exit status 0; returns how long the exit took
    /// and the log.
    pub async fn stop(mut self) -> (Duration, String) {
        self.signal(libc::SIGTERM);
        let started = Instant::now();
        let status = self.wait_exit().await;
        let log = self.log();
        assert_eq!(status.code(), Some(0), "{status}\n{log}");
        (started.elapsed(), log)
    }
}
