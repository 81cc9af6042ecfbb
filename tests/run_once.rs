//! `rekeyd run --once`, end to end: the real binary (built with
//! `--features failpoints`) against the simulated MapsIndoors provider on
//! loopback, with the file store.
//!
//! - Exit status 0 when every credential has a valid token in its files,
//!   69 when one has not (no token, or a token file not written; its line
//!   says why, without a secret), 78 for a configuration error with
//!   nothing touched.
//! - The token file holds a token the provider issued.
//! - A rotation interrupted by a crash (fail points) is finished.
//! - `on_login = true`: the run rotates, the old secret is deleted at the
//!   provider, and the hooks run for the token and the rotation.
//! - A rotation due by schedule is performed, once.
//! - A grace period longer than a run waits for is left to the next run.
//! - The seeds' script pattern: one-shot runs back to back each rotate
//!   once; and one-shot runs killed at random moments against a flaky
//!   provider converge, with the kill loop's assertions: no lockout (the
//!   stored secret logs in) and no orphan (the provider holds exactly the
//!   secrets the journal knows).
//! - A one-shot run while the daemon rotates the same credential waits for
//!   the daemon's rotation claim (I6) and does not start another.

use std::time::{Duration, SystemTime};

use rand::Rng;
use rekeyd::sim::{FaultScope, Faults, SimOptions};
use rekeyd::store::file::FileStore;
use rekeyd::store::{Rotation, Store};
use tokio::time::Instant;

#[path = "support/process.rs"]
mod process;
#[path = "support/world.rs"]
mod world;

use process::{RekeydProcess, TIMEOUT};
use world::{CLIENT, CUSTOMER, NAME, Settings, World, text, wait_for};

const ONCE: &[&str] = &["run", "--once"];

/// The token the token file holds, checked with the provider: issued to
/// our client and not expired.
fn assert_token_file_valid(world: &World) {
    let token = std::fs::read_to_string(world.token_file()).expect("the token file exists");
    assert_eq!(
        world.sim.token_client(token.trim()).as_deref(),
        Some(CLIENT),
        "the token file holds a token the provider issued to {CLIENT}"
    );
}

/// The line `rekeyd run --once` printed for `name`.
fn line_of<'a>(stdout: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}: ");
    stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{stdout}"))
}

/// After rotations from the bootstrap secret: settled (the stored secret
/// logs in, every tagged secret at the provider is the stored one),
/// exactly one secret of ours left, the bootstrap secret deleted, and the
/// provider's books balance: created through its API = the stored one and
/// every one deleted since; deleted = those and the bootstrap secret.
async fn assert_rotated(world: &World) -> serde_json::Value {
    let r = world.assert_settled().await;
    assert!(r["last_rotated_at"].is_string(), "journal: {r}");
    let tagged = world.tagged();
    assert_eq!(tagged.len(), 1, "exactly one secret of ours: {tagged:?}");
    assert!(
        !world.at_sim(&world.bootstrap.id),
        "the bootstrap secret (id configured) is deleted"
    );
    let stats = world.sim.stats();
    assert_eq!(
        stats.secrets_created + 1,
        stats.secrets_deleted + tagged.len() as u64,
        "created vs deleted: {stats:?}"
    );
    r
}

fn with_token_file() -> Settings {
    Settings {
        token_file: true,
        ..Settings::default()
    }
}

// --- exit status and token files --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_token_file_and_exits_0() {
    let world = World::new(SimOptions::default(), &with_token_file()).await;
    let out = world.run(ONCE, None, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "one line per credential: {stdout}"
    );
    let line = line_of(&stdout, NAME);
    assert!(
        line.starts_with("maps: ok: token written to 1 file, expires "),
        "{line}"
    );
    // The rotation is every 24h and the secret was just stored.
    assert!(line.ends_with("; no rotation due"), "{line}");
    assert_token_file_valid(&world);
    assert_eq!(world.sim.stats().secrets_created, 0);
    assert_eq!(world.record()["current"]["id"], world.bootstrap.id.as_str());
    world.assert_no_secret_printed(&[]);
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_that_gets_no_token_fails_the_run_with_69() {
    let world = World::new(SimOptions::default(), &with_token_file()).await;
    // A second credential whose secret the provider does not know.
    world.sim.add_client("other-client", CUSTOMER);
    let wrong = "not-a-secret-the-provider-knows-0123456789";
    let d = world.dir.path();
    std::fs::write(d.join("broken.secret"), wrong).unwrap();
    let broken_file = d.join("broken.token");
    let mut config = std::fs::read_to_string(&world.config).unwrap();
    config.push_str(&format!(
        r#"
[[credentials]]
name = "broken"
provider = "mapsindoors"
client_id = "other-client"
customer_id = "{CUSTOMER}"
initial_secret_file = "{d}/broken.secret"
[credentials.endpoints]
token_url = "{token}"
[[credentials.sinks]]
path = "{path}"
"#,
        d = d.display(),
        token = world.sim.mapsindoors_token_url(),
        path = broken_file.display(),
    ));
    std::fs::write(&world.config, config).unwrap();

    let out = world.run(ONCE, None, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(69),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    // In the configuration's order, one each.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("maps: ok: token written"), "{stdout}");
    assert!(
        lines[1].starts_with(
            "broken: failed: no token: mapsindoors login failed: HTTP 400 error=invalid_client"
        ),
        "the line says why: {stdout}"
    );
    assert!(!broken_file.exists(), "no token, no file");
    assert_token_file_valid(&world);
    world.assert_no_secret_printed(&[]);
    for output in [&out.stdout, &out.stderr] {
        assert!(
            !text(output).contains(wrong),
            "the rejected secret reached the output"
        );
    }
    world.sim.shutdown().await;
}

/// A token file that cannot be written (its directory is missing) fails
/// the credential after the writer's retries; the other file is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_that_cannot_be_written_fails_the_run_with_69() {
    let world = World::new(SimOptions::default(), &with_token_file()).await;
    let unwritable = world.dir.path().join("missing/maps.token");
    let mut config = std::fs::read_to_string(&world.config).unwrap();
    config.push_str(&format!(
        "[[credentials.sinks]]\npath = \"{}\"\n",
        unwritable.display()
    ));
    std::fs::write(&world.config, config).unwrap();
    let out = world.run(ONCE, None, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(69),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let line = line_of(&stdout, NAME);
    assert!(
        line.starts_with(&format!(
            "maps: failed: token file {} not written: ",
            unwritable.display()
        )),
        "{line}"
    );
    assert!(line.contains("No such file or directory"), "{line}");
    assert_token_file_valid(&world);
    assert!(!unwritable.exists());
    world.assert_no_secret_printed(&[]);
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_error_exits_78_with_nothing_touched() {
    let world = World::new(SimOptions::default(), &with_token_file()).await;
    let version = world.version();
    let mut config = std::fs::read_to_string(&world.config).unwrap();
    // A new credential whose initial secret file is missing: found while
    // preparing, before any credential is touched.
    config.push_str(&format!(
        r#"
[[credentials]]
name = "new"
provider = "mapsindoors"
client_id = "new-client"
customer_id = "{CUSTOMER}"
initial_secret_file = "{d}/missing.secret"
[credentials.endpoints]
token_url = "{token}"
"#,
        d = world.dir.path().display(),
        token = world.sim.mapsindoors_token_url(),
    ));
    std::fs::write(&world.config, config).unwrap();
    let out = world.run(ONCE, None, &[]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("credentials[1].initial_secret_file"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(!world.token_file().exists(), "no token file written");
    assert_eq!(world.version(), version, "the journal was written");
    assert_eq!(world.sim.stats().secrets_created, 0);
    world.sim.shutdown().await;
}

// --- rotation -----------------------------------------------------------------

/// `rekeyd rotate` crashes (SIGABRT) at `point`; `rekeyd run --once`
/// finishes that rotation and starts no other (the next is due in 24h).
async fn interrupted_at(point: &'static str, phase: &'static str) {
    let world = World::new(SimOptions::default(), &with_token_file()).await;
    let failpoints = format!("{point}=return");
    let crashed = world
        .run(
            &["rotate", NAME],
            None,
            &[("FAILPOINTS", failpoints.as_str())],
        )
        .await;
    assert_eq!(crashed.status.code(), None, "{point}: aborted, not exited");
    assert_eq!(world.phase(), phase, "{point}");

    let out = world.run(ONCE, None, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{point}: {stdout}\n{}",
        text(&out.stderr)
    );
    let line = line_of(&stdout, NAME);
    assert!(
        line.ends_with(&format!(
            "; finished a rotation left unfinished (it was {phase})"
        )),
        "{point}: {line}"
    );
    let r = assert_rotated(&world).await;
    assert_ne!(r["current"]["id"], world.bootstrap.id.as_str());
    assert_token_file_valid(&world);
    world.assert_no_secret_printed(&[]);
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rotation_is_finished() {
    // A secret created whose value was never stored (the orphan is
    // deleted, I3), one created and stored but not yet proven, and one
    // promoted whose old secret is still to delete.
    let runs = [
        ("rotation-after-create", "creating"),
        ("rotation-after-persist-created", "created"),
        ("rotation-after-persist-promoted", "promoted"),
    ]
    .map(|(point, phase)| tokio::spawn(interrupted_at(point, phase)));
    for run in runs {
        run.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_login_rotates_and_deletes_the_old_secret() {
    let world = World::new(
        SimOptions::default(),
        &Settings {
            on_login: true,
            ..with_token_file()
        },
    )
    .await;
    // A hook that notes each event, once the token file is there.
    let events = world.dir.path().join("events");
    let mut config = std::fs::read_to_string(&world.config).unwrap();
    config.push_str(&format!(
        r#"
[[credentials.hooks]]
on = ["token", "rotation"]
command = ["/bin/sh", "-c", "test -s '{token}' && echo $REKEYD_EVENT >> '{events}'"]
"#,
        token = world.token_file().display(),
        events = events.display(),
    ));
    std::fs::write(&world.config, config).unwrap();

    let out = world.run(ONCE, None, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        line_of(&stdout, NAME).ends_with("; rotated the secret; 2 hooks ran"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&events).unwrap(),
        "token\nrotation\n"
    );
    assert_rotated(&world).await;
    assert!(
        !world.login(&world.bootstrap.value).await,
        "the old secret no longer logs in"
    );
    assert_eq!(world.sim.stats().secrets_created, 1);
    assert_token_file_valid(&world);
    world.assert_no_secret_printed(&[]);
    world.sim.shutdown().await;
}

/// `every = "24h"` and the stored secret is older: the run rotates it
/// (without `on_login`), and the next run finds nothing due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_rotation_is_performed_once() {
    let world = World::new(SimOptions::default(), &with_token_file()).await;
    let store = FileStore::new(&world.dir.path().join("state"));
    let mut record = store.load(NAME).await.unwrap().unwrap();
    record.value.current.created_at = SystemTime::now() - Duration::from_secs(25 * 3600);
    store
        .compare_and_swap(NAME, Some(record.version), &record.value)
        .await
        .unwrap();
    for (run, expected) in [(1, "rotated the secret"), (2, "no rotation due")] {
        let out = world.run(ONCE, None, &[]).await;
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}\n{}",
            text(&out.stderr)
        );
        assert!(
            line_of(&stdout, NAME).ends_with(&format!("; {expected}")),
            "run {run}: {stdout}"
        );
        assert_rotated(&world).await;
        assert_eq!(world.sim.stats().secrets_created, 1, "run {run}");
        assert_token_file_valid(&world);
    }
    world.assert_no_secret_printed(&[]);
    world.sim.shutdown().await;
}

/// A grace period longer than a one-shot run waits for: the run promotes
/// the new secret, writes a token of it and exits, leaving the old secret
/// in the journal (known, so no orphan, and still valid: no lockout). The
/// next run after the grace period deletes it, then rotates again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_grace_period_is_left_to_the_next_run() {
    let world = World::new(
        SimOptions::default(),
        &Settings {
            grace: Some("10m"),
            on_login: true,
            ..with_token_file()
        },
    )
    .await;
    let out = world.run(ONCE, None, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let r = world.record();
    assert_eq!(world.phase(), "promoted", "{r}");
    let until = humantime::format_rfc3339_seconds(world::delete_after(&r)).to_string();
    assert!(
        line_of(&stdout, NAME).ends_with(&format!(
            "; rotated the secret; the old one is deleted after {until} (grace period) by a later run or the daemon"
        )),
        "{stdout}"
    );
    // Both secrets work and both are the journal's.
    assert_eq!(r["rotation"]["old"]["id"], world.bootstrap.id.as_str());
    assert!(world.login(&world.bootstrap.value).await);
    assert!(world.login(r["current"]["value"].as_str().unwrap()).await);
    let tagged = world.tagged();
    assert_eq!(tagged.len(), 1, "{tagged:?}");
    assert_eq!(r["current"]["id"], tagged[0].id.as_str());
    assert_token_file_valid(&world);

    // The grace period is over (moved into the past in the journal).
    let store = FileStore::new(&world.dir.path().join("state"));
    let mut record = store.load(NAME).await.unwrap().unwrap();
    let Rotation::Promoted { delete_after, .. } = &mut record.value.rotation else {
        panic!("not promoted");
    };
    *delete_after = SystemTime::now() - Duration::from_secs(1);
    store
        .compare_and_swap(NAME, Some(record.version), &record.value)
        .await
        .unwrap();
    let out = world.run(ONCE, None, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        line_of(&stdout, NAME).contains(
            "; finished a rotation left unfinished (it was promoted); rotated the secret; the old one is deleted after "
        ),
        "{stdout}"
    );
    assert!(
        !world.at_sim(&world.bootstrap.id),
        "the first old secret is deleted"
    );
    assert_eq!(world.sim.stats().secrets_created, 2);
    world.assert_no_secret_printed(&[]);
    world.sim.shutdown().await;
}

/// The seeds' script pattern: each run logs in with the stored secret,
/// creates the next, deletes the old one and leaves the new one for the
/// next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_runs_each_rotate_once() {
    let world = World::new(
        SimOptions::default(),
        &Settings {
            on_login: true,
            ..with_token_file()
        },
    )
    .await;
    let mut previous = (world.bootstrap.id.clone(), world.bootstrap.value.clone());
    for run in 1..=3u64 {
        let out = world.run(ONCE, None, &[]).await;
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "run {run}: {stdout}\n{}",
            text(&out.stderr)
        );
        assert!(
            line_of(&stdout, NAME).ends_with("; rotated the secret"),
            "run {run}: {stdout}"
        );
        // Exactly one rotation per run: one secret created, and the one
        // the run started with deleted.
        let r = assert_rotated(&world).await;
        let stats = world.sim.stats();
        assert_eq!(stats.secrets_created, run, "run {run}: {stats:?}");
        assert_eq!(stats.secrets_deleted, run, "run {run}: {stats:?}");
        let current = (
            r["current"]["id"].as_str().unwrap().to_string(),
            r["current"]["value"].as_str().unwrap().to_string(),
        );
        assert_ne!(current.0, previous.0, "run {run} rotated");
        assert!(
            !world.at_sim(&previous.0),
            "run {run}: the old secret is deleted"
        );
        assert!(!world.login(&previous.1).await);
        assert_token_file_valid(&world);
        previous = current;
    }
    world.assert_no_secret_printed(&[]);
    world.sim.shutdown().await;
}

/// The kill loop, for one-shot runs: `kill -9` at random moments against
/// a flaky provider (random 5xx, lost replies, lost `create` replies,
/// slow propagation). After every kill the stored secret still exists at
/// the provider (I1); a last run in calm weather leaves no lockout and no
/// orphan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_runs_killed_at_random_moments_converge() {
    const KILLS: usize = 15;
    let world = World::new(
        SimOptions {
            propagation_delay: Duration::from_millis(200),
            ..SimOptions::default()
        },
        &Settings {
            on_login: true,
            ..with_token_file()
        },
    )
    .await;
    let mut outputs = Vec::new();
    let mut finished = 0;
    let mut phases_at_kill = std::collections::BTreeMap::<String, u32>::new();
    // How long a run takes on this machine now (a loaded CI machine is
    // slower): kills land within the first 60% of that, so most runs die
    // mid-way whatever the machine's speed.
    let started = Instant::now();
    let warm_up = world.run(ONCE, None, &[]).await;
    assert_eq!(warm_up.status.code(), Some(0), "{}", text(&warm_up.stderr));
    let typical = started.elapsed().as_millis() as u64;
    let latest_kill = (typical * 6 / 10).max(20);
    for i in 0..KILLS {
        world.sim.set_faults(Faults {
            scope: if i % 2 == 0 {
                FaultScope::All
            } else {
                FaultScope::Only(rekeyd::sim::Endpoint::SecretsCreate)
            },
            latency: Some((Duration::ZERO, Duration::from_millis(50))),
            random_5xx: 0.1,
            random_drop: if i % 2 == 0 { 0.1 } else { 0.4 },
            ..Faults::default()
        });
        let mut once = world.spawn(ONCE, &[]);
        let until =
            Instant::now() + Duration::from_millis(rand::rng().random_range(10..=latest_kill));
        while Instant::now() < until && once.child.try_wait().unwrap().is_none() {
            world.remember_values();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if once.child.try_wait().unwrap().is_none() {
            once.signal(libc::SIGKILL);
            *phases_at_kill.entry(world.phase()).or_default() += 1;
        } else {
            finished += 1;
        }
        let status = once.wait_exit().await;
        // Killed, or ended by itself: 0, or 69 when the flaky provider
        // kept it from a token.
        assert!(
            status.code().is_none_or(|c| c == 0 || c == 69),
            "run {i}: {status}\n{}",
            once.log()
        );
        world.remember_values();
        outputs.push(once.log());
        outputs.push(once.stdout());
        // I1: what the next run logs in with has not been deleted.
        let r = world.record();
        let current = r["current"]["value"].as_str().unwrap();
        assert!(
            world.sim.secrets(CLIENT).iter().any(|s| s.value == current),
            "after run {i}: the stored secret is gone at the provider (phase {})",
            r["rotation"]["phase"]
        );
    }
    eprintln!(
        "{finished} of {KILLS} runs ended before their kill; phase at the kills: {phases_at_kill:?}"
    );
    assert!(
        finished <= KILLS * 2 / 3,
        "runs are killed mid-way: {finished} of {KILLS} ended first (a run takes {typical} ms)"
    );

    // Calm weather: the next run finishes what is left and rotates once.
    world.sim.set_faults(Faults::default());
    let out = world.run(ONCE, None, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        line_of(&stdout, NAME).ends_with("rotated the secret"),
        "{stdout}"
    );
    // No lockout, no orphan: the stored secret logs in and is the only
    // secret of ours at the provider; every one created was deleted but
    // it.
    assert_rotated(&world).await;
    assert_token_file_valid(&world);
    world.assert_no_secret_printed(&outputs);
    world.sim.shutdown().await;
}

// --- next to the daemon -----------------------------------------------------

/// The daemon rotates `maps` and holds the rotation claim through its grace
/// period; a one-shot run started then waits for it, writes nothing to the
/// journal meanwhile, and afterwards finds nothing due: one rotation in
/// all, the daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_daemons_rotation() {
    let world = World::new(
        SimOptions::default(),
        &Settings {
            grace: Some("4s"),
            ..with_token_file()
        },
    )
    .await;
    let mut daemon = world.spawn(&["run"], &[]);
    wait_for(&mut daemon, "rekeyd started", TIMEOUT, |d| {
        d.log().contains("rekeyd started")
    })
    .await;
    daemon.signal(libc::SIGUSR1);
    wait_for(
        &mut daemon,
        "the daemon's rotation to promote",
        TIMEOUT,
        |_| world.phase() == "promoted",
    )
    .await;
    let version = world.version();

    let mut once: RekeydProcess = world.spawn(ONCE, &[]);
    wait_for(
        &mut once,
        "the one-shot run to wait for the claim",
        TIMEOUT,
        |p| p.log().contains(world::WAITING_FOR_THE_CLAIM),
    )
    .await;
    // Still in the daemon's grace period: nothing was written by anyone.
    assert_eq!(world.phase(), "promoted");
    assert_eq!(world.version(), version);
    let status = once.wait_exit().await;
    let (stdout, log) = (once.stdout(), once.log());
    assert_eq!(status.code(), Some(0), "{status}\n{stdout}\n{log}");
    assert_eq!(
        line_of(&stdout, NAME)
            .split("; ")
            .skip(1)
            .collect::<Vec<_>>(),
        ["waited for another process's rotation", "no rotation due"],
        "{stdout}"
    );
    // It got the claim only once the daemon's rotation had completed.
    assert_rotated(&world).await;
    assert_eq!(world.sim.stats().secrets_created, 1);
    assert!(!log.contains("rotation started"), "{log}");
    assert_token_file_valid(&world);
    world.keep_output(&log);
    world.keep_output(&stdout);
    let (_, daemon_log) = daemon.stop().await;
    world.assert_no_secret_printed(&[daemon_log]);
    world.sim.shutdown().await;
}
