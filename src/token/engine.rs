//! The token engine: one task per credential that logs in, publishes the
//! token, sleeps until the refresh point and starts over; on failure it
//! backs off (see [`super::policy`]) while the old token keeps being served
//! until it expires (I8). An application may ask for a login now
//! ([`super::forced`]); the engine performs it and reports its outcome.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::Token;
use super::forced::Failure;
use super::lifetime;
use super::policy::{self, RefreshPolicy};
use crate::credential::CredentialChannels;
use crate::metrics::{self, RefreshLabels};
use crate::provider::{ErrorKind, ProviderError, TokenProvider};
use crate::store::Store;

/// The secrets a login may use, freshest first.
pub struct Secrets {
    /// The secret the store holds as current.
    pub current: SecretString,
    /// A replacement created by an unfinished rotation, not yet promoted.
    pub pending: Option<SecretString>,
    /// The secret a promoted rotation replaced: valid at the provider until
    /// the rotation deletes it, so it still counts when `current` is
    /// refused (S5).
    pub old: Option<SecretString>,
}

/// Where the engine gets secrets from. Read before every login, so a
/// rotation (here or in another replica) is picked up without a signal.
pub trait SecretSource: Send + Sync {
    fn secrets(&self) -> BoxFuture<'_, Result<Secrets, String>>;
}

/// Reads a credential's secrets from the store.
pub struct StoreSecrets {
    pub store: Arc<dyn Store>,
    pub name: String,
}

impl SecretSource for StoreSecrets {
    fn secrets(&self) -> BoxFuture<'_, Result<Secrets, String>> {
        Box::pin(async move {
            let record = self
                .store
                .load(&self.name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "the store holds no secret for this credential".to_string())?
                .value;
            Ok(Secrets {
                // A caller-chosen value of an unfinished create counts as
                // pending: where the API replaces the secret atomically it
                // may be the only one that works (I1).
                pending: record
                    .pending()
                    .map(|p| p.value.clone())
                    .or_else(|| record.chosen().cloned()),
                old: record.rotation.old().map(|o| o.value.clone()),
                current: record.current.value,
            })
        })
    }
}

/// For a credential that stores nothing (`client_assertion_file`): an
/// empty secret, which its provider does not use.
pub struct NoStoredSecret;

impl SecretSource for NoStoredSecret {
    fn secrets(&self) -> BoxFuture<'_, Result<Secrets, String>> {
        Box::pin(async {
            Ok(Secrets {
                current: SecretString::from(String::new()),
                pending: None,
                old: None,
            })
        })
    }
}

pub struct Engine {
    pub name: String,
    pub provider: Arc<dyn TokenProvider>,
    pub secrets: Arc<dyn SecretSource>,
    pub policy: RefreshPolicy,
    pub channels: CredentialChannels,
    /// `rotation.on_login`: ask for a rotation after every login.
    pub rotate_on_login: bool,
    /// Shared by all engines of a daemon: bounds concurrent logins, so that
    /// thousands of credentials starting together do not storm the provider.
    pub login_slots: Arc<Semaphore>,
}

/// Outcome of one refresh attempt.
pub type Attempt = Result<Token, ProviderError>;

impl Engine {
    /// Runs until `shutdown` is cancelled.
    ///
    /// Not an `async fn`: one engine sleeps per credential, and an async
    /// fn's future keeps its arguments twice (as given and as moved into
    /// its body), a copy of the whole engine per credential. The block
    /// below owns the engine once and the loop borrows it.
    pub fn run(self, shutdown: CancellationToken) -> impl Future<Output = ()> + Send {
        let span = info_span!("credential", name = %self.name);
        async move { self.run_loop(&shutdown).await }.instrument(span)
    }

    async fn run_loop(&self, shutdown: &CancellationToken) {
        let clock = &*self.channels.clock;
        // Suspensions reported before this engine started are no reason to
        // refresh: the first login is about to happen anyway.
        let mut jumps = clock.jumps();
        jumps.borrow_and_update();
        let mut failures: u32 = 0;
        // The login that follows a promotion proves the new secret; it is
        // not a login that asks for a rotation (that would chain forever).
        let mut after_promotion = false;
        loop {
            // Whether this attempt is the forced login applications wait for
            // (one asked for before it started).
            let forced = self.channels.forced.claim();
            // Boxed: a login's state lives only while it runs, instead of
            // taking room in every sleeping engine (thousands of them).
            let wait = match Box::pin(self.attempt()).await {
                Ok(mut token) => {
                    // The lifetime counts from the reply's arrival, a moment
                    // ago, on the clock every reader of this credential
                    // decides validity on.
                    token.received_at = clock.now();
                    failures = 0;
                    let wait = self.policy.refresh_delay(token.lifetime, rand::random());
                    info!(
                        step = "refresh",
                        expires_in = %humantime::format_duration(whole_seconds(token.lifetime)),
                        next_refresh_in = %humantime::format_duration(whole_seconds(wait)),
                        "token refreshed"
                    );
                    self.publish(token);
                    // After the publish: whoever waited for this login
                    // reads the new token.
                    self.channels.forced.finish(forced, Ok(()), None);
                    if self.rotate_on_login && !after_promotion {
                        self.channels.rotate_now.notify_one();
                    }
                    wait
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let time_left = self
                        .channels
                        .token
                        .borrow()
                        .as_ref()
                        .map(|t| t.remaining(clock.now()));
                    let wait = policy::retry_delay(
                        failures,
                        err.kind,
                        err.retry_after,
                        time_left,
                        rand::random(),
                    );
                    let serving = time_left.is_some_and(|l| !l.is_zero());
                    warn!(
                        step = "refresh",
                        error = %err,
                        failures,
                        retry_in = %humantime::format_duration(whole_millis(wait)),
                        serving_previous_token = serving,
                        "token refresh failed"
                    );
                    self.record_failure(&err, failures);
                    // A quota reply holds forced logins as long as it holds
                    // the engine's own: the quota is the provider's.
                    let quiet_until = (err.kind == ErrorKind::Quota).then(|| clock.now() + wait);
                    let failure = Failure {
                        reason: err.to_string(),
                        // Passed on to applications, bounded as the engine
                        // bounds its own wait: a `Retry-After` of years is
                        // the provider's text, not a plan.
                        retry_after: err.retry_after.map(|asked| asked.min(wait)),
                    };
                    self.channels
                        .forced
                        .finish(forced, Err(failure), quiet_until);
                    wait
                }
            };
            after_promotion = false;
            metrics::global()
                .token_next_refresh
                .get_or_create(&metrics::credential(&self.name))
                .set(metrics::unix_seconds(SystemTime::now() + wait));
            // tokio's timer runs on the monotonic clock, which stops while
            // the machine is suspended: a suspension report ends the wait,
            // since the token may have expired meanwhile.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                _ = self.channels.refresh_now.notified() => {
                    debug!(step = "refresh", "refresh requested");
                }
                _ = self.channels.promoted.notified() => {
                    debug!(step = "refresh", "new secret promoted; refreshing with it");
                    after_promotion = true;
                }
                Ok(()) = jumps.changed() => {
                    // The watchdog logs the suspension once, not once per
                    // credential.
                    let total = *jumps.borrow_and_update();
                    debug!(
                        step = "refresh",
                        suspended_total = %humantime::format_duration(whole_seconds(total)),
                        "the machine was suspended; refreshing now"
                    );
                }
            }
        }
        debug!(step = "shutdown", "token engine stopped");
    }

    /// One refresh attempt, without publishing: what the engine's loop does
    /// each time (the simulation tests call it directly). A token that is
    /// already expired when it arrives (a provider answering `expires_in:
    /// 0`) is a failed attempt, never a token to publish.
    pub async fn attempt(&self) -> Attempt {
        let token = self.login().await?;
        // The providers refuse such replies already (token::lifetime);
        // this holds for every provider whatever it parsed.
        if token.lifetime < lifetime::MIN_LIFETIME {
            return Err(ProviderError::transient(
                "login",
                format!(
                    "the provider gave a token that lives {:?}: it is already expired",
                    token.lifetime
                ),
            ));
        }
        Ok(token)
    }

    /// Logs in with the current secret; if the provider rejects it, re-reads
    /// the store (another process may have rotated it) and tries the pending
    /// secret of an unfinished rotation, then the old secret of a promoted
    /// one (S5: until it is deleted it still works), before giving up.
    async fn login(&self) -> Attempt {
        let _slot = self
            .login_slots
            .acquire()
            .await
            .expect("the login semaphore is never closed");
        let secrets = self.load_secrets().await?;
        // A refusal may echo any of them, not only the one it was sent (I7).
        for secret in [&secrets.pending, &secrets.old].into_iter().flatten() {
            self.provider.remember(secret);
        }
        let first = self.provider.login(&secrets.current).await;
        let rejected = match first {
            Err(e) if e.kind == ErrorKind::Rejected => e,
            other => return other,
        };
        // Other secrets are tried next: a refusal may echo this one too.
        self.provider.remember(&secrets.current);
        let fresh = self.load_secrets().await?;
        let mut tried = vec![secrets.current];
        for candidate in [Some(fresh.current), fresh.pending, fresh.old]
            .into_iter()
            .flatten()
        {
            if tried
                .iter()
                .any(|t| t.expose_secret() == candidate.expose_secret())
            {
                continue;
            }
            info!(
                step = "refresh",
                "secret rejected; trying the newer secret from the store"
            );
            match self.provider.login(&candidate).await {
                Err(e) if e.kind == ErrorKind::Rejected => tried.push(candidate),
                other => return other,
            }
        }
        Err(rejected)
    }

    async fn load_secrets(&self) -> Result<Secrets, ProviderError> {
        self.secrets
            .secrets()
            .await
            .map_err(|reason| ProviderError {
                // Not the provider's fault, but handled the same way: retry
                // with backoff and keep serving the current token.
                kind: ErrorKind::Transient,
                operation: "read secret",
                status: None,
                code: None,
                detail: reason,
                retry_after: None,
            })
    }

    fn publish(&self, token: Token) {
        let expires_at = token.expires_at_wall();
        let m = metrics::global();
        let label = metrics::credential(&self.name);
        m.refresh_attempts
            .get_or_create(&RefreshLabels {
                credential: self.name.clone(),
                result: "success",
            })
            .inc();
        m.token_expiry
            .get_or_create(&label)
            .set(metrics::unix_seconds(expires_at));
        m.locked_out.get_or_create(&label).set(0);
        self.channels.token.send_replace(Some(Arc::new(token)));
        self.channels.status.send_modify(|s| {
            s.token_expires_at = Some(expires_at);
            s.last_refresh_at = Some(SystemTime::now());
            s.consecutive_failures = 0;
            s.last_error = None;
            s.locked_out = false;
        });
    }

    fn record_failure(&self, err: &ProviderError, failures: u32) {
        let m = metrics::global();
        m.refresh_attempts
            .get_or_create(&RefreshLabels {
                credential: self.name.clone(),
                result: match err.kind {
                    ErrorKind::Transient => "transient",
                    ErrorKind::Quota => "quota",
                    ErrorKind::Rejected => "rejected",
                    ErrorKind::Refused => "refused",
                },
            })
            .inc();
        if err.kind == ErrorKind::Rejected {
            m.locked_out
                .get_or_create(&metrics::credential(&self.name))
                .set(1);
        }
        self.channels.status.send_modify(|s| {
            s.consecutive_failures = failures;
            s.last_error = Some(err.to_string());
            // Only a successful login clears it: a 503 during a lockout says
            // nothing about the secret.
            if err.kind == ErrorKind::Rejected {
                s.locked_out = true;
            }
        });
    }
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider whose tokens live `lifetime`, whatever it is.
    struct Lives(Duration);

    impl TokenProvider for Lives {
        fn login<'a>(&'a self, _: &'a SecretString) -> BoxFuture<'a, Result<Token, ProviderError>> {
            Box::pin(async move {
                Ok(Token::new(
                    SecretString::from("t"),
                    "Bearer".into(),
                    None,
                    self.0,
                ))
            })
        }
    }

    struct OneSecret;

    impl SecretSource for OneSecret {
        fn secrets(&self) -> BoxFuture<'_, Result<Secrets, String>> {
            Box::pin(async {
                Ok(Secrets {
                    current: SecretString::from("s"),
                    pending: None,
                    old: None,
                })
            })
        }
    }

    fn engine(lifetime: Duration) -> Engine {
        Engine {
            name: "c".into(),
            provider: Arc::new(Lives(lifetime)),
            secrets: Arc::new(OneSecret),
            policy: RefreshPolicy::default(),
            channels: crate::credential::channels("c", "test").0,
            rotate_on_login: false,
            login_slots: Arc::new(Semaphore::new(1)),
        }
    }

    #[tokio::test]
    async fn a_token_that_is_already_expired_is_a_failed_attempt() {
        for lifetime in [Duration::ZERO, Duration::from_millis(999)] {
            let e = engine(lifetime).attempt().await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Transient);
            assert!(e.to_string().contains("already expired"), "{e}");
        }
        let token = engine(Duration::from_secs(1)).attempt().await.unwrap();
        assert_eq!(token.lifetime, Duration::from_secs(1));
    }
}
