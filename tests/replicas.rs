//! Two `rekeyd run` replicas (real processes) rotating one MapsIndoors
//! credential through the Kubernetes store, served by the in-process fake
//! API server, against the simulated provider whose `create` is slow:
//!
//! - one replica's clock 20 s behind the other's (in the Lease times it
//!   writes): neither takes the Lease from the other (S3), no rotation run
//!   loses a journal write to the other;
//! - the API server stalled for longer than the claim TTL while the holder
//!   waits on a slow `create`: the holder notices that its claim lapsed and
//!   stops (S3), whoever resumes records a fresh attempt first and cleans
//!   up after it (S2);
//! - `kill -9` of either replica at random moments of its rotations for a
//!   minute, each restarted at once (I5 with two actors).
//!
//! Throughout, the stored secret exists at the provider and logs in (I1),
//! and nothing but our own secrets is deleted (I4). At the end the replicas
//! are stopped, one `rekeyd rotate` runs, and exactly one secret tagged for
//! the credential is left, the stored one (I3).
//! `REKEYD_TEST_SHOW_LOGS=1` prints the replicas' logs at the end.

#[path = "support/fleet.rs"]
mod fleet;
#[path = "support/kube_fake.rs"]
mod kube_fake;
#[path = "support/process.rs"]
mod process;

use std::time::Duration;

use fleet::{Replica, Snapshot, World};
use kube_fake::{Kind, KubeFake, Stall};
use rand::Rng;
use rekeyd::sim::Endpoint;
use tokio::time::Instant;

const NS: &str = "rekeyd-test";
/// The store's default object names.
const SECRET: &str = "rekeyd-state";
const LEASE: &str = "rekeyd-rotation";
/// The shortest the configuration allows: requests time out after 1 s, a
/// holder starts nothing 2 s after its last renewal, a silent holder is
/// taken over after 4 s.
const CLAIM_TTL: Duration = Duration::from_secs(4);

/// Bearer tokens of the two replicas (the fake tells writers apart by them)
/// and of the operator's `rekeyd rotate`.
const A: &str = "replica-a";
const B: &str = "replica-b";
const OPERATOR: &str = "operator";

struct Cluster {
    fake: KubeFake,
    world: World,
    replicas: Vec<Replica>,
    /// The operator's configuration, for `rekeyd rotate`.
    operator: Replica,
    _root: tempfile::TempDir,
}

impl Cluster {
    /// Replicas `A` and `B` (not started) rotating every `every` with grace
    /// `grace`; creates take `create_latency`.
    async fn new(create_latency: (Duration, Duration), every: &str, grace: &str) -> Cluster {
        let fake = KubeFake::start().await;
        let mut world = World::start(create_latency).await;
        let root = tempfile::tempdir().unwrap();
        let replicas: Vec<Replica> = [A, B]
            .iter()
            .map(|token| {
                let r = Replica::new(root.path(), token);
                r.configure(&world, &store_toml(&fake, &r, token), every, grace);
                r
            })
            .collect();
        let operator = Replica::new(root.path(), OPERATOR);
        operator.configure(&world, &store_toml(&fake, &operator, OPERATOR), "1h", "1s");
        world.use_config(&operator.config_path());
        Cluster {
            fake,
            world,
            replicas,
            operator,
            _root: root,
        }
    }

    /// Rewrites a replica's configuration (read at its next start).
    fn configure(&self, token: &str, every: &str, grace: &str) {
        let r = self.replica(token);
        r.configure(&self.world, &store_toml(&self.fake, r, token), every, grace);
    }

    fn replica(&self, token: &str) -> &Replica {
        self.replicas
            .iter()
            .find(|r| r.name == token)
            .expect("a replica of that name")
    }

    fn replica_mut(&mut self, token: &str) -> &mut Replica {
        self.replicas
            .iter_mut()
            .find(|r| r.name == token)
            .expect("a replica of that name")
    }

    /// The record as the fake holds it (no API request: a stalled server
    /// does not stall the test's reads).
    fn stored(&self) -> Option<Snapshot> {
        stored(&self.fake)
    }

    /// The token of the replica holding the Lease, if one does.
    fn holder(&self) -> Option<String> {
        let lease = self.fake.object(Kind::Lease, NS, LEASE)?;
        let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
        if holder.is_empty() {
            return None;
        }
        self.fake.last_writer(Kind::Lease, NS, LEASE)
    }

    /// One round of every wait: the replicas still run, the stored secret
    /// logs in, nothing foreign is gone.
    async fn check(&mut self, when: &str) {
        for r in &mut self.replicas {
            r.assert_running();
        }
        let fake = &self.fake;
        self.world.check(async || stored(fake), when).await;
    }

    /// Checks (see [`Cluster::check`]) every 20 ms until `done` holds, for
    /// `within` at most.
    async fn wait_for(&mut self, what: &str, within: Duration, done: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            self.check(&format!("waiting for {what}")).await;
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; record {:?}\n{}",
                self.stored(),
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the replicas, runs `rekeyd rotate` once, and checks what the
    /// provider is left with (I1, I3, I4) and the logs (I7).
    async fn settle(&mut self) {
        for r in &mut self.replicas {
            if r.is_running() {
                r.stop().await;
            }
        }
        self.world.slow_creates((Duration::ZERO, Duration::ZERO));
        let out = fleet::rotate_once(&self.operator.config_path()).await;
        let stored = self.stored().expect("a record");
        self.world.assert_settled(&stored).await;
        let logs = self.all_logs() + &out;
        if std::env::var_os("REKEYD_TEST_SHOW_LOGS").is_some() {
            eprintln!("{logs}");
        }
        self.world.assert_no_secrets_in(&logs);
    }

    fn all_logs(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("--- {} ---\n{}", r.name, r.logs()))
            .collect()
    }
}

fn store_toml(fake: &KubeFake, replica: &Replica, token: &str) -> String {
    format!(
        "[store]\nkind = \"kubernetes\"\nnamespace = \"{NS}\"\nkubeconfig = \"{}\"\nclaim_ttl = \"{}s\"\n",
        fake.kubeconfig(replica.dir(), NS, token).display(),
        CLAIM_TTL.as_secs()
    )
}

fn stored(fake: &KubeFake) -> Option<Snapshot> {
    Snapshot::from_document(fake.secret_data(NS, SECRET)?.get("maps.json")?)
}

/// Seconds between the Lease's stored `renewTime` and our wall clock.
fn renew_time_offset(fake: &KubeFake) -> Option<i64> {
    let lease = fake.object(Kind::Lease, NS, LEASE)?;
    let renewed: k8s_openapi::jiff::Timestamp =
        lease["spec"]["renewTime"].as_str()?.parse().ok()?;
    Some(renewed.as_second() - k8s_openapi::jiff::Timestamp::now().as_second())
}

fn count(log: &str, what: &str) -> usize {
    log.matches(what).count()
}

const COMPLETE: &str = "rotation complete";
const BUSY: &str = "another process is rotating";
const TAKEOVER: &str = "taking over a rotation claim";
const LOST_CAS: &str = "the journal changed under this run";
const LAPSED: &str = "the rotation claim lapsed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_20s_behind_keeps_its_claim_and_the_pair_rotates_one_at_a_time() {
    let mut c = Cluster::new(
        (Duration::from_millis(800), Duration::from_millis(1500)),
        "1s",
        "1s",
    )
    .await;
    c.fake.skew_lease_times(A, -20);
    // A is due again a second after each of its rotations, B two: A holds
    // the Lease most of the time and B keeps meeting it.
    c.configure(B, "2s", "1s");
    // A first, so that B meets A's Lease.
    c.replica_mut(A).start();
    c.wait_for("A to hold the Lease", Duration::from_secs(20), |c| {
        c.holder().as_deref() == Some(A)
    })
    .await;
    c.replica_mut(B).start();

    // Until A completed rotations while B kept finding the Lease held, and
    // enough rotations happened in all.
    let mut skew_seen = false;
    let started = Instant::now();
    loop {
        c.check("while rotating").await;
        if c.holder().as_deref() == Some(A)
            && renew_time_offset(&c.fake).is_some_and(|s| (-22..=-18).contains(&s))
        {
            skew_seen = true;
        }
        let (a, b) = (c.replica(A).logs(), c.replica(B).logs());
        // S3: both renew, so neither takes the Lease from the other; one
        // rotation at a time, so no run finds the journal moved under it.
        for line in [TAKEOVER, LOST_CAS, LAPSED] {
            assert!(
                !a.contains(line) && !b.contains(line),
                "{line:?} in the logs:\n{}",
                c.all_logs()
            );
        }
        if count(&a, COMPLETE) >= 2
            && count(&b, BUSY) >= 2
            && count(&a, COMPLETE) + count(&b, COMPLETE) >= 4
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "too few rotations: A {} (B busy {}), B {}\n{}",
            count(&a, COMPLETE),
            count(&b, BUSY),
            count(&b, COMPLETE),
            c.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(skew_seen, "A's Lease times were written 20 s behind");
    eprintln!(
        "skewed pair: {} rotations by A, {} by B in {:?}; {} checks, {} logins",
        count(&c.replica(A).logs(), COMPLETE),
        count(&c.replica(B).logs(), COMPLETE),
        started.elapsed(),
        c.world.checks,
        c.world.logins
    );
    c.settle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stalled_by_the_api_server_mid_create_stops_and_the_journal_is_finished() {
    // The create outlasts the moment the stalled holder gives its claim up
    // (half the TTL after its last renewal, at most a TTL into the stall).
    let create = Duration::from_secs(3);
    let mut c = Cluster::new((create, create), "1s", "1s").await;
    c.replica_mut(A).start();
    c.wait_for("A to hold the Lease", Duration::from_secs(20), |c| {
        c.holder().as_deref() == Some(A)
    })
    .await;
    c.replica_mut(B).start();
    // B up (a replica that cannot reach its store at start-up exits), A's
    // first create received by the provider and not yet carried out.
    c.wait_for("A's create in flight", Duration::from_secs(20), |c| {
        let stats = c.world.sim.stats();
        c.replica(B).last_log().contains("rekeyd started")
            && c.holder().as_deref() == Some(A)
            && c.stored().is_some_and(|s| s.phase == "creating")
            && stats.requests_to(Endpoint::SecretsCreate) == 1
            && stats.secrets_created == 0
    })
    .await;

    // No answer to anyone, for longer than the claim TTL.
    c.fake.stall(Stall {
        method: None,
        kind: None,
    });
    let stalled_at = Instant::now();
    c.wait_for(
        "A to stop its run and the stall to outlast the TTL",
        Duration::from_secs(20),
        |c| {
            c.replica(A).last_log().contains(LAPSED)
                && stalled_at.elapsed() > CLAIM_TTL + Duration::from_secs(1)
        },
    )
    .await;
    // A gave its claim up for want of renewals and stopped waiting for the
    // create: nothing of its run came after.
    let a_log = c.replica(A).last_log();
    assert!(
        a_log.contains("cannot renew the rotation claim and it may have lapsed")
            && !a_log.contains("replacement secret created"),
        "{a_log}"
    );
    c.fake.unstall();

    // Whoever resumes writes a fresh attempt first (S2), then finishes.
    let done_at = Instant::now();
    c.wait_for(
        "the interrupted rotation to be finished",
        Duration::from_secs(25),
        |c| {
            c.stored()
                .is_some_and(|s| s.is_idle() && s.last_rotated_at.is_some())
        },
    )
    .await;
    // The create A gave up on was carried out at the provider all the same;
    // whoever resumed deleted it once its own fresh attempt was recorded.
    let logs = c.all_logs();
    assert!(
        logs.contains("resuming unfinished rotation work")
            && logs.contains("deleting a secret from an interrupted attempt"),
        "the journal was resumed and the abandoned create cleaned up:\n{logs}"
    );
    eprintln!(
        "stall: A stopped after {:?} of stall; finished {:?} after the stall; \
         taken over by B: {}; {} checks, {} logins",
        done_at - stalled_at,
        done_at.elapsed(),
        count(&c.replica(B).logs(), TAKEOVER) > 0,
        c.world.checks,
        c.world.logins
    );
    c.settle().await;
}

/// How long replicas are killed and restarted.
const CHAOS: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_either_replica_mid_rotation_for_a_minute() {
    let mut c = Cluster::new(
        (Duration::from_millis(100), Duration::from_millis(900)),
        "1s",
        "1s",
    )
    .await;
    // Some created secrets' replies are lost as well: orphans to recover.
    c.world.sim.update_faults(|f| f.random_drop = 0.15);
    for r in &mut c.replicas {
        r.start();
    }

    let started = Instant::now();
    let mut kills = 0;
    let mut holders_killed = 0;
    let mut phases = std::collections::BTreeMap::<String, u32>::new();
    let mut killed_at = None;
    while started.elapsed() < CHAOS {
        // A rotation in progress that moved on since the last kill (the
        // replicas make progress between kills)...
        c.wait_for("a rotation in progress", Duration::from_secs(30), |c| {
            c.stored()
                .is_some_and(|s| !s.is_idle() && Some(s.version) != killed_at)
        })
        .await;
        // ...caught at a random moment of it.
        let until = Instant::now() + Duration::from_millis(rand::rng().random_range(0..=1500));
        while Instant::now() < until {
            c.check("between kills").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let snap = c.stored().unwrap();
        if snap.is_idle() {
            continue;
        }
        killed_at = Some(snap.version);
        let phase = snap.phase;
        let holder = c.holder();
        let victim = match &holder {
            Some(h) if rand::rng().random_bool(0.7) => h.clone(),
            _ => [A, B][rand::rng().random_range(0..2)].to_string(),
        };
        if holder.as_deref() == Some(victim.as_str()) {
            holders_killed += 1;
        }
        c.replica_mut(&victim).kill().await;
        kills += 1;
        *phases.entry(phase).or_default() += 1;
        c.world.login_at_next_check();
        c.check(&format!("after kill {kills} ({victim})")).await;
        c.replica_mut(&victim).start();
    }

    let logs = c.all_logs();
    let completed = count(&logs, COMPLETE);
    eprintln!(
        "kill loop: {kills} kills ({holders_killed} of the holder) in {:?}, phase at kill \
         {phases:?}; {completed} rotations completed, {} takeovers; sim {:?}; {} checks, {} logins",
        started.elapsed(),
        count(&logs, TAKEOVER),
        c.world.sim.stats(),
        c.world.checks,
        c.world.logins
    );
    assert!(kills >= 6, "{kills} kills");
    assert!(holders_killed >= 3, "{holders_killed} holders killed");
    assert!(completed >= 2, "{completed} rotations completed");
    c.world.sim.update_faults(|f| f.random_drop = 0.0);
    c.settle().await;
}
