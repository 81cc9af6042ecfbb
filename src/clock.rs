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
//! - [`watchdog`] compares the two clocks whenever the kernel says the
//!   machine resumed (and every [`WATCHDOG_TICK`] besides) and, when their
//!   gap grew by [`JUMP`] or more, reports it on [`Clock::jumps`]: the token
//!   engines, asleep on tokio timers that know nothing of it, refresh at
//!   once. The kernel's word is a `CLOCK_REALTIME` timerfd armed with
//!   `TFD_TIMER_CANCEL_ON_SET` (`timerfd_create(2)`): its read fails with
//!   `ECANCELED` when the wall clock is set, and resuming from suspend
//!   counts as such (`timekeeping_resume()` calls `timerfd_resume()`), so
//!   an idle daemon is not woken to look.
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

/// How often [`watchdog`] compares the two clocks without being told the
/// machine resumed: the longest a resumed daemon's engines go on sleeping
/// where the resume notice is missing (no timerfd, a kernel that does not
/// send it). Rare, so an idle daemon is hardly ever woken.
pub const WATCHDOG_TICK: Duration = Duration::from_secs(300);
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
    let mut resumes = match ResumeNotices::new() {
        Ok(notices) => Some(notices),
        Err(e) => {
            tracing::warn!(
                step = "clock",
                error = %e,
                every = %humantime::format_duration(WATCHDOG_TICK),
                "cannot ask the kernel for resume notices; checking for suspensions by the clock alone"
            );
            None
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            notice = next_notice(&mut resumes) => {
                if let Err(e) = notice {
                    tracing::warn!(step = "clock", error = %e, "resume notices failed; checking by the clock alone");
                    resumes = None;
                }
            }
        }
        if clock.check() {
            tracing::info!(
                step = "clock",
                suspended_total = %humantime::format_duration(Duration::from_secs(clock.suspended().as_secs())),
                "the machine was suspended; refreshing every token"
            );
        }
    }
}

async fn next_notice(notices: &mut Option<ResumeNotices>) -> std::io::Result<()> {
    match notices {
        Some(notices) => notices.next().await,
        None => std::future::pending().await,
    }
}

/// The kernel's notices that the wall clock was set, which include every
/// resume from suspend: a `CLOCK_REALTIME` timerfd armed far in the future
/// with `TFD_TIMER_CANCEL_ON_SET` (`timerfd_create(2)`).
#[cfg(target_os = "linux")]
struct ResumeNotices {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

#[cfg(target_os = "linux")]
impl ResumeNotices {
    fn new() -> std::io::Result<ResumeNotices> {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: no pointers; the result is checked before use.
        let raw = unsafe {
            libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        arm(&fd)?;
        // SAFETY: the descriptor is owned by the AsyncFd from here on and
        // is neither closed nor replaced while registered.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)?
        };
        Ok(ResumeNotices { fd })
    }

    /// Returns at the next notice (wall clock set, or a resume).
    async fn next(&mut self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into an 8-byte buffer.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if n >= 0 {
                // The far-future expiry itself: arm again and go on.
                arm(self.fd.get_ref())?;
                continue;
            }
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                // Cancelled by a clock change: the notice. The timer stays
                // armed and cancellable for the next one.
                Some(libc::ECANCELED) => return Ok(()),
                Some(libc::EAGAIN) => ready.clear_ready(),
                _ => return Err(error),
            }
        }
    }
}

/// Arms `fd` at 9999-12-31 (wall clock; the kernel clamps it to its
/// largest time, in 2262), cancelled on every clock change.
#[cfg(target_os = "linux")]
fn arm(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const FAR: libc::time_t = 253_402_300_799;
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: FAR,
            tv_nsec: 0,
        },
    };
    // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
    let r = unsafe {
        libc::timerfd_settime(
            fd.as_raw_fd(),
            libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET,
            &spec,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
struct ResumeNotices;

#[cfg(not(target_os = "linux"))]
impl ResumeNotices {
    fn new() -> std::io::Result<ResumeNotices> {
        Err(std::io::Error::other("no timerfd on this system"))
    }

    async fn next(&mut self) -> std::io::Result<()> {
        std::future::pending().await
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

    /// The resume notices come from a timerfd armed far ahead and
    /// cancellable: nothing arrives while the clock is left alone (a
    /// notice here would wake every engine for nothing).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn resume_notices_are_armed_far_ahead_and_quiet_meanwhile() {
        use std::os::fd::AsRawFd;
        let mut notices = ResumeNotices::new().expect("timerfd");
        let mut now = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        // SAFETY: `now` is a valid itimerspec to fill.
        let r = unsafe { libc::timerfd_gettime(notices.fd.get_ref().as_raw_fd(), &mut now) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        let years = now.it_value.tv_sec / (365 * 24 * 3600);
        // 9999-12-31 as asked, or the kernel's clamp to 2262.
        assert!(years > 200, "armed only {years} years ahead");
        let quiet = tokio::time::timeout(Duration::from_millis(50), notices.next()).await;
        assert!(quiet.is_err(), "a notice without a clock change: {quiet:?}");
    }

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
