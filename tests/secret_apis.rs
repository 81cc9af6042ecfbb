//! Rotation through the Okta and Auth0 profiles of the simulated provider:
//! caller-chosen values stored before the call, Okta's deactivate before
//! delete and its two-secret limit, Auth0's atomic replacement, an
//! administrative credential's token on the secret API
//! (`secret_api_credential`), and a lost reply at each provider call.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rekeyd::config::Config;
use rekeyd::provider::ErrorKind;
use rekeyd::rotation::driver::{LoginBearer, Outcome, RotationError, Rotator};
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::{CredentialRecord, SecretEntry, Store};
use rekeyd::token::engine::StoreSecrets;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

const APP: &str = "app-client";
const ADMIN: &str = "admin-client";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Profile {
    Okta,
    Auth0,
    Keycloak,
    Entra,
}

struct World {
    sim: SimProvider,
    dir: tempfile::TempDir,
    config: Config,
    store: Arc<FileStore>,
    /// The app's bootstrap secret `(id, value)`.
    bootstrap: (String, String),
    /// The administrative client's secret.
    admin: (String, String),
}

async fn world(profile: Profile, propagation: Duration) -> World {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(600),
        propagation_delay: propagation,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(APP, "org");
    sim.add_client(ADMIN, "org");
    let bootstrap = sim.add_secret(APP, "");
    let admin = sim.add_secret(ADMIN, "");
    let dir = tempfile::tempdir().unwrap();
    let provider = match profile {
        Profile::Okta => format!(
            "provider = \"okta\"\norg_url = \"{}\"\n",
            sim.okta_org_url()
        ),
        Profile::Auth0 => "provider = \"auth0\"\ndomain = \"tenant.example\"\n".to_string(),
        Profile::Keycloak => format!(
            "provider = \"keycloak\"\nbase_url = \"{}\"\nrealm = \"demo\"\n",
            sim.keycloak_base_url()
        ),
        Profile::Entra => "provider = \"entra\"\ntenant = \"sim-tenant\"\n".to_string(),
    };
    let endpoints = |client: &str| match profile {
        Profile::Okta | Profile::Keycloak => String::new(),
        Profile::Auth0 => format!(
            "[credentials.endpoints]\ntoken_url = \"{}\"\nsecrets_url = \"{}\"\n",
            sim.auth0_token_url(),
            sim.auth0_client_url(client)
        ),
        Profile::Entra => format!(
            "[credentials.endpoints]\ntoken_url = \"{}\"\nsecrets_url = \"{}\"\n",
            sim.entra_token_url("sim-tenant"),
            sim.entra_application_url(client)
        ),
    };
    let app_id = |client: &str| match profile {
        Profile::Okta => format!("app_id = \"{client}\"\n"),
        Profile::Keycloak => format!("client_uuid = \"{client}\"\n"),
        Profile::Entra => format!("application_object_id = \"{client}\"\n"),
        Profile::Auth0 => String::new(),
    };
    let d = dir.path().display();
    let text = format!(
        r#"state_dir = "{d}/state"

[[credentials]]
name = "app"
{provider}{app_id_app}client_id = "{APP}"
initial_secret_file = "{d}/app.secret"
initial_secret_id = "{bootstrap_id}"
secret_api_credential = "admin"
{endpoints_app}[credentials.rotation]
every = "1h"
grace = "0s"

[[credentials]]
name = "admin"
{provider}{app_id_admin}client_id = "{ADMIN}"
initial_secret_file = "{d}/admin.secret"
{endpoints_admin}"#,
        app_id_app = app_id(APP),
        app_id_admin = app_id(ADMIN),
        bootstrap_id = bootstrap.0,
        endpoints_app = endpoints(APP),
        endpoints_admin = endpoints(ADMIN),
    );
    let config = Config::from_toml(&text).unwrap();
    let store = Arc::new(FileStore::new(&config.state_dir));
    let record = |id: &str, value: &str| {
        CredentialRecord::new(SecretEntry {
            id: Some(id.to_string()),
            value: SecretString::from(value.to_string()),
            created_at: SystemTime::now(),
        })
    };
    store
        .compare_and_swap("app", None, &record(&bootstrap.0, &bootstrap.1))
        .await
        .unwrap();
    store
        .compare_and_swap("admin", None, &record(&admin.0, &admin.1))
        .await
        .unwrap();
    World {
        sim,
        dir,
        config,
        store,
        bootstrap,
        admin,
    }
}

impl World {
    fn rotator(&self, verify_window: Duration) -> Rotator {
        let cred = self.config.credential("app").unwrap();
        let admin = cred.secret_api_credential.as_ref().unwrap();
        let store: Arc<dyn Store> = self.store.clone();
        Rotator {
            name: "app".into(),
            client_id: APP.into(),
            provider: rekeyd::provider::build(cred).unwrap(),
            secret_api: rekeyd::provider::build_secret_api(cred).unwrap().unwrap(),
            secret_api_bearer: Some(Arc::new(LoginBearer {
                provider: rekeyd::provider::build(admin.login.as_ref().unwrap()).unwrap(),
                secrets: Arc::new(StoreSecrets {
                    store: store.clone(),
                    name: admin.secret_of.clone(),
                }),
            })),
            store,
            grace: Duration::ZERO,
            verify_window,
            status: None,
            refresh_now: None,
            clock: rekeyd::rotation::driver::system_clock(),
        }
    }

    async fn rotate(&self, begin: bool) -> Result<Outcome, RotationError> {
        tokio::time::timeout(
            TIMEOUT,
            self.rotator(Duration::from_secs(10))
                .rotate(begin, false, &CancellationToken::new()),
        )
        .await
        .expect("the rotation run ends")
    }

    async fn record(&self) -> CredentialRecord {
        self.store.load("app").await.unwrap().unwrap().value
    }

    /// A login as the token engine makes it: the store's current secret,
    /// then the pending (or caller-chosen) one, then the old one.
    async fn engine_login(&self) -> Result<(), ErrorKind> {
        let cred = self.config.credential("app").unwrap();
        let bearer = LoginBearer {
            provider: rekeyd::provider::build(cred).unwrap(),
            secrets: Arc::new(StoreSecrets {
                store: self.store.clone(),
                name: "app".into(),
            }),
        };
        use rekeyd::rotation::driver::BearerSource;
        bearer.token().await.map(|_| ()).map_err(|e| e.kind)
    }

    async fn login(&self, value: &str) -> Result<(), ErrorKind> {
        let cred = self.config.credential("app").unwrap();
        let provider = rekeyd::provider::build(cred).unwrap();
        provider
            .login(&SecretString::from(value.to_string()))
            .await
            .map(|_| ())
            .map_err(|e| e.kind)
    }

    /// After a completed rotation: the client holds exactly one secret, the
    /// stored one, which logs in; the bootstrap secret no longer does; the
    /// administrative client's secret is untouched.
    async fn assert_rotated_cleanly(&self) {
        let record = self.record().await;
        assert_eq!(record.phase(), "idle", "{record:?}");
        let current = record.current.value.expose_secret().to_string();
        assert_ne!(current, self.bootstrap.1);
        if !self.server_made() {
            assert_eq!(current.len(), 43, "a 256-bit value of rekeyd's own");
        }
        let secrets = self.sim.secrets(APP);
        assert_eq!(secrets.len(), 1, "no orphan, no duplicate: {secrets:?}");
        assert_eq!(
            secrets[0].value, current,
            "the provider holds the stored value"
        );
        assert_eq!(
            record.current.id.as_deref().is_some(),
            self.profile_has_ids()
        );
        self.login(&current)
            .await
            .expect("the stored secret logs in");
        assert_eq!(
            self.login(&self.bootstrap.1).await,
            Err(ErrorKind::Rejected),
            "the old secret is gone"
        );
        let admin = self.sim.secrets(ADMIN);
        assert_eq!(admin.len(), 1);
        assert_eq!(admin[0].value, self.admin.1, "nothing foreign touched");
    }

    fn profile_has_ids(&self) -> bool {
        matches!(
            self.config.credential("app").unwrap().provider.as_str(),
            "okta" | "entra"
        )
    }

    /// The provider makes the values (Entra), not rekeyd.
    fn server_made(&self) -> bool {
        self.config.credential("app").unwrap().provider.as_str() == "entra"
    }

    fn drop_next(&self, endpoint: Endpoint) {
        self.sim.set_faults(Faults {
            scope: FaultScope::Only(endpoint),
            drop_next: 1,
            ..Faults::default()
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okta_rotates_with_a_value_of_its_own_and_deactivates_before_deleting() {
    let w = world(Profile::Okta, Duration::ZERO).await;
    assert_eq!(w.rotate(true).await.unwrap(), Outcome::Rotated);
    w.assert_rotated_cleanly().await;
    let stats = w.sim.stats();
    assert_eq!(stats.requests_to(Endpoint::OktaSecretsDeactivate), 1);
    assert_eq!(stats.requests_to(Endpoint::OktaSecretsDelete), 1);
    assert_eq!(stats.requests_to(Endpoint::OktaSecretsCreate), 1);
    drop(w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okta_a_lost_create_reply_is_found_again_not_created_twice() {
    let w = world(Profile::Okta, Duration::ZERO).await;
    w.drop_next(Endpoint::OktaSecretsCreate);
    let first = w.rotate(true).await;
    assert!(first.is_err(), "the run ends on the lost reply: {first:?}");
    let record = w.record().await;
    assert_eq!(record.phase(), "creating");
    let chosen = record
        .chosen()
        .expect("the value was stored before the call");
    assert_eq!(
        w.sim.secrets(APP).len(),
        2,
        "the create happened at the provider"
    );
    assert!(
        w.sim
            .secrets(APP)
            .iter()
            .any(|s| s.value == chosen.expose_secret()),
        "with the stored value"
    );
    // The next run finds it by a login with the stored value.
    assert_eq!(w.rotate(false).await.unwrap(), Outcome::Rotated);
    w.assert_rotated_cleanly().await;
    assert_eq!(
        w.sim.stats().requests_to(Endpoint::OktaSecretsCreate),
        1,
        "never created twice (the app holds at most two)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okta_a_lost_reply_at_every_other_call_converges() {
    for endpoint in [
        Endpoint::OktaSecretsList,
        Endpoint::OktaSecretsDeactivate,
        Endpoint::OktaSecretsDelete,
        Endpoint::OktaToken,
    ] {
        let w = world(Profile::Okta, Duration::ZERO).await;
        w.drop_next(endpoint);
        let mut runs = 0;
        let mut begin = true;
        loop {
            runs += 1;
            assert!(runs <= 4, "{endpoint:?}: no convergence");
            // A lost token reply is no lockout; a refusal would be.
            assert_ne!(
                w.engine_login().await,
                Err(ErrorKind::Rejected),
                "{endpoint:?}: locked out"
            );
            match w.rotate(begin).await {
                Ok(Outcome::Rotated) => break,
                Ok(Outcome::Idle) if !w.record().await.is_unfinished() => break,
                _ => begin = false,
            }
        }
        w.assert_rotated_cleanly().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okta_at_its_two_secret_limit_asks_an_operator_and_touches_nothing() {
    let w = world(Profile::Okta, Duration::ZERO).await;
    let by_hand = w.sim.add_secret(APP, "");
    let e = w.rotate(true).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("HTTP 400"), "{text}");
    assert!(
        text.contains("E0000001"),
        "the provider's error code: {text}"
    );
    match &e {
        RotationError::Provider(p) => assert_eq!(p.kind, ErrorKind::Refused),
        other => panic!("{other:?}"),
    }
    let ids: Vec<String> = w.sim.secrets(APP).into_iter().map(|s| s.id).collect();
    assert_eq!(
        ids,
        vec![w.bootstrap.0.clone(), by_hand.0],
        "nothing deleted"
    );
    w.engine_login().await.expect("still logs in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_replaces_the_secret_with_a_stored_value_and_keeps_logging_in() {
    let w = world(Profile::Auth0, Duration::from_millis(1500)).await;
    assert_eq!(w.rotate(true).await.unwrap(), Outcome::Rotated);
    w.assert_rotated_cleanly().await;
    assert_eq!(w.sim.stats().requests_to(Endpoint::Auth0ClientUpdate), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_a_lost_update_reply_never_locks_out_and_is_sent_again() {
    let w = world(Profile::Auth0, Duration::ZERO).await;
    w.drop_next(Endpoint::Auth0ClientUpdate);
    assert!(w.rotate(true).await.is_err());
    // The provider replaced the secret; the reply is lost. The journal
    // holds the value, so logins keep working (I1).
    assert_eq!(
        w.login(&w.bootstrap.1).await,
        Err(ErrorKind::Rejected),
        "the old secret died with the replacement"
    );
    let record = w.record().await;
    assert_eq!(record.phase(), "creating");
    w.engine_login()
        .await
        .expect("the stored value logs in while the journal is unfinished");
    assert_eq!(w.rotate(false).await.unwrap(), Outcome::Rotated);
    w.assert_rotated_cleanly().await;
    assert_eq!(
        w.sim.stats().requests_to(Endpoint::Auth0ClientUpdate),
        2,
        "the same value, sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_api_is_called_with_the_administrative_token() {
    for profile in [
        Profile::Okta,
        Profile::Auth0,
        Profile::Keycloak,
        Profile::Entra,
    ] {
        let w = world(profile, Duration::ZERO).await;
        assert_eq!(w.rotate(true).await.unwrap(), Outcome::Rotated);
        let callers: Vec<String> = w.sim.stats().management_callers.into_keys().collect();
        assert_eq!(callers, vec![ADMIN.to_string()], "{profile:?}");
        // The admin credential's secret was never rotated nor touched.
        assert_eq!(w.sim.secrets(ADMIN)[0].value, w.admin.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekeyd_check_explains_the_path_each_rotation_takes() {
    for (profile, says) in [
        (
            Profile::Okta,
            [
                "rekeyd generates the new secret",
                "at most 2 at once",
                "deactivated and deleted",
            ],
        ),
        (
            Profile::Auth0,
            [
                "rekeyd generates the new secret",
                "replaces the old secret at once",
                "nothing is left to delete",
            ],
        ),
    ] {
        let w = world(profile, Duration::ZERO).await;
        let text = rekeyd::commands::effective_config(&w.config).await;
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let rotation = &doc["credentials"][0]["rotation"];
        assert_eq!(rotation["secret_api_credential"], "admin");
        // The ids the URLs come from, under their keys.
        let ids = &doc["credentials"][0]["ids"];
        match profile {
            Profile::Okta => assert_eq!(ids["app_id"], APP, "{ids}"),
            Profile::Auth0 => assert_eq!(ids["domain"], "tenant.example", "{ids}"),
            _ => assert!(ids.is_object(), "{ids}"),
        }
        let path = rotation["path"].as_str().unwrap();
        for fragment in says {
            assert!(path.contains(fragment), "{profile:?}: {path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_secret_cannot_drop_a_chosen_value_in_flight() {
    use rekeyd::rotation::operator::{self, SetSecret, SetSecretError};
    let w = world(Profile::Okta, Duration::ZERO).await;
    w.drop_next(Endpoint::OktaSecretsCreate);
    assert!(w.rotate(true).await.is_err());
    assert!(w.record().await.chosen().is_some());
    let cred = w.config.credential("app").unwrap();
    let provider = rekeyd::provider::build(cred).unwrap();
    let request = SetSecret {
        name: "app",
        value: SecretString::from(w.bootstrap.1.clone()),
        id: Some(w.bootstrap.0.clone()),
        verify: true,
        force: true,
        retire_replaced: true,
    };
    let e = operator::set_secret(
        w.store.as_ref(),
        provider.as_ref(),
        request,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, SetSecretError::ChosenValueInFlight(_)), "{e}");
    assert!(e.to_string().contains("rekeyd rotate app"), "{e}");
    // Finishing it adopts the secret the lost reply made: no orphan.
    assert_eq!(w.rotate(false).await.unwrap(), Outcome::Rotated);
    w.assert_rotated_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_secret_at_okta_retires_the_secret_it_replaces() {
    use rekeyd::rotation::operator::{self, SetSecret};
    let w = world(Profile::Okta, Duration::ZERO).await;
    let (id, value) = w.sim.add_secret(APP, "");
    let cred = w.config.credential("app").unwrap();
    let provider = rekeyd::provider::build(cred).unwrap();
    let request = SetSecret {
        name: "app",
        value: SecretString::from(value.clone()),
        id: Some(id.clone()),
        verify: true,
        force: false,
        retire_replaced: true,
    };
    let installed = operator::set_secret(
        w.store.as_ref(),
        provider.as_ref(),
        request,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(installed.retiring, vec![w.bootstrap.0.clone()]);
    // The next run deletes it (after a listing shows it is this app's):
    // the app has room for the next rotation again.
    w.rotate(false).await.unwrap();
    let left: Vec<String> = w.sim.secrets(APP).into_iter().map(|s| s.id).collect();
    assert_eq!(left, vec![id]);
    assert_eq!(w.rotate(true).await.unwrap(), Outcome::Rotated);
    assert_eq!(w.sim.secrets(APP).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_sets_a_stored_value_and_a_lost_reply_is_sent_again() {
    let w = world(Profile::Keycloak, Duration::from_millis(500)).await;
    w.drop_next(Endpoint::KeycloakClientUpdate);
    assert!(w.rotate(true).await.is_err());
    assert_eq!(w.login(&w.bootstrap.1).await, Err(ErrorKind::Rejected));
    // Once propagated (the provider's own window), the stored value logs
    // in while the journal is unfinished.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while w.engine_login().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "locked out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.rotate(false).await.unwrap(), Outcome::Rotated);
    w.assert_rotated_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_tags_the_display_name_and_deletes_a_lost_replys_secret_by_it() {
    let w = world(Profile::Entra, Duration::from_millis(300)).await;
    w.drop_next(Endpoint::EntraAddPassword);
    assert!(w.rotate(true).await.is_err());
    // The provider made a secret whose value only the lost reply held.
    let made: Vec<String> = w
        .sim
        .secrets(APP)
        .into_iter()
        .map(|s| s.description)
        .collect();
    assert!(
        made.iter().any(|d| d.starts_with("rekeyd:app:")),
        "{made:?}"
    );
    assert_eq!(w.rotate(false).await.unwrap(), Outcome::Rotated);
    w.assert_rotated_cleanly().await;
    let left = w.sim.secrets(APP);
    assert!(left[0].description.starts_with("rekeyd:app:"), "{left:?}");
    assert_eq!(w.sim.stats().requests_to(Endpoint::EntraRemovePassword), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_login_refusals_show_their_aadsts_code() {
    let w = world(Profile::Entra, Duration::ZERO).await;
    let cred = w.config.credential("app").unwrap();
    let provider = rekeyd::provider::build(cred).unwrap();
    let e = provider
        .login(&SecretString::from("not-the-secret".to_string()))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Rejected);
    assert_eq!(e.code.as_deref(), Some("invalid_client"));
    assert!(e.to_string().contains("AADSTS7000215"), "{e}");
}

/// Auth0 replaces its one secret, so a replacement request delayed from an
/// earlier rotation would set the earlier value again after a later
/// rotation. The replaced value stays in the journal through the grace
/// period: logins still try it, and the check at the end of the grace
/// period finds the provider holding another value than the promoted
/// one. The earlier value becomes current again (it logs in) and the
/// promoted one is set again; nothing is dropped, nothing locks out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_a_delayed_replacement_from_an_earlier_rotation_heals() {
    let w = world(Profile::Auth0, Duration::ZERO).await;
    assert_eq!(w.rotate(true).await.unwrap(), Outcome::Rotated);
    let first = w.record().await.current.value.expose_secret().to_string();

    // The next rotation, with a grace period the delayed request lands in.
    let mut rotator = w.rotator(Duration::from_secs(2));
    rotator.grace = Duration::from_secs(3);
    let run =
        tokio::spawn(async move { rotator.rotate(true, false, &CancellationToken::new()).await });
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while w.record().await.phase() != "promoted" {
        assert!(tokio::time::Instant::now() < deadline, "never promoted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = w.record().await.current.value.expose_secret().to_string();
    assert_ne!(second, first);
    // The earlier rotation's request arrives now: the provider holds the
    // first value again.
    let cred = w.config.credential("app").unwrap();
    let admin = cred.secret_api_credential.as_ref().unwrap();
    let admin_token = rekeyd::provider::build(admin.login.as_ref().unwrap())
        .unwrap()
        .login(&SecretString::from(w.admin.1.clone()))
        .await
        .unwrap();
    let api = rekeyd::provider::build_secret_api(cred).unwrap().unwrap();
    let stale = SecretString::from(first.clone());
    api.create(
        &admin_token,
        rekeyd::provider::CreateRequest {
            description: "",
            value: Some(&stale),
        },
    )
    .await
    .unwrap();
    w.engine_login()
        .await
        .expect("the replaced value is still tried during the grace period");

    let outcome = tokio::time::timeout(TIMEOUT, run).await.unwrap().unwrap();
    assert_eq!(outcome.unwrap(), Outcome::Aborted);
    let record = w.record().await;
    assert_eq!(record.current.value.expose_secret(), first, "current again");
    assert_eq!(
        record.chosen().map(|v| v.expose_secret().to_string()),
        Some(second.clone()),
        "the promoted value is kept, to be set again"
    );
    w.engine_login().await.expect("I1");

    // The next run sets it again and completes.
    assert_eq!(w.rotate(false).await.unwrap(), Outcome::Rotated);
    let record = w.record().await;
    assert_eq!(record.phase(), "idle");
    assert_eq!(record.current.value.expose_secret(), second);
    let held = w.sim.secrets(APP);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].value, second, "the provider holds the stored value");
}
