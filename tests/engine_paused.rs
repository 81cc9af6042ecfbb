//! The token engine on a paused clock: a fake in-memory provider and secret
//! source, no I/O at all, so tokio's clock auto-advances whenever every task
//! is idle and the timing of each login attempt is exact.
//!
//! What is pinned down (DESIGN.md "Token refresh", invariant I8):
//! - refresh at 70-80% of the lifetime, or `before_expiry` before it;
//! - `expires_in: 0` is a failed refresh, backed off, never served;
//! - failures back off exponentially, but a retry is never scheduled past the
//!   expiry of the token being served, and while none is served a transient
//!   failure is retried within 30 s;
//! - a quota error's Retry-After is honoured;
//! - the served token stays valid during failures and is invalid after expiry;
//! - a rejected secret makes the engine re-read the store and try the pending
//!   secret before reporting the credential as locked out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rekeyd::clock::BootInstant;
use rekeyd::credential::{self, CredentialHandle, CredentialStatus};
use rekeyd::provider::{ErrorKind, ProviderError, TokenProvider};
use rekeyd::token::Token;
use rekeyd::token::engine::{Engine, SecretSource, Secrets};
use rekeyd::token::policy::RefreshPolicy;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Timers fire on whole milliseconds: a measured delay may exceed the
/// requested one by up to one tick.
const TICK: Duration = Duration::from_millis(2);
/// Virtual time; only a bound so that a broken engine fails the test rather
/// than hanging it.
const VIRTUAL_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);
const MIN_RETRY: Duration = Duration::from_millis(250);
/// The longest retry interval while no token is served.
const NO_TOKEN_MAX_RETRY: Duration = Duration::from_secs(30);
/// The end of a token's life in which retries no longer aim before expiry.
const LAST_SECONDS: Duration = Duration::from_secs(3);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ---------------------------------------------------------------------------
// Fakes
// ---------------------------------------------------------------------------

/// What the fake provider answers to one login.
#[derive(Clone, Debug)]
enum Reply {
    /// A token with this lifetime (`expires_in`).
    Token(Duration),
    /// A failure of this kind, with an optional Retry-After.
    Fail(ErrorKind, Option<Duration>),
}

/// One login as the provider saw it.
#[derive(Clone, Debug)]
struct Call {
    at: Instant,
    secret: String,
}

struct FakeProvider {
    /// Replies in order; once used up, `then` forever.
    script: Mutex<VecDeque<Reply>>,
    then: Mutex<Reply>,
    /// When set, any other secret is rejected (`invalid_client`) without
    /// consuming the script.
    accepts: Mutex<Option<String>>,
    calls: watch::Sender<Vec<Call>>,
    issued: AtomicU64,
}

impl FakeProvider {
    fn new(script: impl IntoIterator<Item = Reply>, then: Reply) -> Arc<Self> {
        Arc::new(FakeProvider {
            script: Mutex::new(script.into_iter().collect()),
            then: Mutex::new(then),
            accepts: Mutex::new(None),
            calls: watch::channel(Vec::new()).0,
            issued: AtomicU64::new(0),
        })
    }

    fn set_then(&self, reply: Reply) {
        *self.then.lock().unwrap() = reply;
    }

    fn accept_only(&self, secret: &str) {
        *self.accepts.lock().unwrap() = Some(secret.to_string());
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }
}

fn failure(kind: ErrorKind, retry_after: Option<Duration>) -> ProviderError {
    let (status, code) = match kind {
        ErrorKind::Rejected => (401, Some("invalid_client".to_string())),
        ErrorKind::Quota => (429, None),
        ErrorKind::Transient => (503, None),
        ErrorKind::Refused => (400, Some("invalid_scope".to_string())),
    };
    ProviderError {
        kind,
        operation: "fake login",
        status: Some(status),
        code,
        detail: "scripted".to_string(),
        retry_after,
    }
}

impl TokenProvider for FakeProvider {
    fn login<'a>(
        &'a self,
        secret: &'a SecretString,
    ) -> BoxFuture<'a, Result<Token, ProviderError>> {
        Box::pin(async move {
            let secret = secret.expose_secret().to_string();
            let rejected = self
                .accepts
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|a| *a != secret);
            self.calls.send_modify(|c| {
                c.push(Call {
                    at: Instant::now(),
                    secret,
                })
            });
            if rejected {
                return Err(failure(ErrorKind::Rejected, None));
            }
            let reply = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| self.then.lock().unwrap().clone());
            match reply {
                Reply::Token(lifetime) => {
                    let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok(Token::new(
                        SecretString::from(format!("tok-{n}")),
                        "Bearer".to_string(),
                        None,
                        lifetime,
                    ))
                }
                Reply::Fail(kind, retry_after) => Err(failure(kind, retry_after)),
            }
        })
    }
}

/// The store as the engine sees it: `(current, pending)`, or a read error.
type Read = Result<(String, Option<String>), String>;

struct FakeSecrets {
    /// Answers in order; once used up, `then` forever.
    script: Mutex<VecDeque<Read>>,
    then: Mutex<Read>,
}

impl FakeSecrets {
    fn new(script: impl IntoIterator<Item = Read>, then: Read) -> Arc<Self> {
        Arc::new(FakeSecrets {
            script: Mutex::new(script.into_iter().collect()),
            then: Mutex::new(then),
        })
    }

    fn fixed(current: &str) -> Arc<Self> {
        Self::new([], Ok((current.to_string(), None)))
    }

    fn set_then(&self, read: Read) {
        *self.then.lock().unwrap() = read;
    }
}

impl SecretSource for FakeSecrets {
    fn secrets(&self) -> BoxFuture<'_, Result<Secrets, String>> {
        let read = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.then.lock().unwrap().clone());
        Box::pin(async move {
            let (current, pending) = read?;
            Ok(Secrets {
                current: SecretString::from(current),
                pending: pending.map(SecretString::from),
                old: None,
            })
        })
    }
}

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

struct Running {
    handle: CredentialHandle,
    /// The engine's promotion wake-up (the rotation driver's side).
    promoted: Arc<tokio::sync::Notify>,
    provider: Arc<FakeProvider>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn run(provider: Arc<FakeProvider>, secrets: Arc<FakeSecrets>, policy: RefreshPolicy) -> Running {
    run_with(provider, secrets, policy, false)
}

fn run_with(
    provider: Arc<FakeProvider>,
    secrets: Arc<FakeSecrets>,
    policy: RefreshPolicy,
    rotate_on_login: bool,
) -> Running {
    let (channels, handle) = credential::channels("fake", "fake");
    let promoted = channels.promoted.clone();
    let engine = Engine {
        name: "fake".to_string(),
        provider: provider.clone(),
        secrets,
        policy,
        channels,
        rotate_on_login,
        login_slots: Arc::new(tokio::sync::Semaphore::new(1)),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(engine.run(shutdown.clone()));
    Running {
        handle,
        promoted,
        provider,
        shutdown,
        task,
    }
}

impl Running {
    /// Waits until the provider has seen a login list for which `accept` holds.
    async fn calls_until(&self, accept: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let mut rx = self.provider.calls.subscribe();
        let calls = tokio::time::timeout(VIRTUAL_TIMEOUT, rx.wait_for(|c| accept(c)))
            .await
            .expect("login calls within the (virtual) timeout")
            .expect("provider alive");
        calls.clone()
    }

    /// Waits for at least `n` logins.
    async fn calls(&self, n: usize) -> Vec<Call> {
        self.calls_until(|c| c.len() >= n).await
    }

    async fn token(&self, accept: impl Fn(&Token) -> bool) -> Arc<Token> {
        let mut rx = self.handle.token.clone();
        let found = tokio::time::timeout(
            VIRTUAL_TIMEOUT,
            rx.wait_for(|t| t.as_ref().is_some_and(|t| accept(t))),
        )
        .await
        .expect("token within the (virtual) timeout")
        .expect("engine alive");
        found.clone().unwrap()
    }

    async fn status(&self, accept: impl Fn(&CredentialStatus) -> bool) -> CredentialStatus {
        let mut rx = self.handle.status.clone();
        let found = tokio::time::timeout(VIRTUAL_TIMEOUT, rx.wait_for(|s| accept(s)))
            .await
            .expect("status within the (virtual) timeout")
            .expect("engine alive");
        found.clone()
    }

    fn served(&self) -> Option<String> {
        self.handle.valid_token().map(|t| access(&t))
    }

    /// When `at` (on the credential's boot-time clock) comes on tokio's
    /// clock; the two differ only by a suspension, and these tests make
    /// none.
    fn monotonic(&self, at: BootInstant) -> Instant {
        Instant::now() + at.saturating_duration_since(self.handle.clock.now())
    }

    /// Stops the engine; it must not need any (virtual) time to do so.
    async fn stop(self) {
        let before = Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(secs(1), self.task)
            .await
            .expect("engine stops on shutdown")
            .unwrap();
        assert!(Instant::now() - before < secs(1));
    }
}

fn access(token: &Token) -> String {
    token.access_token.expose_secret().to_string()
}

/// Time between consecutive logins.
fn gaps(calls: &[Call]) -> Vec<Duration> {
    calls.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[track_caller]
fn assert_within(d: Duration, lo: Duration, hi: Duration, what: &str) {
    assert!(
        lo <= d && d <= hi + TICK,
        "{what}: {d:?} not within [{lo:?}, {hi:?}]"
    );
}

// ---------------------------------------------------------------------------
// Refresh timing
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn refreshes_at_70_to_80_percent_of_the_lifetime() {
    let provider = FakeProvider::new([], Reply::Token(secs(100)));
    let engine = run(provider, FakeSecrets::fixed("s"), RefreshPolicy::default());
    let calls = engine.calls(11).await;
    let gaps = gaps(&calls);
    for (i, gap) in gaps.iter().enumerate() {
        assert_within(*gap, secs(70), secs(80), &format!("refresh {i}"));
    }
    // Jittered, so that many credentials and replicas spread out.
    assert!(gaps.iter().any(|g| *g != gaps[0]), "{gaps:?}");
    // Every refresh was published: the latest token is served.
    let latest = engine.token(|t| access(t) == "tok-11").await;
    assert!(latest.is_valid(engine.handle.clock.now()));
    let status = engine.status(|s| s.last_refresh_at.is_some()).await;
    assert_eq!(status.consecutive_failures, 0);
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn before_expiry_is_honoured_and_jittered_earlier_only() {
    let provider = FakeProvider::new([], Reply::Token(secs(3600)));
    let policy = RefreshPolicy {
        before_expiry: Some(secs(300)),
    };
    let engine = run(provider, FakeSecrets::fixed("s"), policy);
    let calls = engine.calls(6).await;
    for (i, gap) in gaps(&calls).iter().enumerate() {
        // 300 s before expiry, jittered up to 10% earlier (330 s).
        assert_within(*gap, secs(3270), secs(3300), &format!("refresh {i}"));
    }
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn before_expiry_longer_than_the_lifetime_falls_back_to_the_fraction() {
    let provider = FakeProvider::new([], Reply::Token(secs(60)));
    let policy = RefreshPolicy {
        before_expiry: Some(secs(300)),
    };
    let engine = run(provider, FakeSecrets::fixed("s"), policy);
    let calls = engine.calls(6).await;
    for (i, gap) in gaps(&calls).iter().enumerate() {
        assert_within(*gap, secs(42), secs(48), &format!("refresh {i}"));
    }
    engine.stop().await;
}

/// A token that is already expired when it arrives (`expires_in: 0`) is a
/// failed refresh: backed off like any failure, never served.
#[tokio::test(start_paused = true)]
async fn expires_in_zero_is_a_failed_refresh_and_backs_off() {
    let provider = FakeProvider::new([], Reply::Token(Duration::ZERO));
    let engine = run(provider, FakeSecrets::fixed("s"), RefreshPolicy::default());
    let calls = engine.calls(8).await;
    for (i, gap) in gaps(&calls).iter().enumerate() {
        let cap = secs(1u64 << i.min(20)).min(secs(300));
        assert_within(
            *gap,
            MIN_RETRY,
            cap,
            &format!("retry after failure {}", i + 1),
        );
    }
    let status = engine.status(|s| s.consecutive_failures >= 7).await;
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("already expired"),
        "{status:?}"
    );
    assert_eq!(engine.served(), None);
    engine.stop().await;
}

// ---------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_exponentially() {
    let provider = FakeProvider::new([], Reply::Fail(ErrorKind::Transient, None));
    let engine = run(provider, FakeSecrets::fixed("s"), RefreshPolicy::default());
    let calls = engine.calls(30).await;
    let gaps = gaps(&calls);
    for (i, gap) in gaps.iter().enumerate() {
        // After failure k (1-based): full jitter below 2^(k-1) s, capped at
        // 30 s while no token is served, never below the floor.
        let cap = secs(1u64 << i.min(20)).min(NO_TOKEN_MAX_RETRY);
        assert_within(
            *gap,
            MIN_RETRY,
            cap,
            &format!("retry after failure {}", i + 1),
        );
    }
    // Growth, not just bounds: failures 10-29 may wait up to 30 s each; all
    // twenty drawing under 8 s has a probability below 1e-11.
    let late = gaps[9..].iter().max().unwrap();
    assert!(*late > secs(8), "{gaps:?}");
    let status = engine.status(|s| s.consecutive_failures >= 30).await;
    assert!(status.last_error.as_deref().unwrap().contains("HTTP 503"));
    assert!(!status.locked_out);
    assert_eq!(engine.served(), None);
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_backoff() {
    let mut script = vec![Reply::Fail(ErrorKind::Transient, None); 10];
    script.push(Reply::Token(secs(100)));
    let provider = FakeProvider::new(script, Reply::Fail(ErrorKind::Transient, None));
    let engine = run(provider, FakeSecrets::fixed("s"), RefreshPolicy::default());
    engine.token(|_| true).await;
    // The refresh after the success fails: that is failure 1 again, retried
    // within the first step's cap (1 s), then the second's (2 s).
    let calls = engine.calls(14).await;
    let status = engine.handle.status.borrow().clone();
    assert_eq!(status.consecutive_failures, 3, "{status:?}");
    let gaps = gaps(&calls);
    assert_within(gaps[10], secs(70), secs(80), "refresh after the success");
    assert_within(gaps[11], MIN_RETRY, secs(1), "retry after failure 1");
    assert_within(gaps[12], MIN_RETRY, secs(2), "retry after failure 2");
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn served_token_stays_valid_through_failures_until_it_expires() {
    let provider = FakeProvider::new(
        [Reply::Token(secs(100))],
        Reply::Fail(ErrorKind::Transient, None),
    );
    let engine = run(
        provider.clone(),
        FakeSecrets::fixed("s"),
        RefreshPolicy::default(),
    );
    let first = engine.token(|_| true).await;
    let expiry = engine.monotonic(first.expires_at());

    // Just before expiry: refreshes have been failing, the old token is
    // still served.
    tokio::time::sleep_until(expiry - Duration::from_millis(1)).await;
    let status = engine.handle.status.borrow().clone();
    assert!(status.consecutive_failures >= 3, "{status:?}");
    assert!(status.last_error.as_deref().unwrap().contains("HTTP 503"));
    assert_eq!(engine.served().as_deref(), Some("tok-1"));

    // At expiry it is no longer served.
    tokio::time::sleep_until(expiry).await;
    assert_eq!(engine.served(), None);

    // Every retry scheduled while the token had more than its last 3 s
    // left happened before it expired (in those, retries follow the
    // no-token bound instead of crowding the last moments).
    let calls = engine
        .calls_until(|c| c.last().is_some_and(|l| l.at > expiry))
        .await;
    let failures: Vec<&[Call]> = calls[1..].windows(2).collect();
    for pair in &failures {
        let (failed, next) = (&pair[0], &pair[1]);
        if failed.at < expiry && expiry - failed.at >= LAST_SECONDS {
            assert!(
                next.at < expiry,
                "retry at {:?} after expiry (failed {:?} before it)",
                next.at - expiry,
                expiry - failed.at
            );
        } else if failed.at < expiry {
            assert!(next.at - failed.at <= NO_TOKEN_MAX_RETRY + TICK);
        }
    }
    // The refresh happened at 70-80% and then kept trying until the last
    // seconds.
    assert_within(calls[1].at - calls[0].at, secs(70), secs(80), "refresh");
    let before_expiry = calls.iter().filter(|c| c.at < expiry).count();
    assert!(before_expiry >= 4, "{:?}", gaps(&calls));

    // The provider recovers: a new token is served again.
    provider.set_then(Reply::Token(secs(100)));
    let second = engine.token(|t| access(t) != "tok-1").await;
    assert!(second.is_valid(engine.handle.clock.now()));
    assert_eq!(engine.served(), Some(access(&second)));
    engine
        .status(|s| s.consecutive_failures == 0 && s.last_error.is_none())
        .await;
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn quota_waits_for_retry_after_when_no_token_is_served() {
    let provider = FakeProvider::new(
        [
            Reply::Fail(ErrorKind::Quota, None),
            Reply::Fail(ErrorKind::Quota, Some(secs(120))),
            Reply::Fail(ErrorKind::Quota, Some(secs(120))),
        ],
        Reply::Token(secs(3600)),
    );
    let engine = run(provider, FakeSecrets::fixed("s"), RefreshPolicy::default());
    let calls = engine.calls(4).await;
    let gaps = gaps(&calls);
    // Without Retry-After: the quota backoff (30 s cap on the first failure).
    assert_within(gaps[0], MIN_RETRY, secs(30), "quota without Retry-After");
    // With Retry-After 120: that long, spread by up to a tenth of it (the
    // jittered backoff, at most 60 s and 120 s here, is shorter).
    assert_within(
        gaps[1],
        secs(120),
        secs(132),
        "Retry-After 120 (2nd failure)",
    );
    assert_within(
        gaps[2],
        secs(120),
        secs(132),
        "Retry-After 120 (3rd failure)",
    );
    let token = engine.token(|_| true).await;
    assert_eq!(access(&token), "tok-1");
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn quota_retry_after_never_outlasts_the_served_token() {
    let provider = FakeProvider::new(
        [
            Reply::Token(secs(100)),
            Reply::Fail(ErrorKind::Quota, Some(secs(600))),
        ],
        Reply::Token(secs(100)),
    );
    let engine = run(
        provider.clone(),
        FakeSecrets::fixed("s"),
        RefreshPolicy::default(),
    );
    let first = engine.token(|_| true).await;
    let expiry = engine.monotonic(first.expires_at());
    let calls = engine.calls(3).await;
    // I8 wins over Retry-After: one more try before the served token
    // expires, not 600 s later; in the second half of the time left (less
    // a second for the request), so as late as it can be while credentials
    // told the same thing still spread out.
    let left = expiry - calls[1].at;
    assert!(calls[2].at < expiry, "retried after expiry");
    assert_within(
        calls[2].at - calls[1].at,
        (left - secs(1)) / 2,
        left - secs(1),
        "retry with a Retry-After past the expiry",
    );
    let second = engine.token(|t| access(t) == "tok-2").await;
    assert!(second.received_at < first.expires_at());
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn secret_source_failure_is_transient_and_keeps_the_token() {
    let provider = FakeProvider::new([], Reply::Token(secs(100)));
    let secrets = FakeSecrets::fixed("s");
    let engine = run(provider.clone(), secrets.clone(), RefreshPolicy::default());
    engine.token(|_| true).await;
    secrets.set_then(Err("store unreadable".to_string()));
    let status = engine
        .status(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("store unreadable"))
        })
        .await;
    assert!(!status.locked_out);
    assert_eq!(engine.served().as_deref(), Some("tok-1"));
    // No login is attempted without a secret.
    assert_eq!(provider.calls().len(), 1);
    secrets.set_then(Ok(("s".to_string(), None)));
    engine.token(|t| access(t) == "tok-2").await;
    engine.stop().await;
}

// ---------------------------------------------------------------------------
// Rejected secrets
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn rejected_secret_rereads_the_store_before_giving_up() {
    // Another replica rotated between our read and the provider's answer.
    let provider = FakeProvider::new([], Reply::Token(secs(100)));
    provider.accept_only("new");
    let secrets = FakeSecrets::new(
        [Ok(("old".to_string(), None))],
        Ok(("new".to_string(), None)),
    );
    let engine = run(provider.clone(), secrets, RefreshPolicy::default());
    let token = engine.token(|_| true).await;
    assert_eq!(access(&token), "tok-1");
    let calls = provider.calls();
    let used: Vec<&str> = calls.iter().map(|c| c.secret.as_str()).collect();
    assert_eq!(used, ["old", "new"]);
    // In the same attempt, not after a backoff.
    assert_eq!(calls[0].at, calls[1].at);
    let status = engine.status(|s| s.last_refresh_at.is_some()).await;
    assert!(!status.locked_out);
    assert!(status.last_error.is_none());
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rejected_current_falls_back_to_the_pending_secret() {
    let provider = FakeProvider::new([], Reply::Token(secs(100)));
    provider.accept_only("pending");
    let secrets = FakeSecrets::new([], Ok(("current".to_string(), Some("pending".to_string()))));
    let engine = run(provider.clone(), secrets, RefreshPolicy::default());
    engine.token(|_| true).await;
    // And at the next refresh, again current first, then pending.
    let calls = engine.calls(4).await;
    let used: Vec<&str> = calls.iter().map(|c| c.secret.as_str()).collect();
    assert_eq!(used, ["current", "pending", "current", "pending"]);
    assert_within(calls[2].at - calls[1].at, secs(70), secs(80), "refresh");
    assert!(!engine.handle.status.borrow().locked_out);
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn all_secrets_rejected_is_a_lockout_retried_slowly_until_fixed() {
    let provider = FakeProvider::new([], Reply::Token(secs(100)));
    provider.accept_only("fixed");
    let secrets = FakeSecrets::new([], Ok(("current".to_string(), Some("pending".to_string()))));
    let engine = run(provider.clone(), secrets.clone(), RefreshPolicy::default());
    let status = engine.status(|s| s.locked_out).await;
    let error = status.last_error.as_deref().unwrap();
    assert!(error.contains("HTTP 401"), "{error}");
    assert!(error.contains("invalid_client"), "{error}");
    assert_eq!(engine.served(), None);

    // Each attempt tries both secrets once; attempts are slow (10 s cap on
    // the first retry, 20 s on the second).
    let calls = engine.calls(6).await;
    let used: Vec<&str> = calls.iter().map(|c| c.secret.as_str()).collect();
    assert_eq!(
        used,
        [
            "current", "pending", "current", "pending", "current", "pending"
        ]
    );
    assert_eq!(calls[0].at, calls[1].at);
    assert_within(calls[2].at - calls[1].at, MIN_RETRY, secs(10), "1st retry");
    assert_within(calls[4].at - calls[3].at, MIN_RETRY, secs(20), "2nd retry");

    // The operator fixes the store and asks for a refresh: it happens at
    // once, without waiting for the backoff.
    secrets.set_then(Ok(("fixed".to_string(), None)));
    let calls_before = provider.calls().len();
    let asked = Instant::now();
    engine.handle.refresh_now.notify_one();
    let token = engine.token(|_| true).await;
    assert_eq!(access(&token), "tok-1");
    let calls = provider.calls();
    let retry = &calls[calls_before];
    assert_eq!(retry.secret, "fixed");
    assert_eq!(retry.at, asked, "refresh_now skipped the backoff");
    let status = engine.status(|s| !s.locked_out).await;
    assert_eq!(status.consecutive_failures, 0);
    assert!(status.last_error.is_none());
    engine.stop().await;
}

// ---------------------------------------------------------------------------
// rotation.on_login
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn rotate_on_login_asks_for_a_rotation_after_each_login_only() {
    let provider = FakeProvider::new(
        [Reply::Fail(ErrorKind::Transient, None)],
        Reply::Token(secs(100)),
    );
    let engine = run_with(
        provider,
        FakeSecrets::fixed("s"),
        RefreshPolicy::default(),
        true,
    );
    // The failed first attempt asks for nothing; the login that follows does.
    let rotate = engine.handle.rotate_now.clone();
    tokio::time::timeout(VIRTUAL_TIMEOUT, rotate.notified())
        .await
        .expect("a rotation is requested");
    let calls = engine.provider.calls();
    assert_eq!(calls.len(), 2, "requested by the successful login");
    assert_eq!(calls[1].at, Instant::now());
    // And again at the next refresh.
    tokio::time::timeout(VIRTUAL_TIMEOUT, rotate.notified())
        .await
        .expect("a rotation is requested");
    assert_eq!(engine.provider.calls().len(), 3);
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_promotion_refreshes_at_once_without_asking_for_another_rotation() {
    let provider = FakeProvider::new([], Reply::Token(secs(100)));
    let engine = run_with(
        provider,
        FakeSecrets::fixed("s"),
        RefreshPolicy::default(),
        true,
    );
    let rotate = engine.handle.rotate_now.clone();
    tokio::time::timeout(VIRTUAL_TIMEOUT, rotate.notified())
        .await
        .expect("the first login asks for a rotation (on_login)");
    // S5: the rotation promoted a new secret: log in with it now, long
    // before the refresh point...
    let promoted_at = Instant::now();
    engine.promoted.notify_one();
    let calls = engine.calls(2).await;
    assert_eq!(calls[1].at, promoted_at, "refreshed at once");
    // ...and that login does not chain another rotation.
    let asked = tokio::time::timeout(secs(1), rotate.notified()).await;
    assert!(asked.is_err(), "a promotion's login asked for a rotation");
    engine.stop().await;
}

#[tokio::test(start_paused = true)]
async fn no_rotation_is_requested_without_on_login() {
    let provider = FakeProvider::new([], Reply::Token(secs(100)));
    let engine = run(provider, FakeSecrets::fixed("s"), RefreshPolicy::default());
    engine.calls(3).await;
    let asked = tokio::time::timeout(secs(1), engine.handle.rotate_now.notified()).await;
    assert!(
        asked.is_err(),
        "rotation requested without rotation.on_login"
    );
    engine.stop().await;
}
