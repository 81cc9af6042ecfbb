//! Starting an in-process daemon for integration tests.
//! Include with `#[path = "support/daemon.rs"] mod daemon;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rekeyd::config::Config;
use rekeyd::credential::CredentialHandle;
use rekeyd::daemon::{self, Running};
use rekeyd::token::Token;
use tokio_util::sync::CancellationToken;

/// Upper bound for waiting on an event that should happen in seconds; a
/// failure rather than a hang when it does not.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub credentials: Arc<std::collections::BTreeMap<String, CredentialHandle>>,
    pub api_addr: Option<std::net::SocketAddr>,
    pub diag_addr: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Writes `value` to a 0600 file in `dir` and returns its path.
pub fn write_secret(dir: &Path, file: &str, value: &str) -> PathBuf {
    let path = dir.join(file);
    rekeyd::fsutil::write_atomic(&path, value.as_bytes(), 0o600).unwrap();
    path
}

impl TestDaemon {
    /// `config_text` may use `{dir}` for the test's temporary directory.
    pub async fn start_in(dir: tempfile::TempDir, config_text: &str) -> TestDaemon {
        let text = config_text.replace("{dir}", &dir.path().display().to_string());
        let config = Config::from_toml(&text).expect("test config is valid");
        let shutdown = CancellationToken::new();
        let running: Running = daemon::start(&config, shutdown.clone())
            .await
            .expect("daemon starts");
        let credentials = running.credentials();
        let api_addr = running.api_addr;
        let diag_addr = running.diag_addr;
        let task = tokio::spawn(running.wait());
        TestDaemon {
            dir,
            config,
            credentials,
            api_addr,
            diag_addr,
            shutdown,
            task: Some(task),
        }
    }

    pub fn handle(&self, name: &str) -> CredentialHandle {
        self.credentials
            .get(name)
            .expect("credential exists")
            .clone()
    }

    /// The API key the daemon created.
    pub fn api_key(&self) -> String {
        let path = &self.config.api.as_ref().expect("api configured").key_file;
        std::fs::read_to_string(path).unwrap().trim().to_string()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(EVENT_TIMEOUT, task)
                .await
                .expect("daemon stops in time")
                .unwrap();
        }
    }
}

/// Waits until the credential publishes a token for which `accept` holds.
pub async fn wait_token(handle: &CredentialHandle, accept: impl Fn(&Token) -> bool) -> Arc<Token> {
    let mut rx = handle.token.clone();
    let found = tokio::time::timeout(
        EVENT_TIMEOUT,
        rx.wait_for(|t| t.as_ref().is_some_and(|t| accept(t))),
    )
    .await
    .expect("token event within timeout")
    .expect("engine alive");
    found.clone().unwrap()
}

/// Waits until the credential's status satisfies `accept`.
pub async fn wait_status(
    handle: &CredentialHandle,
    accept: impl Fn(&rekeyd::credential::CredentialStatus) -> bool,
) -> rekeyd::credential::CredentialStatus {
    let mut rx = handle.status.clone();
    let found = tokio::time::timeout(EVENT_TIMEOUT, rx.wait_for(|s| accept(s)))
        .await
        .expect("status event within timeout")
        .expect("engine alive");
    found.clone()
}
