//! The Kubernetes store against an in-process fake API server: per-credential
//! compare-and-swap over one Secret, retries of the server's optimistic
//! concurrency conflicts, errors that name the object and the API's status
//! without leaking data, the Lease claim (busy, release, takeover, waiting,
//! timed on each replica's own clock whatever the holder's wall clock says,
//! a holder whose renewals fail going stale and lost), and replicas of the
//! daemon rotating one credential through the store, including a holder that
//! disappears mid-rotation.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/kube_fake.rs"]
mod kube_fake;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::Method;
use daemon::{EVENT_TIMEOUT, TestDaemon, wait_token};
use kube_fake::{FailRule, Kind, KubeFake, Stall};
use rekeyd::config::KubernetesStoreConfig;
use rekeyd::provider::ErrorKind;
use rekeyd::rotation::driver::{DEFAULT_VERIFY_WINDOW, Rotator};
use rekeyd::sim::{SimOptions, SimProvider};
use rekeyd::store::kubernetes::KubernetesStore;
use rekeyd::store::{Claim, CredentialRecord, Rotation, SecretEntry, Store, StoreError};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const NS: &str = "rekeyd-test";
const SECRET: &str = "rekeyd-state";
const LEASE: &str = "rekeyd-rotation";

fn record(value: &str) -> CredentialRecord {
    CredentialRecord::new(SecretEntry {
        id: Some("id1".into()),
        value: SecretString::from(value),
        created_at: SystemTime::UNIX_EPOCH,
        expires_at: None,
    })
}

async fn store(fake: &KubeFake, dir: &Path, token: &str, ttl: Duration) -> KubernetesStore {
    let config = KubernetesStoreConfig {
        // From the kubeconfig's context.
        namespace: None,
        secret: SECRET.into(),
        lease: LEASE.into(),
        kubeconfig: Some(fake.kubeconfig(dir, NS, token)),
        claim_ttl: ttl,
    };
    KubernetesStore::connect(&config)
        .await
        .expect("client builds")
}

/// Polls `check` until it holds, failing after [`EVENT_TIMEOUT`].
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lease_holder(fake: &KubeFake) -> Option<String> {
    fake.object(Kind::Lease, NS, LEASE)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test]
async fn the_history_is_its_own_secret_and_never_touches_the_state_secret() {
    use rekeyd::history::{self, Event, Step, chain};
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15))
        .await
        .with_history_limit(10);
    let v1 = s.compare_and_swap("a", None, &record("one")).await.unwrap();
    let history_secret = format!("{SECRET}-history");
    assert_eq!(s.history_secret(), history_secret);
    let now = SystemTime::now();
    for i in 0..12 {
        let event = Event::new(Step::Deleted).secret(Some(&format!("s{i}")));
        history::append(&s, "a", &[event], now).await.unwrap();
    }
    history::append(&s, "b", &[Event::new(Step::Set)], now)
        .await
        .unwrap();
    // One data key per credential in the history Secret; the state Secret
    // holds the records only, at the versions they had.
    let data = fake.secret_data(NS, &history_secret).unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["a.json", "b.json"]);
    let state = fake.secret_data(NS, SECRET).unwrap();
    assert_eq!(state.keys().collect::<Vec<_>>(), ["a.json"]);
    assert_eq!(s.load("a").await.unwrap().unwrap().version, v1);
    let doc = history::load(&s, "a").await.unwrap().unwrap();
    assert_eq!(doc.entries.len(), 10);
    assert_eq!(doc.entries[0].step, Step::Truncated);
    chain::verify(&doc, "a").unwrap();
    // A write based on a stale read is a conflict, as for records.
    let stale = s.load_history("a").await.unwrap().unwrap();
    history::append(&s, "a", &[Event::new(Step::Set)], now)
        .await
        .unwrap();
    assert!(matches!(
        s.swap_history("a", Some(stale.version), &stale.value).await,
        Err(StoreError::Conflict { .. })
    ));
}

#[tokio::test]
async fn histories_that_outgrow_their_share_of_the_secret_keep_fewer_entries() {
    use rekeyd::history::{self, Event, Step, chain};
    use rekeyd::store::kubernetes::HISTORY_SECRET_BYTES;
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A count bound the Secret cannot hold: the bytes bound must act.
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15))
        .await
        .with_history_limit(100_000);
    let now = SystemTime::now();
    let detail = "d".repeat(400);
    let batch = |name: &str, i: usize| -> Vec<Event> {
        (0..100)
            .map(|j| {
                Event::new(Step::Deleted)
                    .secret(Some(&format!("{name}-{i}-{j}")))
                    .detail(&detail)
            })
            .collect()
    };
    // 2 credentials x 30 batches x 100 entries of ~600 bytes: about 36 MB
    // unbounded, against 768 KiB for the whole Secret.
    for i in 0..30 {
        for name in ["a", "b"] {
            let added = history::append(&s, name, &batch(name, i), now)
                .await
                .unwrap();
            assert_eq!(added.len(), 100, "batch {i} of {name} was recorded");
        }
    }
    let data = fake.secret_data(NS, &format!("{SECRET}-history")).unwrap();
    for name in ["a", "b"] {
        let stored = &data[&format!("{name}.json")];
        assert!(
            stored.len() <= HISTORY_SECRET_BYTES / 2,
            "{name}'s history is {} bytes, over its share",
            stored.len()
        );
        let doc = history::load(&s, name).await.unwrap().unwrap();
        // The oldest went behind a marker; the newest batch is all there.
        assert_eq!(doc.entries[0].step, Step::Truncated);
        let last = doc.entries.last().unwrap();
        assert_eq!(last.seq, 30 * 100 - 1);
        assert_eq!(
            last.secret_id.as_deref(),
            Some(format!("{name}-29-99").as_str())
        );
        chain::verify(&doc, name).unwrap();
    }
}

#[tokio::test]
async fn compare_and_swap_is_per_credential() {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;

    assert!(s.load("a").await.unwrap().is_none());
    // The first write creates the Secret.
    let v1 = s.compare_and_swap("a", None, &record("one")).await.unwrap();
    assert_eq!(v1, 1);
    assert_eq!(fake.count(Method::POST, Kind::Secret), 1);
    assert!(matches!(
        s.compare_and_swap("a", None, &record("x")).await,
        Err(StoreError::Conflict { .. })
    ));
    let mut r = record("two");
    r.rotation = Rotation::Creating {
        rid: "r1".into(),
        attempt: "a1".into(),
        chosen: None,
    };
    let v2 = s.compare_and_swap("a", Some(v1), &r).await.unwrap();
    assert_eq!(v2, 2);
    // A stale version is a conflict.
    assert!(matches!(
        s.compare_and_swap("a", Some(v1), &record("x")).await,
        Err(StoreError::Conflict {
            expected: Some(1),
            ..
        })
    ));
    // Another credential's write changes the Secret but not a's version.
    assert_eq!(
        s.compare_and_swap("b", None, &record("bee")).await.unwrap(),
        1
    );
    let v3 = s
        .compare_and_swap("a", Some(v2), &record("three"))
        .await
        .unwrap();
    assert_eq!(v3, 3);

    let got = s.load("a").await.unwrap().unwrap();
    assert_eq!(got.version, 3);
    assert_eq!(got.value.current.value.expose_secret(), "three");
    let b = s.load("b").await.unwrap().unwrap();
    assert_eq!(
        (b.version, b.value.current.value.expose_secret()),
        (1, "bee")
    );

    // One data key per credential, each the file store's document.
    let data = fake.secret_data(NS, SECRET).unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["a.json", "b.json"]);
    let doc: serde_json::Value = serde_json::from_slice(&data["a.json"]).unwrap();
    assert_eq!(doc["format"], 1);
    assert_eq!(doc["version"], 3);
    assert_eq!(fake.count(Method::POST, Kind::Secret), 1);
}

#[tokio::test]
async fn server_conflicts_are_retried_transparently() {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;
    let v1 = s.compare_and_swap("a", None, &record("one")).await.unwrap();

    let puts = fake.count(Method::PUT, Kind::Secret);
    fake.inject_conflicts(3);
    let v2 = s
        .compare_and_swap("a", Some(v1), &record("two"))
        .await
        .unwrap();
    assert_eq!(v2, 2);
    assert_eq!(fake.conflicts_left(), 0);
    assert_eq!(fake.count(Method::PUT, Kind::Secret) - puts, 4);
    assert_eq!(
        s.load("a")
            .await
            .unwrap()
            .unwrap()
            .value
            .current
            .value
            .expose_secret(),
        "two"
    );

    // A storm that never ends is reported, not looped on forever.
    fake.inject_conflicts(1000);
    let err = s
        .compare_and_swap("a", Some(v2), &record("three"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("attempts"), "{err}");
}

#[tokio::test]
async fn a_secret_created_beforehand_is_used_without_create() {
    let fake = KubeFake::start().await;
    fake.put_object(
        Kind::Secret,
        NS,
        serde_json::json!({"metadata": {"name": SECRET}, "type": "Opaque"}),
    );
    // As the shipped Role: no `create`.
    fake.fail(FailRule {
        method: Some(Method::POST),
        kind: None,
        code: 403,
        remaining: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;
    assert_eq!(
        s.compare_and_swap("a", None, &record("one")).await.unwrap(),
        1
    );
    s.check_writable("a").await.unwrap();
    fake.put_object(
        Kind::Lease,
        NS,
        serde_json::json!({"metadata": {"name": LEASE}, "spec": {}}),
    );
    let claim = s.claim("a", false).await.unwrap();
    assert!(claim.is_some());
    assert_eq!(fake.count(Method::POST, Kind::Secret), 0);
    assert_eq!(fake.count(Method::POST, Kind::Lease), 0);
}

#[tokio::test]
async fn missing_objects_without_create_permission_say_so() {
    let fake = KubeFake::start().await;
    fake.fail(FailRule {
        method: Some(Method::POST),
        kind: None,
        code: 403,
        remaining: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;
    let err = s
        .compare_and_swap("a", None, &record("s3cr3t-value"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("kubernetes Secret rekeyd-test/rekeyd-state"),
        "{text}"
    );
    assert!(text.contains("403 Forbidden"), "{text}");
    assert!(text.contains("create it beforehand"), "{text}");
    assert!(!text.contains("s3cr3t") && !format!("{err:?}").contains("s3cr3t"));
    let err = s.claim("a", false).await.err().expect("claim fails");
    assert!(
        err.to_string()
            .contains("kubernetes Lease rekeyd-test/rekeyd-rotation"),
        "{err}"
    );
    assert!(err.to_string().contains("create it beforehand"), "{err}");
}

#[tokio::test]
async fn corrupt_entry_names_the_key_and_is_kept() {
    let fake = KubeFake::start().await;
    let raw =
        br#"{"format":1,"version":2,"current":{"id":null,"value":12345678,"created_at":"hunter2"}"#;
    fake.set_secret_entry(NS, SECRET, "a.json", raw);
    let dir = tempfile::tempdir().unwrap();
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;
    let err = s.load("a").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("rekeyd-test/rekeyd-state[a.json]"), "{text}");
    assert!(
        !text.contains("hunter2") && !text.contains("12345678"),
        "{text}"
    );
    assert!(
        s.compare_and_swap("a", Some(2), &record("x"))
            .await
            .is_err()
    );
    assert_eq!(fake.secret_data(NS, SECRET).unwrap()["a.json"], raw);
    // Other credentials are unaffected.
    assert_eq!(
        s.compare_and_swap("b", None, &record("b")).await.unwrap(),
        1
    );
}

#[tokio::test]
async fn api_failures_are_unavailable_with_status_and_reason() {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;
    s.compare_and_swap("a", None, &record("s3cr3t-value"))
        .await
        .unwrap();

    fake.fail(FailRule {
        method: Some(Method::GET),
        kind: Some(Kind::Secret),
        code: 403,
        remaining: Some(1),
    });
    let err = s.load("a").await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable { .. }));
    assert!(
        text.starts_with("store kubernetes Secret rekeyd-test/rekeyd-state: 403 Forbidden: secrets \"rekeyd-state\" is forbidden"),
        "{text}"
    );

    fake.fail(FailRule {
        method: Some(Method::PUT),
        kind: Some(Kind::Secret),
        code: 500,
        remaining: Some(1),
    });
    let err = s
        .compare_and_swap("a", Some(1), &record("s3cr3t-value"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("500 InternalError: Internal error occurred"),
        "{text}"
    );
    assert!(!text.contains("s3cr3t") && !format!("{err:?}").contains("s3cr3t"));
    assert_eq!(s.load("a").await.unwrap().unwrap().version, 1);

    // A refusal that quotes the Secret it was sent (its data: the journal,
    // base64) names the refusal and shows none of the journal.
    fake.fail(FailRule {
        method: Some(Method::PUT),
        kind: Some(Kind::Secret),
        code: 422,
        remaining: Some(1),
    });
    let err = s
        .compare_and_swap("a", Some(1), &record("s3cr3t-value-that-is-long"))
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("422 Invalid: secrets"), "{text}");
    assert!(text.contains(r#""data":{"a.json":"[withheld]"}"#), "{text}");
    assert!(!text.contains("s3cr3t"), "{text}");
}

#[tokio::test]
async fn check_writable_is_a_dry_run_write() {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;
    // No Secret yet: a dry-run create, and nothing is created.
    s.check_writable("a").await.unwrap();
    assert!(fake.object(Kind::Secret, NS, SECRET).is_none());
    s.compare_and_swap("a", None, &record("one")).await.unwrap();
    let before = fake.object(Kind::Secret, NS, SECRET).unwrap();
    let puts = fake.count(Method::PUT, Kind::Secret);
    s.check_writable("a").await.unwrap();
    assert_eq!(fake.count(Method::PUT, Kind::Secret), puts + 1);
    assert_eq!(fake.object(Kind::Secret, NS, SECRET).unwrap(), before);

    // RBAC that allows reading but not writing is caught here.
    fake.fail(FailRule {
        method: Some(Method::PUT),
        kind: Some(Kind::Secret),
        code: 403,
        remaining: None,
    });
    let err = s.check_writable("a").await.unwrap_err();
    assert!(err.to_string().contains("403 Forbidden"), "{err}");
    assert!(err.to_string().contains("cannot update"), "{err}");
}

#[tokio::test]
async fn a_held_claim_is_busy_for_others_and_released_on_drop() {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s1 = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;
    let s2 = store(&fake, dir.path(), "t2", Duration::from_secs(15)).await;

    let c1 = s1.claim("maps", false).await.unwrap().expect("free lease");
    let first = lease_holder(&fake).unwrap();
    let lease = fake.object(Kind::Lease, NS, LEASE).unwrap();
    assert_eq!(
        lease["metadata"]["annotations"]["rekeyd.io/credential"],
        "maps"
    );
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    assert!(s2.claim("maps", false).await.unwrap().is_none());
    // One Lease for the store: another credential is busy too.
    assert!(s2.claim("other", false).await.unwrap().is_none());

    drop(c1);
    eventually("the release", || async { lease_holder(&fake).is_none() }).await;
    let c2 = s2
        .claim("maps", false)
        .await
        .unwrap()
        .expect("released lease");
    assert_ne!(lease_holder(&fake).unwrap(), first);
    assert!(s1.claim("maps", false).await.unwrap().is_none());
    drop(c2);
}

#[tokio::test]
async fn waiting_claimer_gets_the_lease_after_release() {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s1 = store(&fake, dir.path(), "t1", Duration::from_secs(15)).await;
    let s2 = Arc::new(store(&fake, dir.path(), "t2", Duration::from_secs(15)).await);

    let c1 = s1.claim("maps", false).await.unwrap().unwrap();
    let gets = fake.count(Method::GET, Kind::Lease);
    let waiter = tokio::spawn({
        let s2 = s2.clone();
        async move { s2.claim("maps", true).await.map(|c| c.is_some()) }
    });
    // The waiter polls the Lease while it is held.
    eventually("the waiter polling", || async {
        fake.count(Method::GET, Kind::Lease) >= gets + 2
    })
    .await;
    assert!(!waiter.is_finished());
    drop(c1);
    let got = tokio::time::timeout(EVENT_TIMEOUT, waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(got.unwrap());
}

#[tokio::test]
async fn claims_of_one_process_queue() {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(store(&fake, dir.path(), "t1", Duration::from_secs(15)).await);
    let a = s.claim("a", false).await.unwrap().unwrap();
    let b = tokio::spawn({
        let s = s.clone();
        async move { s.claim("b", false).await.map(|c| c.is_some()) }
    });
    tokio::task::yield_now().await;
    assert!(!b.is_finished());
    drop(a);
    // Not "busy": it waited for a's release and then took the Lease.
    assert!(
        tokio::time::timeout(EVENT_TIMEOUT, b)
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    );
    let lease = fake.object(Kind::Lease, NS, LEASE).unwrap();
    assert_eq!(
        lease["metadata"]["annotations"]["rekeyd.io/credential"],
        "b"
    );
}

#[tokio::test]
async fn a_holder_that_stops_renewing_is_taken_over() {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(2);
    let s1 = store(&fake, dir.path(), "t1", ttl).await;
    let s2 = store(&fake, dir.path(), "t2", ttl).await;

    let c1 = s1.claim("maps", false).await.unwrap().unwrap();
    let held_at = Instant::now();
    // While the holder renews (every ttl/4), the Lease stays busy past its
    // duration.
    let renewed = fake.count(Method::PUT, Kind::Lease);
    eventually("five renewals", || async {
        fake.count(Method::PUT, Kind::Lease) >= renewed + 5
    })
    .await;
    assert!(held_at.elapsed() >= ttl);
    assert!(s2.claim("maps", false).await.unwrap().is_none());
    assert!(c1.is_fresh());

    // The holder is cut off from the API: no renewals, no release.
    fake.block_token("t1");
    let transitions = fake.object(Kind::Lease, NS, LEASE).unwrap()["spec"]["leaseTransitions"]
        .as_i64()
        .unwrap();
    let cut = Instant::now();
    let c2 = tokio::time::timeout(EVENT_TIMEOUT, s2.claim("maps", true))
        .await
        .unwrap()
        .unwrap()
        .expect("taken over");
    // Not before s2 saw the holder's last record unchanged for a full ttl
    // on its own clock; it first saw that record at the latest right after
    // the cut, at the earliest in its busy attempt just before.
    assert!(cut.elapsed() >= ttl * 3 / 4, "{:?}", cut.elapsed());
    let lease = fake.object(Kind::Lease, NS, LEASE).unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], transitions + 1);
    assert_eq!(fake.last_writer(Kind::Lease, NS, LEASE).unwrap(), "t2");
    // The cut-off holder found out: its renewals failed until the claim was
    // no longer fresh, well before s2 could take it.
    assert!(!c1.is_fresh());
    assert!(c1.lost().is_cancelled());
    assert!(c2.is_fresh());
    drop(c1);
    drop(c2);
}

/// A holder whose Lease writes stop being answered (`stall`) or are
/// refused (`refuse`): its claim goes stale half a TTL after its last
/// accepted renewal, and is lost before another replica could take it.
async fn renewals_fail(stall: bool) {
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Requests time out at ttl/4 = 1 s.
    let ttl = Duration::from_secs(4);
    let s = store(&fake, dir.path(), "t1", ttl).await;
    let claim = s.claim("maps", false).await.unwrap().unwrap();
    let held_at = Instant::now();
    assert!(claim.is_fresh());
    if stall {
        fake.stall(Stall {
            method: Some(Method::PUT),
            kind: Some(Kind::Lease),
        });
    } else {
        fake.fail(FailRule {
            method: Some(Method::PUT),
            kind: Some(Kind::Lease),
            code: 503,
            remaining: None,
        });
    }
    let lost = claim.lost();
    tokio::time::timeout(EVENT_TIMEOUT, lost.cancelled())
        .await
        .expect("the claim is lost");
    let after = held_at.elapsed();
    assert!(!claim.is_fresh());
    // Fresh for half the TTL after the acquiring request was sent (just
    // before `held_at`); lost once a renewal failed after that, before a
    // full TTL could let anyone else in.
    assert!(after >= ttl / 2 - Duration::from_millis(100), "{after:?}");
    assert!(after < ttl, "{after:?}");
    // Still held on the server: nobody took it; the release on drop is
    // answered once the server is.
    assert_eq!(
        fake.last_writer(Kind::Lease, NS, LEASE).as_deref(),
        Some("t1")
    );
    fake.unstall();
    fake.clear_failures();
    drop(claim);
    eventually("the release", || async { lease_holder(&fake).is_none() }).await;
}

#[tokio::test]
async fn a_holder_whose_renewals_hang_goes_stale_and_loses_the_claim() {
    renewals_fail(true).await;
}

#[tokio::test]
async fn a_holder_whose_renewals_are_refused_goes_stale_and_loses_the_claim() {
    renewals_fail(false).await;
}

/// Seconds between a Lease's stored `renewTime` and our wall clock now.
fn renew_time_offset(fake: &KubeFake) -> i64 {
    let lease = fake.object(Kind::Lease, NS, LEASE).unwrap();
    let renewed: k8s_openapi::jiff::Timestamp = lease["spec"]["renewTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    renewed.as_second() - k8s_openapi::jiff::Timestamp::now().as_second()
}

/// A live holder whose wall clock is `skew` seconds off ours writes
/// renewTimes that far off; we must still not take the Lease from it.
async fn live_holder_with_clock_off_by(skew: i64) {
    let fake = KubeFake::start().await;
    fake.skew_lease_times("t1", skew);
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(2);
    let s1 = store(&fake, dir.path(), "t1", ttl).await;
    let s2 = store(&fake, dir.path(), "t2", ttl).await;
    let c1 = s1.claim("maps", false).await.unwrap().unwrap();
    let offset = renew_time_offset(&fake);
    assert!((offset - skew).abs() <= 1, "renewTime {offset} s off");

    // Comparing that renewTime with our clock would say "expired 18 s ago"
    // (behind) or "busy for 22 s" (ahead); waiting well past one TTL shows
    // neither: the holder keeps renewing, so it keeps us out.
    let waited = tokio::time::timeout(ttl * 5 / 2, s2.claim("maps", true)).await;
    assert!(waited.is_err(), "a live holder was taken over");
    assert!(s2.claim("maps", false).await.unwrap().is_none());
    assert!(c1.is_fresh());
    assert!(!c1.lost().is_cancelled());
    assert_eq!(fake.last_writer(Kind::Lease, NS, LEASE).unwrap(), "t1");
}

#[tokio::test]
async fn a_live_holder_20s_behind_our_clock_is_not_taken_over() {
    live_holder_with_clock_off_by(-20).await;
}

#[tokio::test]
async fn a_live_holder_20s_ahead_of_our_clock_is_not_taken_over() {
    live_holder_with_clock_off_by(20).await;
}

#[tokio::test]
async fn a_silent_holder_20s_ahead_of_our_clock_is_taken_over_after_one_ttl() {
    let fake = KubeFake::start().await;
    fake.skew_lease_times("t1", 20);
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(2);
    let s1 = store(&fake, dir.path(), "t1", ttl).await;
    let s2 = store(&fake, dir.path(), "t2", ttl).await;
    let c1 = s1.claim("maps", false).await.unwrap().unwrap();

    fake.block_token("t1");
    let started = Instant::now();
    let c2 = tokio::time::timeout(EVENT_TIMEOUT, s2.claim("maps", true))
        .await
        .unwrap()
        .unwrap()
        .expect("taken over");
    // One TTL from s2's first sighting, on its clock: not the 22 s that the
    // holder's renewTime would suggest, and not sooner.
    let after = started.elapsed();
    assert!(after >= ttl, "{after:?}");
    assert!(after < ttl * 3, "{after:?}");
    assert_eq!(fake.last_writer(Kind::Lease, NS, LEASE).unwrap(), "t2");
    drop(c1);
    drop(c2);
}

// --- replicas ----------------------------------------------------------------

const CLIENT: &str = "maps-client";
const CUSTOMER: &str = "cust";
const TAG: &str = "rekeyd:maps:";

struct Replicas {
    fake: KubeFake,
    sim: Arc<SimProvider>,
    bootstrap: (String, String),
    daemons: Vec<Option<TestDaemon>>,
    /// A store of its own, for the test's reads.
    observer: KubernetesStore,
    /// The daemons' configuration (all alike but for paths).
    config: rekeyd::config::Config,
    _dir: tempfile::TempDir,
}

async fn replicas(n: usize) -> Replicas {
    let fake = KubeFake::start().await;
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(3),
        propagation_delay: Duration::from_millis(200),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let bootstrap = sim.add_secret(CLIENT, "portal: initial secret");
    let dir = tempfile::tempdir().unwrap();
    let observer = store(&fake, dir.path(), "observer", Duration::from_secs(2)).await;
    let mut daemons = Vec::new();
    for i in 0..n {
        let ddir = tempfile::tempdir().unwrap();
        daemon::write_secret(ddir.path(), "maps.secret", &bootstrap.1);
        let kubeconfig = fake.kubeconfig(ddir.path(), NS, &format!("daemon{i}"));
        let config = format!(
            r#"state_dir = "{{dir}}/state"
[store]
kind = "kubernetes"
namespace = "{NS}"
kubeconfig = "{}"
claim_ttl = "4s"
[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "{CLIENT}"
customer_id = "{CUSTOMER}"
initial_secret_file = "{{dir}}/maps.secret"
initial_secret_id = "{}"
[credentials.endpoints]
token_url = "{}"
secrets_url = "{}"
[credentials.rotation]
every = "1s"
grace = "1s"
"#,
            kubeconfig.display(),
            bootstrap.0,
            sim.mapsindoors_token_url(),
            sim.mapsindoors_secrets_url(),
        );
        daemons.push(Some(TestDaemon::start_in(ddir, &config).await));
    }
    let config = daemons[0].as_ref().unwrap().config.clone();
    Replicas {
        config,
        fake,
        sim: Arc::new(sim),
        bootstrap,
        daemons,
        observer,
        _dir: dir,
    }
}

/// Samples every daemon's served token until `stop`: always present and,
/// unless about to expire, honoured by the provider (I1, I8).
fn sample_tokens(r: &Replicas, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<u32>> {
    r.daemons
        .iter()
        .flatten()
        .map(|d| {
            let (handle, sim, stop) = (d.handle("maps"), r.sim.clone(), stop.clone());
            let stopped = d_stopped(d);
            tokio::spawn(async move {
                wait_token(&handle, |_| true).await;
                let mut tick = tokio::time::interval(Duration::from_millis(25));
                let mut verified = 0;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return verified,
                        _ = stopped.cancelled() => return verified,
                        _ = tick.tick() => {}
                    }
                    let token = handle
                        .valid_token()
                        .expect("a valid token is always served");
                    if token.remaining(handle.clock.now()) > Duration::from_millis(500) {
                        assert_eq!(
                            sim.token_client(token.access_token.expose_secret())
                                .as_deref(),
                            Some(CLIENT),
                            "the served token is valid at the provider"
                        );
                        verified += 1;
                    }
                }
            })
        })
        .collect()
}

/// Cancelled when the daemon's credential stops publishing (it was stopped).
fn d_stopped(d: &TestDaemon) -> CancellationToken {
    let token = CancellationToken::new();
    let mut rx = d.handle("maps").token.clone();
    tokio::spawn({
        let token = token.clone();
        async move {
            while rx.changed().await.is_ok() {}
            token.cancel();
        }
    });
    token
}

impl Replicas {
    async fn stored(&self) -> CredentialRecord {
        self.observer
            .load("maps")
            .await
            .unwrap()
            .expect("a stored record")
            .value
    }

    /// Waits until `n` more rotations have completed (secrets created and
    /// the journal idle again).
    async fn rotations(&self, n: u64) {
        let target = self.sim.stats().secrets_created + n;
        eventually("rotations", || async {
            self.sim.stats().secrets_created >= target
                && self.stored().await.rotation.phase() == "idle"
        })
        .await;
    }

    async fn stop_all(&mut self) {
        let stops = self
            .daemons
            .iter_mut()
            .filter_map(Option::take)
            .map(TestDaemon::stop);
        futures_util::future::join_all(stops).await;
    }

    /// Finishes a rotation the stop interrupted, as `rekeyd rotate` would,
    /// then checks the provider: exactly our one secret, the stored one,
    /// and it logs in (I1, I3).
    async fn settle_and_check(&self, store: Arc<dyn Store>) {
        let cred = self.config.credential("maps").unwrap();
        let rotator = Rotator {
            name: "maps".into(),
            client_id: CLIENT.into(),
            provider: rekeyd::provider::build(cred).unwrap(),
            secret_api: rekeyd::provider::build_secret_api(cred).unwrap().unwrap(),
            secret_api_bearer: None,
            store,
            grace: Duration::from_secs(1),
            verify_window: DEFAULT_VERIFY_WINDOW,
            status: None,
            refresh_now: None,
            clock: rekeyd::rotation::driver::system_clock(),
        };
        tokio::time::timeout(
            EVENT_TIMEOUT,
            rotator.rotate(false, true, &CancellationToken::new()),
        )
        .await
        .expect("resumes in time")
        .expect("resumes");

        let record = self.stored().await;
        assert_eq!(record.rotation.phase(), "idle");
        let secrets = self.sim.secrets(CLIENT);
        let tagged: Vec<_> = secrets
            .iter()
            .filter(|s| s.description.starts_with(TAG))
            .collect();
        assert_eq!(tagged.len(), 1, "exactly one tagged secret: {tagged:?}");
        assert_eq!(secrets.len(), 1, "no orphans, bootstrap gone: {secrets:?}");
        assert_eq!(Some(&tagged[0].id), record.current.id.as_ref());
        assert_eq!(tagged[0].value, record.current.value.expose_secret());
        assert!(!secrets.iter().any(|s| s.id == self.bootstrap.0));
        let provider = rekeyd::provider::build(cred).unwrap();
        assert_eq!(
            provider
                .login(&record.current.value)
                .await
                .map(|_| ())
                .map_err(|e| e.kind),
            Ok::<(), ErrorKind>(()),
            "the stored secret logs in"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_rotations_without_lockout() {
    let mut r = replicas(3).await;
    let stop = CancellationToken::new();
    let samplers = sample_tokens(&r, &stop);
    r.rotations(4).await;

    // One rotation at a time: no replica's journal write ever lost to
    // another's, so no rotation step failed anywhere.
    for d in r.daemons.iter().flatten() {
        let status = d.handle("maps").status.borrow().clone();
        assert_eq!(status.last_rotation_error, None);
    }
    stop.cancel();
    for s in samplers {
        let verified = s.await.expect("served continuously");
        assert!(verified >= 10, "{verified}");
    }
    r.stop_all().await;
    let observer = Arc::new(store(&r.fake, r._dir.path(), "settle", Duration::from_secs(2)).await);
    r.settle_and_check(observer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_finishes_a_rotation_whose_holder_vanished() {
    let mut r = replicas(2).await;
    let stop = CancellationToken::new();
    let samplers = sample_tokens(&r, &stop);
    r.rotations(1).await;

    // Catch a rotation in its grace period (promoted, old secret not yet
    // deleted), and cut its holder off the API, then stop it: its claim is
    // neither renewed nor released, and its journal is unfinished.
    eventually("a rotation in its grace period", || async {
        r.stored().await.rotation.phase() == "promoted"
    })
    .await;
    let holder_token = r.fake.last_writer(Kind::Lease, NS, LEASE).unwrap();
    r.fake.block_token(&holder_token);
    let holder: usize = holder_token.trim_start_matches("daemon").parse().unwrap();
    let stuck = r.stored().await;
    let Rotation::Promoted { rid, old, .. } = &stuck.rotation else {
        panic!("promoted")
    };
    let (rid, old_id) = (rid.clone(), old.id.clone());
    r.daemons[holder].take().unwrap().stop().await;

    // The other replica takes the claim over once it expires and finishes
    // that same rotation from the journal.
    eventually("the survivor finishing the rotation", || async {
        let record = r.stored().await;
        record.rotation.phase() == "idle"
            || matches!(&record.rotation, Rotation::Creating { rid: other, .. } | Rotation::Created { rid: other, .. } | Rotation::Promoted { rid: other, .. } if *other != rid)
    })
    .await;
    let survivor = 1 - holder;
    assert_eq!(
        r.fake.last_writer(Kind::Lease, NS, LEASE).unwrap(),
        format!("daemon{survivor}")
    );
    // The old secret of the stuck rotation was deleted by the survivor.
    let old_id = old_id.expect("the bootstrap or a rotated secret has an id");
    eventually("the old secret deleted", || async {
        !r.sim.secrets(CLIENT).iter().any(|s| s.id == old_id)
    })
    .await;

    stop.cancel();
    for s in samplers {
        s.await.expect("served continuously");
    }
    r.stop_all().await;
    let observer = Arc::new(store(&r.fake, r._dir.path(), "settle", Duration::from_secs(2)).await);
    r.settle_and_check(observer).await;
}

#[test]
fn claim_trait_object_is_send() {
    fn is_send<T: Send>() {}
    is_send::<Box<dyn Claim>>();
}

#[tokio::test]
async fn a_broken_kubeconfig_is_reported_without_its_contents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nusers:\n- name: u\n  user:\n    token: {s3cr3t-token: [\n",
    )
    .unwrap();
    let config = KubernetesStoreConfig {
        namespace: Some(NS.into()),
        secret: SECRET.into(),
        lease: LEASE.into(),
        kubeconfig: Some(path.clone()),
        claim_ttl: Duration::from_secs(15),
    };
    let Err(err) = KubernetesStore::connect(&config).await else {
        panic!("a broken kubeconfig connects")
    };
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(
        !text.contains("s3cr3t") && !format!("{err:?}").contains("s3cr3t"),
        "{text}"
    );
}
