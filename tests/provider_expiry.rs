//! Provider-side secret expiry (Entra `endDateTime`) against the simulated
//! Entra profile, whose secrets can be made to expire in seconds: rekeyd
//! learns the bootstrap secret's expiry from a listing at start, rotates
//! before it even without a schedule, and, where it does not rotate, warns
//! in logs, status and metrics, never with the secret in the text.

#[path = "support/daemon.rs"]
mod daemon;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use daemon::{TestDaemon, wait_status, wait_token, write_secret};
use rekeyd::sim::{Endpoint, SimOptions, SimProvider};
use rekeyd::store::Store;
use rekeyd::store::file::FileStore;

const CLIENT: &str = "entra-app";
const ADMIN: &str = "entra-admin";

/// Collects the log output of the current thread's subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    /// Logs to this capture on the current thread until the guard drops.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// A simulated Entra application whose bootstrap secret (returned as
/// `(id, value)`) and every later one expire `lifetime` after creation.
/// Also returns the value of an administrative client's secret, whose
/// token calls Graph for a rotating credential (`secret_api_credential`).
async fn sim(
    token_lifetime: Duration,
    lifetime: Duration,
) -> (SimProvider, (String, String), String) {
    let sim = SimProvider::start(SimOptions {
        token_lifetime,
        propagation_delay: Duration::ZERO,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, "tenant");
    sim.add_client(ADMIN, "tenant");
    // The administrative client's secret (Graph's caller) does not expire.
    let admin = sim.add_secret(ADMIN, "by hand");
    sim.set_secret_lifetime(Some(lifetime));
    let bootstrap = sim.add_secret(CLIENT, "by hand");
    (sim, bootstrap, admin.1)
}

/// The daemon's configuration for credential `name` on `sim`, with
/// `rotation` as its `[credentials.rotation]` table (none: not rotated; a
/// rotating one calls Graph with the administrative client's token, whose
/// secret the test writes to `admin.secret`).
fn config(sim: &SimProvider, name: &str, bootstrap_id: &str, rotation: Option<&str>) -> String {
    let token = sim.entra_token_url("sim-tenant");
    let rotation = rotation
        .map(|r| {
            format!(
                r#"[credentials.rotation]
{r}

[[credentials]]
name = "admin"
provider = "entra"
tenant = "sim-tenant"
application_object_id = "{ADMIN}"
client_id = "{ADMIN}"
initial_secret_file = "{{dir}}/admin.secret"
[credentials.endpoints]
token_url = "{token}"
"#
            )
        })
        .unwrap_or_default();
    let api_credential = if rotation.is_empty() {
        ""
    } else {
        "secret_api_credential = \"admin\"\n"
    };
    format!(
        r#"state_dir = "{{dir}}/state"

[[credentials]]
name = "{name}"
provider = "entra"
tenant = "sim-tenant"
application_object_id = "{CLIENT}"
client_id = "{CLIENT}"
initial_secret_file = "{{dir}}/boot.secret"
initial_secret_id = "{bootstrap_id}"
{api_credential}[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
{rotation}"#,
        secrets = sim.entra_application_url(CLIENT),
    )
}

/// When the sim expires secret `id`.
fn sim_expiry(sim: &SimProvider, id: &str) -> SystemTime {
    let secret = sim
        .secrets(CLIENT)
        .into_iter()
        .find(|s| s.id == id)
        .expect("the secret exists");
    humantime::parse_rfc3339(&secret.expires_at.expect("it expires")).unwrap()
}

/// Waits until the credential's status satisfies `accept`; on a timeout,
/// fails with the status and the logs so far.
async fn status_or_logs(
    handle: &rekeyd::credential::CredentialHandle,
    logs: &Capture,
    accept: impl Fn(&rekeyd::credential::CredentialStatus) -> bool,
) -> rekeyd::credential::CredentialStatus {
    let mut rx = handle.status.clone();
    match tokio::time::timeout(daemon::EVENT_TIMEOUT, rx.wait_for(|s| accept(s))).await {
        Ok(s) => s.expect("engine alive").clone(),
        Err(_) => panic!(
            "timed out; status {:?}\n{}",
            handle.status.borrow().clone(),
            logs.text()
        ),
    }
}

/// Every value of `status` as the API and `rekeyd status` show it.
fn status_json(status: &rekeyd::credential::CredentialStatus) -> String {
    serde_json::to_string(status).unwrap()
}

// Current-thread runtime: every daemon task runs on this thread, so the
// thread-local subscriber sees their logs (and no other test's).
#[tokio::test]
async fn a_secret_without_a_schedule_is_rotated_before_the_provider_expires_it() {
    let logs = Capture::default();
    let _guard = logs.install();
    // Short tokens: the engine logs in every couple of seconds, so a secret
    // past its expiry would be refused (AADSTS7000222) within the test.
    let lifetime = Duration::from_secs(15);
    let (sim, bootstrap, admin) = sim(Duration::from_secs(3), lifetime).await;
    let expires = sim_expiry(&sim, &bootstrap.0);
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "boot.secret", &bootstrap.1);
    write_secret(dir.path(), "admin.secret", &admin);
    // No `every` or `schedule`: only the provider's expiry makes a rotation
    // due (a third of the secret's lifetime before it, by default).
    let text = config(
        &sim,
        "expiring",
        &bootstrap.0,
        Some("max_secret_age = \"365d\"\ngrace = \"1s\""),
    );
    let d = TestDaemon::start_in(dir, &text).await;
    let handle = d.handle("expiring");
    wait_token(&handle, |_| true).await;

    // Watch every status change from here: never locked out.
    let mut rx = handle.status.clone();
    let locked = tokio::spawn(async move {
        let mut ever = false;
        while rx.changed().await.is_ok() {
            ever |= rx.borrow().locked_out;
        }
        ever
    });

    // The bootstrap secret's expiry is learnt from the start-up listing.
    let s = status_or_logs(&handle, &logs, |s| s.secret_expires_at.is_some()).await;
    let learnt = s.secret_expires_at.unwrap();
    assert!(
        learnt
            .duration_since(expires)
            .unwrap_or_else(|e| e.duration())
            < Duration::from_millis(1),
        "{learnt:?} vs {expires:?}"
    );

    // Rotated before the provider's expiry.
    let s = status_or_logs(&handle, &logs, |s| {
        s.last_rotated_at.is_some() && s.rotation_phase == "idle"
    })
    .await;
    assert!(
        s.last_rotated_at.unwrap() < expires,
        "rotated before the bootstrap secret expired"
    );
    // The new secret's expiry came with its create reply.
    let store = FileStore::new(&d.config.state_dir);
    let record = store.load("expiring").await.unwrap().unwrap().value;
    let new_id = record.current.id.clone().expect("an Entra keyId");
    assert_ne!(new_id, bootstrap.0);
    let new_expiry = sim_expiry(&sim, &new_id);
    let recorded = record.current.expires_at.expect("recorded");
    assert!(
        recorded
            .duration_since(new_expiry)
            .unwrap_or_else(|e| e.duration())
            < Duration::from_millis(1)
    );
    assert!(new_expiry > expires);

    // Past the bootstrap secret's expiry: tokens keep coming from the new
    // secret, and the provider never saw a login with an expired one.
    let past_expiry = expires + Duration::from_secs(1);
    wait_token(&handle, |t| t.received_at_wall > past_expiry).await;
    assert_eq!(sim.stats().logins_expired, 0, "{:?}", sim.stats());
    let s = handle.status.borrow().clone();
    assert!(!s.locked_out);
    assert_eq!(s.secret_expiry_warning, None, "rotated in time: no warning");

    let history = rekeyd::history::load(&store, "expiring")
        .await
        .unwrap()
        .expect("a history");
    let history = rekeyd::history::to_json(&history, "expiring").to_string();
    assert!(history.contains("provider_expiry"), "{history}");
    d.stop().await;
    assert!(!locked.await.unwrap(), "never locked out");
    assert!(!logs.text().contains(&bootstrap.1));
}

#[tokio::test]
async fn a_secret_rekeyd_does_not_rotate_is_warned_about_as_its_expiry_nears() {
    let logs = Capture::default();
    let _guard = logs.install();
    // Ten minutes left: well within the 30 days rekeyd warns ahead.
    let (sim, bootstrap, _) = sim(Duration::from_secs(600), Duration::from_secs(600)).await;
    let expires = sim_expiry(&sim, &bootstrap.0);
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "boot.secret", &bootstrap.1);
    let d = TestDaemon::start_in(dir, &config(&sim, "unrotated", &bootstrap.0, None)).await;
    let handle = d.handle("unrotated");
    wait_token(&handle, |_| true).await;

    let s = wait_status(&handle, |s| s.secret_expiry_warning.is_some()).await;
    let warning = s.secret_expiry_warning.clone().unwrap();
    let shown = humantime::format_rfc3339_seconds(expires).to_string();
    assert!(warning.contains(&shown), "{warning} names {shown}");
    assert!(warning.contains("not configured"), "{warning}");
    assert!(warning.contains(&bootstrap.0), "names the secret by id");
    assert!(s.secret_expires_at.is_some());
    // Nothing leaks the secret: status (as the API shows it) and logs.
    assert!(!status_json(&s).contains(&bootstrap.1));
    let metrics = rekeyd::metrics::global().encode();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("rekeyd_secret_expiry_timestamp_seconds")
                && l.contains("credential=\"unrotated\"")
        })
        .unwrap_or_else(|| panic!("an expiry gauge:\n{metrics}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let expected = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((value - expected).abs() < 1.0, "{line}");
    // Not rotated: no rotation is configured.
    assert_eq!(sim.stats().secrets_created, 0);
    assert_eq!(sim.stats().requests_to(Endpoint::EntraAddPassword), 0);
    d.stop().await;

    let text = logs.text();
    let logged = text
        .lines()
        .find(|l| l.contains("WARN") && l.contains("expires at the provider"))
        .unwrap_or_else(|| panic!("a warning in the log:\n{text}"));
    assert!(logged.contains(&bootstrap.0), "{logged}");
    assert!(!text.contains(&bootstrap.1), "the secret is never logged");
    // Logged once, not at every tick of the schedule.
    assert_eq!(text.matches("expires at the provider").count(), 1, "{text}");
}

#[tokio::test]
async fn a_secret_past_its_provider_expiry_is_an_error_in_logs_and_status() {
    let logs = Capture::default();
    let _guard = logs.install();
    // Short tokens: the engine logs in again after the secret expired.
    let (sim, bootstrap, _) = sim(Duration::from_secs(2), Duration::from_secs(600)).await;
    // Expires in three seconds: long enough for the start-up listing (made
    // with a token of this very secret) to learn it.
    let expires = SystemTime::now() + Duration::from_secs(3);
    assert!(sim.set_secret_expiry(&bootstrap.0, Some(expires)));
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "boot.secret", &bootstrap.1);
    let d = TestDaemon::start_in(dir, &config(&sim, "expired", &bootstrap.0, None)).await;
    let handle = d.handle("expired");
    // Near at first (three seconds left, rotation not configured).
    let s = wait_status(&handle, |s| s.secret_expiry_warning.is_some()).await;
    let warning = s.secret_expiry_warning.unwrap();
    assert!(warning.contains("expires at the provider"), "{warning}");

    // The login's refusal names the expiry (AADSTS7000222), and status
    // says the secret expired at the provider.
    let s = wait_status(&handle, |s| {
        s.secret_expiry_warning.is_some()
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("AADSTS7000222"))
    })
    .await;
    let warning = s.secret_expiry_warning.clone().unwrap();
    assert!(warning.contains("expired at the provider"), "{warning}");
    assert!(SystemTime::now() >= expires);
    assert!(!status_json(&s).contains(&bootstrap.1));
    assert!(sim.stats().logins_expired > 0);
    d.stop().await;

    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("ERROR") && l.contains("expired at the provider")),
        "an error in the log:\n{text}"
    );
    assert!(!text.contains(&bootstrap.1), "the secret is never logged");
}
