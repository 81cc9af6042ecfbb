//! The systemd notification protocol (`Type=notify`): READY once every
//! credential has a token or has reported why not, STATUS lines with a
//! one-line summary, RELOADING and STOPPING, and watchdog pings.
//!
//! Without `NOTIFY_SOCKET` (Kubernetes, a terminal) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

use crate::credential::CredentialStatus;

pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// Whether systemd listens (`NOTIFY_SOCKET` is set).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// How often to ping the watchdog: half its timeout, as systemd advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        // A lost notification must never take the daemon down; systemd
        // notices missing pings through the watchdog anyway.
        if let Err(e) = sd_notify::notify(states) {
            debug!(step = "notify", error = %e, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// systemd needs the monotonic timestamp to match RELOADING to READY.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// One credential as the summary sees it.
pub struct Entry<'a> {
    pub status: &'a CredentialStatus,
    /// A valid token is being served.
    pub valid: bool,
}

/// Whether every credential has been tried at least once (it has a token,
/// or an error says why not), and a one-line summary for `STATUS=`.
pub fn summarize(entries: &[Entry<'_>]) -> (bool, String) {
    let total = entries.len();
    let ready = entries.iter().filter(|e| e.valid).count();
    let attempted = entries
        .iter()
        .all(|e| e.valid || e.status.last_error.is_some() || e.status.last_refresh_at.is_some());
    let locked: Vec<&str> = entries
        .iter()
        .filter(|e| e.status.locked_out)
        .map(|e| e.status.name.as_str())
        .collect();
    let failing: Vec<&str> = entries
        .iter()
        .filter(|e| !e.valid && !e.status.locked_out && e.status.last_error.is_some())
        .map(|e| e.status.name.as_str())
        .collect();
    let mut line = format!("{ready}/{total} credentials have a valid token");
    if !locked.is_empty() {
        line.push_str(&format!("; locked out: {}", short_list(&locked)));
    }
    if !failing.is_empty() {
        line.push_str(&format!("; failing: {}", short_list(&failing)));
    }
    (attempted, line)
}

/// STATUS must stay one short line, even with thousands of credentials.
fn short_list(names: &[&str]) -> String {
    const SHOWN: usize = 3;
    let mut out = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        out.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn status(name: &str) -> CredentialStatus {
        CredentialStatus {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn ready_only_once_every_credential_was_tried() {
        let fresh = status("a");
        let (attempted, _) = summarize(&[Entry {
            status: &fresh,
            valid: false,
        }]);
        assert!(!attempted);
        let mut failed = status("b");
        failed.last_error = Some("HTTP 503".into());
        let mut ok = status("c");
        ok.last_refresh_at = Some(SystemTime::now());
        let (attempted, line) = summarize(&[
            Entry {
                status: &failed,
                valid: false,
            },
            Entry {
                status: &ok,
                valid: true,
            },
        ]);
        assert!(attempted);
        assert_eq!(line, "1/2 credentials have a valid token; failing: b");
    }

    #[test]
    fn long_lists_are_shortened() {
        let mut all = Vec::new();
        for i in 0..5 {
            let mut s = status(&format!("c{i}"));
            s.locked_out = true;
            s.last_error = Some("HTTP 401".into());
            all.push(s);
        }
        let entries: Vec<Entry> = all
            .iter()
            .map(|s| Entry {
                status: s,
                valid: false,
            })
            .collect();
        let (_, line) = summarize(&entries);
        assert_eq!(
            line,
            "0/5 credentials have a valid token; locked out: c0, c1, c2 and 2 more"
        );
    }
}
