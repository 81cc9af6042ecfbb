//! Sinks: token files, rewritten atomically with the configured mode,
//! owner and group, and Kubernetes Secret keys ([`super::secret_sink`]),
//! written every time the credential gets a new token, in the sink's
//! format ([`crate::format`]). A write that fails (a full or read-only
//! disk, a missing directory, no right to give the file away, an API
//! server that refuses) is retried with backoff until it lands, without
//! waiting for the next token; meanwhile the sink's state (old or expired
//! token, the error) shows in status, `/readyz/{name}` and the metrics.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::secret_sink::SecretWriter;
use crate::clock::Clock;
use crate::config::{Config, ConfigWarning, FileOwner, SinkConfig, SinkFormat, SinkTarget};
use crate::credential::{SinkState, SinkStates};
use crate::format::{RenderError, TokenView};
use crate::fsutil::{self, Ownership};
use crate::token::Token;

/// First retry of a failed write, before jitter.
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest wait between retries: a disk that filled up is usually freed
/// by a person, and each retry costs only a failed open or write.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// The content for `token` in `format` ([`crate::format::render`]).
pub fn render(token: &Token, format: &SinkFormat) -> Result<Vec<u8>, RenderError> {
    crate::format::render(view(token), format)
}

fn view(token: &Token) -> TokenView<'_> {
    TokenView {
        access_token: token.access_token.expose_secret(),
        token_type: &token.token_type,
        expires_at: token.expires_at_wall(),
    }
}

/// Wait before retrying a write that failed `failures` times in a row (1
/// for the first): exponential from [`RETRY_BASE`] up to [`RETRY_MAX`],
/// with half of it jittered by `unit` (uniform in `[0, 1)`) so that many
/// files on one full disk do not retry in step.
pub fn retry_delay(failures: u32, unit: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let cap = RETRY_BASE.saturating_mul(1 << exp).min(RETRY_MAX);
    cap / 2 + (cap / 2).mul_f64(unit)
}

/// Writes every new token of one credential to its sinks until shutdown,
/// retrying failed writes, and publishes each sink's state on `states`.
/// Runs apart from the token engine so a slow or broken disk (or API
/// server) never delays a refresh.
pub async fn run(
    name: String,
    sinks: Vec<SinkConfig>,
    mut tokens: watch::Receiver<Option<Arc<Token>>>,
    states: SinkStates,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) {
    // A reload that restarts the credential keeps what the files hold, so
    // readiness does not flicker while they are written again.
    let previous = states.borrow().clone();
    states.send_replace(
        sinks
            .iter()
            .map(|sink| {
                let target = sink.label();
                previous
                    .iter()
                    .find(|s| s.target == target)
                    .cloned()
                    .unwrap_or_else(|| SinkState::new(target))
            })
            .collect(),
    );
    if sinks.is_empty() {
        return;
    }
    // Token files a killed process left half-written (its temp files),
    // off the runtime's threads like every other file operation here.
    for sink in &sinks {
        if let SinkTarget::File(file) = &sink.target {
            let path = file.path.clone();
            let swept = tokio::task::spawn_blocking(move || fsutil::sweep_dead_temps(&path)).await;
            if let Ok(Ok(n @ 1..)) = swept {
                info!(credential = %name, sink = %file.path.display(), removed = n, "removed temp files of a write a stopped process left behind");
            }
        }
    }
    let span = info_span!("credential", name = %name);
    async move {
        // When each file is to be written next; `None`: it holds the
        // token to write, or there is none. Every file is written once at
        // start, so a changed mode or owner applies at once.
        let mut due: Vec<Option<Instant>> = vec![Some(Instant::now()); sinks.len()];
        let mut writers: Vec<Writer> = sinks.into_iter().map(Writer::new).collect();
        let mut target: Option<Arc<Token>> = None;
        loop {
            let latest = tokens.borrow_and_update().clone();
            if !same(&latest, &target) {
                target = latest;
                let now = Instant::now();
                for (i, state) in states.borrow().iter().enumerate() {
                    if !same(&state.token, &target) {
                        due[i] = Some(now);
                    }
                }
            }
            match target.as_ref().filter(|t| t.is_valid(clock.now())) {
                Some(token) => {
                    // A Secret write waits on the network: shutdown does
                    // not wait for it (a replace lands whole or not at all).
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = write_due(&mut writers, token, &mut due, &states) => {}
                    }
                }
                // A token that is already invalid is never published: the
                // files keep what they hold until a new one arrives.
                None => due.fill(None),
            }
            let next = due.iter().flatten().min().copied();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = tokens.changed() => if changed.is_err() { break },
                _ = sleep_until(next) => {}
            }
        }
    }
    .instrument(span)
    .await
}

/// Both absent, or the same token.
fn same(a: &Option<Arc<Token>>, b: &Option<Arc<Token>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One sink and what writing it needs.
struct Writer {
    sink: SinkConfig,
    /// A Secret sink's API client, built at its first write (so that a
    /// broken kubeconfig is a failed write in status, retried, like a
    /// missing directory).
    client: Option<SecretWriter>,
}

impl Writer {
    fn new(sink: SinkConfig) -> Writer {
        Writer { sink, client: None }
    }

    /// One write of `token`; the error as status shows it.
    async fn write(&mut self, token: &Token) -> Result<(), String> {
        let content = render(token, &self.sink.format).map_err(|e| e.to_string())?;
        match &self.sink.target {
            SinkTarget::File(file) => {
                let path = file.path.clone();
                let mode = file.mode;
                let owner = Ownership {
                    uid: file.owner.as_ref().map(|o| o.id),
                    gid: file.group.as_ref().map(|g| g.id),
                };
                // The write finishes even if shutdown arrives meanwhile: a
                // file is never left half-written (it is atomic anyway, but
                // the fsync counts).
                match tokio::task::spawn_blocking(move || {
                    fsutil::write_atomic_owned(&path, &content, mode, owner)
                })
                .await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("the writer task failed: {e}")),
                }
            }
            SinkTarget::KubernetesSecret(secret) => {
                if self.client.is_none() {
                    self.client = Some(
                        SecretWriter::connect(secret)
                            .await
                            .map_err(|e| e.to_string())?,
                    );
                }
                let client = self.client.as_ref().expect("built above");
                let written = client
                    .write(&content, token.expires_at_wall())
                    .await
                    .map_err(|e| e.to_string())?;
                debug!(step = "sink", target = %client.target(), ?written, "kubernetes Secret key written");
                Ok(())
            }
        }
    }
}

/// Sinks written one after the other: one file, or the keys of one Secret.
struct Lane<'a> {
    /// The Secret's namespace as configured (`None`: the default) and its
    /// name; `None` for a file, which has a lane of its own.
    secret: Option<(Option<String>, String)>,
    writers: Vec<(usize, &'a mut Writer)>,
}

/// Writes `token` to every sink whose time has come; schedules a retry
/// for each that fails. Sinks are written concurrently, each outcome
/// recorded as it lands, so that a Secret write waiting on a slow or hung
/// API server (up to [`super::secret_sink::REQUEST_TIMEOUT`] per request)
/// does not hold up the token files of the same credential. Keys of one
/// Secret are written one after the other: concurrent replaces of one
/// object would only lose to each other (409) and read it again.
async fn write_due(
    writers: &mut [Writer],
    token: &Arc<Token>,
    due: &mut [Option<Instant>],
    states: &SinkStates,
) {
    let now = Instant::now();
    let mut lanes: Vec<Lane> = Vec::new();
    for (i, writer) in writers.iter_mut().enumerate() {
        if due[i].is_none_or(|at| at > now) {
            continue;
        }
        let secret = match &writer.sink.target {
            SinkTarget::File(_) => None,
            SinkTarget::KubernetesSecret(s) => Some((s.namespace.clone(), s.secret.clone())),
        };
        match lanes
            .iter_mut()
            .find(|lane| secret.is_some() && lane.secret == secret)
        {
            Some(lane) => lane.writers.push((i, writer)),
            None => lanes.push(Lane {
                secret,
                writers: vec![(i, writer)],
            }),
        }
    }
    let mut writes: FuturesUnordered<_> = lanes
        .into_iter()
        .map(|lane| async move {
            let mut results = Vec::with_capacity(lane.writers.len());
            for (i, writer) in lane.writers {
                let what = match writer.sink.target {
                    SinkTarget::File(_) => "token file",
                    SinkTarget::KubernetesSecret(_) => "kubernetes Secret key",
                };
                results.push((i, what, writer.write(token).await));
            }
            results
        })
        .collect();
    while let Some(results) = writes.next().await {
        for outcome in results {
            record(outcome, token, due, states);
        }
    }
}

/// Records the outcome of one write of sink `i`: its state, and when it is
/// due again (`None`: written).
fn record(
    (i, what, result): (usize, &str, Result<(), String>),
    token: &Arc<Token>,
    due: &mut [Option<Instant>],
    states: &SinkStates,
) {
    let before = states.borrow()[i].clone();
    let target = &before.target;
    match result {
        Ok(()) => {
            due[i] = None;
            if before.consecutive_failures > 0 {
                info!(step = "sink", path = %target, failed_attempts = before.consecutive_failures, "{what} written after failed attempts");
            } else {
                debug!(step = "sink", path = %target, "{what} written");
            }
            states.send_modify(|s| {
                s[i].token = Some(token.clone());
                s[i].last_written_at = Some(SystemTime::now());
                s[i].consecutive_failures = 0;
                s[i].last_error = None;
            });
        }
        Err(error) => {
            let failures = before.consecutive_failures.saturating_add(1);
            let wait = retry_delay(failures, rand::random::<f64>());
            due[i] = Some(Instant::now() + wait);
            // Once per kind of trouble at WARN, not at every retry.
            if before.last_error.as_deref() != Some(error.as_str()) {
                warn!(step = "sink", path = %target, error = %error, retry_in = ?wait, "cannot write {what}; retrying until it lands");
            } else {
                debug!(step = "sink", path = %target, error = %error, failures, retry_in = ?wait, "{what} still not written");
            }
            states.send_modify(|s| {
                s[i].consecutive_failures = failures;
                s[i].last_error = Some(error);
            });
        }
    }
}

/// What this process may do with file ownership (`chown(2)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    pub uid: u32,
    /// The effective group and the supplementary groups.
    pub gids: Vec<u32>,
    /// CAP_CHOWN in the effective set: any owner and any group.
    pub cap_chown: bool,
}

impl Privileges {
    /// This process's, from the kernel (`/proc/self/status` for the
    /// capability; without it, root counts as having it).
    pub fn of_this_process() -> Privileges {
        // SAFETY: these calls only read the process's credentials.
        let uid = unsafe { libc::geteuid() };
        let mut gids = vec![unsafe { libc::getegid() }];
        // SAFETY: with size 0 getgroups only counts; then the buffer has
        // room for that many.
        let count = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        if count > 0 {
            let mut more = vec![0 as libc::gid_t; count as usize];
            let got = unsafe { libc::getgroups(count, more.as_mut_ptr()) };
            more.truncate(got.max(0) as usize);
            gids.extend(more);
        }
        let cap_chown = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(hex.trim(), 16).ok()
            })
            // CAP_CHOWN is capability 0.
            .map_or(uid == 0, |caps| caps & 1 != 0);
        Privileges {
            uid,
            gids,
            cap_chown,
        }
    }

    /// Why a file could not be given `owner` and `group`, if it could not
    /// (`chown(2)`: another owner, or a group the process is not in, needs
    /// CAP_CHOWN).
    pub fn cannot_give(
        &self,
        owner: Option<&FileOwner>,
        group: Option<&FileOwner>,
    ) -> Option<String> {
        if self.cap_chown {
            return None;
        }
        if let Some(owner) = owner.filter(|o| o.id != self.uid) {
            return Some(format!(
                "rekeyd runs as uid {} without CAP_CHOWN, so it cannot give the file to owner {}",
                self.uid, owner.shown
            ));
        }
        if let Some(group) = group.filter(|g| !self.gids.contains(&g.id)) {
            return Some(format!(
                "rekeyd runs as uid {} without CAP_CHOWN and is not in group {}, so it cannot give the file to it",
                self.uid, group.shown
            ));
        }
        None
    }
}

/// The token files whose `owner` or `group` this process could not set:
/// each write would fail. `rekeyd check` prints them and `rekeyd run` logs
/// them at start; they are warnings, as the daemon may run as another user
/// than the one checking.
pub fn ownership_warnings(config: &Config, me: &Privileges) -> Vec<ConfigWarning> {
    let mut warnings = Vec::new();
    for (i, cred) in config.credentials.iter().enumerate() {
        for (j, sink) in cred.sinks.iter().enumerate() {
            let Some(sink) = sink.file() else { continue };
            if let Some(reason) = me.cannot_give(sink.owner.as_ref(), sink.group.as_ref()) {
                let field = if sink.owner.as_ref().is_some_and(|o| o.id != me.uid) {
                    "owner"
                } else {
                    "group"
                };
                warnings.push(ConfigWarning {
                    key: format!("credentials[{i}].sinks[{j}].{field}"),
                    reason: format!(
                        "{reason}; writing {} will fail until it can (run rekeyd as root, or \
                         give it CAP_CHOWN, e.g. systemd AmbientCapabilities=CAP_CHOWN)",
                        sink.path.display()
                    ),
                });
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(id: u32) -> FileOwner {
        FileOwner {
            id,
            shown: id.to_string(),
        }
    }

    #[test]
    fn giving_files_away_needs_cap_chown_or_membership() {
        let me = Privileges {
            uid: 1000,
            gids: vec![1000, 27],
            cap_chown: false,
        };
        assert_eq!(me.cannot_give(None, None), None);
        assert_eq!(
            me.cannot_give(Some(&principal(1000)), Some(&principal(27))),
            None
        );
        let other_owner = me.cannot_give(Some(&principal(0)), None).unwrap();
        assert!(other_owner.contains("owner 0"), "{other_owner}");
        let other_group = me.cannot_give(None, Some(&principal(33))).unwrap();
        assert!(other_group.contains("group 33"), "{other_group}");
        let root = Privileges {
            uid: 0,
            gids: vec![0],
            cap_chown: true,
        };
        assert_eq!(
            root.cannot_give(Some(&principal(1)), Some(&principal(2))),
            None
        );
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        assert_eq!(retry_delay(1, 0.0), Duration::from_millis(250));
        assert_eq!(retry_delay(1, 0.999_999).as_millis(), 499);
        assert_eq!(retry_delay(2, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(3, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(6, 0.0), Duration::from_secs(5));
        assert_eq!(retry_delay(100, 0.0), Duration::from_secs(5));
        assert!(retry_delay(u32::MAX, 0.999_999) < RETRY_MAX);
    }
}
