//! The clock token lifetimes are measured on.
//!
//! A token's deadline is `expires_in` after its reply arrived, measured on a
//! clock that keeps counting while the machine is suspended or the VM is
//! paused (DESIGN.md "Token refresh"): Linux's `CLOCK_BOOTTIME`
//! (`clock_gettime(2)`). tokio's timers run on `CLOCK_MONOTONIC`, which
//! stops meanwhile, so after a resume every timer is late by the time spent
//! suspended and a token checked against it would still look valid.
//!
//! Hence:
//! - a [`BootInstant`] is tokio's monotonic instant moved forward by the
//!   time spent suspended since rekeyd started (the boot-time clock minus
//!   the monotonic clock). Whoever decides whether a token is still valid
//!   (the local API, `/readyz`, metrics, the engine's retry planning) reads
//!   it from a [`Clock`], so the answer is right the moment the machine
//!   resumes;
//! - [`watchdog`] compares the two clocks every [`WATCHDOG_TICK`] and, when
//!   their gap grew by [`JUMP`] or more, reports it on [`Clock::jumps`]: the
//!   token engines, asleep on tokio timers that know nothing of it, refresh
//!   at once.
//!
//! Being tokio's instant underneath, a [`BootInstant`] also follows a paused
//! test runtime's clock; [`ManualClock`] adds suspensions a test makes.

use std::ops::{Add, Sub};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often [`watchdog`] compares the two clocks: the longest a resumed
/// daemon's engines go on sleeping before they refresh.
pub const WATCHDOG_TICK: Duration = Duration::from_secs(5);
/// Growth of the gap between the clocks that counts as a suspension. The
/// gap moves only while the machine is suspended, so this is a small
/// margin; a shorter suspension delays the next timer by less than it.
pub const JUMP: Duration = Duration::from_secs(1);

/// A point in time on the boot-time clock, which counts suspended time.
/// Comparable only with instants of the same [`Clock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Instant);

impl BootInstant {
    /// Time from `earlier` to `self`; zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_duration_since(earlier.0)
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0 + d)
    }
}

impl Sub<Duration> for BootInstant {
    type Output = BootInstant;
    fn sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0 - d)
    }
}

/// `later - earlier`, zero if `earlier` is later (as tokio's `Instant`).
impl Sub<BootInstant> for BootInstant {
    type Output = Duration;
    fn sub(self, earlier: BootInstant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// A source of [`BootInstant`]s and of suspension reports.
pub trait Clock: Send + Sync {
    /// Time spent suspended since this clock started counting: how far the
    /// boot-time clock has run ahead of the monotonic one. Never decreases.
    fn suspended(&self) -> Duration;

    /// The [`Clock::suspended`] total, sent each time it grew by [`JUMP`]
    /// or more: the machine was suspended and tokio's timers are late.
    fn jumps(&self) -> watch::Receiver<Duration>;

    /// Now, on the boot-time clock.
    fn now(&self) -> BootInstant {
        BootInstant(Instant::now() + self.suspended())
    }
}

/// The machine's clocks: `CLOCK_BOOTTIME` against `CLOCK_MONOTONIC` on
/// Linux. Elsewhere no suspension is seen (the monotonic clock alone).
pub struct SystemClock {
    /// The suspended total last reported by [`SystemClock::check`].
    jumps: watch::Sender<Duration>,
}

/// The process's system clock: every daemon and command in this process
/// shares it, so tokens stamped by any of them compare alike.
pub fn system() -> Arc<SystemClock> {
    static SYSTEM: LazyLock<Arc<SystemClock>> = LazyLock::new(|| {
        Arc::new(SystemClock {
            jumps: watch::Sender::new(Duration::ZERO),
        })
    });
    SYSTEM.clone()
}

impl SystemClock {
    /// Compares the two clocks and reports a suspension (on
    /// [`Clock::jumps`]) if their gap grew by [`JUMP`] since the last
    /// report. Returns whether it did.
    pub fn check(&self) -> bool {
        let suspended = self.suspended();
        let reported = *self.jumps.borrow();
        if suspended >= reported + JUMP {
            self.jumps.send_replace(suspended);
            true
        } else {
            false
        }
    }
}

impl Clock for SystemClock {
    fn suspended(&self) -> Duration {
        suspended_since_start()
    }

    fn jumps(&self) -> watch::Receiver<Duration> {
        self.jumps.subscribe()
    }
}

/// Reports suspensions of the system clock until `stop` (see the module
/// documentation). One per daemon; a second one in the same process only
/// repeats the first one's reports.
pub async fn watchdog(stop: CancellationToken) {
    let clock = system();
    let mut tick = tokio::time::interval(WATCHDOG_TICK);
    // After a suspension one check is enough, not a burst of missed ticks.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if clock.check() {
                    tracing::info!(
                        step = "clock",
                        suspended_total = %humantime::format_duration(Duration::from_secs(clock.suspended().as_secs())),
                        "the machine was suspended; refreshing every token"
                    );
                }
            }
        }
    }
}

/// `CLOCK_BOOTTIME - CLOCK_MONOTONIC` now, less its value at the first call
/// (so that it starts at zero), never smaller than an earlier result: the
/// two clocks are read one after the other, and the noise between the reads
/// must not make boot time run backwards.
fn suspended_since_start() -> Duration {
    static START: OnceLock<Duration> = OnceLock::new();
    static HIGHEST_NANOS: AtomicU64 = AtomicU64::new(0);
    let gap = boot_minus_monotonic();
    let start = *START.get_or_init(|| gap);
    let nanos = u64::try_from(gap.saturating_sub(start).as_nanos()).unwrap_or(u64::MAX);
    let highest = HIGHEST_NANOS.fetch_max(nanos, Ordering::Relaxed).max(nanos);
    Duration::from_nanos(highest)
}

#[cfg(target_os = "linux")]
fn boot_minus_monotonic() -> Duration {
    // Monotonic first: the gap read errs by the time between the two reads
    // towards more suspension (nanoseconds), never towards less.
    let monotonic = read_clock(libc::CLOCK_MONOTONIC);
    let boot = read_clock(libc::CLOCK_BOOTTIME);
    boot.saturating_sub(monotonic)
}

#[cfg(not(target_os = "linux"))]
fn boot_minus_monotonic() -> Duration {
    Duration::ZERO
}

#[cfg(target_os = "linux")]
fn read_clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which
    // points at a live local.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    // Both clocks exist on every Linux since 2.6.39; a failure would be a
    // broken kernel, and counting no suspension is the old behaviour.
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// A clock for tests: the monotonic clock is tokio's (a paused runtime
/// advances it), and [`ManualClock::suspend`] moves boot time alone
/// forward, as a suspend and resume would, reporting the jump at once as
/// [`watchdog`] would a few seconds after the resume.
pub struct ManualClock {
    suspended: Mutex<Duration>,
    jumps: watch::Sender<Duration>,
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(ManualClock {
            suspended: Mutex::new(Duration::ZERO),
            jumps: watch::Sender::new(Duration::ZERO),
        })
    }

    /// Moves the boot-time clock forward by `d` without the monotonic clock;
    /// reported as [`SystemClock::check`] would, once the total grew by
    /// [`JUMP`] since the last report.
    pub fn suspend(&self, d: Duration) {
        let total = {
            let mut suspended = self.suspended.lock().unwrap_or_else(|e| e.into_inner());
            *suspended += d;
            *suspended
        };
        if total >= *self.jumps.borrow() + JUMP {
            self.jumps.send_replace(total);
        }
    }
}

impl Clock for ManualClock {
    fn suspended(&self) -> Duration {
        *self.suspended.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn jumps(&self) -> watch::Receiver<Duration> {
        self.jumps.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_counts_no_suspension_without_one() {
        let clock = system();
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
        // This test's machine is not suspended between two reads (and if it
        // were, the gap would only grow).
        assert!(clock.suspended() < Duration::from_secs(1));
        assert!(!clock.check());
    }

    #[tokio::test(start_paused = true)]
    async fn boot_time_runs_ahead_of_monotonic_by_the_suspension() {
        let clock = ManualClock::new();
        let mut jumps = clock.jumps();
        let start = clock.now();
        let mono = Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(clock.now() - start, Duration::from_secs(10));
        // A short suspension is counted but not reported as a jump.
        clock.suspend(Duration::from_millis(400));
        assert!(!jumps.has_changed().unwrap());
        clock.suspend(Duration::from_secs(3600));
        assert!(jumps.has_changed().unwrap());
        assert_eq!(*jumps.borrow_and_update(), Duration::from_millis(3_600_400));
        assert_eq!(Instant::now() - mono, Duration::from_secs(10));
        assert_eq!(clock.now() - start, Duration::from_millis(3_610_400));
        // Subtraction saturates, as tokio's.
        assert_eq!(start - clock.now(), Duration::ZERO);
    }
}
