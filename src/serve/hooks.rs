//! Hooks: tell the applications beside rekeyd that something changed, by
//! running a program (argv, no shell, with a timeout) or by signalling a
//! process named by a pid file.
//!
//! Each hook runs in its own task fed by the credential's watch channels, so
//! a slow or failing hook never delays a refresh; events that arrive while a
//! hook runs are coalesced into one more run. Neither the token nor the
//! secret is ever passed to a hook: programs read the token files.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::{HookAction, HookConfig, HookEvent};
use crate::credential::CredentialStatus;
use crate::token::Token;

/// Attempts per event before the hook gives up until the next event.
const MAX_ATTEMPTS: u32 = 5;

/// Environment variables of the daemon's own supervisor that a hook must
/// not inherit (a child answering systemd's watchdog would mask a hang).
const PRIVATE_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} exited with {status}")]
    Failed { program: String, status: String },
    #[error("{program} did not finish within {timeout:?}; killed")]
    Timeout { program: String, timeout: Duration },
    #[error("pid file {path}: {reason}")]
    PidFile { path: String, reason: String },
    #[error("cannot signal pid {pid}: {source}")]
    Signal { pid: i32, source: std::io::Error },
}

/// Runs one hook of credential `name` until shutdown.
pub async fn run(
    name: String,
    hook: HookConfig,
    mut tokens: watch::Receiver<Option<Arc<Token>>>,
    mut status: watch::Receiver<CredentialStatus>,
    shutdown: CancellationToken,
) {
    let span = info_span!("credential", name = %name);
    async move {
        // Only changes after start count: no hook for the state we found.
        let mut last_rotated: Option<SystemTime> = status.borrow_and_update().last_rotated_at;
        // `tokens` comes marked with the token current when the credential
        // was launched (none, or the one a reload kept): marking it again
        // here would swallow a first token the engine published before
        // this task got to run.
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = tokens.changed() => {
                    if changed.is_err() { return }
                    let has_token = tokens.borrow_and_update().is_some();
                    (has_token && hook.on.contains(&HookEvent::Token)).then_some(HookEvent::Token)
                }
                changed = status.changed() => {
                    if changed.is_err() { return }
                    let rotated = status.borrow_and_update().last_rotated_at;
                    let new = rotated.is_some() && rotated != last_rotated;
                    last_rotated = rotated;
                    (new && hook.on.contains(&HookEvent::Rotation)).then_some(HookEvent::Rotation)
                }
            };
            let Some(event) = event else { continue };
            if deliver(&name, &hook, event, &shutdown).await.is_none() {
                return;
            }
        }
    }
    .instrument(span)
    .await
}

/// Performs `hook` for `event`, retrying a failure with backoff up to
/// [`MAX_ATTEMPTS`] times, and logs how it went: the last attempt's result,
/// or `None` when `shutdown` came first. Shutdown (or a reload restarting
/// the credential) does not wait out a slow hook: dropping it kills the
/// program (`kill_on_drop`).
pub async fn deliver(
    name: &str,
    hook: &HookConfig,
    event: HookEvent,
    shutdown: &CancellationToken,
) -> Option<Result<(), HookError>> {
    let mut attempt = 1;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return None,
            result = fire(&hook.action, name, event) => result,
        };
        match result {
            Ok(()) => {
                info!(step = "hook", event = event.as_str(), "hook ran");
                return Some(Ok(()));
            }
            Err(e) if attempt < MAX_ATTEMPTS => {
                let wait = retry_delay(attempt);
                warn!(step = "hook", event = event.as_str(), error = %e, attempt, retry_in = ?wait, "hook failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
                attempt += 1;
            }
            Err(e) => {
                warn!(step = "hook", event = event.as_str(), error = %e, attempt, "hook failed; giving up until the next event");
                return Some(Err(e));
            }
        }
    }
}

/// 1 s, 2 s, 4 s, ... up to a minute.
fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(1 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// Performs the hook's action once.
pub async fn fire(
    action: &HookAction,
    credential: &str,
    event: HookEvent,
) -> Result<(), HookError> {
    match action {
        HookAction::Command { argv, timeout } => {
            run_command(argv, *timeout, credential, event).await
        }
        HookAction::Signal {
            signal, pid_file, ..
        } => send_signal(*signal, pid_file),
    }
}

async fn run_command(
    argv: &[String],
    timeout: Duration,
    credential: &str,
    event: HookEvent,
) -> Result<(), HookError> {
    let program = argv[0].clone();
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("REKEYD_CREDENTIAL", credential)
        .env("REKEYD_EVENT", event.as_str())
        // The hook's output could include what it read from a token file:
        // it is not captured into our logs.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for var in PRIVATE_ENV {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        program: program.clone(),
        source,
    })?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(HookError::Failed {
            program,
            status: status.to_string(),
        }),
        Ok(Err(source)) => Err(HookError::Spawn { program, source }),
        Err(_) => {
            let _ = child.kill().await;
            Err(HookError::Timeout { program, timeout })
        }
    }
}

/// The pid file is read at every event: the process may have restarted.
fn send_signal(signal: i32, pid_file: &std::path::Path) -> Result<(), HookError> {
    let pid_err = |reason: String| HookError::PidFile {
        path: pid_file.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(pid_file).map_err(|e| pid_err(e.to_string()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| pid_err(format!("not a process id: {:?}", text.trim())))?;
    // 0, 1 and negative values would signal process groups or init.
    if pid <= 1 {
        return Err(pid_err(format!("refusing to signal pid {pid}")));
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(HookError::Signal {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_caps() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(4));
        assert_eq!(retry_delay(30), Duration::from_secs(60));
    }

    #[test]
    fn refuses_to_signal_init_or_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pid");
        for bad in ["1", "0", "-5", "abc"] {
            std::fs::write(&path, bad).unwrap();
            assert!(send_signal(1, &path).is_err(), "{bad}");
        }
    }
}
