//! One-shot runs (`rekeyd run --once`): every credential once, then exit.
//!
//! For each credential, concurrently: finish unfinished rotation work and
//! rotate where the rotation is due or `on_login = true` (under the same
//! rotation claim the daemon takes, waiting for it while another process
//! holds it: I6), log in, write the token files, run the hooks; then one
//! line per credential says what happened. The daemon's own pieces do the
//! work: [`Rotator`](crate::rotation::driver::Rotator), the token
//! [`Engine`](crate::token::engine::Engine)'s login (with its fallback to
//! a pending or old secret), the token-file writer ([`sink::run`]) and the
//! hooks ([`hooks::deliver`]); there is no API listener.
//!
//! The order (rotation first, then the login whose token is written) means
//! the token handed out comes from the secret the journal holds at exit:
//! with `on_login = true` that is the new one, so deleting the old secret
//! cannot cut off the token just written.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::config::{Config, HookAction, HookEvent};
use crate::credential::{self, CredentialChannels, SinkState};
use crate::daemon::{self, DaemonError, Prepared, PreparedProfile, Shared};
use crate::provider::{ErrorKind, ProviderError};
use crate::rotation::driver::{OnceOutcome, Outcome, RotationError};
use crate::serve::{hooks, sink};
use crate::token::Token;
use crate::token::policy;

/// A journal step that must wait longer than this (a grace period, a
/// listing that may lag) is left to the next run or the daemon instead of
/// holding up an init container or a cron job; the default grace period
/// (30 s) is waited for.
pub const MAX_JOURNAL_WAIT: Duration = Duration::from_secs(60);

/// Login attempts when the provider fails transiently (5xx, timeouts). A
/// rejected secret, a quota or a refusal is not retried: the answer would
/// be the same, and some providers count every login (Mappls).
pub const LOGIN_ATTEMPTS: u32 = 3;

/// Writes of a token file before it counts as failed (the daemon's writer
/// retries with 0.5 s, 1 s, ... between them).
pub const SINK_WRITE_ATTEMPTS: u32 = 3;

/// What happened to one credential.
#[derive(Debug, Clone)]
pub struct CredentialReport {
    pub name: String,
    /// A valid token was obtained and every token file holds it.
    pub ok: bool,
    /// What happened, for people: no secret, no token.
    pub detail: String,
}

impl CredentialReport {
    /// `NAME: ok: ...` or `NAME: failed: ...`.
    pub fn line(&self) -> String {
        let verdict = if self.ok { "ok" } else { "failed" };
        format!("{}: {verdict}: {}", self.name, self.detail)
    }
}

/// Runs every credential of `config` once; `stop` (SIGTERM, Ctrl-C) ends
/// the run between steps, never inside a journal write (S4). Errors only
/// for what stops every credential: the configuration (exit 78) and the
/// store; each credential's own trouble is in its report.
pub async fn run(
    config: &Config,
    stop: CancellationToken,
) -> Result<Vec<CredentialReport>, DaemonError> {
    let shared = Shared::open(config, stop.clone()).await?;
    // As the daemon does: everything that can fail because of the
    // configuration happens before anything is written.
    let mut prepared = Vec::with_capacity(config.credentials.len());
    for (i, cred) in config.credentials.iter().enumerate() {
        prepared.push(daemon::prepare(i, cred, &shared).await?);
    }
    let shared = &shared;
    Ok(join_all(prepared.into_iter().map(|p| {
        let span = info_span!("credential", name = %p.config.name);
        credential_and_profiles(p, shared).instrument(span)
    }))
    .await
    .into_iter()
    .flatten()
    .collect())
}

/// The credential's report, then one per token profile (in configuration
/// order). The profiles log in after the credential's journal work, so
/// their tokens too come from the secret the journal holds at exit.
async fn credential_and_profiles(mut p: Prepared, shared: &Shared) -> Vec<CredentialReport> {
    let profiles = std::mem::take(&mut p.profiles);
    let secret_of = p.config.name.clone();
    let mut reports = vec![credential(p, shared).await];
    for profile in profiles {
        let span = info_span!("credential", name = %profile.config.name);
        reports.push(
            token_profile(profile, &secret_of, shared)
                .instrument(span)
                .await,
        );
    }
    reports
}

/// A token profile: a login with the credential's secret and the
/// profile's request, and its token files. No journal work (the
/// credential did it) and no hooks (profiles have none).
async fn token_profile(
    profile: PreparedProfile,
    secret_of: &str,
    shared: &Shared,
) -> CredentialReport {
    let cred = &profile.config;
    let (channels, _handle) = credential::channels(&cred.name, cred.provider.as_str());
    let engine = daemon::engine(
        cred,
        secret_of,
        profile.provider.clone(),
        &shared.store,
        &shared.login_slots,
        channels.clone(),
    );
    let (ok, detail) = match deliver(cred, &engine, &channels, &shared.shutdown).await {
        Ok(written) => (true, written),
        Err(failure) => (false, failure),
    };
    CredentialReport {
        name: cred.name.clone(),
        ok,
        detail: format!("token profile of {secret_of}: {detail}"),
    }
}

/// Logs in with `engine` and writes the token to `cred`'s token files.
/// Says what happened: `Ok` when a valid token is in every file.
async fn deliver(
    cred: &crate::config::CredentialConfig,
    engine: &crate::token::engine::Engine,
    channels: &CredentialChannels,
    stop: &CancellationToken,
) -> Result<String, String> {
    let login = tokio::select! {
        result = login(engine) => result,
        _ = stop.cancelled() => return Err("stopped before a token was obtained".into()),
    };
    let mut token = login.map_err(|e| format!("no token: {e}"))?;
    // The lifetime counts from the reply's arrival, on the clock the sink
    // writer judges validity on.
    token.received_at = channels.clock.now();
    let expires_at = token.expires_at_wall();
    let token = Arc::new(token);
    channels.token.send_replace(Some(token.clone()));

    let files = write_sinks(cred, channels, &token, stop).await;
    let not_written: Vec<String> = files
        .iter()
        .filter(|s| !s.token.as_ref().is_some_and(|t| Arc::ptr_eq(t, &token)))
        .map(|s| {
            format!(
                "token file {} not written: {}",
                s.target,
                s.last_error.as_deref().unwrap_or("stopped")
            )
        })
        .collect();
    if !not_written.is_empty() {
        return Err(not_written.join("; "));
    }
    let expiry = humantime::format_rfc3339_seconds(expires_at);
    Ok(match cred.sinks.len() {
        0 => format!("token obtained (no token files), expires {expiry}"),
        1 => format!("token written to 1 file, expires {expiry}"),
        n => format!("token written to {n} files, expires {expiry}"),
    })
}

async fn credential(p: Prepared, shared: &Shared) -> CredentialReport {
    let name = p.config.name.clone();
    let failed = |detail: String| CredentialReport {
        name: name.clone(),
        ok: false,
        detail,
    };
    if let Some(secret) = p.bootstrap
        && let Err(e) = daemon::store_bootstrap(shared.store.as_ref(), &p.config, secret).await
    {
        return failed(format!("cannot store the initial secret: {e}"));
    }
    if let Some(jwks) = &p.config.jwks
        && let Err(e) = daemon::publish_initial_key(shared.store.as_ref(), &p.config, jwks).await
    {
        return failed(e.to_string());
    }
    let stop = &shared.shutdown;
    let cred = &p.config;

    // The journal first: finish what is unfinished, rotate if asked to.
    let unfinished = match shared.store.load_settled(&cred.name).await {
        Ok(record) => record.is_some_and(|r| r.value.is_unfinished()),
        Err(e) => return failed(format!("cannot read the store: {e}")),
    };
    let mut rotation = None;
    // As in the daemon: an unfinished journal is always finished, whatever
    // the configuration now says about rotations.
    if let Some(secret_api) = p
        .secret_api
        .filter(|_| cred.rotation.is_some() || unfinished)
    {
        let rotator = daemon::rotator(
            cred,
            &p.provider,
            secret_api,
            p.secret_api_bearer.clone(),
            &shared.store,
            None,
        );
        let result = rotator
            .settle_once(cred.rotation.as_ref(), MAX_JOURNAL_WAIT, stop)
            .await;
        if let Err(e) = &result {
            warn!(step = "rotate", error = %e, "rotation stopped; the journal resumes it next time");
        }
        rotation = Some(result);
    }
    let rotation_completed = matches!(&rotation, Some(Ok(o)) if o.rotation_completed);
    let mut parts: Vec<String> = rotation
        .as_ref()
        .map(describe_rotation)
        .into_iter()
        .collect();

    // Then a login with the secret the journal now holds.
    let (channels, _handle) = credential::channels(&cred.name, cred.provider.as_str());
    let engine = daemon::engine(
        cred,
        &cred.name,
        p.provider.clone(),
        &shared.store,
        &shared.login_slots,
        channels.clone(),
    );
    let delivered = deliver(cred, &engine, &channels, stop).await;
    let ok = delivered.is_ok();
    parts.insert(0, delivered.unwrap_or_else(|failure| failure));

    // Hooks last: the programs they run read the token files.
    if ok {
        parts.extend(run_hooks(&p.config, rotation_completed, stop).await);
    }
    CredentialReport {
        name,
        ok,
        detail: parts.join("; "),
    }
}

/// One login the way the engine does it, retried a few times when the
/// provider fails transiently (with the engine's backoff, capped).
async fn login(engine: &crate::token::engine::Engine) -> Result<Token, ProviderError> {
    let mut failures = 0;
    loop {
        let error = match engine.attempt().await {
            Ok(token) => return Ok(token),
            Err(e) => e,
        };
        failures += 1;
        if error.kind != ErrorKind::Transient || failures >= LOGIN_ATTEMPTS {
            return Err(error);
        }
        let wait = policy::retry_delay(
            failures,
            error.kind,
            error.retry_after,
            None,
            rand::random(),
        )
        .min(Duration::from_secs(10));
        warn!(step = "refresh", error = %error, failures, retry_in = ?wait, "login failed; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Writes `token` to every token file with the daemon's writer, waiting
/// until each file holds it or failed [`SINK_WRITE_ATTEMPTS`] times;
/// returns the files' states then.
async fn write_sinks(
    cred: &crate::config::CredentialConfig,
    channels: &CredentialChannels,
    token: &Arc<Token>,
    stop: &CancellationToken,
) -> Vec<SinkState> {
    if cred.sinks.is_empty() {
        return Vec::new();
    }
    let done = CancellationToken::new();
    let writer = tokio::spawn(sink::run(
        cred.name.clone(),
        cred.sinks.clone(),
        channels.token.subscribe(),
        channels.sinks.clone(),
        channels.clock.clone(),
        done.clone(),
    ));
    let settled = |states: &[SinkState]| {
        states.len() == cred.sinks.len()
            && states.iter().all(|s| {
                s.token.as_ref().is_some_and(|t| Arc::ptr_eq(t, token))
                    || s.consecutive_failures >= SINK_WRITE_ATTEMPTS
            })
    };
    tokio::select! {
        _ = channels.sinks.wait_for(settled) => {}
        _ = stop.cancelled() => {}
    }
    done.cancel();
    // A write that has started finishes (the writer never leaves a file
    // half-written); then the states are final.
    let _ = writer.await;
    channels.sinks.borrow().clone()
}

/// Runs each hook for this run's events (a token; a completed rotation),
/// with the daemon's retries. Returns what to report: failures, and how
/// many ran.
async fn run_hooks(
    cred: &crate::config::CredentialConfig,
    rotation_completed: bool,
    stop: &CancellationToken,
) -> Vec<String> {
    let mut ran = 0;
    let mut report = Vec::new();
    for hook in &cred.hooks {
        let events = [
            (true, HookEvent::Token),
            (rotation_completed, HookEvent::Rotation),
        ];
        for (happened, event) in events {
            if !happened || !hook.on.contains(&event) {
                continue;
            }
            match hooks::deliver(&cred.name, hook, event, stop).await {
                Some(Ok(())) => ran += 1,
                Some(Err(e)) => report.push(format!("{} hook failed: {e}", event.as_str())),
                None => report.push(format!(
                    "{} hook {} stopped",
                    event.as_str(),
                    hook_name(&hook.action)
                )),
            }
        }
    }
    match ran {
        0 => {}
        1 => report.insert(0, "1 hook ran".into()),
        n => report.insert(0, format!("{n} hooks ran")),
    }
    report
}

fn hook_name(action: &HookAction) -> String {
    match action {
        HookAction::Command { argv, .. } => argv[0].clone(),
        HookAction::Signal { name, .. } => name.clone(),
    }
}

/// What the journal part of a run did, in words.
fn describe_rotation(result: &Result<OnceOutcome, RotationError>) -> String {
    let once = match result {
        Ok(once) => once,
        Err(RotationError::Shutdown) => {
            return "rotation stopped by shutdown; the journal resumes it next time".into();
        }
        Err(e) => return format!("rotation stopped: {e}; the journal resumes it next time"),
    };
    let mut parts = Vec::new();
    if once.waited_for_claim {
        parts.push("waited for another process's rotation".to_string());
    }
    if let Some((phase, outcome)) = &once.resumed {
        parts.push(match outcome {
            Outcome::Rotated => format!("finished a rotation left unfinished (it was {phase})"),
            Outcome::Aborted => format!(
                "finished a rotation left unfinished (it was {phase}): the provider refused the new secret, the old one is kept"
            ),
            Outcome::Idle => format!("finished unfinished rotation work (it was {phase})"),
        });
    }
    let until = once.waiting_until.map(rfc3339);
    match (&once.began, &until) {
        (Some(Outcome::Rotated), _) => parts.push("rotated the secret".into()),
        (Some(Outcome::Aborted), _) => parts.push(
            "rotation aborted: the provider refused the new secret, the old one is kept".into(),
        ),
        (Some(Outcome::Idle), Some(until)) => parts.push(format!(
            "rotated the secret; the old one is deleted after {until} (grace period) by a later run or the daemon"
        )),
        (Some(Outcome::Idle), None) => parts.push("rotation started".into()),
        (None, Some(until)) => parts.push(format!(
            "the journal waits until {until} (grace period, or a listing that may lag); a later run or the daemon finishes it"
        )),
        (None, None) if once.resumed.is_none() => parts.push("no rotation due".into()),
        (None, None) => {}
    }
    parts.join("; ")
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn once() -> OnceOutcome {
        OnceOutcome {
            waited_for_claim: false,
            resumed: None,
            began: None,
            waiting_until: None,
            phase: "idle",
            rotation_completed: false,
        }
    }

    #[test]
    fn describes_what_the_journal_did() {
        assert_eq!(describe_rotation(&Ok(once())), "no rotation due");
        let rotated = OnceOutcome {
            began: Some(Outcome::Rotated),
            rotation_completed: true,
            ..once()
        };
        assert_eq!(describe_rotation(&Ok(rotated)), "rotated the secret");
        let resumed = OnceOutcome {
            waited_for_claim: true,
            resumed: Some(("created", Outcome::Rotated)),
            ..once()
        };
        assert_eq!(
            describe_rotation(&Ok(resumed)),
            "waited for another process's rotation; finished a rotation left unfinished (it was created)"
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let deferred = OnceOutcome {
            began: Some(Outcome::Idle),
            waiting_until: Some(at),
            phase: "promoted",
            ..once()
        };
        assert_eq!(
            describe_rotation(&Ok(deferred)),
            "rotated the secret; the old one is deleted after 2027-01-15T08:00:00Z (grace period) by a later run or the daemon"
        );
        let e = describe_rotation(&Err(RotationError::NoRecord));
        assert!(e.starts_with("rotation stopped: "), "{e}");
    }

    #[test]
    fn report_lines_name_the_credential_and_the_verdict() {
        let r = CredentialReport {
            name: "maps".into(),
            ok: false,
            detail: "no token: login failed".into(),
        };
        assert_eq!(r.line(), "maps: failed: no token: login failed");
    }
}
