//! Forced refreshes: an application whose token was refused (a 401 from the
//! API it calls) asks for a new one now, through `POST
//! /v1/token/{name}/refresh` or `rekeyd token NAME --fresh`, instead of
//! waiting for the next scheduled refresh.
//!
//! Two things keep such requests from hurting:
//! - a request may name the token it saw refused (its SHA-256). If rekeyd
//!   already serves another one, that one is the answer and nobody logs in:
//!   a slow replica of the application cannot make rekeyd throw away a
//!   token newer than the one it holds;
//! - forced logins of one credential start at most once per
//!   `refresh.min_forced_interval`, and not while the provider asked rekeyd
//!   to wait (a quota reply's backoff, which honours `Retry-After`). A
//!   request while a forced login is in flight waits for that login; one
//!   after it, within the interval, is refused with a retry delay. A
//!   crash-looping application cannot burn a provider's login quota
//!   (Mappls counts logins).
//!
//! The decision is [`decide`], pure. [`ForcedRefresh`] is the little state
//! it needs, shared by the API (which asks) and the token engine (which
//! logs in and reports): one per credential, a few dozen bytes, no task.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use super::Token;
use crate::clock::BootInstant;

/// What to do with one forced-refresh request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Answer with the token served now: it is not the one the application
    /// saw refused.
    ServeCurrent,
    /// A forced login is in flight: wait for it and answer with its result.
    Join,
    /// Start a forced login and answer with its result.
    Login,
    /// Refuse for now; the application may ask again after `retry_after`.
    TooSoon { retry_after: Duration, cause: Wait },
}

/// Why a forced login may not start yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The last forced login started less than `refresh.min_forced_interval`
    /// ago.
    Interval,
    /// The provider answered the last login with a quota error and rekeyd
    /// is backing off as it asked.
    ProviderQuota,
}

/// What [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    /// The request named a refused token, and a valid token other than that
    /// one is served now.
    pub serves_other: bool,
    /// A forced login was asked for and has not finished.
    pub in_flight: bool,
    /// When the last forced login was asked for.
    pub last_forced: Option<BootInstant>,
    /// `refresh.min_forced_interval`.
    pub min_interval: Duration,
    /// Until when the provider asked rekeyd not to log in (a quota reply).
    pub provider_quiet_until: Option<BootInstant>,
    /// Now, on the credential's clock.
    pub now: BootInstant,
}

/// Decides one forced-refresh request. A token other than the refused one
/// is answered before anything else, since it costs nothing; a request
/// during a forced login joins it; a login starts only once both the
/// interval since the last forced login and the provider's quota backoff
/// are over (the longer wait is the one reported).
pub fn decide(i: Inputs) -> Decision {
    if i.serves_other {
        return Decision::ServeCurrent;
    }
    if i.in_flight {
        return Decision::Join;
    }
    let interval_left = i
        .last_forced
        .map_or(Duration::ZERO, |at| (at + i.min_interval) - i.now);
    let quota_left = i
        .provider_quiet_until
        .map_or(Duration::ZERO, |until| until - i.now);
    if interval_left.is_zero() && quota_left.is_zero() {
        return Decision::Login;
    }
    if quota_left > interval_left {
        Decision::TooSoon {
            retry_after: quota_left,
            cause: Wait::ProviderQuota,
        }
    } else {
        Decision::TooSoon {
            retry_after: interval_left,
            cause: Wait::Interval,
        }
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3: whole seconds) that is not
/// earlier than `wait`: rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// The SHA-256 of a token's value, as a request's `rejected_sha256` names
/// it (of the `access_token` string's UTF-8 bytes).
pub fn token_sha256(token: &Token) -> [u8; 32] {
    Sha256::digest(token.access_token.expose_secret().as_bytes()).into()
}

/// Whether `token` is the one whose SHA-256 is `rejected`. Compared in
/// constant time: the digest of the served token is not for a caller to
/// probe byte by byte.
pub fn is_rejected(token: &Token, rejected: &[u8; 32]) -> bool {
    bool::from(token_sha256(token).ct_eq(rejected))
}

/// Why a forced login failed: the provider's error as the status shows it
/// (scrubbed of secrets, see [`crate::provider::redact`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    /// The provider's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

/// The outcome of a forced login. `Err` leaves the previous token served
/// while it is valid (I8).
pub type Outcome = Result<(), Failure>;

/// A request's place in line, from [`ForcedRefresh::request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// Answer with the current token, no login.
    ServeCurrent,
    /// Refused for now.
    TooSoon { retry_after: Duration, cause: Wait },
    /// Wait with [`ForcedRefresh::outcome`] for the forced login that
    /// finishes after `finished` of them have; `started` if this request
    /// asked for it (the caller then wakes the engine).
    Await { finished: u64, started: bool },
}

/// One credential's forced-refresh state, shared by the API and the token
/// engine.
#[derive(Debug, Default)]
pub struct ForcedRefresh {
    state: Mutex<State>,
    /// Woken each time a forced login finishes.
    finished: Notify,
}

#[derive(Debug, Default)]
struct State {
    min_interval: Duration,
    in_flight: bool,
    last_forced: Option<BootInstant>,
    provider_quiet_until: Option<BootInstant>,
    /// Forced logins finished so far.
    finished: u64,
    /// The last one's failure; boxed, so that the many credentials that
    /// never had one hold a pointer's worth.
    last_failure: Option<Box<Failure>>,
}

impl ForcedRefresh {
    pub fn new(min_interval: Duration) -> ForcedRefresh {
        ForcedRefresh {
            state: Mutex::new(State {
                min_interval,
                ..State::default()
            }),
            finished: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in the state can be left half-updated by a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets `refresh.min_forced_interval` (at start and on reload).
    pub fn set_min_interval(&self, interval: Duration) {
        self.lock().min_interval = interval;
    }

    /// Decides a request ([`decide`]) and, for a login, records it as in
    /// flight in the same step, so that concurrent requests make one login.
    pub fn request(&self, serves_other: bool, now: BootInstant) -> Ticket {
        let mut s = self.lock();
        let decision = decide(Inputs {
            serves_other,
            in_flight: s.in_flight,
            last_forced: s.last_forced,
            min_interval: s.min_interval,
            provider_quiet_until: s.provider_quiet_until,
            now,
        });
        match decision {
            Decision::ServeCurrent => Ticket::ServeCurrent,
            Decision::TooSoon { retry_after, cause } => Ticket::TooSoon { retry_after, cause },
            Decision::Join => Ticket::Await {
                finished: s.finished,
                started: false,
            },
            Decision::Login => {
                s.in_flight = true;
                s.last_forced = Some(now);
                Ticket::Await {
                    finished: s.finished,
                    started: true,
                }
            }
        }
    }

    /// Waits until more than `finished` forced logins have finished and
    /// returns the outcome of the last one.
    pub async fn outcome(&self, finished: u64) -> Outcome {
        loop {
            let notified = self.finished.notified();
            tokio::pin!(notified);
            // Registered before the check, so a finish between the check and
            // the wait is not missed.
            notified.as_mut().enable();
            {
                let s = self.lock();
                if s.finished > finished {
                    return match &s.last_failure {
                        None => Ok(()),
                        Some(f) => Err((**f).clone()),
                    };
                }
            }
            notified.await;
        }
    }

    /// For the engine, as a login attempt starts: whether it is the forced
    /// login that requests wait for. A login already running when the
    /// request came does not count: it may have been sent before the
    /// application's token was refused.
    pub fn claim(&self) -> bool {
        self.lock().in_flight
    }

    /// For the engine, after every login attempt: `quiet_until` is when the
    /// provider allows the next login after a quota reply (`None` on any
    /// other outcome). After a claimed attempt (`forced`), also reports its
    /// outcome to the requests waiting for it.
    pub fn finish(&self, forced: bool, outcome: Outcome, quiet_until: Option<BootInstant>) {
        let mut s = self.lock();
        s.provider_quiet_until = quiet_until;
        if forced && s.in_flight {
            s.in_flight = false;
            s.finished += 1;
            s.last_failure = outcome.err().map(Box::new);
            drop(s);
            self.finished.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn at(base: BootInstant, secs: u64) -> BootInstant {
        base + Duration::from_secs(secs)
    }

    fn inputs(now: BootInstant) -> Inputs {
        Inputs {
            serves_other: false,
            in_flight: false,
            last_forced: None,
            min_interval: Duration::from_secs(5),
            provider_quiet_until: None,
            now,
        }
    }

    fn base() -> BootInstant {
        ManualClock::new().now()
    }

    #[test]
    fn a_first_request_logs_in() {
        let t0 = base();
        assert_eq!(decide(inputs(t0)), Decision::Login);
    }

    #[test]
    fn another_token_served_is_answered_before_anything_else() {
        let t0 = base();
        for in_flight in [false, true] {
            let i = Inputs {
                serves_other: true,
                in_flight,
                last_forced: Some(t0),
                provider_quiet_until: Some(at(t0, 60)),
                ..inputs(t0)
            };
            assert_eq!(decide(i), Decision::ServeCurrent);
        }
    }

    #[test]
    fn a_request_during_a_forced_login_joins_it_whatever_the_interval() {
        let t0 = base();
        let i = Inputs {
            in_flight: true,
            last_forced: Some(t0),
            ..inputs(at(t0, 1))
        };
        assert_eq!(decide(i), Decision::Join);
    }

    #[test]
    fn within_the_interval_a_request_is_refused_until_it_ends() {
        let t0 = base();
        let i = Inputs {
            last_forced: Some(t0),
            ..inputs(t0 + Duration::from_millis(1500))
        };
        assert_eq!(
            decide(i),
            Decision::TooSoon {
                retry_after: Duration::from_millis(3500),
                cause: Wait::Interval
            }
        );
        // At the end of the interval, and after it, a login starts again.
        for now in [at(t0, 5), at(t0, 6)] {
            let i = Inputs {
                last_forced: Some(t0),
                ..inputs(now)
            };
            assert_eq!(decide(i), Decision::Login);
        }
    }

    #[test]
    fn the_provider_quota_backoff_holds_forced_logins_too() {
        let t0 = base();
        let i = Inputs {
            provider_quiet_until: Some(at(t0, 30)),
            ..inputs(at(t0, 10))
        };
        assert_eq!(
            decide(i),
            Decision::TooSoon {
                retry_after: Duration::from_secs(20),
                cause: Wait::ProviderQuota
            }
        );
        // The longer of the two waits is the one reported.
        let i = Inputs {
            last_forced: Some(at(t0, 9)),
            min_interval: Duration::from_secs(60),
            provider_quiet_until: Some(at(t0, 30)),
            ..inputs(at(t0, 10))
        };
        assert_eq!(
            decide(i),
            Decision::TooSoon {
                retry_after: Duration::from_secs(59),
                cause: Wait::Interval
            }
        );
        let i = Inputs {
            provider_quiet_until: Some(at(t0, 30)),
            ..inputs(at(t0, 30))
        };
        assert_eq!(decide(i), Decision::Login);
    }

    #[test]
    fn a_zero_interval_limits_nothing_but_concurrency() {
        let t0 = base();
        let i = Inputs {
            last_forced: Some(t0),
            min_interval: Duration::ZERO,
            ..inputs(t0)
        };
        assert_eq!(decide(i), Decision::Login);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(3500)), 4);
        assert_eq!(retry_after_seconds(Duration::from_secs(59)), 59);
    }

    #[test]
    fn the_rejected_token_is_recognised_by_its_digest() {
        let token = Token::new(
            "abc".to_string().into(),
            "Bearer".into(),
            None,
            Duration::ZERO,
        );
        // sha256("abc"), FIPS 180-2 appendix B.1.
        let digest: [u8; 32] =
            hex::decode("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
                .unwrap()
                .try_into()
                .unwrap();
        assert!(is_rejected(&token, &digest));
        let mut other = digest;
        other[31] ^= 1;
        assert!(!is_rejected(&token, &other));
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_login_and_its_outcome() {
        let forced = std::sync::Arc::new(ForcedRefresh::new(Duration::from_secs(5)));
        let t0 = base();
        let first = forced.request(false, t0);
        let second = forced.request(false, t0);
        assert_eq!(
            first,
            Ticket::Await {
                finished: 0,
                started: true
            }
        );
        assert_eq!(
            second,
            Ticket::Await {
                finished: 0,
                started: false
            }
        );
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let forced = forced.clone();
                tokio::spawn(async move { forced.outcome(0).await })
            })
            .collect();
        // A login that was not claimed (it started before the request)
        // finishes nothing the requests wait for.
        forced.finish(false, Ok(()), None);
        assert!(forced.claim());
        let failure = Failure {
            reason: "HTTP 503".into(),
            retry_after: Some(Duration::from_secs(7)),
        };
        forced.finish(true, Err(failure.clone()), None);
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), Err(failure.clone()));
        }
        assert!(!forced.claim(), "the forced login is over");
        // The next request within the interval is refused, not joined.
        assert!(matches!(
            forced.request(false, at(t0, 1)),
            Ticket::TooSoon {
                cause: Wait::Interval,
                ..
            }
        ));
        // After it, a login succeeds and clears the failure.
        assert_eq!(
            forced.request(false, at(t0, 5)),
            Ticket::Await {
                finished: 1,
                started: true
            }
        );
        assert!(forced.claim());
        forced.finish(true, Ok(()), None);
        assert_eq!(forced.outcome(1).await, Ok(()));
    }

    #[tokio::test]
    async fn a_quota_reply_holds_the_next_forced_login() {
        let forced = ForcedRefresh::new(Duration::ZERO);
        let t0 = base();
        forced.finish(false, Ok(()), Some(at(t0, 30)));
        assert_eq!(
            forced.request(false, at(t0, 10)),
            Ticket::TooSoon {
                retry_after: Duration::from_secs(20),
                cause: Wait::ProviderQuota
            }
        );
        // The next login's outcome replaces it.
        forced.finish(false, Ok(()), None);
        assert!(matches!(
            forced.request(false, at(t0, 10)),
            Ticket::Await { started: true, .. }
        ));
    }
}
