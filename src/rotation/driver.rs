//! Performs the rotation steps the [`machine`](super::machine) decides,
//! against the provider's secret API and the store, and schedules rotations.
//!
//! Every provider call happens after the journal records it (the machine
//! asks for a persist first), so a crash anywhere is resumed from the store.
//! `crash_point!`s mark the moments right after each durable step and each
//! provider call; the crash tests abort the process there.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::machine::{self, Event, Next};
use super::schedule;
use crate::config::{RotationConfig, RotationTrigger};
use crate::credential::CredentialStatus;
use crate::metrics::{self, RotationLabels};
use crate::provider::{Deleted, ErrorKind, ProviderError, SecretApi, TokenProvider};
use crate::store::{CredentialRecord, Rotation, Store, StoreError, Versioned};
use crate::token::Token;

/// Aborts the process at a named point when the `failpoints` feature is on
/// and `FAILPOINTS` names it (`FAILPOINTS=rotation-after-create=return`).
macro_rules! crash_point {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                std::process::abort();
            }
        }
    }};
}

/// Every crash point, for the crash tests.
pub const CRASH_POINTS: &[&str] = &[
    "rotation-after-persist-creating",
    "rotation-after-list",
    "rotation-after-delete-tagged",
    "rotation-after-create",
    "rotation-after-persist-created",
    "rotation-after-verify",
    "rotation-after-persist-promoted",
    "rotation-after-delete-old",
    "rotation-after-persist-idle",
];

/// New secrets can take a while to be accepted everywhere: keep trying the
/// pending secret this long before calling it rejected.
pub const DEFAULT_VERIFY_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("another process is rotating this credential")]
    Busy,
    #[error("the store holds no secret for this credential")]
    NoRecord,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Machine(#[from] machine::InvalidEvent),
    #[error("stopped by shutdown; the journal resumes at the next start")]
    Shutdown,
}

/// How a rotation run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new secret is in use and the old one is gone (or kept, warned).
    Rotated,
    /// The provider refused the new secret; the old one stays.
    Aborted,
    /// There was nothing to do (idle, and no new rotation asked for).
    Idle,
}

pub struct Rotator {
    pub name: String,
    pub client_id: String,
    pub provider: Arc<dyn TokenProvider>,
    pub secret_api: Arc<dyn SecretApi>,
    pub store: Arc<dyn Store>,
    pub grace: Duration,
    pub verify_window: Duration,
    /// Where rotation progress is shown (daemon); `None` for the CLI.
    pub status: Option<watch::Sender<CredentialStatus>>,
}

/// State of one rotation run: the record as last persisted, and a bearer
/// token for the secret API, obtained lazily.
struct Run<'a> {
    rotator: &'a Rotator,
    record: Versioned<CredentialRecord>,
    bearer: Option<Token>,
}

impl Rotator {
    /// Brings the credential to a stable state: finishes an interrupted
    /// rotation, and when `begin` is set and none was interrupted, performs
    /// a new one. `wait_claim`: wait for another process's rotation to end
    /// instead of returning [`RotationError::Busy`].
    pub async fn rotate(
        &self,
        begin: bool,
        wait_claim: bool,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, RotationError> {
        let _claim = self
            .store
            .claim(&self.name, wait_claim)
            .await?
            .ok_or(RotationError::Busy)?;
        // Read after claiming: the previous holder may have moved on.
        let record = self
            .store
            .load(&self.name)
            .await?
            .ok_or(RotationError::NoRecord)?;
        let idle = matches!(record.value.rotation, Rotation::Idle);
        let event = if begin && idle {
            // I2: a full or read-only disk stops us before the provider
            // creates a secret we could not record.
            self.store.check_writable(&self.name).await?;
            let rid = new_rotation_id();
            info!(step = "rotate", rid = %rid, "rotation started");
            Event::Begin { rid }
        } else {
            if !idle {
                info!(
                    step = "rotate",
                    phase = record.value.rotation.phase(),
                    "resuming rotation"
                );
            }
            Event::Resume
        };
        let mut run = Run {
            rotator: self,
            record,
            bearer: None,
        };
        tokio::select! {
            result = run.drive(event) => result,
            _ = shutdown.cancelled() => Err(RotationError::Shutdown),
        }
    }

    fn publish(&self, record: &CredentialRecord) {
        if let Some(at) = record.last_rotated_at {
            metrics::global()
                .last_rotation
                .get_or_create(&metrics::credential(&self.name))
                .set(metrics::unix_seconds(at));
        }
        if let Some(status) = &self.status {
            status.send_modify(|s| {
                s.rotation_phase = record.rotation.phase().to_string();
                s.last_rotated_at = record.last_rotated_at;
            });
        }
    }
}

impl Run<'_> {
    async fn drive(&mut self, first: Event) -> Result<Outcome, RotationError> {
        let r = self.rotator;
        let mut outcome = Outcome::Idle;
        let mut t = machine::step(&self.record.value, first, SystemTime::now(), r.grace)?;
        loop {
            if let Some(w) = &t.warning {
                warn!(step = "rotate", "{w}");
            }
            if t.persist {
                let was = self.record.value.rotation.phase();
                let version = r
                    .store
                    .compare_and_swap(&r.name, Some(self.record.version), &t.record)
                    .await?;
                self.record = Versioned {
                    version,
                    value: t.record.clone(),
                };
                r.publish(&self.record.value);
                match (was, self.record.value.rotation.phase()) {
                    (_, "creating") => crash_point!("rotation-after-persist-creating"),
                    (_, "created") => crash_point!("rotation-after-persist-created"),
                    (_, "promoted") => {
                        crash_point!("rotation-after-persist-promoted");
                        info!(
                            step = "promote",
                            "new secret verified and in use; old secret kept for the grace period"
                        );
                        // Our bearer token came from the old secret.
                        self.bearer = None;
                    }
                    ("promoted", "idle") => {
                        crash_point!("rotation-after-persist-idle");
                        outcome = Outcome::Rotated;
                    }
                    ("created", "idle") => outcome = Outcome::Aborted,
                    _ => {}
                }
            }
            let event = match t.next {
                Next::Stable => {
                    if outcome == Outcome::Rotated {
                        info!(step = "rotate", "rotation complete");
                    }
                    return Ok(outcome);
                }
                Next::DeleteTagged { rid } => {
                    self.delete_tagged(&rid).await?;
                    Event::TaggedDeleted
                }
                Next::Create { rid } => {
                    let description = super::secret_description(&r.name, &rid);
                    let bearer = self.bearer().await?;
                    let new = r.secret_api.create(&bearer, &description).await?;
                    crash_point!("rotation-after-create");
                    info!(step = "create", secret_id = %new.id, "replacement secret created");
                    Event::Created {
                        id: new.id,
                        value: new.value,
                    }
                }
                Next::Verify => self.verify().await?,
                Next::DeletePending { id } => {
                    self.delete(&id).await?;
                    Event::PendingDeleted
                }
                Next::WaitUntil(at) => {
                    let wait = schedule::wait_for(at, SystemTime::now());
                    if !wait.is_zero() {
                        info!(step = "grace", wait = %humantime::format_duration(whole_seconds(wait)), "waiting before deleting the old secret");
                        tokio::time::sleep(wait).await;
                    }
                    Event::GraceOver
                }
                Next::DeleteOld { id } => {
                    let outcome = self.delete(&id).await?;
                    crash_point!("rotation-after-delete-old");
                    info!(step = "delete", secret_id = %id, already_gone = outcome == Deleted::NotFound, "old secret deleted");
                    Event::OldDeleted
                }
            };
            t = machine::step(&self.record.value, event, SystemTime::now(), r.grace)?;
        }
    }

    /// A bearer token from the current secret, logging in when needed.
    async fn bearer(&mut self) -> Result<Token, RotationError> {
        let now = Instant::now();
        if let Some(token) = self
            .bearer
            .as_ref()
            .filter(|t| t.remaining(now) > Duration::from_secs(10))
        {
            return Ok(token.clone());
        }
        let token = self
            .rotator
            .provider
            .login(&self.record.value.current.value)
            .await?;
        self.bearer = Some(token.clone());
        Ok(token)
    }

    /// Deletes our secrets tagged with `rid` (I3); nothing else (I4).
    async fn delete_tagged(&mut self, rid: &str) -> Result<(), RotationError> {
        let r = self.rotator;
        let bearer = self.bearer().await?;
        let listed = r.secret_api.list(&bearer).await?;
        crash_point!("rotation-after-list");
        let ours = listed.into_iter().filter(|s| {
            super::rotation_id_of(&r.name, &s.description) == Some(rid)
                && s.client_id.as_deref().is_none_or(|c| c == r.client_id)
        });
        for secret in ours {
            warn!(step = "recover", secret_id = %secret.id, rid, "deleting a secret from an interrupted rotation (its value was never stored)");
            self.delete(&secret.id).await?;
            crash_point!("rotation-after-delete-tagged");
        }
        Ok(())
    }

    async fn delete(&mut self, id: &str) -> Result<Deleted, RotationError> {
        let bearer = self.bearer().await?;
        Ok(self.rotator.secret_api.delete(&bearer, id).await?)
    }

    /// Logs in with the pending secret, retrying while it propagates.
    /// Only consistent rejection for the whole window counts as rejected;
    /// other errors leave the journal in `created` to be retried.
    async fn verify(&mut self) -> Result<Event, RotationError> {
        let r = self.rotator;
        let pending: SecretString = self
            .record
            .value
            .pending()
            .expect("machine asks to verify only in phase created")
            .value
            .clone();
        let deadline = Instant::now() + r.verify_window;
        let mut delay = Duration::from_millis(250);
        loop {
            match r.provider.login(&pending).await {
                Ok(_) => {
                    crash_point!("rotation-after-verify");
                    info!(step = "verify", "new secret accepted by the provider");
                    return Ok(Event::Verified);
                }
                Err(e) if Instant::now() + delay >= deadline => {
                    return if e.kind == ErrorKind::Rejected {
                        warn!(step = "verify", error = %e, "new secret still rejected after {}", humantime::format_duration(r.verify_window));
                        Ok(Event::VerifyRejected)
                    } else {
                        Err(e.into())
                    };
                }
                Err(e) => {
                    info!(step = "verify", error = %e, "new secret not accepted yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Unique enough to tell rotations apart in descriptions (and short).
fn new_rotation_id() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{secs:x}-{:08x}", rand::random::<u32>())
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs().max(1))
}

/// Runs rotations of one credential when they are due (and when asked via
/// `rotate_now`) until shutdown. An interrupted rotation is resumed first.
pub async fn run_schedule(
    rotator: Arc<Rotator>,
    config: RotationConfig,
    rotate_now: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let span = info_span!("credential", name = %rotator.name);
    async move {
        let mut failures: u32 = 0;
        let mut retry_at: Option<Instant> = None;
        // A request stays pending until a rotation actually ran: another
        // process holding the claim must not swallow it.
        let mut requested = false;
        loop {
            let retry_wait = retry_at.map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()));
            // Re-read every time: `rekeyd rotate` or `set-secret` may have
            // changed the record while we slept.
            let plan = match rotator.store.load(&rotator.name).await {
                Ok(Some(record)) => {
                    rotator.publish(&record.value);
                    let (plan, due_at) =
                        plan(&record.value, &config.trigger, SystemTime::now(), requested, retry_wait);
                    let gauge = metrics::global()
                        .rotation_next_due
                        .get_or_create(&metrics::credential(&rotator.name));
                    gauge.set(due_at.map_or(0.0, metrics::unix_seconds));
                    plan
                }
                Ok(None) => Plan::Wait(Duration::from_secs(60)),
                Err(e) => {
                    warn!(step = "rotate", error = %e, "cannot read the rotation journal");
                    Plan::Wait(retry_wait.max(retry_delay(failures.max(1))))
                }
            };
            let begin = match plan {
                Plan::Rotate { begin } => begin,
                Plan::Wait(wait) => {
                    // Long waits are cut into pieces: the schedule is on the
                    // wall clock, which may jump (suspend, NTP) while we sleep.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait.min(Duration::from_secs(300))) => {}
                        _ = rotate_now.notified() => requested = true,
                    }
                    continue;
                }
            };
            let result = rotator.rotate(begin, false, &shutdown).await;
            let result_label = match &result {
                Ok(Outcome::Rotated) => Some("success"),
                Ok(Outcome::Aborted) => Some("aborted"),
                Ok(Outcome::Idle) | Err(RotationError::Busy | RotationError::Shutdown) => None,
                Err(_) => Some("error"),
            };
            match result {
                Ok(outcome) => {
                    requested = false;
                    let aborted = outcome == Outcome::Aborted;
                    failures = if aborted { failures + 1 } else { 0 };
                    set_rotation_error(
                        &rotator,
                        aborted.then(|| "new secret refused by the provider; rotation aborted".to_string()),
                    );
                }
                Err(RotationError::Shutdown) => return,
                Err(RotationError::Busy) => {
                    info!(step = "rotate", "another process is rotating; checking again shortly");
                    failures = failures.max(1);
                }
                Err(e) => {
                    failures += 1;
                    warn!(step = "rotate", error = %e, failures, "rotation step failed; will resume");
                    set_rotation_error(&rotator, Some(e.to_string()));
                }
            }
            if let Some(result) = result_label {
                let phase = match rotator.store.load(&rotator.name).await {
                    Ok(Some(r)) => r.value.rotation.phase(),
                    _ => "unknown",
                };
                metrics::global()
                    .rotation_attempts
                    .get_or_create(&RotationLabels {
                        credential: rotator.name.clone(),
                        result,
                        phase,
                    })
                    .inc();
            }
            retry_at = (failures > 0).then(|| Instant::now() + retry_delay(failures));
        }
    }
    .instrument(span)
    .await
}

/// What the schedule says to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Run the rotator; `begin`: start a new rotation if none is unfinished.
    Rotate {
        begin: bool,
    },
    Wait(Duration),
}

/// Pure scheduling decision: backoff after failures first, then an
/// unfinished rotation is resumed, a requested one started, or the next
/// scheduled one waited for. Also returns when the next rotation is due.
fn plan(
    record: &CredentialRecord,
    trigger: &RotationTrigger,
    now: SystemTime,
    requested: bool,
    retry_wait: Duration,
) -> (Plan, Option<SystemTime>) {
    let since = record.last_rotated_at.unwrap_or(record.current.created_at);
    let due_at = schedule::next_due(trigger, since);
    let plan = if !retry_wait.is_zero() {
        Plan::Wait(retry_wait)
    } else if !matches!(record.rotation, Rotation::Idle) {
        Plan::Rotate { begin: false }
    } else if requested {
        Plan::Rotate { begin: true }
    } else {
        match due_at {
            Some(at) if at <= now => Plan::Rotate { begin: true },
            Some(at) => Plan::Wait(schedule::wait_for(at, now)),
            None => Plan::Wait(Duration::from_secs(86400)),
        }
    };
    (plan, due_at)
}

/// Backoff between failed rotation attempts: 5 s doubling to 10 min, jittered.
fn retry_delay(failures: u32) -> Duration {
    let cap = Duration::from_secs(5)
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(Duration::from_secs(600));
    cap.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

fn set_rotation_error(rotator: &Rotator, error: Option<String>) {
    if let Some(status) = &rotator.status {
        status.send_modify(|s| s.last_rotation_error = error);
    }
}

/// Checks a secret value against the provider before it is installed by
/// hand (`rekeyd set-secret`).
pub async fn check_secret(
    provider: &dyn TokenProvider,
    secret: &SecretString,
) -> Result<(), ProviderError> {
    provider.login(secret).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SecretEntry;

    fn record(created: SystemTime, rotation: Rotation) -> CredentialRecord {
        CredentialRecord {
            current: SecretEntry {
                id: None,
                value: SecretString::from("v"),
                created_at: created,
            },
            rotation,
            last_rotated_at: None,
        }
    }

    #[test]
    fn plan_follows_schedule_requests_and_backoff() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = RotationTrigger::Every(Duration::from_secs(3600));
        let idle = record(t0, Rotation::Idle);
        let (p, due) = plan(&idle, &hour, t0, false, Duration::ZERO);
        assert_eq!(p, Plan::Wait(Duration::from_secs(3600)));
        assert_eq!(due, Some(t0 + Duration::from_secs(3600)));
        // Overdue (e.g. while rekeyd was down): now.
        let (p, _) = plan(
            &idle,
            &hour,
            t0 + Duration::from_secs(7200),
            false,
            Duration::ZERO,
        );
        assert_eq!(p, Plan::Rotate { begin: true });
        // Requested: now, unless backing off.
        assert_eq!(
            plan(&idle, &hour, t0, true, Duration::ZERO).0,
            Plan::Rotate { begin: true }
        );
        let backoff = Duration::from_secs(5);
        assert_eq!(plan(&idle, &hour, t0, true, backoff).0, Plan::Wait(backoff));
        // Unfinished: resume without starting another.
        let creating = record(t0, Rotation::Creating { rid: "r".into() });
        assert_eq!(
            plan(&creating, &hour, t0, false, Duration::ZERO).0,
            Plan::Rotate { begin: false }
        );
        // Manual trigger: never by schedule.
        assert_eq!(
            plan(&idle, &RotationTrigger::Manual, t0, false, Duration::ZERO),
            (Plan::Wait(Duration::from_secs(86400)), None)
        );
    }

    #[test]
    fn rotation_ids_differ() {
        assert_ne!(new_rotation_id(), new_rotation_id());
        assert!(!new_rotation_id().contains(':'));
    }

    #[test]
    fn retry_delay_is_bounded() {
        for f in 1..40 {
            let d = retry_delay(f);
            assert!(
                d >= Duration::from_millis(2500) && d <= Duration::from_secs(600),
                "{d:?}"
            );
        }
    }

    #[test]
    fn secret_values_never_in_debug() {
        let e = Event::Created {
            id: "x".into(),
            value: SecretString::from("topsecret"),
        };
        assert!(!format!("{e:?}").contains("topsecret"));
    }
}
