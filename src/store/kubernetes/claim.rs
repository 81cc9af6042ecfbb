//! The rotation claim of the Kubernetes store (I6): a `coordination.k8s.io/v1`
//! Lease that one replica holds while it rotates.
//!
//! One Lease covers the whole store, so at most one rotation runs at a time
//! across all replicas and credentials; the credential being rotated is
//! recorded in an annotation for operators. Claims of one process are
//! queued on a local mutex first, so two credentials of one daemon wait for
//! each other instead of reporting the other as busy.
//!
//! The holder renews `renewTime` every `claim_ttl / 3`. A holder that stops
//! renewing (crashed, partitioned) loses the Lease `leaseDurationSeconds`
//! after its last renewal; the next claimer takes it over and resumes the
//! rotation from the journal. Expiry compares the holder's wall clock with
//! ours, as every Lease user does: keep the nodes' clocks synchronized.
//! Every write carries the Lease's `resourceVersion`, so two claimers
//! deciding on the same read cannot both win.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{api_code, describe_api_error};
use crate::store::StoreError;

/// Names the credential whose rotation holds the Lease.
const CREDENTIAL_ANNOTATION: &str = "rekeyd.io/credential";

/// Rounds of read-decide-write lost to other writers before giving up.
const MAX_WRITE_ATTEMPTS: u32 = 10;

/// Who holds the Lease, as far as the decision needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Holding {
    /// `None` or empty: released.
    pub holder: Option<String>,
    pub renewed_at: Option<SystemTime>,
    /// The holder's `leaseDurationSeconds`.
    pub duration: Option<Duration>,
}

/// What a claimer may do with the Lease as it found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nobody holds it: take it.
    Acquire,
    /// We hold it already (a claim of ours that was not released): renew.
    Renew,
    /// Another live holder; it expires at `until` unless renewed.
    Busy { until: SystemTime },
    /// The holder stopped renewing: take it over.
    Takeover,
}

/// The claim decision, without I/O. `ttl` stands in for a missing
/// `leaseDurationSeconds`; a holder without any renewal time is treated
/// as expired, since nothing says it is alive.
pub(crate) fn decide(current: &Holding, me: &str, now: SystemTime, ttl: Duration) -> Decision {
    let holder = current.holder.as_deref().filter(|h| !h.is_empty());
    match holder {
        None => Decision::Acquire,
        Some(h) if h == me => Decision::Renew,
        Some(_) => match current.renewed_at {
            Some(at) => {
                let until = at + current.duration.unwrap_or(ttl);
                if until > now {
                    Decision::Busy { until }
                } else {
                    Decision::Takeover
                }
            }
            None => Decision::Takeover,
        },
    }
}

fn holding(lease: &Lease) -> Holding {
    let spec = lease.spec.as_ref();
    Holding {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        renewed_at: spec
            .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
            .map(|t| SystemTime::from(t.0)),
        duration: spec
            .and_then(|s| s.lease_duration_seconds)
            .map(|s| Duration::from_secs(s.max(0) as u64)),
    }
}

fn micro_time(t: SystemTime) -> Option<MicroTime> {
    Timestamp::try_from(t).ok().map(MicroTime)
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
    identity: String,
    /// Serializes this process's claims (see the module comment).
    local: Arc<Mutex<()>>,
}

/// The outcome of one attempt to take the Lease.
enum Attempt {
    Acquired,
    Busy { until: SystemTime },
}

impl Claims {
    pub(super) fn new(leases: Api<Lease>, qualified: String, lease: String, ttl: Duration) -> Self {
        Claims {
            leases,
            target: format!("kubernetes Lease {qualified}"),
            lease,
            ttl,
            identity: new_identity(),
            local: Arc::new(Mutex::new(())),
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
        loop {
            match self.try_acquire(credential).await? {
                Attempt::Acquired => break,
                Attempt::Busy { .. } if !wait => return Ok(None),
                Attempt::Busy { until } => {
                    // Poll: a release is not announced. Never sleep past the
                    // expiry, when a takeover becomes possible.
                    let to_expiry = until.duration_since(SystemTime::now()).unwrap_or_default();
                    let poll = (self.ttl / 5).min(to_expiry);
                    tokio::time::sleep(poll.max(Duration::from_millis(50))).await;
                }
            }
        }
        info!(step = "claim", credential, holder = %self.identity, "rotation claim acquired");
        let stop = CancellationToken::new();
        let renew = tokio::spawn(renew_loop(self.renewer(), stop.clone()));
        Ok(Some(LeaseClaim {
            stop,
            release: Some(Release {
                renewer: self.renewer(),
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
        }
    }

    async fn try_acquire(&self, credential: &str) -> Result<Attempt, StoreError> {
        let duration_seconds = self.ttl.as_secs_f64().ceil() as i32;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let now = SystemTime::now();
            let found = self
                .leases
                .get_opt(&self.lease)
                .await
                .map_err(|e| self.unavailable(e))?;
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
                match self.leases.create(&PostParams::default(), &lease).await {
                    Ok(_) => return Ok(Attempt::Acquired),
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
            let decision = decide(&holding(&lease), &self.identity, now, self.ttl);
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            match decision {
                Decision::Busy { until } => return Ok(Attempt::Busy { until }),
                Decision::Renew => {}
                Decision::Acquire | Decision::Takeover => {
                    if decision == Decision::Takeover {
                        warn!(
                            step = "claim",
                            credential,
                            previous = spec.holder_identity.as_deref().unwrap_or(""),
                            "taking over an expired rotation claim"
                        );
                    }
                    // A new holder: counted as a transition, as the
                    // Kubernetes leader election does.
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = micro_time(now);
                }
            }
            spec.renew_time = micro_time(now);
            spec.lease_duration_seconds = Some(duration_seconds);
            lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(CREDENTIAL_ANNOTATION.into(), credential.into());
            match self
                .leases
                .replace(&self.lease, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => return Ok(Attempt::Acquired),
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
}

impl Renewer {
    /// Rewrites the Lease if we still hold it: `Ok(false)` when we do not.
    /// `release`: clear the holder instead of renewing.
    async fn update(&self, release: bool) -> Result<bool, String> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let Some(mut lease) = self
                .leases
                .get_opt(&self.lease)
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
            match self
                .leases
                .replace(&self.lease, &PostParams::default(), &lease)
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

async fn renew_loop(renewer: Renewer, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(renewer.ttl / 3) => {}
        }
        // A renewal racing the stop would only extend a claim being released.
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = renewer.update(false) => r,
        };
        match result {
            Ok(true) => {}
            Ok(false) => {
                warn!(step = "claim", lease = %renewer.target, "rotation claim lost to another holder; the rotation continues on the journal's compare-and-swap");
                return;
            }
            Err(reason) => {
                warn!(step = "claim", lease = %renewer.target, error = %reason, "cannot renew the rotation claim; retrying");
            }
        }
    }
}

/// A held Lease. Dropping it stops renewing and releases the Lease in the
/// background (best effort: if that fails, the Lease expires by itself).
pub(super) struct LeaseClaim {
    stop: CancellationToken,
    release: Option<Release>,
}

struct Release {
    renewer: Renewer,
    renew: JoinHandle<()>,
    /// Held until the Lease is released, so this process's next claim
    /// starts from a released Lease.
    _local: OwnedMutexGuard<()>,
}

impl Release {
    async fn run(self) {
        let _ = self.renew.await;
        if let Err(reason) = self.renewer.update(true).await {
            warn!(step = "claim", lease = %self.renewer.target, error = %reason, "cannot release the rotation claim; it expires by itself");
        }
    }
}

impl crate::store::Claim for LeaseClaim {}

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

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn held_by(holder: &str, renewed: u64, duration: Option<u64>) -> Holding {
        Holding {
            holder: Some(holder.into()),
            renewed_at: Some(t(renewed)),
            duration: duration.map(Duration::from_secs),
        }
    }

    #[test]
    fn free_lease_is_acquired() {
        assert_eq!(
            decide(&Holding::default(), "me", t(0), TTL),
            Decision::Acquire
        );
        let released = Holding {
            holder: Some(String::new()),
            ..held_by("x", 0, Some(15))
        };
        assert_eq!(decide(&released, "me", t(1), TTL), Decision::Acquire);
    }

    #[test]
    fn own_lease_is_renewed_even_when_expired() {
        assert_eq!(
            decide(&held_by("me", 0, Some(15)), "me", t(5), TTL),
            Decision::Renew
        );
        assert_eq!(
            decide(&held_by("me", 0, Some(15)), "me", t(500), TTL),
            Decision::Renew
        );
    }

    #[test]
    fn live_holder_is_busy_until_its_duration_passes() {
        let lease = held_by("other", 100, Some(10));
        assert_eq!(
            decide(&lease, "me", t(105), TTL),
            Decision::Busy { until: t(110) }
        );
        // The holder's duration counts, not ours.
        assert_eq!(decide(&lease, "me", t(110), TTL), Decision::Takeover);
        assert_eq!(decide(&lease, "me", t(111), TTL), Decision::Takeover);
    }

    #[test]
    fn missing_fields_fall_back_safely() {
        // No duration: ours.
        let lease = held_by("other", 100, None);
        assert_eq!(
            decide(&lease, "me", t(110), TTL),
            Decision::Busy { until: t(115) }
        );
        // A holder that never renewed is not known to be alive.
        let lease = Holding {
            holder: Some("other".into()),
            renewed_at: None,
            duration: Some(TTL),
        };
        assert_eq!(decide(&lease, "me", t(0), TTL), Decision::Takeover);
    }

    #[test]
    fn holding_reads_renew_or_acquire_time() {
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        let lease = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some("h".into()),
                acquire_time: Some(MicroTime(at)),
                lease_duration_seconds: Some(7),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        assert_eq!(holding(&lease), held_by("h", 0, Some(7)));
    }

    #[test]
    fn identities_are_unique_per_store() {
        let a = new_identity();
        assert_ne!(a, new_identity());
        assert_eq!(a.split('/').count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_expires_ttl_after_its_last_renewal() {
        // The decision reads the time it is given: a paused clock advanced
        // past the renewal plus the duration turns Busy into Takeover.
        let start = SystemTime::now();
        let clock = tokio::time::Instant::now();
        let lease = Holding {
            holder: Some("other".into()),
            renewed_at: Some(start),
            duration: Some(Duration::from_secs(2)),
        };
        let now = |start: SystemTime| start + clock.elapsed();
        assert!(matches!(
            decide(&lease, "me", now(start), TTL),
            Decision::Busy { .. }
        ));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(decide(&lease, "me", now(start), TTL), Decision::Takeover);
    }
}
