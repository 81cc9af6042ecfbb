//! Performs the rotation steps the [`machine`](super::machine) decides,
//! against the provider's secret API and the store, and schedules rotations.
//!
//! Every provider call happens after the journal records it (the machine
//! asks for a persist first), so a crash anywhere is resumed from the store.
//! `crash_point!`s mark the moments right after each durable step and each
//! provider call; the crash tests abort the process there.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use secrecy::SecretString;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use super::machine::{self, Event, Next};
use super::schedule::ExpiryState;
use super::{expiry, schedule, verify};
use crate::clock::{self, Clock};
use crate::config::RotationConfig;
use crate::credential::CredentialStatus;
use crate::history::{self, Step};
use crate::metrics::{self, RotationLabels};
use crate::provider::key;
use crate::provider::redact::escape_controls;
use crate::provider::{
    CreateRequest, Deleted, ErrorKind, ProviderError, RemoteSecret, Retire, SecretApi,
    TokenProvider, ValueOrigin,
};
use crate::store::{
    Claim, CredentialRecord, RegistrationToken, Store, StoreError, Versioned, sha256_hex,
};
use crate::token::Token;
use crate::token::engine::SecretSource;

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

/// Crash points reached only with other secret APIs than MapsIndoors':
/// between an Okta secret's deactivation and its delete.
pub const PROVIDER_CRASH_POINTS: &[&str] = &["rotation-after-deactivate"];

/// Every crash point on the MapsIndoors path, for the crash tests.
pub const CRASH_POINTS: &[&str] = &[
    "rotation-after-persist-creating",
    "rotation-after-list",
    "rotation-after-delete-tagged",
    "rotation-after-create",
    "rotation-after-persist-created",
    "rotation-after-verify",
    "rotation-after-persist-promoted",
    "rotation-after-persist-retire",
    "rotation-after-delete-old",
    "rotation-after-persist-idle",
];

/// New secrets can take a while to be accepted everywhere: keep trying the
/// pending secret this long before calling it rejected.
pub const DEFAULT_VERIFY_WINDOW: Duration = crate::config::DEFAULT_VERIFY_WINDOW;

/// Lost compare-and-swaps in one run before it gives up (to be resumed
/// later): each one means another actor moved the journal on.
const MAX_CONFLICTS: u32 = 5;

/// After a refusal that only an operator can lift (the provider's secret
/// API will not create another secret, a wrong customer, a scope the
/// client may not have), try again this rarely (jittered by up to half
/// less): the provider would answer the same sooner. A rotation request
/// (`rekeyd rotate`, SIGUSR1, the API) retries at once.
pub const NEEDS_OPERATOR_RETRY: Duration = Duration::from_secs(30 * 60);

/// The wall clock the journal's times come from (grace periods, creation
/// times). A function so that tests can run the driver on a simulated clock.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system's wall clock.
pub fn system_clock() -> WallClock {
    Arc::new(SystemTime::now)
}

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
    /// S3: the claim may have lapsed; another actor may be working.
    #[error("the rotation claim lapsed; stopped before the next step, the journal resumes later")]
    ClaimLost,
}

/// Why a new rotation begins: the `detail` of its `started` entry in the
/// rotation history, and for [`StartReason::Forced`] a `forced` entry
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartReason {
    /// The schedule (`every`, `schedule`) says it is due.
    Schedule,
    /// An operator asked: SIGUSR1, `rekeyd rotate`, `POST /v1/rotate/{name}`.
    Forced,
    /// `on_login = true` (`rekeyd run --once`).
    OnLogin,
    /// The current secret is older than `max_secret_age`.
    MaxSecretAge,
    /// The provider expires the current secret soon (Entra `endDateTime`):
    /// due `before_expiry` before that, whatever the trigger.
    ProviderExpiry,
}

impl StartReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StartReason::Schedule => "schedule",
            StartReason::Forced => "forced",
            StartReason::OnLogin => "on_login",
            StartReason::MaxSecretAge => "max_secret_age",
            StartReason::ProviderExpiry => "provider_expiry",
        }
    }
}

/// How a rotation run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new secret is in use and the old one is gone (or kept, warned).
    Rotated,
    /// The provider refused the new secret; the old one stays.
    Aborted,
    /// There was nothing to do (idle, and no new rotation asked for), or
    /// only leftovers to clean up.
    Idle,
}

/// What [`Rotator::settle_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnceOutcome {
    /// Another process (the daemon, `rekeyd rotate`) held the rotation
    /// claim, and this run waited for it to let go.
    pub waited_for_claim: bool,
    /// Unfinished work found in the journal: its phase then, and how
    /// finishing it ended.
    pub resumed: Option<(&'static str, Outcome)>,
    /// A rotation this run began, and how it ended. [`Outcome::Idle`]
    /// with [`OnceOutcome::waiting_until`] set: the new secret is in use
    /// (promoted); deleting the old one waits for its grace period.
    pub began: Option<Outcome>,
    /// The journal's next step waits until then (a grace period, or a
    /// listing that may lag): left to a later run or the daemon.
    pub waiting_until: Option<SystemTime>,
    /// The journal's phase at the end (`idle`, `promoted`, ...).
    pub phase: &'static str,
    /// A rotation completed during this run (`last_rotated_at` moved): the
    /// `rotation` hooks' event.
    pub rotation_completed: bool,
}

/// Where the secret API's bearer token comes from when it is not the
/// credential's own: `secret_api_credential`, an administrative client.
pub trait BearerSource: Send + Sync {
    fn token(&self) -> BoxFuture<'_, Result<Token, ProviderError>>;

    /// For an RFC 7592 registration: the `access_token_file` whose content
    /// a registration access token the server hands out descends from
    /// ([`RegistrationToken::file_sha256`]).
    fn registration_file(&self) -> Option<&Path> {
        None
    }
}

/// The registration access token of an RFC 7592 client (RFC 7592 §3): the
/// one the last update returned, which the store holds, unless the
/// operator has put another one in `access_token_file` since (a file
/// whose digest is not the stored token's origin).
pub struct RegistrationBearer {
    pub access_token_file: PathBuf,
    pub store: Arc<dyn Store>,
    /// The credential whose record holds the token.
    pub name: String,
}

impl RegistrationBearer {
    /// The token to use now: the stored one while the file still holds
    /// what it descends from (or cannot be read), else the file's.
    async fn current(&self) -> Result<SecretString, ProviderError> {
        let op = "registration access token";
        let record = self
            .store
            .load(&self.name)
            .await
            .map_err(|e| ProviderError::transient(op, e.to_string()))?;
        let stored = record.and_then(|r| r.value.registration);
        match (read_token_file(&self.access_token_file), stored) {
            (Ok(file), Some(stored)) if sha256_hex(&file) != stored.file_sha256 => Ok(file),
            (_, Some(stored)) => Ok(stored.value),
            (Ok(file), None) => Ok(file),
            (Err(e), None) => Err(ProviderError::transient(
                op,
                format!("cannot read {}: {e}", self.access_token_file.display()),
            )),
        }
    }
}

/// A token file's content without surrounding white space (a trailing
/// newline is what an editor or `echo` leaves); empty is an error.
pub fn read_token_file(path: &Path) -> Result<SecretString, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(SecretString::from(text.to_string()))
}

impl BearerSource for RegistrationBearer {
    fn token(&self) -> BoxFuture<'_, Result<Token, ProviderError>> {
        Box::pin(async move {
            let value = self.current().await?;
            // The token does not expire by itself (RFC 7592 §3 gives it no
            // lifetime); a day keeps the run's cache from deciding anything.
            Ok(Token::new(
                value,
                "Bearer".into(),
                None,
                Duration::from_secs(86400),
            ))
        })
    }

    fn registration_file(&self) -> Option<&Path> {
        Some(&self.access_token_file)
    }
}

/// No bearer at all: for a secret API that calls no server, the JWK Set
/// rekeyd publishes itself ([`crate::provider::jwks_publish`], written
/// with rekeyd's own rights). A rotation then never logs in with the
/// current key before it publishes, so it can repair a set that lost the
/// key in use (a hand edit, a revert): the new key is published, proven
/// and promoted while the lost one is not there to log in with.
pub struct NoBearer;

impl BearerSource for NoBearer {
    fn token(&self) -> BoxFuture<'_, Result<Token, ProviderError>> {
        Box::pin(async {
            Ok(Token::new(
                SecretString::from(String::new()),
                "Bearer".into(),
                None,
                Duration::from_secs(86400),
            ))
        })
    }
}

/// A token of another credential (or token profile), logged in with the
/// secret the store holds for it: its current one, else (refused) the
/// pending or old one of its own rotation, as its token engine would.
pub struct LoginBearer {
    pub provider: Arc<dyn TokenProvider>,
    pub secrets: Arc<dyn SecretSource>,
}

impl BearerSource for LoginBearer {
    fn token(&self) -> BoxFuture<'_, Result<Token, ProviderError>> {
        Box::pin(async move {
            let secrets = self
                .secrets
                .secrets()
                .await
                .map_err(|e| ProviderError::transient("secret_api_credential login", e))?;
            for secret in [&secrets.pending, &secrets.old].into_iter().flatten() {
                self.provider.remember(secret);
            }
            let mut result = self.provider.login(&secrets.current).await;
            for fallback in [&secrets.pending, &secrets.old].into_iter().flatten() {
                match &result {
                    Err(e) if e.kind == ErrorKind::Rejected => {
                        result = self.provider.login(fallback).await;
                    }
                    _ => break,
                }
            }
            result
        })
    }
}

pub struct Rotator {
    pub name: String,
    pub client_id: String,
    pub provider: Arc<dyn TokenProvider>,
    pub secret_api: Arc<dyn SecretApi>,
    /// `None`: the secret API takes the credential's own token.
    pub secret_api_bearer: Option<Arc<dyn BearerSource>>,
    pub store: Arc<dyn Store>,
    pub grace: Duration,
    pub verify_window: Duration,
    /// Where rotation progress is shown (daemon); `None` for the CLI.
    pub status: Option<watch::Sender<CredentialStatus>>,
    /// The credential's token engine, asked to log in again right after a
    /// promotion (S5), so consumers hold a token of the new secret before
    /// the old one goes. `None` for the CLI.
    pub refresh_now: Option<Arc<Notify>>,
    pub clock: WallClock,
}

/// State of one rotation run: the record as last persisted, and a bearer
/// token for the secret API, obtained lazily.
struct Run<'a> {
    rotator: &'a Rotator,
    record: Versioned<CredentialRecord>,
    bearer: Option<Token>,
    /// Held for the whole run; released when the run ends.
    claim: Box<dyn Claim>,
    /// Cancelled when the claim is lost (S3).
    lost: CancellationToken,
    /// Shutdown, reload or Ctrl-C.
    stop: &'a CancellationToken,
    /// A journal step that must wait longer than this (a grace period, a
    /// listing that may lag) ends the run instead, leaving the wait to a
    /// later run: one-shot runs ([`Rotator::settle_once`]). `None`: wait.
    max_wait: Option<Duration>,
    /// Set when the run ended at such a wait: when the step may go on.
    waiting_until: Option<SystemTime>,
    /// Why this run begins a rotation, until its `started` step is
    /// recorded in the history.
    reason: Option<StartReason>,
    /// A registration access token a list or delete call returned (RFC
    /// 7592 §3), until a journal write holds it: the next transition
    /// carries it, whatever it is, so it is stored before the next call.
    renewed_registration: Option<RegistrationToken>,
    /// Committed steps not yet in the history, in commit order, each batch
    /// with the time of its step ([`Run::record_history`]).
    history: Vec<(SystemTime, Vec<history::Event>)>,
}

impl Rotator {
    /// Brings the credential to a stable state: finishes unfinished work in
    /// the journal, and when `begin` is set and there was none, performs a
    /// new rotation. `wait_claim`: wait for another process's rotation to end
    /// instead of returning [`RotationError::Busy`].
    ///
    /// `stop` ends the run between steps and interrupts provider calls and
    /// waits, never a journal write (S4): a write that has started lands or
    /// fails before this returns, so the claim is never released under it.
    ///
    /// A rotation begun here is recorded as forced (an operator's
    /// request); [`Rotator::rotate_for`] names another reason.
    pub async fn rotate(
        &self,
        begin: bool,
        wait_claim: bool,
        stop: &CancellationToken,
    ) -> Result<Outcome, RotationError> {
        self.rotate_for(begin.then_some(StartReason::Forced), wait_claim, stop)
            .await
    }

    /// [`Rotator::rotate`], beginning a new rotation (when idle) for
    /// `begin`'s reason, or only finishing unfinished work when `None`.
    pub async fn rotate_for(
        &self,
        begin: Option<StartReason>,
        wait_claim: bool,
        stop: &CancellationToken,
    ) -> Result<Outcome, RotationError> {
        let claim = tokio::select! {
            claim = self.store.claim(&self.name, wait_claim) => claim?.ok_or(RotationError::Busy)?,
            _ = stop.cancelled() => return Err(RotationError::Shutdown),
        };
        let mut run = self.start_run(claim, stop, None).await?;
        let idle = !run.record.value.is_unfinished();
        let event = if let Some(reason) = begin.filter(|_| idle) {
            run.reason = Some(reason);
            self.begin_event(&run.record.value).await?
        } else {
            if !idle {
                run.announce_resume();
            }
            Event::Resume
        };
        run.drive(event).await
    }

    /// What a one-shot run (`rekeyd run --once`) does with the journal,
    /// under one claim taken as the daemon takes it (waiting for another
    /// process's rotation to end, I6): finishes unfinished work first,
    /// then begins a new rotation when `rotation` says one is due now or
    /// asks for one at every login (`on_login`). Decided on the record
    /// read under the claim, so a rotation another process just finished
    /// is not repeated because it was due when this run started.
    ///
    /// Never sleeps on the journal for longer than `max_wait`: a grace
    /// period or a lagging listing that ends later is left in the journal
    /// (old secrets stay valid and known to it, I1/I3) for the next run or
    /// the daemon, and [`OnceOutcome::waiting_until`] says until when.
    /// `stop` behaves as in [`Rotator::rotate`].
    pub async fn settle_once(
        &self,
        rotation: Option<&RotationConfig>,
        max_wait: Duration,
        stop: &CancellationToken,
    ) -> Result<OnceOutcome, RotationError> {
        let claim = match self.store.claim(&self.name, false).await? {
            Some(claim) => (claim, false),
            None => tokio::select! {
                claim = self.store.claim(&self.name, true) => (claim?.ok_or(RotationError::Busy)?, true),
                _ = stop.cancelled() => return Err(RotationError::Shutdown),
            },
        };
        let (claim, waited_for_claim) = claim;
        let mut run = self.start_run(claim, stop, Some(max_wait)).await?;
        let rotated_before = run.record.value.last_rotated_at;
        let mut once = OnceOutcome {
            waited_for_claim,
            resumed: None,
            began: None,
            waiting_until: None,
            phase: "idle",
            rotation_completed: false,
        };
        if run.record.value.is_unfinished() {
            let phase = run.record.value.phase();
            run.announce_resume();
            let outcome = run.drive(Event::Resume).await?;
            once.resumed = Some((phase, outcome));
        }
        let resumed_ok = once
            .resumed
            .as_ref()
            .is_none_or(|(_, outcome)| *outcome != Outcome::Aborted);
        let begin = rotation
            .filter(|_| run.waiting_until.is_none() && resumed_ok)
            .and_then(|r| {
                if r.on_login {
                    return Some(StartReason::OnLogin);
                }
                match plan(
                    &run.record.value,
                    Some(r),
                    (self.clock)(),
                    false,
                    Duration::ZERO,
                )
                .0
                {
                    Plan::Rotate { begin } => begin,
                    Plan::Wait(_) => None,
                }
            });
        if let Some(reason) = begin {
            run.reason = Some(reason);
            let event = self.begin_event(&run.record.value).await?;
            once.began = Some(run.drive(event).await?);
        }
        once.waiting_until = run.waiting_until;
        once.phase = run.record.value.phase();
        once.rotation_completed = run.record.value.last_rotated_at != rotated_before;
        Ok(once)
    }

    /// Lists the provider's secrets once to learn when the current secret
    /// expires, where the API states expiries and the journal knows the
    /// secret's id but not its expiry ([`expiry::worth_listing`]: the
    /// bootstrap secret named by `initial_secret_id`). No call at all for
    /// an API that states no expiry (MapsIndoors), nor once the expiry is
    /// known. Under the claim if it is free (another actor holding it
    /// lists too, and learns the same); the expiry is written with the
    /// journal's compare-and-swap. `Ok(true)`: learnt and recorded.
    pub async fn learn_expiry(&self, stop: &CancellationToken) -> Result<bool, RotationError> {
        if !self.secret_api.lists_expiry() {
            return Ok(false);
        }
        // Read first: most starts have nothing to learn, and take no claim.
        let worth = |r: &CredentialRecord| expiry::worth_listing(r, true);
        match self.store.load_settled(&self.name).await? {
            Some(record) if worth(&record.value) => {}
            _ => return Ok(false),
        }
        let Some(claim) = self.store.claim(&self.name, false).await? else {
            return Ok(false);
        };
        let mut run = self.start_run(claim, stop, None).await?;
        if !worth(&run.record.value) {
            return Ok(false);
        }
        run.check_go()?;
        let bearer = run.bearer().await?;
        let listed = run.guard(self.secret_api.list(&bearer)).await??;
        Ok(run.learn_expiry(&listed).await)
    }

    /// Reads the journal under `claim` and sets up a run on it.
    async fn start_run<'a>(
        &'a self,
        claim: Box<dyn Claim>,
        stop: &'a CancellationToken,
        max_wait: Option<Duration>,
    ) -> Result<Run<'a>, RotationError> {
        // Read after claiming: the previous holder may have moved on.
        let record = self
            .store
            .load_settled(&self.name)
            .await?
            .ok_or(RotationError::NoRecord)?;
        self.remember_secrets(&record.value);
        Ok(Run {
            rotator: self,
            record,
            bearer: None,
            lost: claim.lost(),
            claim,
            stop,
            max_wait,
            waiting_until: None,
            reason: None,
            renewed_registration: None,
            history: Vec::new(),
        })
    }

    /// The event that starts a new rotation of `record`, once the store
    /// has shown it can record one.
    async fn begin_event(&self, record: &CredentialRecord) -> Result<Event, RotationError> {
        // I2: a full or read-only disk stops us before the provider
        // creates a secret we could not record.
        self.store.check_writable(&self.name).await?;
        let rid = new_rotation_id();
        info!(step = "rotate", rid = %rid, "rotation started");
        let chosen = match self.secret_api.capabilities().value {
            ValueOrigin::Caller { alphabet } => Some(crate::provider::generate_value(alphabet)),
            ValueOrigin::Key => {
                // The same type as the current key: the server accepts it
                // (its registration names the signing algorithm).
                let alg = key::from_secret(&record.current.value)
                    .map(|k| k.alg())
                    .unwrap_or(key::Alg::Es256);
                let next = key::generate(alg).map_err(|e| {
                    RotationError::Provider(ProviderError::transient(
                        "key generation",
                        e.to_string(),
                    ))
                })?;
                Some(next.to_secret())
            }
            ValueOrigin::Server => None,
        };
        Ok(Event::Begin { rid, chosen })
    }

    /// I7: a refusal of the secret API may echo any secret of the journal,
    /// not only one this process has sent or been given yet.
    fn remember_secrets(&self, record: &CredentialRecord) {
        let old = record.rotation.old();
        for entry in [Some(&record.current), record.pending(), old]
            .into_iter()
            .flatten()
        {
            self.provider.remember(&entry.value);
        }
        if let Some(chosen) = record.chosen() {
            self.provider.remember(chosen);
        }
    }

    fn context(&self) -> machine::Context<'_> {
        machine::Context {
            now: (self.clock)(),
            grace: self.grace,
            credential: &self.name,
            client_id: &self.client_id,
            caps: self.secret_api.capabilities(),
        }
    }

    fn publish(&self, record: &CredentialRecord) {
        let label = metrics::credential(&self.name);
        if let Some(at) = record.last_rotated_at {
            metrics::global()
                .last_rotation
                .get_or_create(&label)
                .set(metrics::unix_seconds(at));
        }
        metrics::global()
            .secret_created
            .get_or_create(&label)
            .set(metrics::unix_seconds(record.current.created_at));
        match record.current.expires_at {
            Some(at) => {
                metrics::global()
                    .secret_expiry
                    .get_or_create(&label)
                    .set(metrics::unix_seconds(at));
            }
            None => {
                metrics::global().secret_expiry.remove(&label);
            }
        }
        if let Some(status) = &self.status {
            status.send_modify(|s| {
                s.secret_expires_at = record.current.expires_at;
                s.rotation_phase = record.phase().to_string();
                s.rotation_waiting_for = super::waiting_for(record, &self.name);
                s.last_rotated_at = record.last_rotated_at;
                if let Some(auth) = &mut s.client_auth {
                    auth.follow(&record.current);
                }
            });
        }
    }
}

impl Run<'_> {
    fn announce_resume(&self) {
        info!(
            step = "rotate",
            phase = self.record.value.phase(),
            retiring = self.record.value.retire.len(),
            "resuming unfinished rotation work"
        );
    }

    /// Runs the journal from `first` until it rests or must wait; returns
    /// once the history has every step this run committed (still under
    /// the claim, so another process appends after them, never between).
    async fn drive(&mut self, first: Event) -> Result<Outcome, RotationError> {
        let outcome = self.drive_steps(first).await;
        if outcome.is_err() {
            self.store_renewed_registration().await;
        }
        self.flush_history().await;
        outcome
    }

    /// A call that replaced the registration access token and then failed
    /// (or a run stopped before its next write) leaves the new token in
    /// memory only: stored now, in the record as it is, so the next run
    /// sends the token that works. A lost swap reads and tries again.
    async fn store_renewed_registration(&mut self) {
        let r = self.rotator;
        for _ in 0..MAX_CONFLICTS {
            let Some(token) = self.renewed_registration.clone() else {
                return;
            };
            let mut next = self.record.value.clone();
            next.registration = Some(token);
            match r
                .store
                .compare_and_swap(&r.name, Some(self.record.version), &next)
                .await
            {
                Ok(version) => {
                    self.record = Versioned {
                        version,
                        value: next,
                    };
                    self.renewed_registration = None;
                    return;
                }
                Err(StoreError::Conflict { .. }) => match r.store.load_settled(&r.name).await {
                    Ok(Some(record)) => self.record = record,
                    _ => break,
                },
                Err(_) => break,
            }
        }
        error!(
            step = "rotate",
            "a new registration access token the server returned could not be stored; the management channel may be lost (put a new token in access_token_file)"
        );
    }

    /// Queues the history entries of a step whose journal write has landed
    /// (never before: the history shows no step the journal does not
    /// hold). They are written when the run pauses or ends
    /// ([`Run::flush_history`]): one history write for the steps in
    /// between instead of one per step, which doubled the cost of a
    /// rotation on a busy disk (BENCHMARKS.md "Rotation"). A crash loses
    /// the queued entries only; the journal has the steps.
    fn record_history(&mut self, events: Vec<history::Event>) {
        if !events.is_empty() {
            self.history.push(((self.rotator.clock)(), events));
        }
    }

    /// Appends the queued entries to the history; called before the run
    /// sleeps and when it ends.
    async fn flush_history(&mut self) {
        if self.history.is_empty() {
            return;
        }
        let batches = std::mem::take(&mut self.history);
        let r = self.rotator;
        history::record_batches(r.store.as_ref(), &r.name, &batches).await;
    }

    async fn drive_steps(&mut self, first: Event) -> Result<Outcome, RotationError> {
        let r = self.rotator;
        let mut outcome = Outcome::Idle;
        let mut conflicts = 0;
        let mut t = machine::step(&self.record.value, first, &r.context())?;
        loop {
            if let Some(token) = &self.renewed_registration {
                // The token the last call was sent with is dead (RFC 7592
                // §3): whatever this step is, its write stores the new one
                // before any further call.
                t.record.registration = Some(token.clone());
                t.persist = true;
            }
            for w in &t.warnings {
                // They quote ids and client ids the provider listed.
                warn!(step = "rotate", "{}", escape_controls(w));
            }
            if t.persist {
                let was = self.record.value.rotation.phase();
                // Not raced against `stop` or the claim (S4): a write that
                // has started is waited for, so whoever reads next sees it.
                let written = r
                    .store
                    .compare_and_swap(&r.name, Some(self.record.version), &t.record)
                    .await;
                let version = match written {
                    Ok(version) => version,
                    Err(StoreError::Conflict { .. }) if conflicts < MAX_CONFLICTS => {
                        // S1: another actor wrote since we read. Act on
                        // nothing we did not just write: read and decide again.
                        conflicts += 1;
                        info!(
                            step = "rotate",
                            "the journal changed under this run; reading it again"
                        );
                        self.record = r
                            .store
                            .load_settled(&r.name)
                            .await?
                            .ok_or(RotationError::NoRecord)?;
                        r.remember_secrets(&self.record.value);
                        r.publish(&self.record.value);
                        // The current secret may have changed.
                        self.bearer = None;
                        t = machine::step(&self.record.value, Event::Resume, &r.context())?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                self.record = Versioned {
                    version,
                    value: t.record.clone(),
                };
                self.renewed_registration = None;
                r.publish(&self.record.value);
                // After the write that commits them (see crate::history).
                let events = self.audit_events(&t.audit);
                self.record_history(events);
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
                        // S5: consumers get a token of the new secret now,
                        // which also proves it once more.
                        if let Some(refresh) = &r.refresh_now {
                            refresh.notify_one();
                        }
                    }
                    ("promoted", "idle") => crash_point!("rotation-after-persist-retire"),
                    ("idle", "idle") if t.next == Next::Stable => {
                        crash_point!("rotation-after-persist-idle");
                    }
                    _ => {}
                }
            }
            if t.next == Next::Stable {
                if outcome == Outcome::Rotated {
                    info!(step = "rotate", "rotation complete");
                }
                return Ok(outcome);
            }
            // S3, S4: no new side effect once stopped or once the claim may
            // have been taken over; the journal says where to resume.
            self.check_go()?;
            let event = match t.next.clone() {
                Next::Stable => unreachable!("returned above"),
                Next::DeleteTagged { rid, keep } => {
                    self.delete_tagged(&rid, &keep).await?;
                    Event::TaggedDeleted
                }
                Next::Create { rid, attempt } => {
                    let description = super::secret_description(&r.name, &rid, &attempt);
                    let bearer = self.bearer().await?;
                    let chosen = self.record.value.chosen().cloned();
                    if let Some(value) = &chosen {
                        // I7: a reply may echo it (Okta and Auth0 do).
                        r.provider.remember(value);
                    }
                    let request = CreateRequest {
                        description: &description,
                        value: chosen.as_ref(),
                    };
                    let new = self.guard(r.secret_api.create(&bearer, request)).await;
                    // A failed create may have replaced the token first.
                    self.take_renewed_registration();
                    let new = new??;
                    crash_point!("rotation-after-create");
                    info!(
                        step = "create",
                        secret_id = %escape_controls(new.id.as_deref().unwrap_or("(none)")),
                        "replacement secret created"
                    );
                    let registration = match new.registration_access_token {
                        Some(value) => {
                            // The token just sent is dead now (RFC 7592
                            // §3): the next call uses the new one, which
                            // the write of this event stores first.
                            self.bearer = None;
                            Some(self.registration_token(value))
                        }
                        None => None,
                    };
                    let value = match (r.secret_api.capabilities().value, chosen) {
                        // The value the journal holds is the one sent.
                        (ValueOrigin::Caller { .. } | ValueOrigin::Key, Some(chosen)) => chosen,
                        _ => new.value,
                    };
                    Event::Created {
                        id: new.id,
                        value,
                        expires_at: new.expires_at,
                        registration,
                    }
                }
                Next::Probe { id } => {
                    let chosen = self
                        .record
                        .value
                        .chosen()
                        .expect("machine probes only a caller-chosen create")
                        .clone();
                    let what = "the value of an interrupted create";
                    let accepted = self.verify(&chosen, what).await?.is_some();
                    Event::Probed { id, accepted }
                }
                Next::Verify => {
                    let pending = self
                        .record
                        .value
                        .pending()
                        .expect("machine asks to verify only in phase created")
                        .value
                        .clone();
                    if self.verify(&pending, "new secret").await?.is_some() {
                        crash_point!("rotation-after-verify");
                        Event::Verified
                    } else {
                        outcome = Outcome::Aborted;
                        Event::VerifyRejected
                    }
                }
                Next::WaitUntil(at) => {
                    let wait = schedule::wait_for(at, (r.clock)());
                    if self.max_wait.is_some_and(|max| wait > max) {
                        // Everything so far is persisted; the journal
                        // resumes here in the next run (I5).
                        info!(step = "grace", wait = %humantime::format_duration(whole_seconds(wait)), "leaving the wait (grace period, or a listing that may lag) and what follows it to a later run");
                        self.waiting_until = Some(at);
                        return Ok(outcome);
                    }
                    if !wait.is_zero() {
                        info!(step = "grace", wait = %humantime::format_duration(whole_seconds(wait)), "waiting before deleting (grace period, or a listing that may lag)");
                        self.flush_history().await;
                        self.guard(tokio::time::sleep(wait)).await?;
                    }
                    Event::GraceOver
                }
                Next::VerifyCurrent => {
                    let current = self.record.value.current.value.clone();
                    if let Some(token) = self.verify(&current, "promoted secret").await? {
                        // A token of the current secret: the bearer for
                        // the listing and deletes that follow, unless
                        // another credential's token calls the secret API.
                        if r.secret_api_bearer.is_none() {
                            self.bearer = Some(token);
                        }
                        outcome = Outcome::Rotated;
                        Event::CurrentVerified
                    } else {
                        outcome = Outcome::Aborted;
                        // The old secret becomes current again.
                        self.bearer = None;
                        Event::CurrentRejected
                    }
                }
                Next::List if !r.secret_api.capabilities().lists => {
                    // Nothing to check or sweep with: an empty listing
                    // keeps only what the journal itself proved ours.
                    Event::Listed {
                        secrets: Vec::new(),
                    }
                }
                Next::List => {
                    let bearer = self.bearer().await?;
                    let secrets = self.guard(r.secret_api.list(&bearer)).await;
                    self.take_renewed_registration();
                    let secrets = secrets??;
                    crash_point!("rotation-after-list");
                    self.learn_expiry(&secrets).await;
                    Event::Listed { secrets }
                }
                Next::Delete { ids } => {
                    let mut done = Vec::with_capacity(ids.len());
                    for id in ids {
                        // Between deletes too: each one is a side effect.
                        self.check_go()?;
                        let deleted = self.delete(&id).await?;
                        crash_point!("rotation-after-delete-old");
                        info!(step = "delete", secret_id = %escape_controls(&id), already_gone = deleted == Deleted::NotFound, "retired secret deleted");
                        done.push(id);
                        if self.renewed_registration.is_some() {
                            // The token changed: it is stored before the
                            // next delete, which the machine asks for again.
                            break;
                        }
                    }
                    Event::RetireDeleted { ids: done }
                }
            };
            t = machine::step(&self.record.value, event, &r.context())?;
            if t.record.last_rotated_at != self.record.value.last_rotated_at {
                // A rotation the provider completed in its reply (an RFC
                // 7592 update that kept the secret) counts as one.
                outcome = Outcome::Rotated;
            }
        }
    }

    /// The history entries of a transition: its steps, the `started` one
    /// with why this run began it (and a `forced` entry first when an
    /// operator asked).
    fn audit_events(&mut self, audit: &[history::Event]) -> Vec<history::Event> {
        let mut events = Vec::with_capacity(audit.len() + 1);
        for event in audit {
            if event.step == Step::Started {
                let reason = self.reason.take().unwrap_or(StartReason::Schedule);
                if reason == StartReason::Forced {
                    let mut forced = history::Event::new(Step::Forced);
                    forced.rid = event.rid.clone();
                    events.push(forced);
                }
                events.push(event.clone().detail(reason.as_str()));
            } else {
                events.push(event.clone());
            }
        }
        events
    }

    /// Records what `listed` says about the expiry of the journal's secrets
    /// ([`expiry::learn`]), by compare-and-swap on the record this run
    /// holds (S1). Best effort: a lost swap or a store error leaves the
    /// record as it was (the journal's next write then re-reads), and the
    /// next listing teaches it again. `true`: recorded.
    async fn learn_expiry(&mut self, listed: &[RemoteSecret]) -> bool {
        let r = self.rotator;
        let Some(next) = expiry::learn(&self.record.value, listed) else {
            return false;
        };
        match r
            .store
            .compare_and_swap(&r.name, Some(self.record.version), &next)
            .await
        {
            Ok(version) => {
                if let Some(at) = next.current.expires_at {
                    info!(step = "expiry", expires_at = %humantime::format_rfc3339_seconds(at), "the provider's listing says when the current secret expires");
                }
                self.record = Versioned {
                    version,
                    value: next,
                };
                r.publish(&self.record.value);
                true
            }
            Err(e) => {
                info!(step = "expiry", error = %e, "the secret's provider expiry was not recorded; the next listing tries again");
                false
            }
        }
    }

    /// A registration access token an update returned, with the digest of
    /// the `access_token_file` content it descends from, read now (a file
    /// an operator changed meanwhile wins at the next call anyway). Never
    /// an error: the token must reach the journal. A file that cannot be
    /// read keeps the lineage the record had.
    fn registration_token(&self, value: SecretString) -> RegistrationToken {
        let file_sha256 = self
            .rotator
            .secret_api_bearer
            .as_ref()
            .and_then(|b| b.registration_file())
            .and_then(|file| read_token_file(file).ok())
            .map(|content| sha256_hex(&content))
            .or_else(|| {
                let stored = self.record.value.registration.as_ref();
                stored.map(|r| r.file_sha256.clone())
            })
            .unwrap_or_default();
        RegistrationToken { value, file_sha256 }
    }

    /// Stops the run before a side effect when shut down (S4) or when the
    /// claim may have lapsed (S3).
    fn check_go(&self) -> Result<(), RotationError> {
        if self.stop.is_cancelled() {
            return Err(RotationError::Shutdown);
        }
        if self.lost.is_cancelled() || !self.claim.is_fresh() {
            return Err(RotationError::ClaimLost);
        }
        Ok(())
    }

    /// Runs a provider call or a wait, cut short by shutdown or a lost claim.
    /// Cutting a provider call is safe: the journal already records what it
    /// may have done.
    async fn guard<T>(&self, fut: impl Future<Output = T>) -> Result<T, RotationError> {
        tokio::select! {
            out = fut => Ok(out),
            _ = self.stop.cancelled() => Err(RotationError::Shutdown),
            _ = self.lost.cancelled() => Err(RotationError::ClaimLost),
        }
    }

    /// A bearer token for the secret API, logging in when needed: with the
    /// current secret, or, while promoted and the current one is refused,
    /// with the old one (S5).
    async fn bearer(&mut self) -> Result<Token, RotationError> {
        // Its own logins' tokens, stamped on the system clock.
        let now = clock::system().now();
        if let Some(token) = self
            .bearer
            .as_ref()
            .filter(|t| t.remaining(now) > Duration::from_secs(10))
        {
            return Ok(token.clone());
        }
        if let Some(source) = &self.rotator.secret_api_bearer {
            let token = self.guard(source.token()).await??;
            self.bearer = Some(token.clone());
            return Ok(token);
        }
        let provider = &self.rotator.provider;
        let record = &self.record.value;
        let token = match self.guard(provider.login(&record.current.value)).await? {
            Err(e) if e.kind == ErrorKind::Rejected => {
                // S5: the old secret of a promoted rotation, which the
                // grace period keeps valid; with an API that replaces the
                // secret atomically, the new value the journal holds
                // (pending, or chosen while its create is unanswered).
                let fallback = match record.rotation.old() {
                    Some(old) => Some(&old.value),
                    None if self.rotator.secret_api.capabilities().replaces() => {
                        record.pending().map(|p| &p.value).or(record.chosen())
                    }
                    None => None,
                };
                match fallback {
                    Some(secret) => {
                        info!(
                            step = "rotate",
                            "current secret refused; using the other secret the journal holds"
                        );
                        self.guard(provider.login(secret)).await??
                    }
                    None => return Err(e.into()),
                }
            }
            other => other?,
        };
        self.bearer = Some(token.clone());
        Ok(token)
    }

    /// Deletes the secrets of attempts of rotation `rid` earlier than
    /// `keep` (their values were never persisted: the write of attempt
    /// `keep` won, S2); nothing else (I4). Later attempts are another
    /// actor's, made after ours: never touched.
    async fn delete_tagged(&mut self, rid: &str, keep: &str) -> Result<(), RotationError> {
        let r = self.rotator;
        let bearer = self.bearer().await?;
        let listed = self.guard(r.secret_api.list(&bearer)).await;
        self.take_renewed_registration();
        let listed = listed??;
        crash_point!("rotation-after-list");
        self.learn_expiry(&listed).await;
        let earlier = listed.into_iter().filter(|s| {
            super::parse_tag(&r.name, &s.description)
                .is_some_and(|tag| machine::superseded(&tag, rid, keep))
                && s.client_id.as_deref().is_none_or(|c| c == r.client_id)
        });
        for secret in earlier {
            self.check_go()?;
            warn!(step = "recover", secret_id = %escape_controls(&secret.id), rid, "deleting a secret from an interrupted attempt (its value was never stored)");
            self.delete(&secret.id).await?;
            crash_point!("rotation-after-delete-tagged");
        }
        Ok(())
    }

    /// Retires secret `id` at the provider as its API requires: deleted,
    /// or deactivated first (both licensed by the write before, S1).
    async fn delete(&mut self, id: &str) -> Result<Deleted, RotationError> {
        let bearer = self.bearer().await?;
        let api = self.rotator.secret_api.clone();
        if api.capabilities().retire == Retire::DeactivateThenDelete {
            let deactivated = self.guard(api.deactivate(&bearer, id)).await;
            self.take_renewed_registration();
            deactivated??;
            crash_point!("rotation-after-deactivate");
        }
        let deleted = self.guard(api.delete(&bearer, id)).await;
        self.take_renewed_registration();
        Ok(deleted??)
    }

    /// Takes a registration access token the last call returned out of
    /// the API (failed calls included: the server may have replaced it
    /// before the failure), for the next journal write to store.
    fn take_renewed_registration(&mut self) {
        if let Some(value) = self.rotator.secret_api.take_renewed_registration_token() {
            self.renewed_registration = Some(self.registration_token(value));
            // The token this run held is dead.
            self.bearer = None;
        }
    }

    /// Logs in with `secret`, retrying while it propagates: `Ok(Some(token))`
    /// once accepted, `Ok(None)` only on consistent rejection (see
    /// [`verify::Tally`]); anything else is an error that leaves the journal
    /// where it is, to be retried.
    async fn verify(
        &mut self,
        secret: &SecretString,
        what: &str,
    ) -> Result<Option<Token>, RotationError> {
        let r = self.rotator;
        let started = Instant::now();
        let deadline = started + r.verify_window;
        let mut tally = verify::Tally::default();
        let mut delay = Duration::from_millis(250);
        loop {
            let error = match self.guard(r.provider.login(secret)).await? {
                Ok(token) => {
                    info!(step = "verify", "{what} accepted by the provider");
                    return Ok(Some(token));
                }
                Err(e) => e,
            };
            tally.record(error.kind == ErrorKind::Rejected, started.elapsed());
            if Instant::now() + delay >= deadline {
                return if tally.consistently_rejected(r.verify_window) {
                    warn!(step = "verify", error = %error, rejections = tally.rejections, "{what} consistently rejected for {}", humantime::format_duration(r.verify_window));
                    Ok(None)
                } else {
                    Err(error.into())
                };
            }
            info!(step = "verify", error = %error, "{what} not accepted yet; retrying");
            self.flush_history().await;
            self.guard(tokio::time::sleep(delay)).await?;
            delay = (delay * 2).min(Duration::from_secs(5));
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
/// `rotate_now`) until shutdown. Unfinished work in the journal is always
/// finished first; with `config` `None` (the credential no longer rotates,
/// e.g. after a reload removed `[credentials.rotation]`) that is all it does.
pub async fn run_schedule(
    rotator: Arc<Rotator>,
    config: Option<RotationConfig>,
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
        // The last run ended in a refusal only an operator can lift.
        let mut needs_operator = false;
        // The bootstrap secret's provider expiry: listed for while the
        // journal knows the current secret's id but not its expiry.
        let mut learning = ExpiryLearning::new();
        let mut expiry_warned = ExpiryWarned::default();
        loop {
            let retry_wait = retry_at.map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()));
            // Re-read every time: `rekeyd rotate` or `set-secret` may have
            // changed the record while we slept.
            let mut finished = false;
            // When the expiry warning changes next: wake then.
            let mut expiry_check: Option<SystemTime> = None;
            let plan = match rotator.store.load_settled(&rotator.name).await {
                Ok(Some(record)) => {
                    let learn = rotator.secret_api.lists_expiry()
                        && super::expiry::worth_listing(&record.value, true);
                    if learn && learning.due() {
                        match learning.attempt(&rotator, config.is_some(), &shutdown).await {
                            // Plan again on the record with the expiry.
                            Some(true) => continue,
                            Some(false) => {}
                            None => return,
                        }
                    }
                    rotator.publish(&record.value);
                    expiry_check = expiry_warned.check(&rotator, &record.value, config.as_ref());
                    if learn {
                        let next = SystemTime::now() + learning.next.saturating_duration_since(Instant::now());
                        expiry_check = Some(expiry_check.map_or(next, |at| at.min(next)));
                    }
                    // A secret with a provider expiry is watched (warned
                    // about) even when rekeyd does not rotate it.
                    finished = config.is_none()
                        && !record.value.is_unfinished()
                        && record.value.current.expires_at.is_none()
                        && !learn;
                    let (plan, due_at) = plan(
                        &record.value,
                        config.as_ref(),
                        (rotator.clock)(),
                        requested,
                        retry_wait,
                    );
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
                // No schedule and nothing unfinished: this task's work is done.
                Plan::Wait(_) if finished => return,
                Plan::Wait(wait) => {
                    let wait = match expiry_check {
                        Some(at) => wait.min(schedule::wait_for(at, (rotator.clock)())),
                        None => wait,
                    };
                    // Long waits are cut into pieces: the schedule is on the
                    // wall clock, which may jump (suspend, NTP) while we sleep.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait.min(Duration::from_secs(300))) => {}
                        _ = rotate_now.notified() => {
                            requested = true;
                            // The operator says it is fixed: try now
                            // rather than half an hour from now.
                            if needs_operator {
                                retry_at = None;
                            }
                        }
                    }
                    continue;
                }
            };
            // Boxed: the rotation's state lives on the heap only while it
            // runs, so each credential's idle schedule task stays small
            // (10,000 credentials hold 10,000 of them).
            let result = Box::pin(rotator.rotate_for(begin, false, &shutdown)).await;
            let refusal = match &result {
                Err(RotationError::Provider(e)) if e.kind == ErrorKind::Refused => Some(e.reason()),
                _ => None,
            };
            let result_label = match &result {
                Ok(Outcome::Rotated) => Some("success"),
                Ok(Outcome::Aborted) => Some("aborted"),
                Ok(Outcome::Idle)
                | Err(RotationError::Busy | RotationError::Shutdown | RotationError::ClaimLost) => {
                    None
                }
                Err(_) if refusal.is_some() => Some("refused"),
                Err(_) => Some("error"),
            };
            // A run that got anywhere (even one with nothing left to do,
            // after `rekeyd rotate` finished the work) clears it.
            if result_label.is_some() || result.is_ok() {
                needs_operator = refusal.is_some();
                set_needs_operator(&rotator, refusal.clone());
            }
            match result {
                Ok(outcome) => {
                    // A run that only cleaned up leftovers (secrets still to
                    // delete) has not rotated: a pending request stands.
                    if outcome != Outcome::Idle {
                        requested = false;
                    }
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
                Err(RotationError::ClaimLost) => {
                    warn!(step = "rotate", "the rotation claim lapsed (store unreachable or too slow); stopped, resuming from the journal shortly");
                    failures = failures.max(1);
                }
                Err(e) if needs_operator => {
                    failures += 1;
                    let reason = refusal.unwrap_or_default();
                    warn!(
                        step = "rotate",
                        error = %e,
                        needs_operator = %reason,
                        "rotation needs an operator: the provider refuses this step and will until someone acts; the current secret stays in use, retried every 15 to 30 minutes. Fix it at the provider, then `rekeyd rotate {}`",
                        rotator.name
                    );
                    set_rotation_error(&rotator, Some(format!("needs operator: {reason}: {e}")));
                }
                Err(e) => {
                    failures += 1;
                    warn!(step = "rotate", error = %e, failures, "rotation step failed; will resume");
                    set_rotation_error(&rotator, Some(e.to_string()));
                }
            }
            if let Some(result) = result_label {
                let phase = match rotator.store.load(&rotator.name).await {
                    Ok(Some(r)) => r.value.phase(),
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
            let wait = if needs_operator {
                NEEDS_OPERATOR_RETRY.mul_f64(0.5 + rand::random::<f64>() / 2.0)
            } else {
                retry_delay(failures)
            };
            retry_at = (failures > 0).then(|| Instant::now() + wait);
        }
    }
    .instrument(span)
    .await
}

/// Listings to learn the current secret's expiry ([`Rotator::learn_expiry`])
/// at most this often: after one that did not show it, and as the bound of
/// the backoff after failures.
const EXPIRY_LISTING_EVERY: Duration = Duration::from_secs(3600);

/// When the schedule lists next to learn the current secret's expiry:
/// at start, then after a backoff while listing fails (another credential
/// named by `secret_api_credential` may not have its secret stored yet; a
/// store or provider outage), hourly while the listing does not show it.
struct ExpiryLearning {
    next: Instant,
    failures: u32,
}

impl ExpiryLearning {
    fn new() -> Self {
        ExpiryLearning {
            next: Instant::now(),
            failures: 0,
        }
    }

    fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// `Some(true)`: the expiry is recorded; `None`: shut down.
    async fn attempt(
        &mut self,
        rotator: &Rotator,
        rotates: bool,
        stop: &CancellationToken,
    ) -> Option<bool> {
        match rotator.learn_expiry(stop).await {
            Ok(learnt) => {
                self.failures = 0;
                self.next = Instant::now() + EXPIRY_LISTING_EVERY;
                Some(learnt)
            }
            Err(RotationError::Shutdown) => None,
            Err(e) => {
                self.failures += 1;
                let wait = retry_delay(self.failures).min(EXPIRY_LISTING_EVERY);
                self.next = Instant::now() + wait;
                let message = "cannot list the provider's secrets to learn when the current secret expires; trying again later";
                // Without rotation configured the listing only serves the
                // warning, which a token without Graph access cannot have:
                // not worth a warning at every attempt. With rotation, the
                // first failure warns: until the expiry is known, no
                // rotation is due before it.
                if rotates && self.failures == 1 {
                    warn!(step = "expiry", error = %e, retry_in = %humantime::format_duration(whole_seconds(wait)), "{message}");
                } else {
                    info!(step = "expiry", error = %e, retry_in = %humantime::format_duration(whole_seconds(wait)), "{message}");
                }
                Some(false)
            }
        }
    }
}

/// How often the same expiry warning is logged again while it stands.
const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(3600);

/// The expiry warning of one credential: shown in status and as a metric
/// at every schedule tick, logged when it first appears or changes and then
/// at most every [`EXPIRY_WARNING_EVERY`], not at every tick.
#[derive(Default)]
struct ExpiryWarned {
    last: Option<(ExpiryState, Instant)>,
}

impl ExpiryWarned {
    /// Shows and logs where the current secret stands; returns when that
    /// changes next (the schedule wakes then).
    fn check(
        &mut self,
        rotator: &Rotator,
        record: &CredentialRecord,
        rotation: Option<&RotationConfig>,
    ) -> Option<SystemTime> {
        let now = (rotator.clock)();
        let current = &record.current;
        let rotates = rotation.map(|r| r.before_expiry);
        let state = schedule::expiry_state(current.created_at, current.expires_at, rotates, now);
        let changes_at =
            schedule::expiry_state_changes_at(current.created_at, current.expires_at, rotates, now);
        let warning = expiry_warning(state, current.id.as_deref(), rotation.is_some());
        if let Some(status) = &rotator.status {
            status.send_if_modified(|s| {
                let changed = s.secret_expiry_warning != warning;
                s.secret_expiry_warning = warning.clone();
                changed
            });
        }
        let Some(text) = warning else {
            self.last = None;
            return changes_at;
        };
        let due = match self.last {
            Some((was, at)) => was != state || at.elapsed() >= EXPIRY_WARNING_EVERY,
            None => true,
        };
        if due {
            self.last = Some((state, Instant::now()));
            match state {
                ExpiryState::Expired(_) => error!(step = "expiry", "{}", escape_controls(&text)),
                _ => warn!(step = "expiry", "{}", escape_controls(&text)),
            }
        }
        changes_at
    }
}

/// The expiry warning for `record`'s current secret at `now`, as the
/// daemon shows it in status (`rekeyd status` without a daemon uses it).
pub fn expiry_warning_at(
    record: &CredentialRecord,
    rotation: Option<&RotationConfig>,
    now: SystemTime,
) -> Option<String> {
    let current = &record.current;
    let state = schedule::expiry_state(
        current.created_at,
        current.expires_at,
        rotation.map(|r| r.before_expiry),
        now,
    );
    expiry_warning(state, current.id.as_deref(), rotation.is_some())
}

/// The status line and log message for an [`ExpiryState`]: the secret's
/// provider id and the time, never its value (I7).
fn expiry_warning(state: ExpiryState, id: Option<&str>, rotates: bool) -> Option<String> {
    let secret = match id {
        Some(id) => format!("the current secret ({id})"),
        None => "the current secret".to_string(),
    };
    let fix = if rotates {
        "the rotation that should replace it has not succeeded (see last_rotation_error)"
    } else {
        "rekeyd does not rotate it ([credentials.rotation] is not configured): replace it with `rekeyd set-secret`"
    };
    match state {
        ExpiryState::Fine => None,
        ExpiryState::Near(at) => Some(format!(
            "{secret} expires at the provider at {}; {fix}",
            humantime::format_rfc3339_seconds(at)
        )),
        ExpiryState::Expired(at) => Some(format!(
            "{secret} expired at the provider at {}: logins with it fail; {fix}",
            humantime::format_rfc3339_seconds(at)
        )),
    }
}

/// What the schedule says to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Run the rotator; `begin`: start a new rotation, for this reason, if
    /// none is unfinished.
    Rotate {
        begin: Option<StartReason>,
    },
    Wait(Duration),
}

/// Pure scheduling decision: backoff after failures first, then unfinished
/// journal work is resumed, a requested rotation started, or the next
/// scheduled one waited for: by the trigger, when the current secret
/// reaches `max_secret_age`, or `before_expiry` ahead of the provider's
/// expiry of the current secret ([`schedule::expiry_due`]), whichever comes
/// first; the last two apply whatever the trigger (`manual` included). Also
/// returns when the next rotation is due. Without a rotation config (not,
/// or no longer, configured) only unfinished work is done; a near expiry is
/// then only warned about ([`schedule::expiry_state`]).
fn plan(
    record: &CredentialRecord,
    rotation: Option<&RotationConfig>,
    now: SystemTime,
    requested: bool,
    retry_wait: Duration,
) -> (Plan, Option<SystemTime>) {
    let since = record.last_rotated_at.unwrap_or(record.current.created_at);
    let scheduled = rotation.and_then(|r| schedule::next_due(&r.trigger, since));
    // Counted from the last rotation when that is later than the secret's
    // creation: a provider that kept the secret when asked for a new one
    // (an RFC 7592 update) must not be asked again at once, forever.
    let aged_since = record
        .current
        .created_at
        .max(record.last_rotated_at.unwrap_or(record.current.created_at));
    let aged = rotation
        .and_then(|r| r.max_secret_age)
        .and_then(|max| schedule::aged_out(aged_since, max));
    // Where the last rotation ended after the expiry's due time and the
    // current secret still expires then, the provider kept the secret (an
    // RFC 7592 server may): asking again at once would loop, so only the
    // warning is left (`schedule::expiry_state`).
    let expiry = rotation.and_then(|r| {
        let current = &record.current;
        let due = schedule::expiry_due(current.created_at, current.expires_at?, r.before_expiry);
        record
            .last_rotated_at
            .is_none_or(|last| last < due)
            .then_some(due)
    });
    // The earliest; on a tie the schedule names it, then the age bound.
    let (due_at, reason) = [
        (scheduled, StartReason::Schedule),
        (aged, StartReason::MaxSecretAge),
        (expiry, StartReason::ProviderExpiry),
    ]
    .into_iter()
    .filter_map(|(at, reason)| Some((at?, reason)))
    .min_by_key(|(at, _)| *at)
    .map_or((None, StartReason::Schedule), |(at, reason)| {
        (Some(at), reason)
    });
    let plan = if !retry_wait.is_zero() {
        Plan::Wait(retry_wait)
    } else if record.is_unfinished() {
        Plan::Rotate { begin: None }
    } else if rotation.is_none() {
        Plan::Wait(Duration::from_secs(86400))
    } else if requested {
        // With `on_login`, the token engine asks after every login through
        // the same request as an operator does; such a request is taken
        // as the login's.
        let on_login = rotation.is_some_and(|r| r.on_login);
        Plan::Rotate {
            begin: Some(if on_login {
                StartReason::OnLogin
            } else {
                StartReason::Forced
            }),
        }
    } else {
        match due_at {
            Some(at) if at <= now => Plan::Rotate {
                begin: Some(reason),
            },
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

/// Shows (status, metric) whether the last rotation attempt ended in a
/// refusal only an operator can lift, and its reason.
fn set_needs_operator(rotator: &Rotator, reason: Option<String>) {
    metrics::global()
        .rotation_needs_operator
        .get_or_create(&metrics::credential(&rotator.name))
        .set(i64::from(reason.is_some()));
    if let Some(status) = &rotator.status {
        status.send_modify(|s| s.rotation_needs_operator = reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RotationTrigger;
    use crate::store::{Rotation, SecretEntry};

    fn record(created: SystemTime, rotation: Rotation) -> CredentialRecord {
        CredentialRecord {
            rotation,
            ..CredentialRecord::new(SecretEntry {
                id: None,
                value: SecretString::from("v"),
                created_at: created,
                expires_at: None,
            })
        }
    }

    fn rotation(trigger: RotationTrigger, max_secret_age: Option<Duration>) -> RotationConfig {
        RotationConfig {
            trigger,
            grace: Duration::from_secs(60),
            on_login: false,
            max_secret_age,
            before_expiry: None,
            verify_window: None,
        }
    }

    #[test]
    fn plan_follows_schedule_requests_and_backoff() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = rotation(RotationTrigger::Every(Duration::from_secs(3600)), None);
        let hour = Some(&hour);
        let idle = record(t0, Rotation::Idle);
        let (p, due) = plan(&idle, hour, t0, false, Duration::ZERO);
        assert_eq!(p, Plan::Wait(Duration::from_secs(3600)));
        assert_eq!(due, Some(t0 + Duration::from_secs(3600)));
        // Overdue (e.g. while rekeyd was down): now.
        let (p, _) = plan(
            &idle,
            hour,
            t0 + Duration::from_secs(7200),
            false,
            Duration::ZERO,
        );
        assert_eq!(
            p,
            Plan::Rotate {
                begin: Some(StartReason::Schedule)
            }
        );
        // Requested: now, unless backing off.
        assert_eq!(
            plan(&idle, hour, t0, true, Duration::ZERO).0,
            Plan::Rotate {
                begin: Some(StartReason::Forced)
            }
        );
        let backoff = Duration::from_secs(5);
        assert_eq!(plan(&idle, hour, t0, true, backoff).0, Plan::Wait(backoff));
        // Unfinished: resume without starting another.
        let creating = record(
            t0,
            Rotation::Creating {
                rid: "r".into(),
                attempt: "a".into(),
                chosen: None,
            },
        );
        assert_eq!(
            plan(&creating, hour, t0, false, Duration::ZERO).0,
            Plan::Rotate { begin: None }
        );
        // Manual trigger: never by schedule.
        let manual = rotation(RotationTrigger::Manual, None);
        assert_eq!(
            plan(&idle, Some(&manual), t0, false, Duration::ZERO),
            (Plan::Wait(Duration::from_secs(86400)), None)
        );
    }

    #[test]
    fn max_secret_age_forces_a_rotation_when_it_comes_first() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86400);
        // Never rotated by the schedule (the rotations aborted), and the
        // secret is old: an operator installed it long ago.
        let old = record(t0, Rotation::Idle);
        let weekly = rotation(RotationTrigger::Every(7 * day), Some(10 * day));
        // The schedule falls due first...
        let (p, due) = plan(&old, Some(&weekly), t0 + 7 * day, false, Duration::ZERO);
        assert_eq!(
            p,
            Plan::Rotate {
                begin: Some(StartReason::Schedule)
            }
        );
        assert_eq!(due, Some(t0 + 7 * day));
        // ... and with a schedule longer than the bound, the bound decides.
        let twelve_days = rotation(RotationTrigger::Every(12 * day), Some(10 * day));
        let (p, due) = plan(
            &old,
            Some(&twelve_days),
            t0 + 10 * day,
            false,
            Duration::ZERO,
        );
        assert_eq!(
            p,
            Plan::Rotate {
                begin: Some(StartReason::MaxSecretAge)
            }
        );
        assert_eq!(due, Some(t0 + 10 * day));
        // Younger than the bound: the earlier of the two is waited for.
        let (p, due) = plan(
            &old,
            Some(&twelve_days),
            t0 + 9 * day,
            false,
            Duration::ZERO,
        );
        assert_eq!(p, Plan::Wait(day));
        assert_eq!(due, Some(t0 + 10 * day));
        // A provider that kept the secret when asked for a new one (an RFC
        // 7592 update) at 9 days: the bound counts from then, or every
        // run would ask again at once.
        let mut kept = record(t0, Rotation::Idle);
        kept.last_rotated_at = Some(t0 + 9 * day);
        let (p, due) = plan(
            &kept,
            Some(&twelve_days),
            t0 + 10 * day,
            false,
            Duration::ZERO,
        );
        assert_eq!(p, Plan::Wait(9 * day));
        assert_eq!(due, Some(t0 + 19 * day));
        // A manual trigger rotates only when the secret gets too old.
        let manual = rotation(RotationTrigger::Manual, Some(30 * day));
        let fresh = record(t0, Rotation::Idle);
        assert_eq!(
            plan(&fresh, Some(&manual), t0 + day, false, Duration::ZERO).1,
            Some(t0 + 30 * day)
        );
        assert_eq!(
            plan(&fresh, Some(&manual), t0 + 31 * day, false, Duration::ZERO).0,
            Plan::Rotate {
                begin: Some(StartReason::MaxSecretAge)
            }
        );
    }

    #[tokio::test]
    async fn the_stored_registration_token_is_used_until_the_file_changes() {
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("registration.token");
        std::fs::write(&file, "rat-1\n").unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::file::FileStore::new(
            &dir.path().join("state"),
        ));
        let bearer = RegistrationBearer {
            access_token_file: file.clone(),
            store: store.clone(),
            name: "app".into(),
        };
        let token = || async {
            bearer
                .token()
                .await
                .unwrap()
                .access_token
                .expose_secret()
                .to_string()
        };
        // No record yet: the file's token (without its newline).
        assert_eq!(token().await, "rat-1");
        // An update replaced it; the store holds the new one, descended
        // from the file's content.
        let mut record = CredentialRecord::new(SecretEntry {
            id: None,
            value: SecretString::from("secret"),
            created_at: SystemTime::now(),
            expires_at: None,
        });
        record.registration = Some(RegistrationToken {
            value: SecretString::from("rat-2"),
            file_sha256: sha256_hex(&SecretString::from("rat-1")),
        });
        store.compare_and_swap("app", None, &record).await.unwrap();
        assert_eq!(token().await, "rat-2");
        // The file cannot be read: the stored token still works.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(token().await, "rat-2");
        // An operator hands over a new token: the file wins.
        std::fs::write(&file, "rat-9").unwrap();
        assert_eq!(token().await, "rat-9");
        // An empty file holds no token: the stored one is used; without a
        // stored one the error names the file.
        std::fs::write(&file, " \n").unwrap();
        assert_eq!(
            token().await,
            "rat-2",
            "unreadable as a token: the stored one"
        );
        let missing = RegistrationBearer {
            access_token_file: dir.path().join("absent"),
            store: Arc::new(crate::store::file::FileStore::new(
                &dir.path().join("other"),
            )),
            name: "app".into(),
        };
        let err = missing.token().await.unwrap_err().to_string();
        assert!(err.contains("absent"), "{err}");
    }

    #[test]
    fn provider_expiry_makes_a_rotation_due_whatever_the_trigger() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86400);
        let mut expiring = record(t0, Rotation::Idle);
        expiring.current.expires_at = Some(t0 + 30 * day);
        // Earlier than the schedule: the expiry wins (a third of the
        // 30-day lifetime before it).
        let monthly = rotation(RotationTrigger::Every(60 * day), None);
        let (p, due) = plan(&expiring, Some(&monthly), t0 + day, false, Duration::ZERO);
        assert_eq!(due, Some(t0 + 20 * day));
        assert_eq!(p, Plan::Wait(19 * day));
        assert_eq!(
            plan(
                &expiring,
                Some(&monthly),
                t0 + 20 * day,
                false,
                Duration::ZERO
            )
            .0,
            Plan::Rotate {
                begin: Some(StartReason::ProviderExpiry)
            }
        );
        // A schedule that comes first still names the rotation.
        let weekly = rotation(RotationTrigger::Every(7 * day), None);
        assert_eq!(
            plan(
                &expiring,
                Some(&weekly),
                t0 + 7 * day,
                false,
                Duration::ZERO
            ),
            (
                Plan::Rotate {
                    begin: Some(StartReason::Schedule)
                },
                Some(t0 + 7 * day)
            )
        );
        // A manual trigger (no schedule) still rotates before the expiry,
        // `before_expiry` ahead of it when set.
        let mut manual = rotation(RotationTrigger::Manual, None);
        manual.before_expiry = Some(2 * day);
        assert_eq!(
            plan(
                &expiring,
                Some(&manual),
                t0 + 27 * day,
                false,
                Duration::ZERO
            ),
            (Plan::Wait(day), Some(t0 + 28 * day))
        );
        assert_eq!(
            plan(
                &expiring,
                Some(&manual),
                t0 + 28 * day,
                false,
                Duration::ZERO
            )
            .0,
            Plan::Rotate {
                begin: Some(StartReason::ProviderExpiry)
            }
        );
        // No expiry known: a manual trigger never rotates by itself.
        let unknown = record(t0, Rotation::Idle);
        assert_eq!(
            plan(
                &unknown,
                Some(&manual),
                t0 + 900 * day,
                false,
                Duration::ZERO
            ),
            (Plan::Wait(day), None)
        );
        // A rotation after the due time that left the expiry as it was (a
        // server that kept its secret): not asked again at once, forever;
        // the warning is what is left.
        let mut kept = expiring.clone();
        kept.last_rotated_at = Some(t0 + 28 * day);
        assert_eq!(
            plan(&kept, Some(&manual), t0 + 28 * day, false, Duration::ZERO),
            (Plan::Wait(day), None)
        );
        // Without rotation configured: never rotated, only warned about.
        let (p, due) = plan(&expiring, None, t0 + 29 * day, false, Duration::ZERO);
        assert_eq!((p, due), (Plan::Wait(day), None));
        assert_eq!(
            schedule::expiry_state(t0, expiring.current.expires_at, None, t0 + 29 * day),
            schedule::ExpiryState::Near(t0 + 30 * day)
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
            id: Some("x".into()),
            value: SecretString::from("topsecret"),
            expires_at: None,
            registration: None,
        };
        assert!(!format!("{e:?}").contains("topsecret"));
    }
}
