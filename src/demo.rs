//! `rekeyd demo`: the daemon against the built-in simulated provider, with
//! token lifetimes of seconds so a newcomer sees the whole cycle in a minute.
//! Narration goes to stdout; the daemon's own log lines go to stderr.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoProvider;
use crate::config::Config;
use crate::credential::CredentialHandle;
use crate::daemon;
use crate::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};

/// Short enough to see several refreshes a minute, long enough to read.
const DEMO_TOKEN_LIFETIME: Duration = Duration::from_secs(10);
/// The "maps" credential's secret is rotated this often...
const DEMO_ROTATE_EVERY: Duration = Duration::from_secs(25);
/// ...and the old secret is deleted this long after the new one is in use.
const DEMO_GRACE: Duration = Duration::from_secs(5);
/// New secrets take this long to be accepted, as at a real provider.
const DEMO_PROPAGATION: Duration = Duration::from_secs(1);
/// When the demo breaks the Mappls endpoint for a while.
const OUTAGE_AT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot set up the demo: {0}")]
    Setup(String),
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
}

fn setup<E: std::fmt::Display>(e: E) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// The "maps" credential as `provider` has it rotated, and for Okta and
/// Auth0 the administrative credential whose token calls the secret API.
fn rotating_credential(provider: DemoProvider, sim: &SimProvider, bootstrap_id: &str) -> String {
    match provider {
        DemoProvider::Mapsindoors => format!(
            r#"provider = "mapsindoors"
client_id = "demo-maps"
customer_id = "demo-customer"
initial_secret_id = "{bootstrap_id}"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
"#,
            token = sim.mapsindoors_token_url(),
            secrets = sim.mapsindoors_secrets_url(),
        ),
        DemoProvider::Okta => format!(
            r#"provider = "okta"
org_url = "{org}"
app_id = "demo-maps"
client_id = "demo-maps"
initial_secret_id = "{bootstrap_id}"
secret_api_credential = "admin"
"#,
            org = sim.okta_org_url(),
        ),
        DemoProvider::Auth0 => format!(
            r#"provider = "auth0"
domain = "demo.auth0.invalid"
client_id = "demo-maps"
secret_api_credential = "admin"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{client}"
"#,
            token = sim.auth0_token_url(),
            client = sim.auth0_client_url("demo-maps"),
        ),
        DemoProvider::Keycloak => format!(
            r#"provider = "keycloak"
base_url = "{base}"
realm = "demo"
client_uuid = "demo-maps"
client_id = "demo-maps"
"#,
            base = sim.keycloak_base_url(),
        ),
        DemoProvider::Entra => format!(
            r#"provider = "entra"
tenant = "demo-tenant"
application_object_id = "demo-maps"
client_id = "demo-maps"
initial_secret_id = "{bootstrap_id}"
secret_api_credential = "maps-graph"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{application}"
[[credentials.tokens]]
name = "maps-graph"
scope = "https://graph.microsoft.com/.default"
"#,
            token = sim.entra_token_url("demo-tenant"),
            application = sim.entra_application_url("demo-maps"),
        ),
    }
}

fn admin_credential(provider: DemoProvider, sim: &SimProvider, secret_file: &str) -> String {
    let head = format!(
        "\n[[credentials]]\nname = \"admin\"\nclient_id = \"demo-admin\"\ninitial_secret_file = \"{secret_file}\"\n"
    );
    match provider {
        DemoProvider::Mapsindoors | DemoProvider::Keycloak | DemoProvider::Entra => String::new(),
        DemoProvider::Okta => format!(
            "{head}provider = \"okta\"\norg_url = \"{}\"\napp_id = \"demo-admin\"\n",
            sim.okta_org_url()
        ),
        DemoProvider::Auth0 => format!(
            "{head}provider = \"auth0\"\ndomain = \"demo.auth0.invalid\"\n[credentials.endpoints]\ntoken_url = \"{}\"\n",
            sim.auth0_token_url()
        ),
    }
}

/// Runs the demo for `duration` (or until Ctrl-C when `None`), rotating
/// through `provider`'s simulated secret API.
pub async fn run(duration: Option<Duration>, provider: DemoProvider) -> Result<(), DemoError> {
    let dir = tempfile::tempdir().map_err(setup)?;
    let sim = SimProvider::start(SimOptions {
        token_lifetime: DEMO_TOKEN_LIFETIME,
        propagation_delay: DEMO_PROPAGATION,
        ..SimOptions::default()
    })
    .await
    .map_err(setup)?;

    sim.add_client("demo-maps", "demo-customer");
    let (maps_id, maps_secret) = sim.add_secret("demo-maps", "bootstrap secret");
    sim.add_client("demo-places", "demo-customer");
    let (_, places_secret) = sim.add_secret("demo-places", "bootstrap secret");
    sim.add_client("demo-admin", "demo-customer");
    let (_, admin_secret) = sim.add_secret("demo-admin", "administrative client");
    let path = |name: &str| dir.path().join(name).display().to_string();
    for (file, secret) in [
        ("maps.secret", &maps_secret),
        ("places.secret", &places_secret),
        ("admin.secret", &admin_secret),
    ] {
        crate::fsutil::write_atomic(&dir.path().join(file), secret.as_bytes(), 0o600)
            .map_err(setup)?;
    }
    let config_text = format!(
        r#"state_dir = "{state}"

[api]
listen = "127.0.0.1:0"
key_file = "{key}"

[[credentials]]
name = "maps"
initial_secret_file = "{maps_secret}"
{maps}[credentials.rotation]
every = "{rotate_every}s"
grace = "{grace}s"
[[credentials.sinks]]
path = "{maps_token_file}"
format = "header"

[[credentials]]
name = "places"
provider = "mappls"
client_id = "demo-places"
initial_secret_file = "{places_secret}"
[credentials.endpoints]
token_url = "{places_token}"
[credentials.refresh]
before_expiry = "3s"
[[credentials.sinks]]
path = "{places_token_file}"
format = "json"
{admin}"#,
        state = path("state"),
        rotate_every = DEMO_ROTATE_EVERY.as_secs(),
        grace = DEMO_GRACE.as_secs(),
        key = path("api.key"),
        maps_secret = path("maps.secret"),
        maps = rotating_credential(provider, &sim, &maps_id),
        admin = admin_credential(provider, &sim, &path("admin.secret")),
        maps_token_file = path("maps.token"),
        places_secret = path("places.secret"),
        places_token = sim.mappls_token_url(),
        places_token_file = path("places.token"),
    );
    let config_path = dir.path().join("rekeyd.toml");
    std::fs::write(&config_path, &config_text).map_err(setup)?;
    let config = Config::load_with_env(&config_path, std::iter::empty()).map_err(setup)?;

    println!("rekeyd demo");
    let rotating = match provider {
        DemoProvider::Mapsindoors => "MapsIndoors",
        DemoProvider::Okta => "Okta",
        DemoProvider::Auth0 => "Auth0",
        DemoProvider::Keycloak => "Keycloak",
        DemoProvider::Entra => "Entra",
    };
    println!(
        "  simulated {rotating} and Mappls auth services on {}",
        sim.base_url()
    );
    println!(
        "  configuration: {} (a real rekeyd.toml; `rekeyd check -c` it)",
        config_path.display()
    );
    println!(
        "  tokens live {}s; rekeyd refreshes them before they expire.",
        DEMO_TOKEN_LIFETIME.as_secs()
    );
    println!(
        "  At {}s the Mappls endpoint fails for a while: rekeyd backs off and keeps",
        OUTAGE_AT.as_secs()
    );
    println!("  serving the still-valid token. Token values are never printed.");
    match duration {
        Some(d) => println!(
            "  Running for {}; Ctrl-C stops earlier.\n",
            humantime::format_duration(d)
        ),
        None => println!("  Press Ctrl-C to stop.\n"),
    }

    let shutdown = CancellationToken::new();
    daemon::spawn_signal_listener(shutdown.clone());
    let running = daemon::start(&config, shutdown.clone()).await?;
    let api = running
        .api_addr
        .ok_or_else(|| DemoError::Setup("the API has no TCP address".into()))?;
    let key = std::fs::read_to_string(dir.path().join("api.key")).map_err(setup)?;
    for handle in running.credentials().values() {
        tokio::spawn(narrate(
            handle.clone(),
            api,
            key.trim().to_string(),
            shutdown.clone(),
        ));
    }

    let started = Instant::now();
    let outage = async {
        tokio::time::sleep(OUTAGE_AT).await;
        println!("\n>>> demo: the Mappls token endpoint now answers 503 to the next 4 requests\n");
        sim.set_faults(Faults {
            scope: FaultScope::Only(Endpoint::MapplsToken),
            fail_next: 4,
            ..Faults::default()
        });
        std::future::pending::<()>().await
    };
    let stop_after = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = stop_after => shutdown.cancel(),
        _ = shutdown.cancelled() => {}
        // Never completes: the outage only matters while the demo runs.
        _ = outage => {}
    }
    running.wait().await;

    let stats = sim.stats();
    println!(
        "\ndemo finished after {}s: {} logins, {} secrets created and {} deleted at the simulated provider, {} faults injected.",
        started.elapsed().as_secs(),
        stats.logins_ok,
        stats.secrets_created,
        stats.secrets_deleted,
        stats.faults_injected
    );
    let live: Vec<String> = sim
        .secrets("demo-maps")
        .into_iter()
        .map(|s| match s.description.as_str() {
            // Okta and Auth0 secrets carry no description.
            "" => format!("id {}", s.id),
            d => d.to_string(),
        })
        .collect();
    println!("secrets the \"maps\" client has now: {live:?}");
    sim.shutdown().await;
    Ok(())
}

/// Prints a line each time the credential gets a new token, showing that
/// the local API serves it.
async fn narrate(
    mut handle: CredentialHandle,
    api: std::net::SocketAddr,
    key: String,
    shutdown: CancellationToken,
) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    let mut seen = 0u32;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = handle.token.changed() => if changed.is_err() { return },
        }
        seen += 1;
        let Some(token) = handle.token.borrow_and_update().clone().map(|t: Arc<_>| t) else {
            continue;
        };
        let url = format!("http://{api}/v1/token/{}", handle.name);
        let served = match client.get(&url).header("X-Rekeyd-Key", &key).send().await {
            Ok(r) => format!("GET /v1/token/{} -> {}", handle.name, r.status().as_u16()),
            Err(e) => format!("GET /v1/token/{} failed: {e}", handle.name),
        };
        println!(
            ">>> demo: {:<6} token #{seen} valid for {}s; {served}",
            handle.name,
            token.remaining(handle.clock.now()).as_secs()
        );
    }
}
