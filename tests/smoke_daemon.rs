#[path = "support/daemon.rs"]
mod daemon;

use rekeyd::sim::{SimOptions, SimProvider};
use secrecy::ExposeSecret;

#[tokio::test]
async fn first_login_against_sim() {
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    sim.add_client("c1", "cust");
    let (_, secret) = sim.add_secret("c1", "boot");
    let dir = tempfile::tempdir().unwrap();
    daemon::write_secret(dir.path(), "c1.secret", &secret);
    let config = format!(
        r#"state_dir = "{{dir}}/state"
[[credentials]]
name = "c1"
provider = "mapsindoors"
client_id = "c1"
initial_secret_file = "{{dir}}/c1.secret"
[credentials.endpoints]
token_url = "{}"
secrets_url = "{}"
"#,
        sim.mapsindoors_token_url(),
        sim.mapsindoors_secrets_url()
    );
    let d = daemon::TestDaemon::start_in(dir, &config).await;
    let token = daemon::wait_token(&d.handle("c1"), |_| true).await;
    assert_eq!(
        sim.token_client(token.access_token.expose_secret())
            .as_deref(),
        Some("c1")
    );
    d.stop().await;
}
