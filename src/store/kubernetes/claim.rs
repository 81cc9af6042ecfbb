//! The rotation claim of the Kubernetes store (I6): a `coordination.k8s.io/v1`
//! Lease that one replica holds while it rotates.
//!
//! One Lease covers the whole store, so at most one rotation runs at a time
//! across all replicas and credentials; the credential being rotated is
//! recorded in an annotation for operators. Claims of one process are
//! queued on a local mutex first, so two credentials of one daemon wait for
//! each other instead of reporting the other as busy.
//!
//! Timing (S3). No node ever compares its wall clock with another's:
//!
//! - An observer (a replica that wants the Lease) remembers the record it
//!   last read (holder, `renewTime`, `resourceVersion`) and the instant, on
//!   its own monotonic clock, at which it first saw it, as client-go's leader
//!   election does. It takes the Lease over only once that same record has
//!   stood unchanged for a full `leaseDurationSeconds` from that instant
//!   ([`decide`]). `renewTime` matters only in that it changes: its value is
//!   the holder's wall clock and says nothing about ours.
//! - The holder renews every `claim_ttl / 4` and counts from the instant it
//!   *sent* its last renewal that the server accepted; once that is older
//!   than half the TTL, [`Claim::is_fresh`] is false and no new side effect
//!   starts. A renewal that finds another holder, or failures that last
//!   until the claim is no longer fresh, cancel [`Claim::lost`].
//! - Every request to the API server times out at a quarter of the TTL
//!   ([`request_timeout`]), so a stalled server cannot hold a step past it.
//!
//! What remains assumed: that the nodes' clocks run at nearly the same
//! *rate* (an observer's full TTL must not pass before the holder's half),
//! and that the pause between an `is_fresh()` check and the side effect it
//! licenses is short next to half the TTL. Safety does not rest on either
//! (S1): every destructive provider call is licensed by a compare-and-swap
//! of the journal that the actor just made, so a claim that lapsed unnoticed
//! costs a failed CAS, not a deleted secret. Every Lease write carries the
//! Lease's `resourceVersion`, so two claimers deciding on the same read
//! cannot both win, and a late renewal cannot undo a takeover.
//!
//! [`Claim::is_fresh`]: crate::store::Claim::is_fresh
//! [`Claim::lost`]: crate::store::Claim::lost

use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{api_code, bounded, describe_api_error};
use crate::store::StoreError;

/// Names the credential whose rotation holds the Lease.
const CREDENTIAL_ANNOTATION: &str = "rekeyd.io/credential";

/// Rounds of read-decide-write lost to other writers before giving up.
const MAX_WRITE_ATTEMPTS: u32 = 10;

/// No store request waits less than this, however short the TTL: a loaded
/// API server or etcd member may need a moment.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

// --- holder-side timing, shared with the etcd store ---------------------------

/// How long a store request may take with claim TTL `ttl`: a quarter of it,
/// at least [`MIN_REQUEST_TIMEOUT`], at most `cap` (S3). A renewal sent a
/// quarter TTL after the last one then ends, answered or not, by the time
/// the claim stops being fresh (half the TTL), and no step waits on a
/// stalled store while the claim may lapse under it. With a TTL under
/// 4 s the floor makes this a larger fraction; at the 2 s minimum the
/// configuration allows it is half the TTL, the whole fresh period.
pub(crate) fn request_timeout(ttl: Duration, cap: Duration) -> Duration {
    (ttl / 4).clamp(MIN_REQUEST_TIMEOUT, cap.max(MIN_REQUEST_TIMEOUT))
}

/// How long after *sending* its last accepted renewal a holder may still
/// start a side effect: half the TTL (S3). An observer takes over only a
/// full TTL after it *saw* that renewal, which was after we sent it, timed
/// on its own clock. The other half is the margin for what we cannot see:
/// clocks whose rates differ a little, a request still in flight, and the
/// pause between an `is_fresh()` check and the side effect it licenses.
fn fresh_for(ttl: Duration) -> Duration {
    ttl / 2
}

/// A moment on two clocks: tokio's monotonic one (which tests can pause)
/// and, on Linux, `CLOCK_BOOTTIME`, which unlike `CLOCK_MONOTONIC` keeps
/// counting while the machine is suspended. A holder resumed from a
/// suspend must see that its claim went stale in the meantime.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    monotonic: Instant,
    boot: Option<Duration>,
}

impl Stamp {
    fn now() -> Stamp {
        Stamp {
            monotonic: Instant::now(),
            boot: boot_time(),
        }
    }

    /// Time since this stamp: the longer reading of the two clocks.
    fn elapsed(&self) -> Duration {
        let boot = match (self.boot, boot_time()) {
            (Some(then), Some(now)) => now.saturating_sub(then),
            _ => Duration::ZERO,
        };
        self.monotonic.elapsed().max(boot)
    }
}

/// `CLOCK_BOOTTIME`, or `None` where it cannot be read.
fn boot_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// The holder's side of a claim (S3): when its last accepted renewal was
/// sent, and whether it is lost. Shared by the claim handle and the task
/// that renews it.
#[derive(Debug, Clone)]
pub(crate) struct Tenure {
    renewed: Arc<StdMutex<Stamp>>,
    fresh_for: Duration,
    lost: CancellationToken,
}

impl Tenure {
    /// A claim whose acquiring request was sent at `sent`.
    fn new(sent: Stamp, ttl: Duration) -> Tenure {
        Tenure {
            renewed: Arc::new(StdMutex::new(sent)),
            fresh_for: fresh_for(ttl),
            lost: CancellationToken::new(),
        }
    }

    /// A claim whose acquiring request is being sent now: call right before
    /// sending it (the server stores it later, never earlier).
    pub(crate) fn sending(ttl: Duration) -> Tenure {
        Tenure::new(Stamp::now(), ttl)
    }

    fn last_renewal(&self) -> Stamp {
        *self.renewed.lock().expect("tenure")
    }

    fn renewed(&self, sent: Stamp) {
        let mut renewed = self.renewed.lock().expect("tenure");
        if sent.monotonic > renewed.monotonic {
            *renewed = sent;
        }
    }

    fn lose(&self) {
        self.lost.cancel();
    }

    /// See [`crate::store::Claim::is_fresh`].
    pub(crate) fn is_fresh(&self) -> bool {
        !self.lost.is_cancelled() && self.last_renewal().elapsed() < self.fresh_for
    }

    /// See [`crate::store::Claim::lost`].
    pub(crate) fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }
}

/// What one renewal attempt found.
#[derive(Debug)]
pub(crate) enum Renewal {
    /// The store accepted it: the claim is still ours.
    Renewed,
    /// The claim is gone (another holder, an expired lease); says why.
    Lost(&'static str),
    /// The attempt failed; the claim may still be ours.
    Failed(String),
}

/// Renews a held claim every `ttl / 4` until `stop`, each attempt bounded
/// by `timeout`, and records the send time of each accepted one in
/// `tenure`. Cancels `tenure.lost()` and returns when a renewal finds the
/// claim gone, or when one fails while the claim is no longer fresh: from
/// then on another actor may hold it, so the run must stop rather than
/// retry its way back (S3). `claim` names the Lease or key in logs.
pub(crate) async fn keep_renewed<F, Fut>(
    tenure: Tenure,
    ttl: Duration,
    timeout: Duration,
    claim: &str,
    stop: &CancellationToken,
    mut renew: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Renewal>,
{
    let every = ttl / 4;
    let mut next = tenure.last_renewal().monotonic + every;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let sent = Stamp::now();
        // A renewal racing the stop would only extend a claim being released.
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(timeout, renew()) => r.unwrap_or_else(|_| {
                Renewal::Failed(format!("no answer within {timeout:?}"))
            }),
        };
        match outcome {
            Renewal::Renewed => {
                tenure.renewed(sent);
                next = sent.monotonic + every;
            }
            Renewal::Lost(why) => {
                warn!(
                    step = "claim",
                    claim,
                    "rotation claim lost ({why}); the rotation stops here and its journal is resumed later"
                );
                tenure.lose();
                return;
            }
            Renewal::Failed(reason) if !tenure.is_fresh() => {
                warn!(
                    step = "claim",
                    claim,
                    error = %reason,
                    "cannot renew the rotation claim and it may have lapsed; the rotation stops here and its journal is resumed later"
                );
                tenure.lose();
                return;
            }
            Renewal::Failed(reason) => {
                warn!(step = "claim", claim, error = %reason, "cannot renew the rotation claim; retrying");
                // Soon: a few more attempts fit before the claim goes stale.
                next = Instant::now() + ttl / 8;
            }
        }
    }
}

// --- observer-side decision -----------------------------------------------------

/// The Lease record as an observer compares it: any change means the holder
/// (or someone) wrote it, and restarts the observer's count (S3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Holding {
    /// `None` or empty: released.
    pub holder: Option<String>,
    /// The holder's wall clock when it renewed: compared for change only.
    pub renewed_at: Option<SystemTime>,
    pub resource_version: Option<String>,
    /// The holder's `leaseDurationSeconds`.
    pub duration: Option<Duration>,
}

/// A record seen before and how long ago, on our monotonic clock, we first
/// saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observation {
    pub record: Holding,
    pub age: Duration,
}

/// What a claimer may do with the Lease as it found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nobody holds it: take it.
    Acquire,
    /// We hold it already (a claim of ours that was not released): renew.
    Renew,
    /// Another holder, maybe alive: unless it renews (or releases), a
    /// takeover becomes possible after `wait` on our own clock.
    Busy { wait: Duration },
    /// The holder left the record unchanged for a full duration on our
    /// clock: take it over.
    Takeover,
}

/// The claim decision, without I/O and without any wall clock: `read` is
/// the Lease as just read, `before` the record we had seen and how long
/// ago. `ttl` stands in for a missing `leaseDurationSeconds`.
pub(crate) fn decide(
    read: &Holding,
    before: Option<&Observation>,
    me: &str,
    ttl: Duration,
) -> Decision {
    match read.holder.as_deref().filter(|h| !h.is_empty()) {
        None => Decision::Acquire,
        Some(h) if h == me => Decision::Renew,
        Some(_) => {
            let duration = read.duration.unwrap_or(ttl);
            // A record we had not seen yet counts from now.
            let unchanged_for = before
                .filter(|b| b.record == *read)
                .map_or(Duration::ZERO, |b| b.age);
            if unchanged_for >= duration {
                Decision::Takeover
            } else {
                Decision::Busy {
                    wait: duration - unchanged_for,
                }
            }
        }
    }
}

fn holding(lease: &Lease) -> Holding {
    let spec = lease.spec.as_ref();
    Holding {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        renewed_at: spec
            .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
            .map(|t| SystemTime::from(t.0)),
        resource_version: lease.metadata.resource_version.clone(),
        duration: spec
            .and_then(|s| s.lease_duration_seconds)
            .map(|s| Duration::from_secs(s.max(0) as u64)),
    }
}

fn micro_time(t: SystemTime) -> Option<MicroTime> {
    Timestamp::try_from(t).ok().map(MicroTime)
}

/// The Lease record an observer last read, and when it first saw it on its
/// own monotonic clock: its only measure of a holder's silence (S3).
#[derive(Debug, Default)]
struct LastSeen(Option<(Holding, Instant)>);

impl LastSeen {
    /// Notes `read`, received at `at`, unless it is the record seen before;
    /// returns what had been seen before and how long ago it was first seen.
    fn see(&mut self, read: &Holding, at: Instant) -> Option<Observation> {
        let before = self.0.as_ref().map(|(record, since)| Observation {
            record: record.clone(),
            age: at.saturating_duration_since(*since),
        });
        if before.as_ref().is_none_or(|b| b.record != *read) {
            self.0 = Some((read.clone(), at));
        }
        before
    }
}

/// A process-wide unique holder identity: `<hostname>/<pid>/<random>`. The
/// random part tells apart two stores of one process (and a restarted pod
/// that got the same pid).
fn new_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

pub(super) struct Claims {
    leases: Api<Lease>,
    /// `kubernetes Lease <ns>/<name>`, for errors.
    target: String,
    lease: String,
    ttl: Duration,
    /// Bound on each request (see [`request_timeout`]).
    timeout: Duration,
    identity: String,
    /// Serializes this process's claims (see the module comment).
    local: Arc<Mutex<()>>,
    /// What an observer's decisions rest on (S3). Kept across claims, so
    /// repeated non-waiting attempts count from the first sighting.
    last_seen: StdMutex<LastSeen>,
}

/// The outcome of one attempt to take the Lease.
enum Attempt {
    Acquired(Tenure),
    Busy { wait: Duration },
}

impl Claims {
    pub(super) fn new(
        leases: Api<Lease>,
        qualified: String,
        lease: String,
        ttl: Duration,
        timeout: Duration,
    ) -> Self {
        Claims {
            leases,
            target: format!("kubernetes Lease {qualified}"),
            lease,
            ttl,
            timeout,
            identity: new_identity(),
            local: Arc::new(Mutex::new(())),
            last_seen: StdMutex::default(),
        }
    }

    fn unavailable(&self, e: kube::Error) -> StoreError {
        StoreError::Unavailable {
            target: self.target.clone(),
            reason: describe_api_error(&e),
        }
    }

    pub(super) async fn claim(
        &self,
        credential: &str,
        wait: bool,
    ) -> Result<Option<LeaseClaim>, StoreError> {
        let local = self.local.clone().lock_owned().await;
        let tenure = loop {
            match self.try_acquire(credential).await? {
                Attempt::Acquired(tenure) => break tenure,
                Attempt::Busy { .. } if !wait => return Ok(None),
                Attempt::Busy { wait } => {
                    // Poll: a release is not announced. Never sleep past the
                    // moment a takeover becomes possible.
                    let poll = (self.ttl / 5).min(wait);
                    tokio::time::sleep(poll.max(Duration::from_millis(50))).await;
                }
            }
        };
        info!(step = "claim", credential, holder = %self.identity, "rotation claim acquired");
        let stop = CancellationToken::new();
        let renewer = Arc::new(self.renewer());
        let renew = tokio::spawn({
            let (tenure, stop, renewer) = (tenure.clone(), stop.clone(), renewer.clone());
            async move {
                let (ttl, timeout, target) = (renewer.ttl, renewer.timeout, &renewer.target);
                keep_renewed(tenure, ttl, timeout, target, &stop, || {
                    let renewer = renewer.clone();
                    async move { renewer.renew().await }
                })
                .await;
            }
        });
        Ok(Some(LeaseClaim {
            tenure,
            stop,
            release: Some(Release {
                renewer,
                renew,
                _local: local,
            }),
        }))
    }

    fn renewer(&self) -> Renewer {
        Renewer {
            leases: self.leases.clone(),
            lease: self.lease.clone(),
            target: self.target.clone(),
            identity: self.identity.clone(),
            ttl: self.ttl,
            timeout: self.timeout,
        }
    }

    async fn try_acquire(&self, credential: &str) -> Result<Attempt, StoreError> {
        let duration_seconds = self.ttl.as_secs_f64().ceil() as i32;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let found = bounded(self.timeout, self.leases.get_opt(&self.lease))
                .await
                .map_err(|e| self.unavailable(e))?;
            // After the answer arrived: the record may have been written
            // just before the server read it, never after (S3).
            let received = Instant::now();
            let now = SystemTime::now();
            let Some(mut lease) = found else {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.lease.clone()),
                        annotations: Some(
                            [(CREDENTIAL_ANNOTATION.into(), credential.into())].into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration_seconds),
                        acquire_time: micro_time(now),
                        renew_time: micro_time(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                let tenure = Tenure::sending(self.ttl);
                match bounded(
                    self.timeout,
                    self.leases.create(&PostParams::default(), &lease),
                )
                .await
                {
                    Ok(_) => return Ok(Attempt::Acquired(tenure)),
                    Err(e) if api_code(&e) == Some(409) => continue,
                    Err(e) if api_code(&e) == Some(403) => {
                        return Err(StoreError::Unavailable {
                            target: self.target.clone(),
                            reason: format!(
                                "{}; the Lease does not exist and may not be created by this account: create it beforehand (deploy/kubernetes has it)",
                                describe_api_error(&e)
                            ),
                        });
                    }
                    Err(e) => return Err(self.unavailable(e)),
                }
            };
            let read = holding(&lease);
            let before = self
                .last_seen
                .lock()
                .expect("last seen")
                .see(&read, received);
            let decision = decide(&read, before.as_ref(), &self.identity, self.ttl);
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            match decision {
                Decision::Busy { wait } => return Ok(Attempt::Busy { wait }),
                Decision::Renew => {}
                Decision::Acquire | Decision::Takeover => {
                    if decision == Decision::Takeover {
                        warn!(
                            step = "claim",
                            credential,
                            previous = spec.holder_identity.as_deref().unwrap_or(""),
                            "taking over a rotation claim whose holder stopped renewing it"
                        );
                    }
                    // A new holder: counted as a transition, as the
                    // Kubernetes leader election does.
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = micro_time(now);
                }
            }
            // Our wall clock, for operators and other Lease readers; no
            // rekeyd replica compares it with its own (S3).
            spec.renew_time = micro_time(now);
            spec.lease_duration_seconds = Some(duration_seconds);
            lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(CREDENTIAL_ANNOTATION.into(), credential.into());
            let tenure = Tenure::sending(self.ttl);
            match bounded(
                self.timeout,
                self.leases
                    .replace(&self.lease, &PostParams::default(), &lease),
            )
            .await
            {
                Ok(_) => return Ok(Attempt::Acquired(tenure)),
                // Someone wrote the Lease since we read it: decide again.
                Err(e) if api_code(&e) == Some(409) || api_code(&e) == Some(404) => continue,
                Err(e) => return Err(self.unavailable(e)),
            }
        }
        Err(StoreError::Unavailable {
            target: self.target.clone(),
            reason: format!(
                "still changing under concurrent writers after {MAX_WRITE_ATTEMPTS} attempts"
            ),
        })
    }
}

/// What renewing and releasing need, owned, for background tasks.
struct Renewer {
    leases: Api<Lease>,
    lease: String,
    target: String,
    identity: String,
    ttl: Duration,
    timeout: Duration,
}

impl Renewer {
    async fn renew(&self) -> Renewal {
        match self.update(false).await {
            Ok(true) => Renewal::Renewed,
            Ok(false) => Renewal::Lost("the Lease is held by another replica or was deleted"),
            Err(reason) => Renewal::Failed(reason),
        }
    }

    /// Rewrites the Lease if we still hold it: `Ok(false)` when we do not.
    /// `release`: clear the holder instead of renewing. Each request is
    /// bounded; the caller bounds the whole (retries included).
    async fn update(&self, release: bool) -> Result<bool, String> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let Some(mut lease) = bounded(self.timeout, self.leases.get_opt(&self.lease))
                .await
                .map_err(|e| describe_api_error(&e))?
            else {
                return Ok(false);
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(false);
            }
            if release {
                spec.holder_identity = None;
                if let Some(a) = lease.metadata.annotations.as_mut() {
                    a.remove(CREDENTIAL_ANNOTATION);
                }
            } else {
                spec.renew_time = micro_time(SystemTime::now());
            }
            // The read's resourceVersion goes with the write: should another
            // replica have taken the Lease over since, this is a 409 and the
            // next read sees the new holder.
            match bounded(
                self.timeout,
                self.leases
                    .replace(&self.lease, &PostParams::default(), &lease),
            )
            .await
            {
                Ok(_) => return Ok(true),
                Err(e) if api_code(&e) == Some(409) => continue,
                Err(e) => return Err(describe_api_error(&e)),
            }
        }
        Err(format!(
            "still changing under concurrent writers after {MAX_WRITE_ATTEMPTS} attempts"
        ))
    }
}

/// A held Lease. Dropping it stops renewing and releases the Lease in the
/// background (best effort: if that fails, the Lease expires by itself).
pub(super) struct LeaseClaim {
    tenure: Tenure,
    stop: CancellationToken,
    release: Option<Release>,
}

struct Release {
    renewer: Arc<Renewer>,
    renew: JoinHandle<()>,
    /// Held until the Lease is released, so this process's next claim
    /// starts from a released Lease.
    _local: OwnedMutexGuard<()>,
}

impl Release {
    async fn run(self) {
        let _ = self.renew.await;
        let released = tokio::time::timeout(self.renewer.timeout, self.renewer.update(true)).await;
        let error = match released {
            Ok(Ok(_)) => return,
            Ok(Err(reason)) => reason,
            Err(_) => format!("no answer within {:?}", self.renewer.timeout),
        };
        warn!(step = "claim", lease = %self.renewer.target, error = %error, "cannot release the rotation claim; it expires by itself");
    }
}

impl crate::store::Claim for LeaseClaim {
    fn is_fresh(&self) -> bool {
        self.tenure.is_fresh()
    }

    fn lost(&self) -> CancellationToken {
        self.tenure.lost()
    }
}

impl Drop for LeaseClaim {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(release) = self.release.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(release.run());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(15);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A record held by `holder`, renewed at `renewed` (the holder's wall
    /// clock), written at resourceVersion `rv`.
    fn held_by(holder: &str, renewed: SystemTime, rv: u64, duration: Option<u64>) -> Holding {
        Holding {
            holder: Some(holder.into()),
            renewed_at: Some(renewed),
            resource_version: Some(rv.to_string()),
            duration: duration.map(Duration::from_secs),
        }
    }

    fn seen(record: &Holding, age: Duration) -> Observation {
        Observation {
            record: record.clone(),
            age,
        }
    }

    #[test]
    fn a_released_lease_is_acquired_at_once() {
        assert_eq!(
            decide(&Holding::default(), None, "me", TTL),
            Decision::Acquire
        );
        let released = Holding {
            holder: Some(String::new()),
            ..held_by("x", SystemTime::now(), 7, Some(15))
        };
        // Never seen before, just released: no wait.
        assert_eq!(decide(&released, None, "me", TTL), Decision::Acquire);
        let held = held_by("x", SystemTime::now(), 6, Some(15));
        assert_eq!(
            decide(&released, Some(&seen(&held, secs(1))), "me", TTL),
            Decision::Acquire
        );
    }

    #[test]
    fn own_lease_is_renewed_however_old() {
        let mine = held_by("me", SystemTime::UNIX_EPOCH, 1, Some(15));
        assert_eq!(decide(&mine, None, "me", TTL), Decision::Renew);
        assert_eq!(
            decide(&mine, Some(&seen(&mine, secs(500))), "me", TTL),
            Decision::Renew
        );
    }

    #[test]
    fn a_skewed_holder_clock_changes_nothing_on_first_sight() {
        // The holder's renewTime is 20 s behind or ahead of our wall clock
        // (or wildly off): we wait one full duration from now either way.
        let now = SystemTime::now();
        for renewed in [
            now - secs(20),
            now + secs(20),
            now - secs(3600),
            SystemTime::UNIX_EPOCH,
        ] {
            let lease = held_by("other", renewed, 5, Some(15));
            assert_eq!(
                decide(&lease, None, "me", TTL),
                Decision::Busy { wait: secs(15) },
                "{renewed:?}"
            );
            assert_eq!(
                decide(&lease, Some(&seen(&lease, secs(14))), "me", TTL),
                Decision::Busy { wait: secs(1) }
            );
            assert_eq!(
                decide(&lease, Some(&seen(&lease, secs(15))), "me", TTL),
                Decision::Takeover
            );
        }
    }

    /// An observer polling a Lease on a simulated monotonic clock: at each
    /// poll it reads `record(t)`, notes it, and decides.
    fn observe_for(
        polls: impl IntoIterator<Item = Duration>,
        record: impl Fn(Duration) -> Holding,
    ) -> Vec<(Duration, Decision)> {
        let start = Instant::now();
        let mut last_seen = LastSeen::default();
        polls
            .into_iter()
            .map(|t| {
                let read = record(t);
                let before = last_seen.see(&read, start + t);
                (t, decide(&read, before.as_ref(), "me", TTL))
            })
            .collect()
    }

    fn every(step: Duration, until: Duration) -> impl Iterator<Item = Duration> {
        (0..)
            .map(move |i| step * i)
            .take_while(move |t| *t <= until)
    }

    #[test]
    fn a_renewing_holder_keeps_us_busy() {
        // Renews every 5 s with its clock 20 s behind ours; we poll every
        // second for ten durations and never take over.
        let behind = SystemTime::now() - secs(20);
        let decisions = observe_for(every(secs(1), secs(150)), |t| {
            let renewal = t.as_secs() / 5;
            held_by("other", behind + secs(renewal * 5), renewal, Some(15))
        });
        for (t, decision) in decisions {
            assert!(
                matches!(decision, Decision::Busy { wait } if wait > secs(10)),
                "{t:?}: {decision:?}"
            );
        }
    }

    #[test]
    fn a_silent_holder_is_taken_over_one_duration_after_we_first_saw_it() {
        let ahead = SystemTime::now() + secs(20);
        let lease = held_by("other", ahead, 9, Some(10));
        // First seen at t = 3 s: the holder's duration (10 s, not our TTL)
        // counts from there.
        let decisions = observe_for(every(secs(1), secs(20)).skip(3), |_| lease.clone());
        for (t, decision) in decisions {
            let expected = if t >= secs(13) {
                Decision::Takeover
            } else {
                Decision::Busy { wait: secs(13) - t }
            };
            assert_eq!(decision, expected, "at {t:?}");
        }
    }

    #[test]
    fn any_change_of_the_record_restarts_the_count() {
        let now = SystemTime::now();
        let first = held_by("other", now, 1, Some(15));
        // Only the resourceVersion moved (e.g. an annotation was written).
        let rewritten = held_by("other", now, 2, Some(15));
        // A different holder took over from the one we watched.
        let new_holder = held_by("third", now, 2, Some(15));
        for changed in [rewritten, new_holder] {
            assert_eq!(
                decide(&changed, Some(&seen(&first, secs(100))), "me", TTL),
                Decision::Busy { wait: secs(15) }
            );
        }
    }

    #[test]
    fn missing_fields_fall_back_to_waiting() {
        // No duration: ours.
        let lease = Holding {
            duration: None,
            ..held_by("other", SystemTime::now(), 1, None)
        };
        assert_eq!(
            decide(&lease, None, "me", TTL),
            Decision::Busy { wait: TTL }
        );
        // No renewal time at all: still a holder, still a full wait.
        let lease = Holding {
            holder: Some("other".into()),
            ..Holding::default()
        };
        assert_eq!(
            decide(&lease, None, "me", TTL),
            Decision::Busy { wait: TTL }
        );
        assert_eq!(
            decide(&lease, Some(&seen(&lease, TTL)), "me", TTL),
            Decision::Takeover
        );
    }

    #[test]
    fn holding_reads_the_record_an_observer_compares() {
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        let lease = Lease {
            metadata: ObjectMeta {
                resource_version: Some("42".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("h".into()),
                acquire_time: Some(MicroTime(at)),
                lease_duration_seconds: Some(7),
                ..LeaseSpec::default()
            }),
        };
        assert_eq!(
            holding(&lease),
            held_by(
                "h",
                SystemTime::UNIX_EPOCH + secs(1_800_000_000),
                42,
                Some(7)
            )
        );
    }

    #[test]
    fn identities_are_unique_per_store() {
        let a = new_identity();
        assert_ne!(a, new_identity());
        assert_eq!(a.split('/').count(), 3);
    }

    #[test]
    fn request_timeouts_stay_below_the_ttl() {
        let cap = secs(30);
        assert_eq!(request_timeout(secs(15), cap), Duration::from_millis(3750));
        assert_eq!(request_timeout(secs(4), cap), secs(1));
        // The configuration's 2 s minimum: the floor, half the TTL.
        assert_eq!(request_timeout(secs(2), cap), secs(1));
        assert_eq!(request_timeout(secs(3600), cap), cap);
        assert_eq!(request_timeout(secs(3600), secs(5)), secs(5));
    }

    // --- the holder's side, on tokio's paused clock ---------------------------

    /// Runs `keep_renewed` with TTL 8 s and a 2 s timeout over `renew`.
    fn hold<F, Fut>(renew: F) -> (Tenure, CancellationToken)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Renewal> + Send,
    {
        let ttl = secs(8);
        let tenure = Tenure::sending(ttl);
        let stop = CancellationToken::new();
        tokio::spawn({
            let (tenure, stop) = (tenure.clone(), stop.clone());
            async move { keep_renewed(tenure, ttl, secs(2), "test lease", &stop, renew).await }
        });
        (tenure, stop)
    }

    /// Lets `d` pass on the paused clock: it jumps from timer to timer,
    /// running every task that wakes in between.
    async fn run_for(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_claim_stays_fresh() {
        let calls = Arc::new(StdMutex::new(0));
        let (tenure, stop) = hold({
            let calls = calls.clone();
            move || {
                *calls.lock().unwrap() += 1;
                async { Renewal::Renewed }
            }
        });
        for _ in 0..40 {
            run_for(secs(1)).await;
            assert!(tenure.is_fresh());
        }
        assert!(!tenure.lost().is_cancelled());
        // Every quarter TTL.
        let calls = *calls.lock().unwrap();
        assert!((19..=21).contains(&calls), "{calls}");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn failing_renewals_stale_the_claim_at_half_its_ttl_then_lose_it() {
        let (tenure, _stop) = hold(|| async { Renewal::Failed("503".into()) });
        run_for(Duration::from_millis(3900)).await;
        assert!(tenure.is_fresh());
        assert!(!tenure.lost().is_cancelled());
        run_for(Duration::from_millis(200)).await;
        assert!(!tenure.is_fresh(), "stale after half the TTL");
        // Lost at the first failure after that (retries every TTL / 8).
        run_for(secs(1)).await;
        assert!(tenure.lost().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_renewal_ends_at_its_timeout_and_loses_the_claim() {
        let (tenure, _stop) = hold(std::future::pending::<Renewal>);
        // Sent at 2 s, given up at 4 s: the claim is stale by then.
        run_for(Duration::from_millis(3900)).await;
        assert!(!tenure.lost().is_cancelled());
        run_for(Duration::from_millis(200)).await;
        assert!(!tenure.is_fresh());
        assert!(tenure.lost().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_finds_another_holder_loses_at_once() {
        let (tenure, _stop) = hold(|| async { Renewal::Lost("taken over") });
        run_for(Duration::from_millis(2100)).await;
        assert!(tenure.lost().is_cancelled());
        assert!(!tenure.is_fresh(), "a lost claim is never fresh");
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_holder_is_stale_as_soon_as_it_runs_again() {
        // No renewal ran during the pause; the monotonic clock went on.
        let tenure = Tenure::sending(secs(8));
        assert!(tenure.is_fresh());
        tokio::time::advance(secs(20)).await;
        assert!(!tenure.is_fresh());
        // A renewal the store accepts after the pause (nobody took the
        // Lease meanwhile) makes it fresh again.
        tenure.renewed(Stamp::now());
        assert!(tenure.is_fresh());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_renewal_loop_ends_quietly() {
        let (tenure, stop) = hold(|| async { Renewal::Renewed });
        stop.cancel();
        run_for(secs(20)).await;
        assert!(!tenure.lost().is_cancelled());
    }
}
