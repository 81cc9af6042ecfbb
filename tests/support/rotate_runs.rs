//! `rekeyd rotate` as a child process, as the key-rotation tests run it:
//! with one crash point armed or none, killed at a chosen moment, and
//! with everything it printed kept, together with every private key the
//! journal held, so that the output can be searched for them (I7).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use rekeyd::store::CredentialRecord;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// How long one run may take before the test fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The runs of `rekeyd rotate app` under one configuration.
pub struct RotateRuns {
    pub config_path: PathBuf,
    /// Environment every run gets (a kubeconfig, say).
    pub env: Vec<(String, PathBuf)>,
    /// Everything the runs printed, in order.
    pub logs: String,
    /// The private member `d` of every key a journal held.
    pub privates: Vec<String>,
}

impl RotateRuns {
    pub fn new(config_path: PathBuf) -> RotateRuns {
        RotateRuns {
            config_path,
            env: Vec::new(),
            logs: String::new(),
            privates: Vec::new(),
        }
    }

    /// `rekeyd rotate app`, logging everything, no crash point armed.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rekeyd"));
        cmd.args(["rotate", "app", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "trace")
            .env_remove("FAILPOINTS")
            // Never the cluster the tests may run in: a fake's kubeconfig
            // in `env`, if any.
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (name, value) in &self.env {
            cmd.env(name, value);
        }
        cmd
    }

    /// One run to its end, with one crash point armed if given; its
    /// output is kept.
    pub async fn rotate(&mut self, failpoint: Option<&str>) -> Output {
        let mut cmd = self.command();
        if let Some(point) = failpoint {
            cmd.env("FAILPOINTS", format!("{point}=return"));
        }
        let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .expect("rekeyd rotate ends in time")
            .unwrap();
        self.logs.push_str(&String::from_utf8_lossy(&out.stderr));
        self.logs.push_str(&String::from_utf8_lossy(&out.stdout));
        out
    }

    /// One run, sent SIGKILL after `delay` unless it ended before; its
    /// output is kept (read as it is written, so a full pipe never holds
    /// the run up).
    pub async fn rotate_killed_after(&mut self, delay: Duration) -> ExitStatus {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = read_all(child.stdout.take().unwrap());
        let stderr = read_all(child.stderr.take().unwrap());
        let status = match tokio::time::timeout(delay, child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => {
                child.start_kill().unwrap();
                tokio::time::timeout(RUN_TIMEOUT, child.wait())
                    .await
                    .expect("a killed run ends")
                    .unwrap()
            }
        };
        for pipe in [stderr, stdout] {
            self.logs
                .push_str(&String::from_utf8_lossy(&pipe.await.unwrap()));
        }
        status
    }

    /// Notes every private key `record` holds, for [`Self::assert_nothing_leaked`].
    pub fn remember_keys(&mut self, record: &CredentialRecord) {
        let entries = [
            Some(&record.current.value),
            record.pending().map(|p| &p.value),
            record.rotation.old().map(|o| &o.value),
            record.chosen(),
        ];
        for value in entries.into_iter().flatten() {
            let d = private_d(value);
            if !self.privates.contains(&d) {
                self.privates.push(d);
            }
        }
    }

    /// I7: no private key, nor any of `secrets`, in anything the runs
    /// printed.
    pub fn assert_nothing_leaked(&self, secrets: &[&str]) {
        assert!(!self.logs.is_empty());
        for d in &self.privates {
            assert!(!self.logs.contains(d), "a private key reached the output");
        }
        for secret in secrets {
            assert!(!self.logs.contains(secret), "a secret reached the output");
        }
    }
}

/// The private member of a stored key (`d`: every key type has one).
pub fn private_d(stored: &SecretString) -> String {
    let jwk: Value = serde_json::from_str(stored.expose_secret()).unwrap();
    jwk["d"].as_str().unwrap().to_string()
}

/// Everything `pipe` carries until its writer is gone.
fn read_all(
    mut pipe: impl tokio::io::AsyncRead + Send + Unpin + 'static,
) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut text = Vec::new();
        pipe.read_to_end(&mut text).await.unwrap();
        text
    })
}
