//! Two `rekeyd run` replicas (real processes) rotating one MapsIndoors
//! credential through the etcd store on a real etcd server, against the
//! simulated provider whose `create` is slow. The holder of the rotation
//! claim is paused (SIGSTOP) while its create is on its way, past the
//! claim's TTL; the other replica takes the claim over and resumes the
//! journal; the paused one is resumed (SIGCONT) while the other's create is
//! on its way. The paused holder must notice that its claim is gone and
//! start nothing (S3; its journal writes are fenced on its lease), the
//! other resumes with a fresh attempt and deletes the secret the paused
//! one's create left (S2). Throughout, the stored secret exists at the
//! provider and logs in (I1) and nothing foreign is deleted (I4); once the
//! replicas are stopped and one `rekeyd rotate` ran, exactly one secret
//! tagged for the credential is left, the stored one (I3).
//! `REKEYD_TEST_SHOW_LOGS=1` prints the replicas' logs at the end.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/fleet.rs"]
mod fleet;
#[path = "support/process.rs"]
mod process;

use std::time::Duration;

use etcd::EtcdServer;
use fleet::{Replica, Snapshot, World};
use rekeyd::config::EtcdStoreConfig;
use rekeyd::sim::Endpoint;
use rekeyd::store::Store;
use rekeyd::store::etcd::EtcdStore;
use tokio::time::Instant;

const PREFIX: &str = "/rekeyd-test";
/// The shortest the configuration allows.
const CLAIM_TTL: Duration = Duration::from_secs(4);

struct Fleet {
    /// Kept running until the test ends.
    _server: EtcdServer,
    world: World,
    a: Replica,
    b: Replica,
    operator: Replica,
    /// The test's own store client, for reads.
    observer: EtcdStore,
    raw: etcd_client::Client,
    _root: tempfile::TempDir,
}

impl Fleet {
    async fn read(&self) -> Option<Snapshot> {
        let record = self.observer.load(fleet::NAME).await.ok()??;
        Some(Snapshot::from_record(record.version, &record.value))
    }

    /// The pid of the process holding the rotation claim, from the holder
    /// identity (`host/pid/random`) in the claim key.
    async fn holder_pid(&mut self) -> Option<u32> {
        let key = format!("{PREFIX}/claims/{}", fleet::NAME);
        let found = self.raw.get(key, None).await.ok()?;
        let value = String::from_utf8(found.kvs().first()?.value().to_vec()).ok()?;
        value.split('/').nth(1)?.parse().ok()
    }

    /// One round of every wait: the stored secret logs in, nothing foreign
    /// is gone, the running replicas still run.
    async fn check(&mut self, when: &str) {
        for r in [&mut self.a, &mut self.b] {
            r.assert_running();
        }
        let (world, observer) = (&mut self.world, &self.observer);
        let read = async || {
            let record = observer.load(fleet::NAME).await.ok()??;
            Some(Snapshot::from_record(record.version, &record.value))
        };
        world.check(read, when).await;
    }

    /// Checks every 20 ms until `done` holds, for `within` at most.
    async fn wait_for<F: AsyncFnMut(&mut Fleet) -> bool>(
        &mut self,
        what: &str,
        within: Duration,
        mut done: F,
    ) {
        let deadline = Instant::now() + within;
        loop {
            self.check(&format!("waiting for {what}")).await;
            if done(self).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; record {:?}\n{}",
                self.read().await,
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn all_logs(&self) -> String {
        [&self.a, &self.b]
            .iter()
            .map(|r| format!("--- {} ---\n{}", r.name, r.logs()))
            .collect()
    }
}

fn store_toml(server: &EtcdServer) -> String {
    format!(
        "[store]\nkind = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\nclaim_ttl = \"{}s\"\n",
        server.endpoint,
        CLAIM_TTL.as_secs()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_ttl_mid_create_is_taken_over_and_starts_nothing_on_waking() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let create = Duration::from_millis(1500);
    let mut world = World::start((create, create)).await;
    let root = tempfile::tempdir().unwrap();
    let store = store_toml(&server);
    let [a, b, operator] = ["replica-a", "replica-b", "operator"].map(|name| {
        let r = Replica::new(root.path(), name);
        r.configure(
            &world,
            &store,
            if name == "operator" { "1h" } else { "1s" },
            "1s",
        );
        r
    });
    world.use_config(&operator.config_path());
    let observer = EtcdStore::connect(&EtcdStoreConfig {
        endpoints: vec![server.endpoint.clone()],
        prefix: PREFIX.into(),
        claim_ttl: CLAIM_TTL,
        tls: None,
        auth: None,
    })
    .await
    .unwrap();
    let raw = etcd_client::Client::connect([server.endpoint.as_str()], None)
        .await
        .unwrap();
    let mut f = Fleet {
        _server: server,
        world,
        a,
        b,
        operator,
        observer,
        raw,
        _root: root,
    };

    f.a.start();
    let a_pid = f.a.pid().unwrap();
    f.wait_for("A to hold the claim", Duration::from_secs(20), async |f| {
        f.holder_pid().await == Some(a_pid)
    })
    .await;
    f.b.start();
    let b_pid = f.b.pid().unwrap();
    f.b.wait_started().await;
    f.wait_for("A's create in flight", Duration::from_secs(20), async |f| {
        let stats = f.world.sim.stats();
        f.read().await.is_some_and(|s| s.phase == "creating")
            && stats.requests_to(Endpoint::SecretsCreate) == 1
            && stats.secrets_created == 0
    })
    .await;
    let paused = f.read().await.unwrap();
    assert_eq!(f.holder_pid().await, Some(a_pid), "A's create");

    // Paused with its create on its way: the provider carries it out, the
    // claim's lease expires on the server, B takes over.
    f.a.signal(libc::SIGSTOP);
    let paused_at = Instant::now();
    f.wait_for(
        "B to take the claim over",
        Duration::from_secs(20),
        async |f| f.holder_pid().await == Some(b_pid),
    )
    .await;
    let taken_after = paused_at.elapsed();
    assert!(
        taken_after >= CLAIM_TTL - Duration::from_secs(1),
        "{taken_after:?}"
    );
    // B resumes the journal with an attempt of its own (S2), deletes what
    // A's create left, and creates again: wake A while that is on its way.
    f.wait_for("B's create in flight", Duration::from_secs(20), async |f| {
        let stats = f.world.sim.stats();
        f.read().await.is_some_and(|s| {
            s.phase == "creating" && s.rid == paused.rid && s.attempt != paused.attempt
        }) && stats.requests_to(Endpoint::SecretsCreate) == 2
            && stats.secrets_created == 1
            && stats.secrets_deleted == 1
    })
    .await;
    assert!(
        f.b.last_log()
            .contains("deleting a secret from an interrupted attempt"),
        "{}",
        f.b.last_log()
    );
    f.a.signal(libc::SIGCONT);
    let woken_at = Instant::now();

    // A learns it lost the claim and starts nothing; B finishes.
    f.wait_for(
        "A to give up and B to finish the rotation",
        Duration::from_secs(20),
        async |f| {
            let log = f.a.last_log();
            (log.contains("rotation claim lost") || log.contains("claim expired"))
                && f.read()
                    .await
                    .is_some_and(|s| s.is_idle() && s.last_rotated_at.is_some())
        },
    )
    .await;
    // A's run ended there: the create it had sent may have been answered,
    // but nothing was recorded and no other call made.
    let a_log = f.a.last_log();
    let end = ["rotation step failed", "the rotation claim lapsed"]
        .iter()
        .filter_map(|line| a_log.find(line))
        .min()
        .unwrap_or_else(|| panic!("A's run ended:\n{a_log}"));
    let first_run = &a_log[..end];
    for effect in [
        "deleting a secret",
        "new secret accepted",
        "new secret verified",
        "retired secret deleted",
    ] {
        assert!(
            !first_run.contains(effect),
            "A acted after waking ({effect}):\n{a_log}"
        );
    }
    assert!(
        !f.b.last_log().contains("rotation claim lost"),
        "B kept its claim:\n{}",
        f.b.last_log()
    );
    // Both go on rotating for a while.
    let rotated = f.world.sim.stats().secrets_created;
    f.wait_for("two more rotations", Duration::from_secs(20), async |f| {
        f.world.sim.stats().secrets_created >= rotated + 2
            && f.read().await.is_some_and(|s| s.is_idle())
    })
    .await;
    eprintln!(
        "paused holder: taken over {taken_after:?} after the pause; everything settled {:?} \
         after waking it; {} checks, {} logins",
        woken_at.elapsed(),
        f.world.checks,
        f.world.logins
    );

    f.a.stop().await;
    f.b.stop().await;
    f.world.slow_creates((Duration::ZERO, Duration::ZERO));
    let out = fleet::rotate_once(&f.operator.config_path()).await;
    let stored = f.read().await.expect("a record");
    f.world.assert_settled(&stored).await;
    let logs = f.all_logs() + &out;
    if std::env::var_os("REKEYD_TEST_SHOW_LOGS").is_some() {
        eprintln!("{logs}");
    }
    f.world.assert_no_secrets_in(&logs);
}
