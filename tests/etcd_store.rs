//! The etcd store against a real etcd server (`etcd` on PATH, started per
//! test on loopback ports): compare-and-swap, rotation claims (exclusion,
//! release on drop, expiry after a holder stops renewing, fencing, waiting,
//! a holder that is paused or whose keep-alives stall going stale and lost),
//! an unreachable cluster, and three daemon replicas sharing one rotating
//! MapsIndoors credential while one of them is killed again and again.

#[path = "support/etcd.rs"]
mod etcd;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use etcd::EtcdServer;
use rand::Rng;
use rekeyd::config::EtcdStoreConfig;
use rekeyd::store::etcd::EtcdStore;
use rekeyd::store::{CredentialRecord, Rotation, SecretEntry, Store, StoreError};
use secrecy::{ExposeSecret, SecretString};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const PREFIX: &str = "/rekeyd-test";

fn config(server: &EtcdServer, claim_ttl: Duration) -> EtcdStoreConfig {
    EtcdStoreConfig {
        endpoints: vec![server.endpoint.clone()],
        prefix: PREFIX.to_string(),
        claim_ttl,
        tls: None,
        auth: None,
    }
}

async fn store(server: &EtcdServer, claim_ttl: Duration) -> EtcdStore {
    EtcdStore::connect(&config(server, claim_ttl))
        .await
        .expect("connect to the test etcd")
}

async fn raw_client(server: &EtcdServer) -> etcd_client::Client {
    etcd_client::Client::connect([server.endpoint.as_str()], None)
        .await
        .unwrap()
}

fn record(value: &str) -> CredentialRecord {
    CredentialRecord::new(SecretEntry {
        id: Some("id1".into()),
        value: SecretString::from(value),
        created_at: SystemTime::UNIX_EPOCH,
        expires_at: None,
    })
}

/// Polls `f` every 50 ms until it returns `Some`, failing after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_history_larger_than_an_etcd_request_keeps_fewer_entries() {
    use rekeyd::history::{self, Event, Step, chain};
    use rekeyd::store::etcd::HISTORY_KEY_BYTES;
    let Some(server) = EtcdServer::start() else {
        return;
    };
    // A count bound etcd cannot take in one request: the bytes bound acts.
    let store = store(&server, Duration::from_secs(15))
        .await
        .with_history_limit(100_000);
    let now = SystemTime::now();
    let detail = "d".repeat(400);
    // 30 batches x 100 entries of ~600 bytes: about 1.8 MB unbounded.
    for i in 0..30 {
        let batch: Vec<Event> = (0..100)
            .map(|j| {
                Event::new(Step::Deleted)
                    .secret(Some(&format!("s-{i}-{j}")))
                    .detail(&detail)
            })
            .collect();
        let added = history::append(&store, "a", &batch, now).await.unwrap();
        assert_eq!(added.len(), 100, "batch {i} was recorded");
    }
    let stored = store.load_history("a").await.unwrap().unwrap();
    assert!(
        stored.value.len() <= HISTORY_KEY_BYTES,
        "{} bytes",
        stored.value.len()
    );
    let doc = history::load(&store, "a").await.unwrap().unwrap();
    assert_eq!(doc.entries[0].step, Step::Truncated);
    assert_eq!(doc.entries.last().unwrap().seq, 30 * 100 - 1);
    chain::verify(&doc, "a").unwrap();
}

#[tokio::test]
async fn the_history_is_its_own_key_with_compare_and_swap() {
    use rekeyd::history::{self, Event, Step, chain};
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let store = store(&server, Duration::from_secs(15))
        .await
        .with_history_limit(10);
    let v1 = store
        .compare_and_swap("a", None, &record("one"))
        .await
        .unwrap();
    let now = SystemTime::now();
    for i in 0..12 {
        let event = Event::new(Step::Deleted).secret(Some(&format!("s{i}")));
        history::append(&store, "a", &[event], now).await.unwrap();
    }
    // The record is untouched; the history is bounded and verifies.
    assert_eq!(store.load("a").await.unwrap().unwrap().version, v1);
    let doc = history::load(&store, "a").await.unwrap().unwrap();
    assert_eq!(doc.entries.len(), 10);
    assert_eq!(doc.entries[0].step, Step::Truncated);
    chain::verify(&doc, "a").unwrap();
    let stale = store.load_history("a").await.unwrap().unwrap();
    history::append(&store, "a", &[Event::new(Step::Set)], now)
        .await
        .unwrap();
    assert!(matches!(
        store
            .swap_history("a", Some(stale.version), &stale.value)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store.swap_history("b", Some(1), b"{}").await,
        Err(StoreError::Conflict { .. })
    ));
}

#[tokio::test]
async fn compare_and_swap_creates_updates_and_refuses_stale_writes() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let store = store(&server, Duration::from_secs(15)).await;
    assert!(store.load("a").await.unwrap().is_none());
    store.check_writable("a").await.unwrap();

    let v1 = store
        .compare_and_swap("a", None, &record("one"))
        .await
        .unwrap();
    // Absent-only create: a second create loses.
    assert!(matches!(
        store.compare_and_swap("a", None, &record("x")).await,
        Err(StoreError::Conflict { expected: None, .. })
    ));
    let mut r = record("two");
    r.rotation = Rotation::Creating {
        rid: "r1".into(),
        attempt: "a1".into(),
        chosen: None,
    };
    let v2 = store.compare_and_swap("a", Some(v1), &r).await.unwrap();
    assert!(v2 > v1);
    // Stale: written against v1 after v2 replaced it.
    assert!(matches!(
        store.compare_and_swap("a", Some(v1), &record("y")).await,
        Err(StoreError::Conflict {
            expected: Some(_),
            ..
        })
    ));
    // A version the key never had (e.g. someone else's revision).
    assert!(matches!(
        store.compare_and_swap("b", Some(v2), &record("z")).await,
        Err(StoreError::Conflict { .. })
    ));
    let got = store.load("a").await.unwrap().unwrap();
    assert_eq!(got.version, v2);
    assert_eq!(got.value.current.value.expose_secret(), "two");
    assert_eq!(got.value.rotation.phase(), "creating");

    // The same JSON document the file store writes, readable with etcdctl.
    let mut raw = raw_client(&server).await;
    let kv = raw
        .get(format!("{PREFIX}/credentials/a"), None)
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(kv.kvs()[0].value()).unwrap();
    assert_eq!(doc["format"], 1);
    assert_eq!(doc["rotation"]["phase"], "creating");
    // check_writable left no probe behind.
    let probes = raw
        .get(
            format!("{PREFIX}/probes/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(probes.count(), 0);
}

#[tokio::test]
async fn corrupt_record_names_the_key_without_quoting_it() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let store = store(&server, Duration::from_secs(15)).await;
    let key = format!("{PREFIX}/credentials/c");
    let mut raw = raw_client(&server).await;
    raw.put(
        key.as_str(),
        "{\"format\":1,\"current\":\"hunter2-secret\"",
        None,
    )
    .await
    .unwrap();
    let err = store.load("c").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&key), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // Never silently replaced.
    assert!(
        store
            .compare_and_swap("c", None, &record("x"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn claims_exclude_and_are_released_on_drop() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let a = store(&server, Duration::from_secs(15)).await;
    let b = store(&server, Duration::from_secs(15)).await;
    let claim = a.claim("m", false).await.unwrap().expect("free claim");
    assert!(b.claim("m", false).await.unwrap().is_none(), "held by a");
    // Another credential is independent.
    assert!(b.claim("other", false).await.unwrap().is_some());
    // The claim key names its holder.
    let mut raw = raw_client(&server).await;
    let held = raw.get(format!("{PREFIX}/claims/m"), None).await.unwrap();
    let holder = String::from_utf8(held.kvs()[0].value().to_vec()).unwrap();
    assert!(
        holder.contains(&format!("/{}/", std::process::id())),
        "{holder}"
    );
    assert_ne!(held.kvs()[0].lease(), 0, "the claim is attached to a lease");

    drop(claim);
    // The release (a lease revoke) runs in the background.
    let _b_claim = eventually(
        "b to get the released claim",
        Duration::from_secs(5),
        || async { b.claim("m", false).await.unwrap() },
    )
    .await;
    assert!(
        a.claim("m", false).await.unwrap().is_none(),
        "now held by b"
    );
}

#[tokio::test]
async fn claim_expires_after_the_ttl_when_its_holder_stops_renewing() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let ttl = Duration::from_secs(2);
    // The holder runs on a runtime of its own that is then shut down: its
    // keep-alive task dies with it and nothing revokes the lease, as when
    // the process is killed.
    let cfg = config(&server, ttl);
    let taken_at = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (store, claim) = rt.block_on(async {
            let store = EtcdStore::connect(&cfg).await.unwrap();
            let claim = store.claim("m", false).await.unwrap().expect("free");
            (store, claim)
        });
        let taken_at = Instant::now();
        rt.shutdown_background();
        std::mem::forget(claim);
        std::mem::forget(store);
        taken_at
    })
    .await
    .unwrap();
    let other = store(&server, ttl).await;
    assert!(other.claim("m", false).await.unwrap().is_none());
    let _claim = eventually(
        "the dead holder's lease to expire",
        Duration::from_secs(10),
        || async { other.claim("m", false).await.unwrap() },
    )
    .await;
    let after = taken_at.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "claim freed too early: {after:?}"
    );
}

#[tokio::test]
async fn a_live_claim_outlives_its_ttl_and_a_lost_one_fences_writes() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let a = store(&server, ttl).await;
    let b = store(&server, ttl).await;
    let v1 = a.compare_and_swap("m", None, &record("one")).await.unwrap();
    let claim = a.claim("m", false).await.unwrap().expect("free");
    // Kept alive well past the TTL.
    tokio::time::sleep(ttl * 2).await;
    assert!(b.claim("m", false).await.unwrap().is_none(), "renewed");
    assert!(claim.is_fresh());
    let v2 = a
        .compare_and_swap("m", Some(v1), &record("two"))
        .await
        .unwrap();

    // The lease vanishes behind a's back (as when a stalls past the TTL):
    // b may now rotate, and a's writes are refused.
    let mut raw = raw_client(&server).await;
    let held = raw.get(format!("{PREFIX}/claims/m"), None).await.unwrap();
    raw.lease_revoke(held.kvs()[0].lease()).await.unwrap();
    let _b_claim = b.claim("m", false).await.unwrap().expect("free again");
    let err = a
        .compare_and_swap("m", Some(v2), &record("three"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable { .. }) && err.to_string().contains("claim"),
        "{err}"
    );
    let got = b.load("m").await.unwrap().unwrap();
    assert_eq!(got.version, v2);
    // a's next keep-alive is answered with TTL 0: a learns it lost the claim.
    tokio::time::timeout(ttl, claim.lost().cancelled())
        .await
        .expect("a notices the lost claim");
    assert!(!claim.is_fresh());
    // b, the holder now, writes.
    b.compare_and_swap("m", Some(v2), &record("four"))
        .await
        .unwrap();
}

// A current-thread runtime: blocking its thread stops every task of the
// holder, its keep-alive included, as SIGSTOP would stop the process.
#[tokio::test(flavor = "current_thread")]
async fn a_paused_holder_is_stale_at_once_and_lost_once_its_lease_expired() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let holder = store(&server, ttl).await;
    let claim = holder.claim("m", false).await.unwrap().expect("free");
    assert!(claim.is_fresh());

    // Paused past the TTL: nothing renews, and etcd expires the lease.
    std::thread::sleep(ttl + Duration::from_millis(1500));
    // On waking, before any keep-alive had a chance to run: its monotonic
    // clock kept counting, so it starts nothing new.
    assert!(!claim.is_fresh());
    // The next keep-alive finds the lease gone.
    tokio::time::timeout(Duration::from_secs(10), claim.lost().cancelled())
        .await
        .expect("the claim is lost");
    assert!(!claim.is_fresh());
    // Another replica may take it now.
    let other = store(&server, ttl).await;
    assert!(other.claim("m", false).await.unwrap().is_some());
}

#[tokio::test]
async fn a_holder_whose_keep_alives_stall_goes_stale_and_loses_the_claim() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    // Requests time out at ttl/4 = 1 s.
    let ttl = Duration::from_secs(4);
    let holder = store(&server, ttl).await;
    let claim = holder.claim("m", false).await.unwrap().expect("free");
    let held_at = Instant::now();
    assert!(claim.is_fresh());

    server.pause();
    let lost = tokio::time::timeout(Duration::from_secs(10), claim.lost().cancelled()).await;
    let after = held_at.elapsed();
    server.resume();
    lost.expect("the claim is lost");
    assert!(!claim.is_fresh());
    // Fresh for half the TTL after the lease grant was sent (just before
    // `held_at`); lost once a keep-alive failed after that, well before
    // the lease could expire on the server.
    assert!(after >= ttl / 2 - Duration::from_millis(100), "{after:?}");
    assert!(after < ttl, "{after:?}");
}

#[tokio::test]
async fn waiting_claim_is_granted_once_the_holder_lets_go() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let a = store(&server, Duration::from_secs(15)).await;
    let b = std::sync::Arc::new(store(&server, Duration::from_secs(15)).await);
    let claim = a.claim("m", false).await.unwrap().expect("free");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.claim("m", true).await.map(|c| c.is_some()) })
    };
    // Still waiting while a holds it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "b got a claim a holds");
    let released = Instant::now();
    drop(claim);
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("b is granted the claim after the release")
        .unwrap()
        .unwrap();
    assert!(got);
    // Woken by the deletion (a watch), not by the 15 s claim TTL.
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "{:?}",
        released.elapsed()
    );
}

#[tokio::test]
async fn unreachable_cluster_is_reported_quickly_and_named() {
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let result = EtcdStore::connect(&EtcdStoreConfig {
        endpoints: vec![endpoint.clone()],
        prefix: PREFIX.into(),
        claim_ttl: Duration::from_secs(15),
        tls: None,
        auth: None,
    })
    .await;
    let Err(err) = result else {
        panic!("connected to nothing")
    };
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&endpoint), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // A cluster that goes away after the connect: requests fail, bounded.
    let Some(mut server) = EtcdServer::start() else {
        return;
    };
    let store = store(&server, Duration::from_secs(15)).await;
    server.kill();
    let started = Instant::now();
    let err = store.load("m").await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/rekeyd-test/credentials/m"), "{text}");
    assert!(text.contains(&server.endpoint), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

// --- three replicas, one killed again and again ----------------------------

const CLIENT: &str = "maps-client";
const CUSTOMER: &str = "cust";
const TAG: &str = "rekeyd:maps:";
const REPLICAS: usize = 3;
/// How long replicas are killed and restarted.
const CHAOS: Duration = Duration::from_secs(30);

struct Replica {
    dir: PathBuf,
    child: Option<Child>,
    runs: usize,
}

impl Replica {
    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("rekeyd.toml")
    }

    fn write_config(
        &self,
        shared: &Path,
        etcd: &str,
        sim: &rekeyd::sim::SimProvider,
        boot: &str,
        every: &str,
    ) {
        let d = self.dir.display();
        let s = shared.display();
        let text = format!(
            r#"state_dir = "{d}/state"

[api]
listen = "unix:{d}/api.sock"
key_file = "{d}/api.key"

[store]
kind = "etcd"
endpoints = ["{etcd}"]
prefix = "{PREFIX}"
claim_ttl = "4s"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "{CLIENT}"
customer_id = "{CUSTOMER}"
initial_secret_file = "{s}/maps.secret"
initial_secret_id = "{boot}"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
request_timeout = "5s"
[credentials.rotation]
every = "{every}"
grace = "1s"
"#,
            token = sim.mapsindoors_token_url(),
            secrets = sim.mapsindoors_secrets_url(),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    fn spawn(&mut self) {
        let log = self.dir.join(format!("run-{:03}.log", self.runs));
        self.runs += 1;
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        // A stale socket from a killed run is replaced by the daemon.
        let child = Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("start rekeyd");
        self.child = Some(child);
    }

    async fn signal(&mut self, sig: i32) {
        let child = self.child.as_mut().expect("running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "replica {} exited by itself ({status}):\n{}",
                self.dir.display(),
                self.logs()
            );
        }
        let pid = child.id().expect("running") as i32;
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to {pid}");
        tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("rekeyd exits in time")
            .unwrap();
        self.child = None;
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for i in 0..self.runs {
            let path = self.dir.join(format!("run-{i:03}.log"));
            all.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        all
    }

    /// `GET path` on the replica's API socket, as JSON; `None` while it
    /// does not answer 200.
    async fn api(&self, path: &str) -> Option<serde_json::Value> {
        let key = std::fs::read_to_string(self.dir.join("api.key")).ok()?;
        let client = reqwest::Client::builder()
            .unix_socket(self.socket())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let response = client
            .get(format!("http://localhost{path}"))
            .header("x-rekeyd-key", key.trim())
            .send()
            .await
            .ok()?;
        if response.status() != reqwest::StatusCode::OK {
            return None;
        }
        serde_json::from_slice(&response.bytes().await.ok()?).ok()
    }
}

/// The stored record's current secret exists at the provider (I1). The
/// record is re-read when it is not found: a rotation may have completed
/// between the two reads.
async fn assert_current_exists(store: &EtcdStore, sim: &rekeyd::sim::SimProvider, when: &str) {
    for _ in 0..3 {
        let Some(record) = store.load("maps").await.unwrap() else {
            return;
        };
        let current = record.value.current.value.expose_secret().to_string();
        if sim.secrets(CLIENT).iter().any(|s| s.value == current) {
            return;
        }
        let again = store.load("maps").await.unwrap().expect("record");
        if again.version == record.version {
            panic!(
                "{when}: the stored current secret is gone at the provider (phase {})",
                record.value.rotation.phase()
            );
        }
    }
    panic!("{when}: the record kept changing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_a_rotating_credential_through_kill_9() {
    use rekeyd::sim::{SimOptions, SimProvider};
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(3),
        propagation_delay: Duration::from_millis(200),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, CUSTOMER);
    let (boot_id, boot) = sim.add_secret(CLIENT, "portal: initial secret");
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("maps.secret"), &boot).unwrap();
    let mut values: HashSet<String> = [boot.clone()].into_iter().collect();

    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|i| {
            let dir = shared.path().join(format!("replica-{i}"));
            std::fs::create_dir(&dir).unwrap();
            Replica {
                dir,
                child: None,
                runs: 0,
            }
        })
        .collect();
    for r in &mut replicas {
        r.write_config(shared.path(), &server.endpoint, &sim, &boot_id, "1s");
        r.spawn();
    }
    let store = store(&server, Duration::from_secs(2)).await;

    // Chaos: a random replica killed at a random moment, restarted at once.
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < CHAOS {
        let (victim, run_for) = {
            let mut rng = rand::rng();
            (rng.random_range(0..REPLICAS), rng.random_range(200..=1500))
        };
        let until = Instant::now() + Duration::from_millis(run_for);
        while Instant::now() < until {
            for s in sim.secrets(CLIENT) {
                values.insert(s.value);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        replicas[victim].signal(libc::SIGKILL).await;
        kills += 1;
        assert_current_exists(&store, &sim, &format!("after kill {kills}")).await;
        replicas[victim].spawn();
    }
    let rotated_during_chaos = store.load("maps").await.unwrap().expect("record");

    // Settle: stop every replica, schedule no more rotations, start them
    // again. Whatever journal the stop left is finished by one of them.
    for r in &mut replicas {
        r.signal(libc::SIGTERM).await;
        r.write_config(shared.path(), &server.endpoint, &sim, &boot_id, "1h");
        r.spawn();
    }
    let settled = eventually("the journal to settle", Duration::from_secs(30), || async {
        let record = store.load("maps").await.unwrap()?;
        let tagged = sim
            .secrets(CLIENT)
            .into_iter()
            .filter(|s| s.description.starts_with(TAG))
            .count();
        (record.value.rotation.phase() == "idle" && tagged == 1).then_some(record)
    })
    .await;

    // Every replica serves a valid token, none is locked out.
    for (i, r) in replicas.iter().enumerate() {
        let status = eventually(
            &format!("replica {i} to be ready"),
            Duration::from_secs(20),
            || async {
                let status = r.api("/v1/status").await?;
                let maps = status["credentials"][0].clone();
                (maps["ready"] == true).then_some(maps)
            },
        )
        .await;
        assert_eq!(status["locked_out"], false, "replica {i}: {status}");
        let token = r.api("/v1/token/maps").await.expect("a token is served");
        let access = token["access_token"].as_str().expect("access_token");
        assert_eq!(
            sim.token_client(access).as_deref(),
            Some(CLIENT),
            "replica {i} serves a token the provider issued"
        );
    }

    // The stored secret logs in.
    let config = rekeyd::config::Config::load(&replicas[0].config_path()).unwrap();
    let provider = rekeyd::provider::build(config.credential("maps").unwrap()).unwrap();
    provider
        .login(&settled.value.current.value)
        .await
        .expect("the stored secret logs in");

    // Exactly one secret of ours: the stored one. The bootstrap secret (its
    // id was given) was rotated away; every secret rekeyd created but the
    // stored one was deleted: no orphans (I3).
    let ours = sim.secrets(CLIENT);
    assert_eq!(ours.len(), 1, "only the stored secret remains: {ours:?}");
    assert!(ours[0].description.starts_with(TAG));
    assert_eq!(Some(&ours[0].id), settled.value.current.id.as_ref());
    assert_eq!(ours[0].value, settled.value.current.value.expose_secret());
    let stats = sim.stats();
    assert_eq!(stats.secrets_created, stats.secrets_deleted, "{stats:?}");
    assert!(
        settled.version > rotated_during_chaos.version || stats.secrets_created >= 2,
        "rotations happened"
    );

    // I7: no secret value or token in any replica's output.
    let mut logs = String::new();
    for r in &replicas {
        logs.push_str(&r.logs());
    }
    assert!(logs.contains("rotation complete"), "rotations completed");
    assert!(!logs.contains("sim_"), "a token reached the logs");
    for value in &values {
        assert!(
            !logs.contains(value.as_str()),
            "a secret value reached the logs"
        );
    }
    let completed = logs.matches("rotation complete").count();
    let resumed = logs.matches("resuming rotation").count();
    eprintln!(
        "replicas: {kills} kills in {:?}; {completed} rotations completed, {resumed} resumed; \
         sim: {} created, {} deleted",
        CHAOS, stats.secrets_created, stats.secrets_deleted
    );
    assert!(kills >= 10, "{kills} kills");

    for r in &mut replicas {
        r.signal(libc::SIGTERM).await;
    }
    sim.shutdown().await;
}
