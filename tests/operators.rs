//! Operators among running rotations, end to end with real processes
//! (DESIGN.md "Safety with more than one actor"): the `rekeyd` binary,
//! built with `--features failpoints`, against the simulated MapsIndoors
//! provider on loopback.
//!
//! - `set-secret` of the old secret during a rotation's grace period (S6):
//!   refused as retired, or installed only where the rotation's later
//!   delete cannot lock anyone out (also when a reload lets it in first).
//! - SIGHUP to `rekeyd run`, and Ctrl-C to `rekeyd rotate`, while a journal
//!   write is in flight (S4): the write is held open by the
//!   `store-before-write` fail point; the reload and the exit wait for it,
//!   and the journal converges with no orphan. Also a write that outlasts
//!   the reload's wait, and Ctrl-C to a command still waiting for the
//!   claim.
//! - A promoted secret revoked during the grace period (S5): the daemon
//!   keeps serving from the old secret, and the rotation falls back to it.
//! - A reload that removes `[credentials.rotation]` mid-rotation, and
//!   `rekeyd rotate` without that section: an unfinished journal is always
//!   finished.
//! - `set-secret --force` on a stuck journal (S6, S7).
//!
//! Every wait is on something observable: the journal file, the write lock
//! of the store, log lines, the provider's state, the daemon's API.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, SystemTime};

use rekeyd::sim::SimOptions;

#[path = "support/process.rs"]
mod process;
#[path = "support/world.rs"]
mod world;

use process::{RekeydProcess, TIMEOUT};
use world::{NAME, Settings, World, delete_after, phase_of, since, text, wait_for};

/// How long the `store-before-write` fail point holds the write under test.
const SLOW_WRITE_MS: u64 = 3000;
const SIGABRT: i32 = 6;

/// `rekeyd run`, once it has started.
async fn start_daemon(world: &World, env: &[(&str, &str)]) -> RekeydProcess {
    let mut daemon = world.spawn(&["run"], env);
    wait_for(&mut daemon, "rekeyd started", TIMEOUT, |d| {
        d.log().contains("rekeyd started")
    })
    .await;
    daemon
}

/// Whether `first` is in `log`, before any `then`.
fn comes_before(log: &str, first: &str, then: &str) -> bool {
    log.find(first)
        .is_some_and(|a| log.find(then).is_none_or(|b| a < b))
}

async fn wait_phase(world: &World, process: &mut RekeydProcess, phase: &str) {
    wait_for(process, &format!("journal phase {phase}"), TIMEOUT, |_| {
        world.phase() == phase
    })
    .await;
}

/// Idle, nothing left to delete, and a rotation completed.
fn rotated(world: &World) -> bool {
    let r = world.record();
    phase_of(&r) == "idle" && r["last_rotated_at"].is_string()
}

/// After rotations that began from the bootstrap secret: settled, exactly
/// one secret of ours at the provider (the stored one), the bootstrap
/// secret deleted, and the provider's books balance: every secret created
/// through its API was deleted through it except the stored one, and the
/// one deletion besides is the bootstrap secret's.
async fn assert_rotated(world: &World) {
    let r = world.assert_settled().await;
    assert!(r["last_rotated_at"].is_string(), "journal: {r}");
    let tagged = world.tagged();
    assert_eq!(tagged.len(), 1, "exactly one secret of ours: {tagged:?}");
    assert!(
        !world.at_sim(&world.bootstrap.id),
        "the bootstrap secret (id configured) is deleted"
    );
    // Created through the API: the stored one and every one deleted since;
    // deleted through the API: those and the bootstrap secret.
    let stats = world.sim.stats();
    assert_eq!(
        stats.secrets_created + 1,
        stats.secrets_deleted + tagged.len() as u64,
        "created vs deleted: {stats:?}"
    );
}

// --- 2: set-secret during the grace period ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_secret_of_the_old_secret_during_the_grace_period() {
    let world = World::new(
        SimOptions::default(),
        &Settings {
            grace: Some("5s"),
            ..Settings::default()
        },
    )
    .await;
    let mut daemon = start_daemon(&world, &[]).await;
    daemon.signal(libc::SIGUSR1);
    wait_phase(&world, &mut daemon, "promoted").await;
    let promoted = world.record();
    let rotated_id = promoted["current"]["id"].as_str().unwrap().to_string();
    let old = world.bootstrap.clone();
    assert_eq!(promoted["rotation"]["old"]["id"], old.id.as_str());
    // What the operator sees: the old secret still logs in.
    assert!(world.login(&old.value).await);
    assert!(
        SystemTime::now() < delete_after(&promoted),
        "the grace period is already over; the test is too slow for its grace"
    );

    let out = world
        .run(
            &["set-secret", NAME, "--id", &old.id],
            Some(&old.value),
            &[],
        )
        .await;
    let stderr = text(&out.stderr);
    let refused = match out.status.code() {
        Some(1) => {
            assert!(
                stderr.contains("retired by a rotation")
                    && stderr.contains("lock the credential out"),
                "the refusal says the secret was retired: {stderr}"
            );
            assert!(
                stderr.contains("secret now in use") && stderr.contains("a new one"),
                "the refusal says what to do instead: {stderr}"
            );
            true
        }
        // It got the claim before the rotation moved on: allowed, if the
        // rotation's delete then locks no one out (checked below).
        Some(0) => false,
        _ => panic!("set-secret: {:?}\n{stderr}", out.status),
    };
    wait_for(&mut daemon, "the rotation to finish", TIMEOUT, |_| {
        rotated(&world)
    })
    .await;
    let r = world.assert_settled().await;
    assert!(
        !world.at_sim(&old.id),
        "the old secret is deleted after the grace"
    );
    if refused {
        assert_eq!(
            r["current"]["id"],
            rotated_id.as_str(),
            "the rotated secret is the stored one"
        );
        assert_eq!(world.tagged().len(), 1, "{:?}", world.tagged());
    } else {
        // Installed: the rotated secret is stored or deleted, never left
        // untracked at the provider (assert_settled checked the tags).
        assert!(
            r["current"]["id"] == rotated_id.as_str() || !world.at_sim(&rotated_id),
            "the rotated secret is orphaned: {r}"
        );
    }
    // The daemon serves a token of the stored secret.
    let row = world.status().await;
    assert_eq!(row["ready"], true, "{row}");
    assert_eq!(row["locked_out"], false, "{row}");
    let (_, log) = daemon.stop().await;
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}

/// The other way `set-secret` can meet a rotation in its grace period: it
/// waits for the claim, and a reload (which stops the rotation between
/// steps and releases the claim) lets it in before the rotation moved on.
/// Even with `--force` it must not install the old secret, which the
/// promoted journal is about to delete (S6): it refuses, and the rotation
/// finishes with nothing locked out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_secret_force_of_the_old_secret_let_in_by_a_reload() {
    let world = World::new(
        SimOptions::default(),
        &Settings {
            grace: Some("5s"),
            ..Settings::default()
        },
    )
    .await;
    let mut daemon = start_daemon(&world, &[]).await;
    daemon.signal(libc::SIGUSR1);
    wait_phase(&world, &mut daemon, "promoted").await;
    let rotated_id = world.record()["current"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let old = world.bootstrap.clone();

    let mut set = world.spawn_with_input(
        &["set-secret", NAME, "--id", &old.id, "--force"],
        &old.value,
    );
    wait_for(&mut set, "set-secret to wait for the claim", TIMEOUT, |p| {
        p.log().contains(world::WAITING_FOR_THE_CLAIM)
    })
    .await;
    assert_eq!(world.phase(), "promoted");
    world.write_config(&Settings {
        grace: Some("5s"),
        request_timeout: "11s",
        ..Settings::default()
    });
    daemon.signal(libc::SIGHUP);
    let status = set.wait_exit().await;
    let stderr = set.log();
    world.keep_output(&stderr);
    assert_eq!(status.code(), Some(1), "set-secret: {status}\n{stderr}");
    assert!(stderr.contains("retired by a rotation"), "{stderr}");
    wait_for(&mut daemon, "the journal to settle", TIMEOUT, |_| {
        world.phase() == "idle"
    })
    .await;
    let r = world.assert_settled().await;
    assert_eq!(r["current"]["id"], rotated_id.as_str(), "{r}");
    assert!(!world.at_sim(&old.id));
    let row = world.status().await;
    assert_eq!(row["ready"], true, "{row}");
    let (_, log) = daemon.stop().await;
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}

// --- 4: signals while a journal write is in flight ---------------------------

/// The `n`th journal write of a rotation (the store's first write in a
/// process that starts from an idle journal is the rotation's first),
/// recognised by the log line that comes right before it and the phase the
/// journal is in until it lands.
#[derive(Clone, Copy, Debug)]
struct SlowWrite {
    n: usize,
    after: &'static str,
    phase: &'static str,
    /// Whether it is the rotation's last write (nothing is left to stop).
    last: bool,
}

/// With grace 0s: creating, created, promoted, idle retiring the old
/// secret (after the listing; this write licenses the delete), idle with
/// the delete done.
const SLOW_WRITES: [SlowWrite; 5] = [
    SlowWrite {
        n: 1,
        after: "rotation started",
        phase: "idle",
        last: false,
    },
    SlowWrite {
        n: 2,
        after: "replacement secret created",
        phase: "creating",
        last: false,
    },
    SlowWrite {
        n: 3,
        after: "new secret accepted by the provider",
        phase: "created",
        last: false,
    },
    SlowWrite {
        n: 4,
        after: "promoted secret accepted by the provider",
        phase: "promoted",
        last: false,
    },
    SlowWrite {
        n: 5,
        after: "retired secret deleted",
        phase: "retiring",
        last: true,
    },
];

/// FAILPOINTS value that holds only the `n`th write, for SLOW_WRITE_MS.
fn slow_write(n: usize) -> String {
    format!("store-before-write={}*off->1*sleep({SLOW_WRITE_MS})", n - 1)
}

/// Waits until `case`'s write is in flight (its lock held, the journal
/// still as before it); returns the journal's version before the write.
async fn wait_slow_write(world: &World, process: &mut RekeydProcess, case: SlowWrite) -> u64 {
    wait_for(
        process,
        &format!("write #{} in flight", case.n),
        TIMEOUT,
        |p| p.log().contains(case.after) && world.phase() == case.phase && world.write_in_flight(),
    )
    .await;
    world.version()
}

/// Runs `scenario` for every case side by side and reports every failure.
async fn for_each_slow_write<F, Fut>(scenario: F)
where
    F: Fn(SlowWrite) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = SLOW_WRITES
        .iter()
        .map(|&case| (case, tokio::spawn(scenario(case))))
        .collect();
    let mut failures = Vec::new();
    for (case, task) in tasks {
        if let Err(e) = task.await {
            let message = match e.try_into_panic() {
                Ok(payload) => payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            failures.push(format!("write #{} ({}): {message}", case.n, case.after));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

async fn sighup_during_write(case: SlowWrite) {
    let world = World::new(SimOptions::default(), &Settings::default()).await;
    let failpoints = slow_write(case.n);
    let mut daemon = start_daemon(&world, &[("FAILPOINTS", &failpoints)]).await;
    daemon.signal(libc::SIGUSR1);
    let before = wait_slow_write(&world, &mut daemon, case).await;

    // A changed configuration for the credential: its tasks are cancelled
    // and started again.
    world.write_config(&Settings {
        request_timeout: "11s",
        ..Settings::default()
    });
    daemon.signal(libc::SIGHUP);
    wait_for(&mut daemon, "the reload", TIMEOUT, |d| {
        d.log().contains("configuration reloaded")
    })
    .await;
    // S4: the reload waited for the write it interrupted.
    assert!(
        world.version() > before,
        "the reload finished before the journal write in flight landed"
    );
    assert!(
        daemon
            .log()
            .contains("credential configuration changed; restarting it")
    );
    wait_for(&mut daemon, "the journal to settle", TIMEOUT, |_| {
        rotated(&world)
    })
    .await;
    let (_, log) = daemon.stop().await;
    assert_rotated(&world).await;
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_while_a_journal_write_is_in_flight() {
    for_each_slow_write(sighup_during_write).await;
}

async fn ctrl_c_during_write(case: SlowWrite) {
    let world = World::new(SimOptions::default(), &Settings::default()).await;
    let failpoints = slow_write(case.n);
    let mut rotate = world.spawn(&["rotate", NAME], &[("FAILPOINTS", &failpoints)]);
    let before = wait_slow_write(&world, &mut rotate, case).await;
    rotate.signal(libc::SIGINT);
    let status = rotate.wait_exit().await;
    let log = rotate.log();
    world.keep_output(&log);
    // S4: the write that had started landed before the process ended.
    assert!(
        world.version() > before,
        "rekeyd rotate exited before its journal write landed ({status})\n{log}"
    );
    if case.last {
        assert_eq!(status.code(), Some(0), "{status}\n{log}");
        assert!(log.contains("secret rotated"), "{log}");
    } else {
        assert_eq!(status.code(), Some(1), "{status}\n{log}");
        assert!(
            log.contains("rotation stopped: stopped by shutdown"),
            "{log}"
        );
    }
    let current = world.record()["current"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        world.login(&current).await,
        "I1: after Ctrl-C the stored secret does not log in"
    );

    let out = world.run(&["rotate", NAME], None, &[]).await;
    assert!(
        out.status.success(),
        "rekeyd rotate again: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert_rotated(&world).await;
    world.assert_no_secret_printed(&[]);
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ctrl_c_to_rotate_while_a_journal_write_is_in_flight() {
    for_each_slow_write(ctrl_c_during_write).await;
}

/// A reload waits for a journal write in flight only so long (its tasks
/// are aborted after the shutdown grace of 5 s). A write that outlasts
/// that (a stalled disk) still lands; the restarted credential must then
/// see it and finish the journal, here with the rotation section removed,
/// the case where nothing else would ever look at it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_rotation_section_while_a_write_outlasts_the_reload_wait() {
    let world = World::new(SimOptions::default(), &Settings::default()).await;
    let mut daemon = start_daemon(
        &world,
        &[("FAILPOINTS", "store-before-write=1*sleep(8000)")],
    )
    .await;
    daemon.signal(libc::SIGUSR1);
    let before = wait_slow_write(&world, &mut daemon, SLOW_WRITES[0]).await;
    world.write_config(&Settings {
        grace: None,
        ..Settings::default()
    });
    daemon.signal(libc::SIGHUP);
    wait_for(&mut daemon, "the reload", TIMEOUT, |d| {
        d.log().contains("configuration reloaded")
    })
    .await;
    wait_for(&mut daemon, "the write to land", TIMEOUT, |_| {
        world.version() > before
    })
    .await;
    // The write that landed began a rotation: it must be finished, now with
    // the default grace period (30 s): the removed section's is gone.
    wait_for(
        &mut daemon,
        "the journal to be finished",
        Duration::from_secs(90),
        |_| rotated(&world),
    )
    .await;
    let (_, log) = daemon.stop().await;
    assert_rotated(&world).await;
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}

/// Ctrl-C to an operator command that waits for the claim of a rotation
/// in its grace period: the command stops at once, before writing
/// anything, and the daemon's rotation goes on. (The grace period is
/// longer than `wait_exit` waits.)
async fn ctrl_c_while_waiting_for_the_claim(command: &'static str) {
    let world = World::new(
        SimOptions::default(),
        &Settings {
            grace: Some("20s"),
            ..Settings::default()
        },
    )
    .await;
    let mut daemon = start_daemon(&world, &[]).await;
    daemon.signal(libc::SIGUSR1);
    wait_phase(&world, &mut daemon, "promoted").await;
    let version = world.version();

    let mut waiting = world.spawn_with_input(&[command, NAME], &world.bootstrap.value);
    wait_for(
        &mut waiting,
        "the command to wait for the claim",
        TIMEOUT,
        |p| p.log().contains(world::WAITING_FOR_THE_CLAIM),
    )
    .await;
    waiting.signal(libc::SIGINT);
    let status = waiting.wait_exit().await;
    let log = waiting.log();
    assert_eq!(status.code(), Some(1), "{command}: {status}\n{log}");
    assert_eq!(world.version(), version, "{command} wrote to the journal");
    assert_eq!(world.phase(), "promoted");
    world.keep_output(&log);
    let (_, log) = daemon.stop().await;
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_to_a_command_waiting_for_the_claim_stops_it() {
    let rotate = tokio::spawn(ctrl_c_while_waiting_for_the_claim("rotate"));
    let set_secret = tokio::spawn(ctrl_c_while_waiting_for_the_claim("set-secret"));
    let (rotate, set_secret) = (rotate.await, set_secret.await);
    let failures: Vec<String> = [("rotate", rotate), ("set-secret", set_secret)]
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// --- 5: the promoted secret revoked during the grace period ------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_secret_revoked_during_the_grace_period() {
    // Short tokens: the engine logs in again every two seconds or so, so
    // it meets the revoked secret during the grace period. The grace is
    // long enough that a loaded machine still sees that login before it
    // ends: the phase is asserted below.
    let world = World::new(
        SimOptions {
            token_lifetime: Duration::from_secs(3),
            ..SimOptions::default()
        },
        &Settings {
            grace: Some("15s"),
            ..Settings::default()
        },
    )
    .await;
    let mut daemon = start_daemon(&world, &[]).await;
    daemon.signal(libc::SIGUSR1);
    wait_phase(&world, &mut daemon, "promoted").await;
    let promoted = world.record();
    let new_id = promoted["current"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        promoted["rotation"]["old"]["id"],
        world.bootstrap.id.as_str()
    );

    let revoked_at = daemon.log().len();
    assert!(world.sim.remove_secret(&new_id), "revoked at the provider");
    // S5: the engine is refused the current secret and logs in with the
    // old one, which the grace period keeps.
    wait_for(&mut daemon, "a login with the old secret", TIMEOUT, |d| {
        let log = d.log();
        let after = since(&log, revoked_at);
        after
            .find("secret rejected; trying the newer secret from the store")
            .is_some_and(|i| after[i..].contains("token refreshed"))
    })
    .await;
    assert_eq!(world.phase(), "promoted", "still in the grace period");
    let row = world.status().await;
    assert_eq!(row["ready"], true, "{row}");
    assert_eq!(row["locked_out"], false, "{row}");
    assert_token_served(&world).await;

    // After the grace the rotation proves the promoted secret once more,
    // is refused throughout its verification window, and goes back to the
    // old secret. Meanwhile the daemon stays ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut polls = 0u32;
    while world.phase() != "idle" {
        if polls.is_multiple_of(20) {
            let (status, body) = world.api("/v1/status").await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["credentials"][0]["ready"], true, "S5: {body}");
        }
        polls += 1;
        daemon
            .keep_waiting("the rotation to fall back to the old secret", deadline)
            .await;
    }
    let r = world.assert_settled().await;
    assert_eq!(r["current"]["id"], world.bootstrap.id.as_str(), "{r}");
    assert_eq!(
        r["current"]["value"],
        world.bootstrap.value.as_str(),
        "the old secret is current again"
    );
    assert!(r["last_rotated_at"].is_null(), "no rotation completed: {r}");
    let retired = r["retired"].as_array().cloned().unwrap_or_default();
    assert!(
        retired.iter().any(|x| x["id"] == new_id.as_str()),
        "the refused secret is retired: {r}"
    );
    assert!(world.tagged().is_empty(), "{:?}", world.tagged());
    assert!(world.at_sim(&world.bootstrap.id));
    let log = daemon.log();
    assert!(
        since(&log, revoked_at).contains("the provider refuses the new secret after its promotion"),
        "{log}"
    );
    assert!(
        !since(&log, revoked_at).contains("token refresh failed"),
        "S5: a refresh failed although the old secret still worked\n{log}"
    );
    let row = world.status().await;
    assert_eq!(row["ready"], true, "{row}");
    assert_eq!(row["rotation_phase"], "idle", "{row}");
    assert_token_served(&world).await;
    let (_, log) = daemon.stop().await;
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}

/// The daemon serves a token that the provider knows, for our client.
async fn assert_token_served(world: &World) {
    let (status, body) = world.api(&format!("/v1/token/{NAME}")).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(
        world.sim.token_client(token).as_deref(),
        Some(world::CLIENT),
        "the served token is not valid at the provider"
    );
}

// --- 6: the rotation section removed mid-rotation -----------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_rotation_section_finishes_a_promoted_journal() {
    let world = World::new(
        SimOptions::default(),
        &Settings {
            grace: Some("4s"),
            ..Settings::default()
        },
    )
    .await;
    let mut daemon = start_daemon(&world, &[]).await;
    daemon.signal(libc::SIGUSR1);
    wait_phase(&world, &mut daemon, "promoted").await;
    let until = delete_after(&world.record());

    world.write_config(&Settings {
        grace: None,
        ..Settings::default()
    });
    daemon.signal(libc::SIGHUP);
    let mut old_gone_at = None;
    wait_for(&mut daemon, "the journal to be finished", TIMEOUT, |d| {
        if old_gone_at.is_none() && !world.at_sim(&world.bootstrap.id) {
            old_gone_at = Some(SystemTime::now());
        }
        rotated(&world) && d.log().contains("configuration reloaded")
    })
    .await;
    let gone = old_gone_at.expect("the old secret is deleted");
    assert!(
        gone >= until,
        "I1: the old secret was deleted before the grace period ended"
    );
    let log = daemon.log();
    assert!(
        comes_before(&log, "configuration reloaded", "promoted secret accepted"),
        "the reload came after the rotation had moved on\n{log}"
    );
    assert_rotated(&world).await;
    let (_, log) = daemon.stop().await;
    assert!(log.contains("resuming unfinished rotation work"), "{log}");
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_rotation_section_finishes_a_created_journal() {
    // The new secret is refused while it propagates: verification is held
    // in `created` long enough for the reload to come in the middle.
    let world = World::new(
        SimOptions {
            propagation_delay: Duration::from_secs(6),
            ..SimOptions::default()
        },
        &Settings {
            grace: Some("1s"),
            ..Settings::default()
        },
    )
    .await;
    let mut daemon = start_daemon(&world, &[]).await;
    daemon.signal(libc::SIGUSR1);
    wait_for(&mut daemon, "verification retrying", TIMEOUT, |d| {
        world.phase() == "created" && d.log().contains("new secret not accepted yet; retrying")
    })
    .await;

    world.write_config(&Settings {
        grace: None,
        ..Settings::default()
    });
    daemon.signal(libc::SIGHUP);

    // Promoted with the default grace (the configured one is gone), then
    // finished.
    let mut until = None;
    let mut old_gone_at = None;
    wait_for(
        &mut daemon,
        "the journal to be finished",
        Duration::from_secs(90),
        |_| {
            let r = world.record();
            if until.is_none() && phase_of(&r) == "promoted" {
                until = Some(delete_after(&r));
            }
            if old_gone_at.is_none() && !world.at_sim(&world.bootstrap.id) {
                old_gone_at = Some(SystemTime::now());
            }
            rotated(&world)
        },
    )
    .await;
    let until = until.expect("the journal was seen promoted");
    assert!(
        old_gone_at.expect("the old secret is deleted") >= until,
        "I1: the old secret was deleted before the grace period ended"
    );
    let log = daemon.log();
    assert!(
        comes_before(&log, "configuration reloaded", "new secret accepted"),
        "the reload came after the rotation had moved on\n{log}"
    );
    assert_rotated(&world).await;
    let (_, log) = daemon.stop().await;
    assert!(log.contains("resuming unfinished rotation work"), "{log}");
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_without_rotation_section_finishes_an_unfinished_journal() {
    // (crash point leaving the journal unfinished, its phase, what the
    // finishing run reports)
    let cases = [
        (
            "rotation-after-persist-promoted",
            "promoted",
            "secret rotated",
        ),
        (
            "rotation-after-persist-retire",
            "retiring",
            "the unfinished rotation is finished",
        ),
    ];
    for (point, phase, report) in cases {
        let world = World::new(
            SimOptions::default(),
            &Settings {
                grace: Some("2s"),
                ..Settings::default()
            },
        )
        .await;
        let failpoints = format!("{point}=return");
        let out = world
            .run(&["rotate", NAME], None, &[("FAILPOINTS", &failpoints)])
            .await;
        assert_eq!(
            out.status.signal(),
            Some(SIGABRT),
            "{point}: {:?}",
            out.status
        );
        assert_eq!(world.phase(), phase, "after a crash at {point}");

        world.write_config(&Settings {
            grace: None,
            ..Settings::default()
        });
        let out = world.run(&["rotate", NAME], None, &[]).await;
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{point}: {:?}\n{stderr}", out.status);
        assert!(
            stderr.contains("resuming unfinished rotation work"),
            "{point}: {stderr}"
        );
        assert!(stderr.contains(report), "{point}: {stderr}");
        assert_rotated(&world).await;

        // Nothing unfinished: without the section there is nothing to do.
        let version = world.version();
        let out = world.run(&["rotate", NAME], None, &[]).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{point}: {stderr}");
        assert!(
            stderr.contains("has no [credentials.rotation] section"),
            "{point}: {stderr}"
        );
        assert_eq!(world.version(), version);
        world.assert_no_secret_printed(&[]);
        world.sim.shutdown().await;
    }
}

// --- set-secret --force on a stuck journal ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_secret_force_replaces_a_stuck_journal() {
    let world = World::new(SimOptions::default(), &Settings::default()).await;
    // A rotation stuck in `created`: its new secret exists at the provider
    // but is refused (it never propagates), and the process that created
    // it died.
    world.sim.set_propagation_delay(Duration::from_secs(3600));
    let out = world
        .run(
            &["rotate", NAME],
            None,
            &[("FAILPOINTS", "rotation-after-persist-created=return")],
        )
        .await;
    assert_eq!(out.status.signal(), Some(SIGABRT), "{:?}", out.status);
    world.sim.set_propagation_delay(Duration::ZERO);
    let stuck = world.record();
    assert_eq!(phase_of(&stuck), "created");
    let pending_id = stuck["rotation"]["pending"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pending_value = stuck["rotation"]["pending"]["value"].as_str().unwrap();
    assert!(
        !world.login(pending_value).await,
        "the pending one is refused"
    );
    assert!(world.at_sim(&pending_id));

    // The operator made a new secret in the portal.
    let (manual_id, manual_value) = world.sim.add_secret(world::CLIENT, "made in the portal");

    // Without --force: refused, with what to do.
    let out = world
        .run(
            &["set-secret", NAME, "--id", &manual_id],
            Some(&manual_value),
            &[],
        )
        .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rekeyd rotate maps"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(world.version(), stuck["version"].as_u64().unwrap());

    // --force with a secret that does not log in: refused, nothing written.
    let out = world
        .run(
            &["set-secret", NAME, "--force"],
            Some("not-a-secret-of-this-client"),
            &[],
        )
        .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not accept this secret"), "{stderr}");
    assert_eq!(world.version(), stuck["version"].as_u64().unwrap());

    // --force with the new secret: installed, and it says what it replaced.
    let out = world
        .run(
            &["set-secret", NAME, "--id", &manual_id, "--force"],
            Some(&manual_value),
            &[],
        )
        .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("replaced an unfinished rotation journal (phase created)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "secrets to be deleted by the daemon once a listing shows they are this client's: {pending_id}"
        )),
        "{stderr}"
    );
    let r = world.record();
    assert_eq!(phase_of(&r), "retiring", "{r}");
    assert_eq!(r["current"]["id"], manual_id.as_str());

    // The daemon deletes the replaced journal's secret.
    let mut daemon = start_daemon(&world, &[]).await;
    wait_for(
        &mut daemon,
        "the replaced rotation's secret to be deleted",
        TIMEOUT,
        |_| world.phase() == "idle" && !world.at_sim(&pending_id),
    )
    .await;
    let (_, log) = daemon.stop().await;
    let r = world.assert_settled().await;
    assert_eq!(r["current"]["id"], manual_id.as_str());
    assert!(world.tagged().is_empty(), "{:?}", world.tagged());
    // The secret current before the rotation is left in place (its
    // rotation never finished), and nothing else was deleted.
    assert!(world.at_sim(&world.bootstrap.id));
    assert!(world.at_sim(&manual_id));
    assert_eq!(world.sim.stats().secrets_deleted, 1);
    world.assert_no_secret_printed(&[log]);
    world.sim.shutdown().await;
}
